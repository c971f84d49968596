"""The one contract every input backend honours.

A backend yields, per training step, one :class:`Batch`: a labeled uint8 batch with its labels
and an unlabeled uint8 batch with the samples' stable indices, already on the training device.
Augmentation (weak/strong views, normalisation) happens afterwards, on that device, in
:mod:`pipelines.augment` -- backends hand over raw pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)


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


HostBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]
"""A reader's host batch: uint8 images, int64 labels, int64 indices, corrupt images skipped."""


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
