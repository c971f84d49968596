"""``order="stream"`` of the webdataset backend: shards read front to back, split by worker.

The index mode (:mod:`pipelines.wds`) seeks to every sample, which is exact but slow where
random access is (network filesystems, object-store mounts). This mode reads each shard
sequentially (plain ustar reads, no seeks), the way webdataset users expect:

* **Shard order.** Epoch ``e`` of a stream shuffles the split's shard list with a generator
  seeded by ``(seed, stream name, e)``. With ``W = max(num_workers, 1)`` DataLoader workers per
  rank and ``G = world_size * W`` global workers, global worker ``g = rank * W + worker`` takes
  shards ``perm[g::G]`` of that epoch and streams them one after another. Every shard is read by
  exactly one worker per epoch, so the ranks see disjoint shards and, together, each sample of
  the split exactly once per epoch. A split with fewer than ``G`` shards is refused
  (:class:`ValueError`): some worker would have nothing to read.
* **Shuffle buffer.** Each worker passes its epoch's samples through a buffer of
  ``shuffle_buffer`` encoded samples seeded by ``(seed, stream, epoch, g)``, drained at the end
  of the epoch (so epochs do not mix). The training splits are written in a seeded shuffled
  order (docs/datasets.md, "Sample order"), so every shard is a uniform sample of its split and
  batches mix classes like a global permutation's whatever the buffer; the buffer only keeps
  batches from repeating across epochs. Datasets built before that are in class order: a batch
  then holds a few classes, and the reader warns, naming the ``bmb-shards`` rebuild command.
* **Batches.** Worker ``g`` cuts its infinite sample sequence (epoch after epoch) into batches
  and decodes them in the worker process; a batch may end one epoch and start the next. The
  DataLoader hands out worker batches round-robin, so rank step ``k`` is batch ``k // W`` of
  worker ``k % W``. Streams are infinite on every worker, so every rank has the same
  (unbounded) number of steps and none starves. When the shards divide evenly (``G`` divides
  the shard count, all shards hold the same number of samples and ``W * B`` divides a
  worker's epoch), the first ``per-rank epoch / B`` steps of every rank are exactly that rank's
  shards of epoch 0, and so on for later epochs; otherwise workers drift apart by whole samples
  between epochs (no sample is dropped or repeated within a worker's epoch).
* **Labels and indices** come from each sample's ``.cls`` and ``.idx`` members (checked
  against the manifest's recorded order), never from positions.
* **Corrupt input.** A truncated or malformed shard raises a :class:`ValueError` naming the
  shard and the last good key when the reader reaches it (there is no up-front index).
  An undecodable image raises naming shard and key, or with ``on_corrupt="skip"`` is replaced
  by a copy of a valid sample of the same batch (with that sample's own label and index),
  counted and logged -- the sample sequence never depends on decoding, which keeps resume exact.
* **URLs.** ``root`` may be a URL (``http(s)://``, webdataset ``pipe:`` commands, ``gs://``:
  :func:`shards.format.is_url`): the manifest and every shard are opened with
  ``webdataset.gopen`` and parsed by :func:`shards.format.tar_members`; a failed transfer raises
  like a malformed shard, naming the URL. The shards' sha256 are not checked (nor are local
  files' here). Evaluation of such a dataset streams too (:class:`WdsStreamEval`), and resume
  is the same as below: re-reading at most one epoch of a worker's shards means re-fetching it.
* **Resume.** The state records, per stream, the epoch the stream restarted from, the batches
  delivered since, and the earliest epoch still in progress. Restored with the same seed,
  world size, ``max(num_workers, 1)``, batch size and buffer, the stream continues *exactly*:
  each worker recomputes how many samples it had delivered, skips whole epochs by arithmetic
  over the manifest's shard counts and re-reads (without decoding) at most one epoch of its
  shards to rebuild the shuffle buffer. Restored under any other layout, resume is *not exact*:
  the stream restarts at the beginning of the earliest epoch still in progress, so no sample of
  that or a later epoch is lost, but some of that epoch's samples are seen twice.

The shard layer (shard order, reading one shard, the shuffle buffer, a split's shard list) is
:mod:`pipelines.stream_shards`, re-exported here; this module is the DataLoader side.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.base import Batch, ReaderSetup, StepAccounting, paired_batches
from pipelines.decode import Decoder, HostBatch
from pipelines.sampling import check_rank, stream_seed
from pipelines.shard_index import warn_if_class_sorted
from pipelines.stream_shards import (  # noqa: F401  (re-exported: defined here before the split)
    ShardOrder,
    _Sample,
    _SplitShards,
    iter_shard,
    load_split_shards,
    manifest_location,
    shuffled,
)
from shards.format import DataError, is_url, load_manifest

log = logging.getLogger(__name__)

DEFAULT_SHUFFLE_BUFFER = 1000
SPLITS = ("labeled", "unlabeled")
# State keys that must match for a resume to make sense at all (same data, same seed).
_SAME_DATA = ("seed", "n", "shards")
# State keys whose change makes a resume approximate (restart at the epoch in progress).
_SAME_LAYOUT = ("rank", "world_size", "num_workers", "batch_size", "shuffle_buffer")


def _worker_batches(k: int, logical: int, workers: int) -> int:
    """How many of a rank's first ``k`` batches came from (logical) worker ``logical``."""
    return (k - logical + workers - 1) // workers


