"""The ``ffcv`` backend with reader-cut views (``data.view_rule=authors_imagenet``): the images
are read straight from the ``.beton`` and cut by the webdataset reader's own code.

Why not an FFCV decoder. The views need, per sample, crop places keyed by the batch's number
and the sample's row in the global batch (:mod:`pipelines.imagenet_views`), a resize of the
whole image to ``(256, int(256 L / S))`` and then windows of it. FFCV 1.0.2's decoders see only
the batch's row ids (no per-batch state from Python), draw their crops from numba's global
random state, and resize a crop *region* of the source with OpenCV's ``INTER_AREA``
(``resize_crop``), which is not "resize, then cut": a window of the resized image starts at a
fractional source pixel. Passing crop tables through a side buffer into a compiled decoder, and
resizing the whole image in a second buffer, would work but would give other pixels than the
webdataset and DALI readers and tie us to FFCV internals that change between releases.

What this module does instead. The ``.beton`` is a memory-mapped file: its header gives every
row's image mode (``jpg``/``raw``), stored size and data pointer, and the allocation table the
size at each pointer (:class:`BetonImages`, via FFCV's own :class:`~ffcv.reader.Reader`). A
JPEG row is handed as bytes to :func:`~pipelines.imagenet_views.decode_views` -- the webdataset
reader's function; a raw row (PNG datasets, lossless) goes to
:func:`~pipelines.imagenet_views.cut_views` as pixels. Batches follow the ``exact`` order of
:mod:`pipelines.ffcv_backend` (the tensor/webdataset backends' global order), the crop places
use the same key ``(seed, stream, batch, rank x local batch + j)``, so for the same sample in
the same batch and row the crops are the webdataset reader's, in a resumed run and for any
world size. Pixels: a raw row gives the webdataset strip exactly; a JPEG row differs by the
builder's re-encoding only (FFCV stores JPEGs re-encoded at quality 95,
:mod:`shards.ffcv_out`), never by geometry. Decoding runs in ``num_workers`` threads per stream
(PIL releases the GIL while it decodes and resizes), batches decoded ahead in order.

Cost (2026-12-08, 500 x 375 JPEGs, 256 / 224, one weak + two strong crops): 3.3 ms of CPU per
image here against 3.1 ms for the webdataset reader (the re-encoded JPEGs are a third larger);
on 2 loaded cores with 2 threads / 2 workers both delivered 150-310 images/s, about the same
(FFCV's own numba decoder of a 256 centre square did 70-160 images/s on the same files, as it
decodes at full size).
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ffcv.reader import Reader

from pipelines.base import Batch, ReaderSetup, to_device
from pipelines.ffcv_files import beton_path, rows_of_indices
from pipelines.imagenet_views import ImageNetViews, cut_views, decode_views, resized_size
from pipelines.sampling import IndexStream, check_rank, eval_rank_indices
from pipelines.shard_index import split_info
from shards.format import DataError, load_manifest
from shards.images import MAX_PIXELS, check_pixels

_JPG, _RAW = 0, 1  # FFCV's IMAGE_MODES


class BetonImages:
    """The images and labels of a ``.beton``, addressed by stable index, read from the mapped file.

    Args:
        path: the ``.beton`` (fields ``image``, ``label``, ``index``, :mod:`shards.ffcv_out`).
    """

    def __init__(self, path: Path, max_pixels: int = MAX_PIXELS) -> None:
        self.path, self.max_pixels = Path(path), max_pixels
        reader = Reader(str(self.path))
        field = {name: reader.metadata[f"f{k}"] for k, name in enumerate(reader.field_names)}
        self.rows = rows_of_indices(self.path)  # (N,) row of each stable index
        self.image = field["image"]  # (N,) mode, width, height, data_ptr per row
        self.labels = np.asarray(field["label"], dtype=np.int64)[self.rows]  # (N,) by index
        table = reader.alloc_table
        self._size = dict(zip(table["ptr"].tolist(), table["size"].tolist()))
        self._file = np.memmap(self.path, dtype=np.uint8, mode="r")

    def __len__(self) -> int:
        return len(self.rows)

    def stored(self, i: int) -> tuple[int, int, int, np.ndarray]:
        """Sample ``i``'s image as the file holds it: ``(mode, height, width, uint8 bytes)``,
        mode 0 a JPEG, 1 raw ``(height, width, 3)`` pixels."""
        row = int(self.rows[i])
        mode, w, h, ptr = (int(self.image[row][k]) for k in ("mode", "width", "height", "data_ptr"))
        return mode, h, w, self._file[ptr : ptr + self._size[ptr]]

    def views(self, i: int, views: ImageNetViews, rng: np.random.Generator | None) -> np.ndarray:
        """Sample ``i``'s strip: uint8 ``views.out_hw + (3,)`` (see the module docstring)."""
        try:
            mode, h, w, data = self.stored(i)
            check_pixels(h, w, self.max_pixels)  # the size the file records, before decoding
            if mode == _JPG:
                return decode_views(data.tobytes(), views, rng, self.max_pixels)
            if mode != _RAW or data.size != h * w * 3:
                raise ValueError(f"image mode {mode}, {data.size} bytes for {h}x{w}")
            from PIL import Image

            rgb = Image.fromarray(np.asarray(data).reshape(h, w, 3))
            return cut_views(rgb, resized_size(h, w, views.resize), views, rng)
        except Exception as e:  # PIL raises many types for corrupt data
            raise DataError(f"{self.path}: row {self.rows[i]} (index {i}): cannot decode image ({e})") from e

    def batch(self, idx: np.ndarray, views: ImageNetViews, key: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``idx`` (this rank's part of global batch ``key``; ``None``: evaluation) as
        ``(uint8 (B, 3, H, W), int64 (B,) labels)``."""
        out = np.stack([self.views(int(i), views, views.rng(key, j, len(idx)) if key is not None else None)
                        for j, i in enumerate(idx)])  # (B, H, W, 3)
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(self.labels[idx])


def _ahead(pool: ThreadPoolExecutor, jobs: Iterator[Any], work: Any, depth: int) -> Iterator[Any]:
    """``work(job)`` for each job, computed ``depth`` jobs ahead in ``pool``, in order."""
    queue: deque[Future] = deque()
    for job in jobs:
        queue.append(pool.submit(work, job))
        if len(queue) > depth:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


class FfcvViewsStream:
    """Infinite, resumable :class:`~pipelines.base.TrainStream` of reader-cut views over the
    ``.beton`` files (``order="exact"`` only; same state as :class:`~pipelines.ffcv_backend.FfcvStream`).

    Args:
        root: dataset directory (built with ``--formats ffcv``).
        setup: placement, ``num_workers`` (decode threads per stream), ``imagenet_views`` and
            ``num_strong`` (see :class:`~pipelines.base.ReaderSetup`); ``os_cache`` is not read
            (the file is memory-mapped, so the OS page cache holds it).
        labeled_batch, unlabeled_batch, seed: as for :func:`pipelines.build_train_stream`.
    """

    def __init__(self, root: Path, setup: ReaderSetup, *, labeled_batch: int, unlabeled_batch: int,
                 seed: int = 0) -> None:
        check_rank(setup.rank, setup.world_size)
        if setup.order not in (None, "exact"):
            raise ValueError(f"data.view_rule=authors_imagenet keys each batch's crops by its number in the "
                             f"exact order: the ffcv backend needs order='exact', not {setup.order!r}")
        root = Path(root)
        manifest = load_manifest(root)
        self.device, self.threads = torch.device(setup.device), max(int(setup.num_workers), 1)
        self._parts: dict[str, tuple[BetonImages, ImageNetViews, IndexStream]] = {}
        for name, batch in (("labeled", labeled_batch), ("unlabeled", unlabeled_batch)):
            images = BetonImages(beton_path(root, name, manifest, setup.max_pixels), setup.max_pixels)
            stream = IndexStream(len(images), batch, seed=seed, stream=name, rank=setup.rank,
                                 world_size=setup.world_size)
            self._parts[name] = (images, setup.stream_views(manifest, name), stream)

    def _batches(self, name: str, pool: ThreadPoolExecutor) -> Iterator[tuple[torch.Tensor, ...]]:
        """Stream ``name``'s ``(images, labels, indices)`` from its position on, decoded ahead."""
        images, views, stream = self._parts[name]

        def jobs(s: IndexStream) -> Iterator[tuple[int, np.ndarray]]:  # (batch number, indices)
            while True:
                k = s.batches
                yield k, s.next_indices().numpy()

        def read(job: tuple[int, np.ndarray]) -> tuple[torch.Tensor, ...]:
            k, idx = job
            return (*images.batch(idx, views, k), torch.from_numpy(idx))

        # A copy of its own: the jobs run ahead of the position the state records.
        return _ahead(pool, jobs(copy.copy(stream)), read, self.threads)

    def __iter__(self) -> Iterator[Batch]:
        with ThreadPoolExecutor(self.threads) as pool_l, ThreadPoolExecutor(self.threads) as pool_u:
            lab, unl = self._batches("labeled", pool_l), self._batches("unlabeled", pool_u)
            d = self.device
            while True:
                (x_l, y_l, _), (x_u, y_u, i_u) = next(lab), next(unl)
                for _, _, s in self._parts.values():
                    s.batches += 1
                yield Batch(to_device(x_l, d), to_device(y_l, d), to_device(x_u, d), to_device(i_u, d),
                            to_device(y_u, d))

    def state_dict(self) -> dict[str, Any]:
        return {"backend": "ffcv", "order": "exact", **{n: s.state_dict() for n, (_, _, s) in self._parts.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("backend") != "ffcv" or state.get("order") != "exact":
            raise ValueError(f"reader state is from backend {state.get('backend')!r} order "
                             f"{state.get('order')!r}, not ffcv order 'exact'")
        for name, (_, _, s) in self._parts.items():
            s.load_state_dict(state[name])


class FfcvViewsEval:
    """One pass of centre crops over a split's ``.beton`` (an :class:`~pipelines.base.EvalSource`;
    batches and rank split as :class:`~pipelines.ffcv_backend.FfcvEval`)."""

    def __init__(self, root: Path, split: str, setup: ReaderSetup, *, batch_size: int) -> None:
        root = Path(root)
        manifest = load_manifest(root)
        self.images = BetonImages(beton_path(root, split, manifest, setup.max_pixels), setup.max_pixels)
        n = int(split_info(root, manifest, split)["count"])
        self._idx, self._valid = eval_rank_indices(n, setup.rank, setup.world_size)
        self.views = setup.stream_views(manifest, "eval")
        self.device, self.world_size, self.batch_size = torch.device(setup.device), setup.world_size, batch_size
        self.threads = max(int(setup.num_workers), 1)

    def __len__(self) -> int:
        return -(-self._idx.numel() // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        b = self.batch_size
        starts = range(0, self._idx.numel(), b)
        with ThreadPoolExecutor(self.threads) as pool:
            read = lambda s: self.images.batch(self._idx[s : s + b].numpy(), self.views, None)  # noqa: E731
            for s, (x, y) in zip(starts, _ahead(pool, iter(starts), read, self.threads)):
                x, y = to_device(x, self.device), to_device(y, self.device)
                yield (x, y) if self.world_size == 1 else (x, y, self._valid[s : s + b].to(self.device))
