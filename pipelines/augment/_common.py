"""Shared helpers of the augmentation modules: input checks, device moves, uniform draws."""

from __future__ import annotations

import torch
from torch import Tensor

from pipelines.base import to_device


def _check_images(images: Tensor, name: str = "images") -> None:
    if not isinstance(images, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise ValueError(f"{name} must be uint8, got {images.dtype}")


def _check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def _on(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device`` without a sync (:func:`pipelines.base.to_device`); ``t`` if there."""
    return t if t.device == device else to_device(t, device)


def _rand(generator: torch.Generator, shape: tuple[int, ...]) -> Tensor:
    """U(0, 1) float32 of ``shape`` on the generator's device."""
    return torch.rand(shape, generator=generator, device=generator.device)


Rows = tuple[int, Tensor]
"""``(total, keep)``: draw a call's random parameters for ``total`` rows, as one call over a
larger (global) batch would, and keep rows ``keep`` (int64 ``(n,)``): this call's part of it."""


def _draw_count(n: int, rows: Rows | None) -> int:
    """How many rows of parameters to draw for ``n`` rows (:data:`Rows`)."""
    if rows is None:
        return n
    if len(rows[1]) != n:
        raise ValueError(f"rows keeps {len(rows[1])} of {rows[0]} drawn rows, but the call has {n}")
    return rows[0]


def _kept(t: Tensor, rows: Rows | None) -> Tensor:
    """The kept rows of drawn parameters ``t`` (:data:`Rows`)."""
    return t if rows is None else t[_on(rows[1], t.device)]