class _StreamBatches(IterableDataset):
    """One stream's batches for one rank; each DataLoader worker is one global worker.

    ``start_epoch``/``start_batch`` place the stream: the rank's batch ``start_batch`` counted
    from the beginning of ``start_epoch`` is the first one yielded.
    """

    def __init__(
        self,
        split: _SplitShards,
        order: ShardOrder,
        *,
        batch_size: int,
        rank: int,
        workers: int,
        buffer: int,
        start_epoch: int,
        start_batch: int,
        decoder: Decoder,
    ) -> None:
        self.split, self.order = split, order
        self.batch_size, self.rank, self.workers, self.buffer = batch_size, rank, workers, buffer
        self.start_epoch, self.start_batch = start_epoch, start_batch
        self.decoder = decoder

    def _samples(self, g: int, epoch: int, skip: int) -> Iterator[_Sample]:
        sp, seed = self.split, self.order.seed
        while True:
            rng = random.Random(stream_seed(seed, f"{sp.name}/buffer/{g}", epoch))
            shards = self.order.shards(epoch, g)
            raw = (
                sample
                for s in shards
                for sample in iter_shard(
                    sp.paths[s],
                    s,
                    indices=sp.order[sp.first[s] : sp.first[s] + sp.counts[s]],
                    num_classes=sp.num_classes,
                )
            )
            for sample in shuffled(raw, self.buffer, rng):
                if skip:  # resume: rebuild the buffer's state without decoding
                    skip -= 1
                    continue
                yield sample
            epoch += 1

    def _decode(self, batch: list[_Sample]) -> HostBatch:
        paths = self.split.paths
        return self.decoder.batch(
            [s.image for s in batch],
            np.array([s.label for s in batch]),
            np.array([s.index for s in batch]),
            lambda j: f"{paths[batch[j].shard]}: sample {batch[j].key!r}",
        )

    def __iter__(self) -> Iterator[HostBatch | _ReaderError]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # Rotate worker ids so the DataLoader's first batch (from worker 0) is the rank's batch
        # ``start_batch``, which belongs to logical worker ``start_batch % W``.
        logical = (worker + self.start_batch) % self.workers
        g = self.rank * self.workers + logical
        done = _worker_batches(self.start_batch, logical, self.workers) * self.batch_size
        epoch, skip = self.order.locate(g, self.start_epoch, done)
        batch: list[_Sample] = []
        try:
            for sample in self._samples(g, epoch, skip):
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield self._decode(batch)
                    batch = []
        except ValueError as e:
            # Handed over as data, not raised: the main process raises it with a clean message,
            # and a DataLoader whose worker raised takes seconds to shut down.
            yield _ReaderError(str(e))


@dataclass(frozen=True)
class _ReaderError:
    """Bad input met by a reader (a worker, or the main process with ``num_workers=0``)."""

    message: str


def _checked(item: Any) -> HostBatch:
    """A worker's batch, or the bad data it reported (a :class:`~shards.format.DataError`)."""
    if isinstance(item, _ReaderError):
        raise DataError(item.message)
    return item


