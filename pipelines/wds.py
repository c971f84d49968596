"""The ``webdataset`` backend: the tar shards, decoded in DataLoader workers.

Sampling is the tensor backend's (:class:`~pipelines.sampling.IndexStream`: a global per-epoch
permutation, each rank a contiguous slice of every global batch, batches running across epochs), applied to the tar
shards through a header index (:mod:`pipelines.shard_index`): each worker reads its batch's
samples with one seek each and decodes them. Consequences:

* the same seed gives the same batches as the tensor backend, on any number of workers;
* every rank has the same (infinite) number of steps, and no rank can starve for shards;
* resume is exact and O(1), at any world size with the same global batch: the state is the
  number of global batches each stream has delivered;
* shuffling is uniform over the whole split whatever order the shards hold their samples in
  (samples are found by their ``.idx``), so datasets built before the training splits were
  written shuffled (class order) mix just as well here.

Batch ``k`` of a rank is computed by whichever DataLoader worker gets it, so decode runs in
parallel in ``num_workers`` processes with pinned memory and ``prefetch_factor`` batches queued.

That is the default, ``order="index"``. Where random access is slow (network filesystems,
object stores) ``order="stream"`` reads every shard front to back instead, shards split by
global DataLoader worker, with a shuffle buffer (:mod:`pipelines.wds_stream`); its batches
differ from the tensor backend's and its resume is exact only under the same worker layout.
Only that order reads a dataset given as a URL (``http(s)://``, ``pipe:``, ...: no seeks);
evaluation of such a dataset streams each split too (:class:`~pipelines.wds_stream.WdsStreamEval`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipelines.base import Batch, ReaderSetup, StepAccounting, TrainStream, paired_batches
from pipelines.decode import Decoder, HostBatch
from pipelines.sampling import IndexStream, check_rank, eval_rank_indices
from pipelines.shard_index import SplitIndex, build_index
from shards.format import DataError, is_url, load_manifest

log = logging.getLogger(__name__)


class _SampleReader:
    """Reads and decodes samples of one split; lives in each worker (file handles are lazy)."""

    def __init__(self, index: SplitIndex, decoder: Decoder):
        self.index, self.decoder = index, decoder
        self._files: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = {}  # open files do not travel to workers
        return state

    def _read(self, i: int) -> bytes:
        s = int(self.index.shard[i])
        f = self._files.get(s)
        if f is None:
            f = self._files[s] = open(self.index.shards[s], "rb")  # noqa: SIM115
        f.seek(int(self.index.offset[i]))
        size = int(self.index.size[i])
        data = f.read(size)
        if len(data) != size:
            raise DataError(
                f"{self.index.shards[s]}: sample {self.index.keys[i]!r} truncated "
                f"({len(data)} of {size} bytes)"
            )
        return data

    def _where(self, i: int) -> str:
        return f"{self.index.shards[self.index.shard[i]]}: sample {self.index.keys[i]!r}"

    def read_batch(self, idx: np.ndarray, key: int | None = None) -> HostBatch:
        """Read and decode samples ``idx`` (:meth:`~pipelines.decode.Decoder.batch`; ``key``:
        the batch's number, which keys the reader-side crops)."""
        idx = np.asarray(idx, dtype=np.int64)
        images = [self._read(int(i)) for i in idx]
        return self.decoder.batch(
            images, self.index.labels[idx], idx, lambda j: self._where(int(idx[j])), key
        )

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class _TrainBatches(Dataset):
    """Map-style dataset: item ``k`` is the rank's ``k``-th batch (indices are computed, not
    stored, so any worker can produce any batch)."""

    def __init__(self, reader: _SampleReader, stream: IndexStream) -> None:
        self.reader, self.stream = reader, stream
        self._cache: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:  # pragma: no cover - infinite; DataLoader uses the sampler
        raise TypeError("infinite")

    def indices_of(self, k: int) -> np.ndarray:
        self.stream.batches = k
        return self.stream.next_indices().numpy()

    def __getitem__(self, k: int):
        return self.reader.read_batch(self.indices_of(k), key=k)


class _FromStep(Sampler[int]):
    """``start, start + 1, ...`` forever."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        k = self.start
        while True:
            yield k
            k += 1


def _loader(ds: Dataset, sampler: Any, num_workers: int, pin: bool, prefetch: int) -> DataLoader:
    kw: dict[str, Any] = {}
    if num_workers > 0:
        kw.update(prefetch_factor=prefetch, persistent_workers=False)
    return DataLoader(
        ds, batch_size=None, sampler=sampler, num_workers=num_workers, pin_memory=pin, **kw
    )


class WdsStream(StepAccounting):
    """Infinite, resumable :class:`~pipelines.base.TrainStream` over the tar shards.

    Args:
        root: dataset directory.
        setup: rank, device, decode workers (per stream) and the other reader options.
        labeled_batch, unlabeled_batch, seed: as for :func:`pipelines.build_train_stream`.
    """

    def __init__(
        self, root: Path, setup: ReaderSetup, *, labeled_batch: int, unlabeled_batch: int, seed: int
    ) -> None:
        rank, world_size = setup.rank, setup.world_size
        check_rank(rank, world_size)
        self.root, self.device = Path(root), torch.device(setup.device)
        manifest = load_manifest(self.root, strict=False)
        self.num_workers, self.prefetch = int(setup.num_workers), int(setup.prefetch_factor)
        self.pin = setup.pin()
        self.skipped = 0
        self._parts = {}
        for name, batch in (("labeled", labeled_batch), ("unlabeled", unlabeled_batch)):
            index = build_index(self.root, name, manifest)
            stream = IndexStream(
                len(index), batch, seed=seed, stream=name, rank=rank, world_size=world_size
            )
            self._parts[name] = (_SampleReader(index, setup.decoder(manifest, name)), stream)
        self._steps = 0  # batches handed out since construction / restore
        self._base = {name: s.batches for name, (_, s) in self._parts.items()}

    def _batch_number(self, name: str) -> int:
        """Global batch counter of a stream at its restored position."""
        return self._base[name]

    def __iter__(self) -> Iterator[Batch]:
        loaders = {}
        for name, (reader, stream) in self._parts.items():
            # A copy of its own: _TrainBatches positions it at each batch it computes.
            ds = _TrainBatches(reader, copy.copy(stream))
            start = self._batch_number(name) + self._steps
            loaders[name] = iter(
                _loader(ds, _FromStep(start), self.num_workers, self.pin, self.prefetch)
            )
        yield from paired_batches(
            loaders["labeled"], loaders["unlabeled"], self.device, self._count_step
        )

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": "webdataset", "skipped": self.skipped}
        for name, (_, stream) in self._parts.items():
            out[name] = {**stream.state_dict(), "batches": self._batch_number(name) + self._steps}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("backend") != "webdataset":
            raise ValueError(
                f"reader state is from backend {state.get('backend')!r}, not 'webdataset'"
            )
        if state.get("order", "index") != "index":
            raise ValueError(
                f"reader state is from webdataset order {state['order']!r}, not 'index'"
            )
        for name, (_, stream) in self._parts.items():
            stream.load_state_dict(state[name])
            self._base[name] = stream.batches
        self._steps = 0
        self.skipped = int(state.get("skipped", 0))


class _EvalBatches(Dataset):
    def __init__(self, reader: _SampleReader, idx: torch.Tensor, valid: torch.Tensor, bs: int):
        self.reader, self.idx, self.valid, self.bs = reader, idx, valid, bs

    def __len__(self) -> int:
        return -(-self.idx.numel() // self.bs)

    def __getitem__(self, j: int):
        sl = slice(j * self.bs, (j + 1) * self.bs)
        x, y, _, skipped = self.reader.read_batch(self.idx[sl].numpy())
        return x, y, self.valid[sl], skipped


class WdsEval:
    """One pass over a split's shards (an :class:`~pipelines.base.EvalSource`); same batch
    layout and rank split as :class:`~pipelines.tensor.TensorEval`.

    With ``on_corrupt="skip"``, :attr:`skipped` counts the corrupt images replaced in the
    latest pass.
    """

    def __init__(self, root: Path, split: str, setup: ReaderSetup, *, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        manifest = load_manifest(Path(root), strict=False)
        decoder = setup.decoder(manifest)
        index = build_index(Path(root), split, manifest)
        reader = _SampleReader(index, decoder)
        idx, valid = eval_rank_indices(len(index), setup.rank, setup.world_size)
        self.device, self.world_size = torch.device(setup.device), setup.world_size
        self._ds = _EvalBatches(reader, idx, valid, batch_size)
        self._args = (setup.num_workers, setup.pin(), setup.prefetch_factor)
        self.skipped = 0

    def __len__(self) -> int:
        return len(self._ds)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        num_workers, pin, prefetch = self._args
        loader = _loader(
            self._ds, range(len(self._ds)), min(num_workers, len(self._ds)), pin, prefetch
        )
        self.skipped = 0
        for x, y, valid, skipped in loader:
            if skipped:
                self.skipped += int(skipped)
                log.warning("%d corrupt evaluation images skipped in this pass", self.skipped)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield (x, y) if self.world_size == 1 else (x, y, valid.to(self.device))


_ORDERS = ("index", "stream")


def build_train(
    root: Path | str,
    *,
    labeled_batch: int,
    unlabeled_batch: int,
    seed: int = 0,
    order: str = "index",
    shuffle_buffer: int | None = None,
    **setup: Any,
) -> TrainStream:
    """The training stream: ``order="index"`` (default, :class:`WdsStream`: seek per sample,
    exact tensor-backend batches) or ``order="stream"``
    (:class:`~pipelines.wds_stream.WdsShardStream`: shards read sequentially per worker with a
    shuffle buffer of ``shuffle_buffer`` samples, default 1000). ``setup``: the fields of
    :class:`~pipelines.base.ReaderSetup`."""
    if order not in _ORDERS:
        raise ValueError(f"webdataset order must be one of {_ORDERS}, got {order!r}")
    if is_url(root) and order != "stream":
        raise ValueError(
            f"dataset {root} is a URL: the webdataset backend reads URLs only with "
            f"order='stream' (data.order=stream), not order={order!r}, which seeks in the shards"
        )
    batches = dict(labeled_batch=labeled_batch, unlabeled_batch=unlabeled_batch, seed=seed)
    if order == "stream":
        from pipelines.wds_stream import DEFAULT_SHUFFLE_BUFFER, WdsShardStream

        buffer = DEFAULT_SHUFFLE_BUFFER if shuffle_buffer is None else shuffle_buffer
        return WdsShardStream(root, ReaderSetup(**setup), shuffle_buffer=buffer, **batches)
    if shuffle_buffer is not None:
        raise ValueError(
            f"shuffle_buffer={shuffle_buffer} only applies to order='stream' (order='index' "
            "samples a uniform permutation)"
        )
    return WdsStream(root, ReaderSetup(**setup), **batches)


def build_eval(root: Path | str, split: str, *, batch_size: int, **setup: Any) -> Any:
    """One pass over ``split`` (a URL: streamed, :class:`~pipelines.wds_stream.WdsStreamEval`);
    ``setup``: the fields of :class:`~pipelines.base.ReaderSetup`."""
    if is_url(root):
        from pipelines.wds_stream import WdsStreamEval

        return WdsStreamEval(root, split, ReaderSetup(**setup), batch_size=batch_size)
    return WdsEval(root, split, ReaderSetup(**setup), batch_size=batch_size)
