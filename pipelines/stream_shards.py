"""The shard layer of the stream reader (:mod:`pipelines.wds_stream`): which shards each
global worker reads in which epoch and where a resumed worker stands (:class:`ShardOrder`),
one shard's samples read front to back and checked against the manifest (:func:`iter_shard`),
the shuffle buffer (:func:`shuffled`) and a split's shard list (:func:`load_split_shards`).

Split out of :mod:`pipelines.wds_stream` along its seam: everything here is plain data over
:mod:`shards.format` (no torch, no DataLoader), shared by the training stream and the
evaluation reader; :mod:`pipelines.wds_stream` re-exports every name.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipelines.sampling import epoch_permutation
from shards.format import (
    MANIFEST,
    DataError,
    dataset_file,
    is_url,
    join_url,
    sample_fields,
    shard_samples,
    split_order,
)


@dataclass(frozen=True)
class ShardOrder:
    """Which shards each global worker streams in each epoch, and how many samples that is.

    Args:
        name: stream name (``"labeled"``/``"unlabeled"``), mixed into the seeds.
        counts: int64 ``(S,)`` samples per shard, in manifest order.
        seed: base seed of the run.
        global_workers: ``G = world_size * max(num_workers, 1)``.
    """

    name: str
    counts: np.ndarray
    seed: int
    global_workers: int

    def shards(self, epoch: int, g: int) -> list[int]:
        """Shard numbers global worker ``g`` streams in ``epoch``, in reading order."""
        perm = epoch_permutation(len(self.counts), self.seed, f"{self.name}/shards", epoch)
        return perm[g :: self.global_workers].tolist()

    def epoch_size(self, epoch: int, g: int) -> int:
        """Samples global worker ``g`` delivers in ``epoch``."""
        return int(self.counts[self.shards(epoch, g)].sum())

    def locate(self, g: int, start_epoch: int, consumed: int) -> tuple[int, int]:
        """Where worker ``g`` is after ``consumed`` samples counted from ``start_epoch``.

        Returns:
            ``(epoch, offset)``: the epoch of its next sample and that sample's position within
            the worker's share of the epoch.
        """
        epoch = start_epoch
        while True:
            size = self.epoch_size(epoch, g)
            if consumed < size:
                return epoch, consumed
            consumed -= size
            epoch += 1


class _Sample(NamedTuple):
    shard: int
    key: str
    image: bytes
    label: int
    index: int


def iter_shard(
    path: Path | str,
    shard: int,
    *,
    indices: np.ndarray,
    num_classes: int | None,
) -> Iterator[_Sample]:
    """Stream one shard's samples in file order (no seeks).

    Args:
        path: the tar file, or its URL (:func:`shards.format.open_url`).
        shard: its number in the split (carried along for error messages).
        indices: int64 ``(count,)`` stable indices of its samples in file order (the
            manifest's order record); ``count`` is the number of samples it must hold.
        num_classes: labels must lie in ``[0, num_classes)`` when given.

    Raises:
        ValueError: truncated or malformed tar, a sample lacking its image/``.cls``/``.idx``,
            a bad label or index, or a sample count other than ``count`` -- naming the shard
            and the key.
    """
    seen = 0
    for key, _, data in shard_samples(path):
        want = int(indices[seen]) if seen < len(indices) else None
        img, label, index = sample_fields(path, key, data, data, want)
        if num_classes is not None and not 0 <= label < num_classes:
            raise DataError(f"{path}: sample {key!r} label {label} outside [0, {num_classes})")
        yield _Sample(shard, key, data[img], label, index)
        seen += 1
    if seen != len(indices):
        raise DataError(
            f"{path}: {seen} samples, manifest says {len(indices)} (truncated or foreign shard?)"
        )


def shuffled(samples: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items, draining it at the end.

    Each incoming item, once the buffer is full, replaces a uniformly chosen buffered item,
    which is yielded. ``size <= 1`` passes the stream through unchanged.
    """
    if size <= 1:
        yield from samples
        return
    buf: list[Any] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        j = rng.randrange(size)
        out, buf[j] = buf[j], s
        yield out
    rng.shuffle(buf)
    yield from buf


@dataclass(frozen=True)
class _SplitShards:
    """One split as the stream reader needs it (picklable: it travels to the workers)."""

    name: str
    paths: tuple[Path | str, ...]  # files, or URLs (read through webdataset.gopen)
    counts: np.ndarray  # int64 (S,)
    first: np.ndarray  # int64 (S,) file position of each shard's first sample
    order: np.ndarray  # int64 (N,) stable index of the sample at each file position
    num_classes: int | None

    @property
    def n(self) -> int:
        return int(self.counts.sum())


def manifest_location(root: Path | str) -> Path | str:
    """The manifest of the dataset at ``root`` (a directory or a URL), for messages."""
    return join_url(root, MANIFEST) if is_url(root) else Path(root) / MANIFEST


def load_split_shards(root: Path | str, split: str, manifest: dict[str, Any]) -> _SplitShards:
    """The shard list of ``split`` from the manifest; checks that local files exist (a URL's
    shards are checked when read: a missing one is an error naming its URL then).

    Raises:
        ValueError: unknown split, a missing shard file or an empty shard, naming it.
    """
    if split not in manifest["splits"]:
        raise ValueError(
            f"{manifest_location(root)}: no split {split!r} (has {sorted(manifest['splits'])})"
        )
    info = manifest["splits"][split]
    paths, counts = [], []
    for entry in info["shards"]:
        path: Path | str
        if is_url(root):
            path = join_url(str(root), entry["file"])
        else:
            path = dataset_file(root, entry["file"])
            if not path.is_file():
                raise ValueError(f"missing shard {path} (listed in manifest split {split!r})")
        if int(entry["count"]) < 1:
            raise ValueError(f"{path}: manifest lists an empty shard (count {entry['count']})")
        paths.append(path)
        counts.append(int(entry["count"]))
    c = np.asarray(counts, dtype=np.int64)
    if "count" in info and int(info["count"]) != int(c.sum()):
        raise ValueError(
            f"{manifest_location(root)}: split {split!r} has {info['count']} samples but its "
            f"shards' counts sum to {int(c.sum())}"
        )
    first = np.concatenate([[0], np.cumsum(c)[:-1]]).astype(np.int64)
    num_classes = manifest.get("num_classes")
    order = split_order(manifest, split) if "count" in info else np.arange(int(c.sum()))
    return _SplitShards(
        split,
        tuple(paths),
        c,
        first,
        order,
        None if num_classes is None else int(num_classes),
    )