class WdsShardStream(StepAccounting):
    """Infinite :class:`~pipelines.base.TrainStream` streaming the tar shards (``order="stream"``).

    See the module docstring for the sampling, equal-step and resume guarantees.

    Args:
        root: dataset directory, or its URL (``http(s)://``, ``pipe:``, ... see
            :func:`shards.format.is_url`): ``manifest.json`` and the shards are read as streams.
        setup: rank, device, DataLoader workers per stream (each needs a shard of its own, see
            the module docstring) and the other reader options.
        labeled_batch, unlabeled_batch, seed: as for :func:`pipelines.build_train_stream`.
        shuffle_buffer: encoded samples each worker buffers for shuffling (``<= 1``: none).

    Raises:
        ValueError: a split with fewer shards than ``world_size * max(num_workers, 1)``, bad
            options, or a missing shard.
    """

    def __init__(
        self,
        root: Path | str,
        setup: ReaderSetup,
        *,
        labeled_batch: int,
        unlabeled_batch: int,
        seed: int,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    ) -> None:
        rank, world_size = setup.rank, setup.world_size
        check_rank(rank, world_size)
        if int(shuffle_buffer) < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if int(setup.num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {setup.num_workers}")
        self.root = root if is_url(root) else Path(root)
        self.device = torch.device(setup.device)
        if setup.imagenet_views is not None:
            raise ValueError("data.view_rule=authors_imagenet cuts each batch's crops keyed by its batch "
                             "number: use data.order=index (order=stream has no stable batch numbers)")
        manifest = load_manifest(self.root, strict=False)
        self.decoder = setup.decoder(manifest)
        self.num_workers, self.prefetch = int(setup.num_workers), int(setup.prefetch_factor)
        self.workers = max(self.num_workers, 1)  # num_workers=0 reads like one worker
        self.pin, self.buffer = setup.pin(), int(shuffle_buffer)
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.skipped = 0
        g_total = world_size * self.workers
        warn_if_class_sorted(self.root, manifest, "webdataset order='stream'", SPLITS)
        self._splits: dict[str, tuple[_SplitShards, ShardOrder, int]] = {}
        for name, batch in (("labeled", labeled_batch), ("unlabeled", unlabeled_batch)):
            if batch < 1:
                raise ValueError(f"{name}: batch size must be >= 1, got {batch}")
            sp = load_split_shards(self.root, name, manifest)
            if len(sp.paths) < g_total:
                raise ValueError(
                    f"split {name!r} has {len(sp.paths)} shard(s) but order='stream' needs one "
                    f"per global DataLoader worker: world_size * max(num_workers, 1) = "
                    f"{world_size} * {self.workers} = {g_total}. Rebuild the dataset with a "
                    f"smaller --shard-size (at most {max(sp.n // g_total, 1)} samples for this "
                    "split), use fewer num_workers, or use order='index'"
                )
            self._splits[name] = (sp, ShardOrder(name, sp.counts, self.seed, g_total), batch)
        # Position: rank batch ``_start_batch + _steps`` counted from the start of ``_start_epoch``.
        self._start_epoch = dict.fromkeys(self._splits, 0)
        self._start_batch = dict.fromkeys(self._splits, 0)
        self._steps = 0

    def _dataset(self, name: str) -> _StreamBatches:
        sp, order, batch = self._splits[name]
        return _StreamBatches(
            sp,
            order,
            batch_size=batch,
            rank=self.rank,
            workers=self.workers,
            buffer=self.buffer,
            start_epoch=self._start_epoch[name],
            start_batch=self._start_batch[name] + self._steps,
            decoder=self.decoder,
        )

    def __iter__(self) -> Iterator[Batch]:
        loaders = {}
        for name in self._splits:
            kw: dict[str, Any] = {}
            if self.num_workers > 0:
                kw.update(prefetch_factor=self.prefetch, persistent_workers=False)
            loader = DataLoader(
                self._dataset(name),
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=self.pin,
                **kw,
            )
            loaders[name] = map(_checked, loader)
        yield from paired_batches(
            loaders["labeled"], loaders["unlabeled"], self.device, self._count_step
        )

    def epoch_in_progress(self, name: str) -> int:
        """The earliest epoch of stream ``name`` that some worker of this rank has not finished
        delivering (counting batches handed out, not those prefetched)."""
        sp, order, batch = self._splits[name]
        k = self._start_batch[name] + self._steps
        epochs = []
        for logical in range(self.workers):
            g = self.rank * self.workers + logical
            done = _worker_batches(k, logical, self.workers) * batch
            epochs.append(order.locate(g, self._start_epoch[name], done)[0])
        return min(epochs)

    def _layout(self, name: str) -> dict[str, int]:
        """What a saved position of stream ``name`` depends on: the data and seed
        (:data:`_SAME_DATA`) and the reading layout (:data:`_SAME_LAYOUT`)."""
        sp, _, batch = self._splits[name]
        return {
            "seed": self.seed,
            "n": sp.n,
            "shards": len(sp.paths),
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.workers,
            "batch_size": batch,
            "shuffle_buffer": self.buffer,
        }

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": "webdataset", "order": "stream", "skipped": self.skipped}
        for name in self._splits:
            out[name] = {
                "start_epoch": self._start_epoch[name],
                "batches": self._start_batch[name] + self._steps,
                "epoch": self.epoch_in_progress(name),
                **self._layout(name),
            }
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position: exact under the same layout, else restart at the epoch in
        progress (see the module docstring).

        Raises:
            ValueError: a state from another backend or order, or for other data or seed.
        """
        if state.get("backend") != "webdataset" or state.get("order") != "stream":
            raise ValueError(
                f"reader state is from backend {state.get('backend')!r} order "
                f"{state.get('order', 'index')!r}, not webdataset order 'stream'"
            )
        for name in self._splits:
            st, now = state[name], self._layout(name)
            for key in _SAME_DATA:
                if st[key] != now[key]:
                    raise ValueError(
                        f"{name}: cannot restore reader state: {key}={st[key]} in the "
                        f"checkpoint but {now[key]} now"
                    )
            changed = [k for k in _SAME_LAYOUT if st[k] != now[k]]
            if changed:
                log.warning(
                    "%s: reader layout changed (%s); resume is approximate: restarting at the "
                    "beginning of epoch %d",
                    name,
                    ", ".join(f"{k} {st[k]} -> {now[k]}" for k in changed),
                    st["epoch"],
                )
                self._start_epoch[name], self._start_batch[name] = int(st["epoch"]), 0
            else:
                self._start_epoch[name] = int(st["start_epoch"])
                self._start_batch[name] = int(st["batches"])
        self._steps = 0
        self.skipped = int(state.get("skipped", 0))


class WdsStreamEval:
    """One pass over a split read as a stream (an :class:`~pipelines.base.EvalSource`), for a
    dataset at a URL, which cannot be indexed (no seeks).

    Rank ``r`` of ``R`` takes the samples at file positions ``r, r + R, ...`` (the shards read
    in manifest order; :class:`~pipelines.wds.WdsEval` splits by stable index instead, so a
    rank's share differs, but together the ranks evaluate every sample exactly once either
    way), padded to ``ceil(n / R)`` with a repeat marked invalid. Every rank reads the whole
    split and decodes its share in the main process (no DataLoader workers).

    Raises:
        ValueError: bad options or an unknown split (at construction); a shard that cannot be
            read, is truncated or holds other samples than the manifest says (when read),
            naming its URL.
    """

    def __init__(
        self, root: Path | str, split: str, setup: ReaderSetup, *, batch_size: int
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_rank(setup.rank, setup.world_size)
        manifest = load_manifest(root, strict=False)
        self.decoder = setup.decoder(manifest)
        self.split = load_split_shards(root, split, manifest)
        self.rank, self.world_size, self.batch_size = setup.rank, setup.world_size, batch_size
        self.per_rank = -(-self.split.n // self.world_size)
        self.device = torch.device(setup.device)
        self.skipped = 0

    def __len__(self) -> int:
        return -(-self.per_rank // self.batch_size)

    def _samples(self) -> Iterator[tuple[_Sample, bool]]:
        sp, pos, mine, pad = self.split, 0, 0, None
        for s, path in enumerate(sp.paths):
            indices = sp.order[sp.first[s] : sp.first[s] + sp.counts[s]]
            for sample in iter_shard(path, s, indices=indices, num_classes=sp.num_classes):
                if pad is None or (pos == self.rank):
                    pad = sample  # this rank's first sample (the split's first for a rank >= n)
                if pos % self.world_size == self.rank:
                    yield sample, True
                    mine += 1
                pos += 1
        for _ in range(self.per_rank - mine):
            yield pad, False

    def _batch(self, items: list[tuple[_Sample, bool]]) -> tuple[torch.Tensor, ...]:
        paths = self.split.paths
        x, y, _, skipped = self.decoder.batch(
            [s.image for s, _ in items],
            np.array([s.label for s, _ in items]),
            np.array([s.index for s, _ in items]),
            lambda j: f"{paths[items[j][0].shard]}: sample {items[j][0].key!r}",
        )
        if skipped:
            self.skipped += int(skipped)
            log.warning("%d corrupt evaluation images skipped in this pass", self.skipped)
        x, y = x.to(self.device), y.to(self.device)
        if self.world_size == 1:
            return x, y
        return x, y, torch.tensor([v for _, v in items], dtype=torch.bool, device=self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        self.skipped = 0
        items: list[tuple[_Sample, bool]] = []
        for item in self._samples():
            items.append(item)
            if len(items) == self.batch_size:
                yield self._batch(items)
                items = []
        if items:
            yield self._batch(items)
