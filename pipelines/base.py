"""The one contract every input backend honours.

A backend yields, per training step, one :class:`Batch`: a labeled uint8 batch with its labels
and an unlabeled uint8 batch with the samples' stable indices, already on the training device.
Augmentation (weak/strong views, normalisation) happens afterwards, on that device, in
:mod:`pipelines.augment` -- backends hand over raw pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch

from pipelines.decode import Decoder, HostBatch, check_on_corrupt, output_size
from shards.images import MAX_PIXELS

log = logging.getLogger(__name__)

_EVERY = ("tensor", "webdataset", "ffcv", "dali")


def _option(default: Any, train: tuple[str, ...], eval: tuple[str, ...] | None = None) -> Any:
    """A :class:`ReaderSetup` field read by the ``train`` backends' training streams and the
    ``eval`` backends' evaluation passes (default: the same backends)."""
    return field(
        default=default,
        metadata={"train": frozenset(train), "eval": frozenset(train if eval is None else eval)},
    )


@dataclass(frozen=True)
class ReaderSetup:
    """Where and how an input backend delivers: the one options object of every backend.

    Built from the run config by :func:`pipelines.reader_setup`, or from the keyword options of
    :func:`pipelines.build_train_stream` / :func:`pipelines.build_eval_source`
    (:meth:`from_options`); one setup serves both (each reads only its own fields). ``None``
    means the backend's own default.

    Attributes:
        rank, world_size, device: this process's rank, the number of ranks, where batches go.
        num_workers: ``webdataset``: DataLoader worker processes per stream (labeled and
            unlabeled each get this many; ``0``: read in the main process); ``ffcv``: decode
            threads per stream.
        prefetch_factor: ``webdataset``: batches queued per worker.
        pin_memory: ``webdataset``: pin host batches (``None``: when ``device`` is CUDA).
        load_size: output square size for variable-size (full-res JPEG) datasets (with
            ``imagenet_views``: the shorter side after resizing).
        on_corrupt: ``webdataset``: ``"error"`` or ``"skip"`` (replaced, counted in the
            reader's ``skipped``, logged), see :class:`~pipelines.decode.Decoder`.
        order: training order: ``webdataset`` ``"index"`` (default) or ``"stream"``; ``ffcv``
            ``"exact"`` (default) or ``"quasi_random"``.
        shuffle_buffer: training shuffle buffer (samples) of ``webdataset`` ``order="stream"``
            and of ``dali``.
        mmap, on_device: ``tensor``: memory-map the arrays; hold the splits on ``device``.
        os_cache: ``ffcv``: let the OS page cache hold the file (default: for ``exact`` and
            evaluation).
        num_threads, decode_device, prefetch: ``dali``: CPU threads per pipeline, ``"cpu"`` or
            ``"mixed"`` decode (default: mixed on CUDA), prefetch queue depth (training).
        views: ``dali`` training: a :class:`~pipelines.dali_views.DaliViews` that makes the
            step's views in the pipeline (``data.views=loader``).
        imagenet_views: a :class:`~pipelines.imagenet_views.ImageNetViews`
            (``data.view_rule=authors_imagenet``): the reader resizes the shorter side and cuts
            every view's crop (``num_strong`` is its unlabeled crops minus one).
        num_strong: strong views per unlabeled sample (with ``imagenet_views``; default 2).
        max_pixels: every backend: the largest image (``H * W``) decoded; a larger one is a
            :class:`~shards.format.DataError` naming shard and key, raised before decoding
            (config ``data.max_pixels``, default :data:`shards.images.MAX_PIXELS`).
    """

    rank: int = _option(0, _EVERY)
    world_size: int = _option(1, _EVERY)
    device: torch.device | str = _option("cpu", _EVERY)
    num_workers: int = _option(2, ("webdataset", "ffcv"))
    prefetch_factor: int = _option(4, ("webdataset",))
    pin_memory: bool | None = _option(None, ("webdataset",))
    load_size: int | None = _option(None, ("webdataset", "ffcv", "dali"))
    on_corrupt: str = _option("error", ("webdataset",))
    order: str | None = _option(None, ("webdataset", "ffcv"), ())
    shuffle_buffer: int | None = _option(None, ("webdataset", "dali"), ())
    mmap: bool = _option(True, ("tensor",))
    on_device: bool = _option(False, ("tensor",))
    os_cache: bool | None = _option(None, ("ffcv",))
    num_threads: int = _option(2, ("dali",))
    decode_device: str | None = _option(None, ("dali",))
    prefetch: int = _option(2, ("dali",), ())
    views: Any = _option(None, ("dali",), ())
    imagenet_views: Any = _option(None, ("webdataset", "ffcv", "dali"))
    num_strong: int | None = _option(None, ("webdataset", "ffcv", "dali"), ())
    max_pixels: int = _option(MAX_PIXELS, _EVERY)

    def __post_init__(self) -> None:
        check_on_corrupt(self.on_corrupt)  # before any reader starts

    @staticmethod
    def accepted(backend: str, kind: str) -> list[str]:
        """The fields ``backend``'s ``kind`` (``"train"`` or ``"eval"``) reads."""
        return [f.name for f in fields(ReaderSetup) if backend in f.metadata[kind]]

    @classmethod
    def from_options(cls, backend: str, kind: str, options: dict[str, Any]) -> ReaderSetup:
        """The setup of keyword options; raises ValueError for one ``backend``'s ``kind``
        does not read (the placement fields are accepted by every backend)."""
        allowed = set(cls.accepted(backend, kind))
        unknown = sorted(set(options) - allowed)
        if unknown:
            listed = sorted(allowed - {"rank", "world_size", "device"})
            raise ValueError(
                f"unknown option(s) {unknown} for input backend {backend!r}; allowed: {listed}"
            )
        return cls(**options)

    def options(self, backend: str, kind: str) -> dict[str, Any]:
        """The fields ``backend``'s ``kind`` reads, as keyword options (``None`` left out: the
        backend's own default)."""
        values = {name: getattr(self, name) for name in self.accepted(backend, kind)}
        return {k: v for k, v in values.items() if v is not None}

    def pin(self) -> bool:
        """Whether host batches are pinned."""
        if self.pin_memory is None:
            return torch.device(self.device).type == "cuda"
        return bool(self.pin_memory)

    def decoder(self, manifest: dict[str, Any], stream: str = "eval") -> Decoder:
        """The :class:`~pipelines.decode.Decoder` of a dataset's ``stream`` (``labeled``,
        ``unlabeled`` or ``eval``); raises ValueError for ``imagenet_views`` on a fixed-size
        dataset."""
        fixed = bool(manifest.get("image_size"))
        return Decoder(output_size(manifest, self.load_size), fixed, self.on_corrupt,
                       views=self.stream_views(manifest, stream), max_pixels=self.max_pixels)

    def stream_views(self, manifest: dict[str, Any], stream: str) -> Any:
        """``imagenet_views`` for one stream: 1 crop per labeled sample, ``1 + num_strong`` per
        unlabeled one, the centre crop for evaluation; ``None`` without ``imagenet_views``."""
        if self.imagenet_views is None:
            return None
        if manifest.get("image_size"):
            raise ValueError("data.view_rule=authors_imagenet resizes full-resolution images: this dataset "
                             f"has a fixed image size {manifest['image_size']}")
        strong = 2 if self.num_strong is None else self.num_strong
        crops = {"labeled": 1, "unlabeled": 1 + strong, "eval": 0}[stream]
        return self.imagenet_views.for_stream(stream, crops, self.rank)


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device`` without making the host wait for the GPU.

    A plain ``cpu_tensor.to("cuda")`` synchronises the stream (the host waits for all queued
    GPU work); a CPU tensor therefore goes through pinned memory and an asynchronous copy, which
    the caching host allocator keeps alive until the copy has run.
    """
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class Batch:
    """One training step's input.

    Attributes:
        labeled: uint8 ``(B_L, 3, H, W)`` labeled images.
        labels: int64 ``(B_L,)`` their class labels.
        unlabeled: uint8 ``(B_U, 3, H, W)`` unlabeled images.
        unlabeled_index: int64 ``(B_U,)`` stable index of each unlabeled sample within its split.
        unlabeled_labels: int64 ``(B_U,)`` true labels of the unlabeled samples when the dataset
            has them (diagnostics only, never used by the method), else ``None``.
    """

    labeled: torch.Tensor
    labels: torch.Tensor
    unlabeled: torch.Tensor
    unlabeled_index: torch.Tensor
    unlabeled_labels: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(
            mv(self.labeled), mv(self.labels), mv(self.unlabeled), mv(self.unlabeled_index),
            mv(self.unlabeled_labels),
        )


class TrainStream(Protocol):
    """An infinite, resumable stream of :class:`Batch` for one rank."""

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]:
        """Reader position; restoring it makes the stream continue exactly where it stopped."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class EvalSource(Protocol):
    """A finite pass over an evaluation split: yields ``(uint8 (B,3,H,W), int64 (B,))``.

    In distributed runs each rank sees a disjoint part; ranks may receive padded batches with a
    third element, a bool validity mask, so that every rank runs the same number of steps.
    """

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]: ...

    def __len__(self) -> int: ...


