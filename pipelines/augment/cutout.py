"""FixMatch Cutout: one gray square per sample, centred at a uniform pixel, clipped at the borders.

The boxes come from three ``U(0, 1)`` draws per sample; the fill is uint8 bit arithmetic with a
per-sample box mask, in place (in :class:`~pipelines.augment.views.ViewMaker` on RandAugment's
sorted copy, before the one permutation back). Design notes: ``docs/augmentation.md``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from pipelines.augment._common import _on


def cutout_boxes(u: Tensor, size: float, h: int, w: int) -> Tensor:
    """FixMatch Cutout squares, one per sample, from three ``U(0, 1)`` draws each.

    Side ``floor(u[:, 0] * size * min(H, W))`` px, centred at pixel
    ``floor(u[:, 1:] * (H, W))``, clipped at the borders (the top-left corner is clamped
    first, as FixMatch's reference code does). Fill them with
    :func:`~pipelines.augment.policy.apply_rand_augment` (``boxes=``).

    Args:
        u: float32 ``(N, 3)`` uniform draws, any device.
        size: maximum side as a fraction of the image side (FixMatch: 0.5).
        h, w: image size.

    Returns:
        float32 ``(N, 2, 2)`` on ``u.device``: ``boxes[i, 0]`` is sample i's first and
        last + 1 row, ``boxes[i, 1]`` its first and last + 1 column.
    """
    side = torch.floor(u[:, :1] * size * min(h, w))  # (N, 1)
    start = torch.floor(u[:, 1:] * _positions(h, w, u.device)[1] - side / 2).clamp_(min=0)
    return torch.stack([start, start + side], -1)


def _cutout_(images: Tensor, boxes: Tensor, fill: int) -> None:
    """Fill each sample's box (from :func:`cutout_boxes`) with ``fill``, in place."""
    n, _, h, w = images.shape
    dev = images.device
    boxes = _on(boxes, dev)
    # Rows and columns inside the box, both at once, as 255 (inside) or 0: (N, 2, max(H, W)).
    pos = _positions(h, w, dev)[0]
    inside = ((pos >= boxes[..., :1]) & (pos < boxes[..., 1:])).to(torch.uint8).neg_()
    inside = inside[:, 0, :h].view(n, 1, h, 1) & inside[:, 1, :w].view(n, 1, 1, w)
    # (x & ~inside) | (fill & inside), in uint8 bit arithmetic: bool masks (masked_fill_,
    # where, a bool outer product) are several times slower per pixel on the CPU, and uint8
    # multiplies slower than bit operations.
    fill_in = inside & fill
    images.bitwise_and_(inside.bitwise_not_()).bitwise_or_(fill_in)


@functools.lru_cache(maxsize=16)
def _positions(h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """float32 ``0 .. max(H, W) - 1`` and ``(H, W)`` on ``device`` (cached), for Cutout."""
    pos = torch.arange(max(h, w), device=device, dtype=torch.float32)
    return pos, torch.tensor([float(h), float(w)], device=device)


def _check_cutout(size: float, fill: int) -> None:
    if not 0.0 <= size <= 1.0:
        raise ValueError(f"cutout size must be in [0, 1], got {size}")
    if not 0 <= fill <= 255:
        raise ValueError(f"cutout fill must be in [0, 255], got {fill}")
