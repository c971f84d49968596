"""The ``ffcv`` backend: the ``.beton`` files (fields ``image``, ``label``, ``index``).

Orders (option ``order``):

* ``"exact"`` (default): a custom FFCV traversal order that returns this rank's share of the
  tensor backend's epoch permutation, so batches equal the tensor/webdataset backends' for the
  same seed, and resume is exact and O(1) (the first resumed epoch starts at the position).
* ``"quasi_random"``: FFCV's page-aware order (needs ``os_cache=False``; for datasets larger
  than RAM) over this rank's static share ``r::R``; FFCV seeds it from ``seed + epoch``.
  Resume is exact too but costs decoding the skipped part of the epoch.

Rows of a ``.beton`` are in the tar shards' file order (shuffled for the training splits, so
``quasi_random``'s page-wise reading mixes classes); the stable index of each row is its
``index`` field, read once from the file's metadata, and the ``exact`` order and evaluation
passes map indices to rows through it.

FFCV reuses its batch buffers, so every batch is copied out (``contiguous`` NCHW) before it is
kept. Batches run across epoch boundaries like the other backends.

With ``imagenet_views`` (``data.view_rule=authors_imagenet``) :func:`build_train` and
:func:`build_eval` hand over to :mod:`pipelines.ffcv_views` (the webdataset reader's crops).
Both read the files through :mod:`pipelines.ffcv_files`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import ToTensor, ToTorchImage

from pipelines.base import Batch, ReaderSetup
from pipelines.decode import output_size
from pipelines.ffcv_files import beton_path, rows_of_indices
from pipelines.sampling import IndexStream, check_rank, eval_rank_indices
from pipelines.shard_index import split_info
from shards.format import load_manifest

_ORDERS = ("exact", "quasi_random")


def _pipelines(manifest: dict[str, Any], load_size: int | None) -> dict[str, list]:
    if manifest.get("image_size"):
        decoder = SimpleRGBImageDecoder()
    else:
        # ratio 1: the largest centered square, resized to load_size == resize the shorter side
        # then center crop, like the other backends.
        decoder = CenterCropRGBImageDecoder(output_size(manifest, load_size), ratio=1.0)
    return {
        "image": [decoder, ToTensor(), ToTorchImage()],
        "label": [IntDecoder(), ToTensor()],
        "index": [IntDecoder(), ToTensor()],
    }


class _FixedOrder:
    """Stands in for an FFCV ``TraversalOrder``: returns the order set for the next epoch.

    (FFCV 1.0.2's ``Loader`` rejects TraversalOrder subclasses passed as ``order`` -- its
    ``isinstance`` check tests a class -- so the instance is swapped in after construction.)
    """

    def __init__(self) -> None:
        self.order = np.zeros(0, dtype=np.int64)

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.order


class _Split:
    """One infinite stream (labeled or unlabeled) over a .beton."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        stream: IndexStream,
        *,
        order: str,
        os_cache: bool,
        num_workers: int,
        load_size: int | None,
    ) -> None:
        self.stream, self.order = stream, order
        s = stream
        # Exact order: any sample may fall in this rank's slice of a global batch. Quasi-random:
        # FFCV's own order over a disjoint share of the split per rank (not world-size invariant).
        indices = (
            np.arange(s.n) if order == "exact" else np.arange(s.rank, s.n, s.world_size)[: s.n // s.world_size]
        )
        ffcv_order = OrderOption.SEQUENTIAL if order == "exact" else OrderOption.QUASI_RANDOM
        self.loader = Loader(
            str(path),
            batch_size=s.batch_size,
            num_workers=num_workers,
            order=ffcv_order,
            os_cache=os_cache,
            drop_last=False,
            seed=s.seed,
            indices=indices,
            pipelines=_pipelines(manifest, load_size),
        )
        self._fixed = _FixedOrder()
        self._rows = rows_of_indices(path)
        if order == "exact":
            self.loader.traversal_order = self._fixed
        else:
            # FFCV's quasi-random order shuffles its page table in place, so epoch e's order
            # would depend on which epochs ran before it; restoring the table before every
            # epoch makes the order a function of (seed, epoch) alone, hence resumable.
            self._pages = self.loader.traversal_order.page_to_samples_array.copy()

    def _epoch(self, epoch: int, skip: int) -> Iterator[tuple[torch.Tensor, ...]]:
        s = self.stream
        if self.order == "exact":
            share = self._rows[s.epoch_share(epoch).numpy()[skip:]]
            self._fixed.order = share
            # Loader.__len__ (hence how many batches it yields) reads first_traversal_order.
            self.loader.first_traversal_order = share
            skip = 0
        else:
            np.copyto(self.loader.traversal_order.page_to_samples_array, self._pages)
        self.loader.next_epoch = epoch
        for x, y, i in self.loader:
            # FFCV reuses these buffers for later batches: copy before keeping.
            x, y, i = (
                x.contiguous().clone(),
                y.reshape(-1).long().clone(),
                i.reshape(-1).long().clone(),
            )
            if skip:
                drop = min(skip, len(i))
                x, y, i, skip = x[drop:], y[drop:], i[drop:], skip - drop
                if not len(i):
                    continue
            yield x, y, i

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Fixed-size batches across epochs, starting at the stream's (epoch, position)."""
        s = self.stream
        if self.order == "exact":
            epoch, position = s.location()
        else:  # FFCV's epochs over the static share r::R (n // R samples)
            epoch, position = divmod(s.batches * s.batch_size, s.n // s.world_size)
        parts: list[tuple[torch.Tensor, ...]] = []
        have = 0
        while True:
            for part in self._epoch(epoch, position):
                parts.append(part)
                have += len(part[2])
                while have >= s.batch_size:
                    x, y, i = (torch.cat([p[k] for p in parts]) for k in range(3))
                    b = s.batch_size
                    yield x[:b], y[:b], i[:b]
                    parts = [(x[b:], y[b:], i[b:])] if len(i) > b else []
                    have = len(i) - b
            epoch, position = epoch + 1, 0


class FfcvStream:
    """Infinite, resumable :class:`~pipelines.base.TrainStream` over the ``.beton`` files.

    Args:
        root: dataset directory (built with ``--formats ffcv``).
        setup: placement and options; reads ``num_workers`` (FFCV decode threads per
            stream), ``order`` (``"exact"``, the default, or ``"quasi_random"``, see the module
            docstring), ``os_cache`` (let the OS page cache hold the file, FFCV's default;
            ``False`` for datasets larger than RAM, required by ``quasi_random``) and
            ``load_size`` (output square size for variable-size JPEG datasets).
        labeled_batch, unlabeled_batch, seed: as for :func:`pipelines.build_train_stream`.
    """

    def __init__(
        self, root: Path, setup: ReaderSetup, *, labeled_batch: int, unlabeled_batch: int, seed: int = 0
    ) -> None:
        rank, world_size = setup.rank, setup.world_size
        order, os_cache = "exact" if setup.order is None else setup.order, setup.os_cache
        check_rank(rank, world_size)
        if order not in _ORDERS:
            raise ValueError(f"ffcv order must be one of {_ORDERS}, got {order!r}")
        if os_cache is None:
            os_cache = order == "exact"
        if order == "quasi_random" and os_cache:
            raise ValueError("ffcv order 'quasi_random' needs os_cache=False")
        root = Path(root)
        manifest = load_manifest(root)
        self.device = torch.device(setup.device)
        self._streams: dict[str, IndexStream] = {}
        self._paths: dict[str, Path] = {}
        for name, batch in (("labeled", labeled_batch), ("unlabeled", unlabeled_batch)):
            self._paths[name] = beton_path(root, name, manifest, setup.max_pixels)
            n = int(split_info(root, manifest, name)["count"])
            self._streams[name] = IndexStream(
                n, batch, seed=seed, stream=name, rank=rank, world_size=world_size
            )
        self._kw = dict(
            order=order, os_cache=os_cache, num_workers=setup.num_workers, load_size=setup.load_size
        )
        self._manifest = manifest

    def __iter__(self) -> Iterator[Batch]:
        its = {
            name: _Split(
                self._paths[name],
                self._manifest,
                IndexStream(
                    s.n,
                    s.batch_size,
                    seed=s.seed,
                    stream=s.stream,
                    rank=s.rank,
                    world_size=s.world_size,
                ),
                **self._kw,
            )
            for name, s in self._streams.items()
        }
        for name, sp in its.items():
            sp.stream.batches = self._streams[name].batches
        lab, unl = its["labeled"].batches(), its["unlabeled"].batches()
        while True:
            x_l, y_l, _ = next(lab)
            x_u, y_u, i_u = next(unl)
            for s in self._streams.values():
                s.batches += 1
            d = self.device
            yield Batch(x_l.to(d), y_l.to(d), x_u.to(d), i_u.to(d), y_u.to(d))

    def state_dict(self) -> dict[str, Any]:
        return {
            "backend": "ffcv",
            "order": self._kw["order"],
            **{name: s.state_dict() for name, s in self._streams.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("backend") != "ffcv" or state.get("order") != self._kw["order"]:
            raise ValueError(
                f"reader state is from backend {state.get('backend')!r} order "
                f"{state.get('order')!r}, not ffcv order {self._kw['order']!r}"
            )
        for name, s in self._streams.items():
            s.load_state_dict(state[name])


class FfcvEval:
    """One pass over a split's ``.beton`` (an :class:`~pipelines.base.EvalSource`); same batch
    layout and rank split as :class:`~pipelines.tensor.TensorEval`."""

    def __init__(self, root: Path, split: str, setup: ReaderSetup, *, batch_size: int) -> None:
        rank, world_size, device = setup.rank, setup.world_size, setup.device
        root = Path(root)
        manifest = load_manifest(root)
        path = beton_path(root, split, manifest, setup.max_pixels)
        n = int(split_info(root, manifest, split)["count"])
        idx, self._valid = eval_rank_indices(n, rank, world_size)
        self.device, self.world_size, self.batch_size = torch.device(device), world_size, batch_size
        self._n = idx.numel()
        rows = rows_of_indices(path)
        self.loader = Loader(
            str(path),
            batch_size=batch_size,
            num_workers=setup.num_workers,
            order=OrderOption.SEQUENTIAL,
            os_cache=True if setup.os_cache is None else setup.os_cache,
            drop_last=False,
            indices=rows[idx.numpy()],
            pipelines=_pipelines(manifest, setup.load_size),
        )

    def __len__(self) -> int:
        return -(-self._n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        start = 0
        for x, y, _ in self.loader:
            x, y = x.contiguous().clone().to(self.device), y.reshape(-1).long().to(self.device)
            valid = self._valid[start : start + len(y)]
            start += len(y)
            yield (x, y) if self.world_size == 1 else (x, y, valid.to(self.device))


def build_train(root: Path, setup: ReaderSetup, **batches: Any) -> Any:
    if setup.imagenet_views is not None:  # reader-cut views: pipelines.ffcv_views
        from pipelines.ffcv_views import FfcvViewsStream

        return FfcvViewsStream(root, setup, **batches)
    return FfcvStream(root, setup, **batches)


def build_eval(root: Path, split: str, setup: ReaderSetup, *, batch_size: int) -> Any:
    if setup.imagenet_views is not None:
        from pipelines.ffcv_views import FfcvViewsEval

        return FfcvViewsEval(root, split, setup, batch_size=batch_size)
    return FfcvEval(root, split, setup, batch_size=batch_size)