class StepAccounting:
    """Step and skip accounting of a reader that pairs host batches (:func:`paired_batches`).

    The reader sets ``skipped`` (corrupt images skipped, kept in checkpoints) and ``_steps``
    (batches handed out since construction or restore) and passes :meth:`_count_step` as
    ``on_step``.
    """

    skipped: int
    _steps: int

    def _count_step(self, skipped: int) -> None:
        self._steps += 1
        if skipped:
            self.skipped += skipped
            log.warning("%d corrupt images skipped so far", self.skipped)


def paired_batches(
    labeled: Iterator[HostBatch],
    unlabeled: Iterator[HostBatch],
    device: torch.device,
    on_step: Callable[[int], None],
) -> Iterator[Batch]:
    """Zip a labeled and an unlabeled iterator of host batches into one :class:`Batch` per step.

    Tensors move to ``device`` with :meth:`Batch.to` (asynchronous from pinned batches).

    Args:
        labeled: host batches of the labeled split (their indices are dropped).
        unlabeled: host batches of the unlabeled split.
        device: where batches are delivered.
        on_step: called once per step, after both halves are drawn, with the number of corrupt
            images the two skipped (the reader's step and skip accounting).
    """
    while True:
        x_l, y_l, _, skipped_l = next(labeled)
        x_u, y_u, i_u, skipped_u = next(unlabeled)
        on_step(skipped_l + skipped_u)
        yield Batch(x_l, y_l, x_u, i_u, y_u).to(device)
