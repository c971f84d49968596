"""RandAugment's geometric ops: shear_x, rotate, shear_y, translate_x, translate_y.

Nearest-neighbour, black fill, in place on a batch sorted by op: every output pixel takes
exactly the source pixel that ``grid_sample(mode="nearest", padding_mode="zeros",
align_corners=False)`` picks on the CPU for the same grid. Shears and rotations are one uint8
pixel gather from a black-bordered copy; translations, which move whole rows, one row gather.
The affine maps themselves come from :func:`pipelines.augment.policy._affine_coeffs`. Design
notes: ``docs/augmentation.md``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from pipelines.augment._common import _on


def _op_affine_(x: Tensor, counts: list[int], coeffs: Tensor) -> None:
    """Shear / rotate / translate, nearest-neighbour, black fill, in place.

    Samples as sorted by :func:`_slot_ranks`: ``counts`` each of shear_x, rotate, shear_y,
    translate_x, translate_y. Every output pixel takes the source pixel that
    ``grid_sample(mode="nearest", padding_mode="zeros", align_corners=False)`` picks on the CPU
    for the same grid: shears and rotations by one pixel gather (:func:`_op_warp_`),
    translations, which move whole rows, by one row gather (:func:`_op_translate_`).

    Args:
        x: uint8 ``(n, 3, H, W)``, contiguous, modified in place.
        counts: sample counts of the five geometric ops, in the order above.
        coeffs: float32 ``(n, 8)`` from :func:`_affine_coeffs`, on the CPU.
    """
    warped = sum(counts[:3])
    if warped:
        _op_warp_(x[:warped], counts[:3], coeffs[:warped])
    if x.shape[0] > warped:
        _op_translate_(x[warped:], coeffs[warped:, 6:])


def _op_warp_(x: Tensor, counts: list[int], coeffs: Tensor) -> None:
    """Shear_x / rotate / shear_y (in this order, ``counts`` each): one pixel gather for all.

    Every output pixel takes the source pixel that grid_sample (nearest) picks on the CPU for
    the same grid -- the same float32 operations, so the same pixel -- read straight from the
    uint8 image (no float copy of it), out-of-range coordinates clamped onto a one-pixel black
    border. Only the coordinates that vary in both directions are computed per pixel: x for
    shear_x and rotate, y for rotate and shear_y (hence the sort order: both runs are
    contiguous), as one stack of planes. The others are exactly the pixel's own (the map's
    cross term is an exact zero, and its float error stays far below half a pixel).

    Args:
        x: uint8 ``(n, 3, H, W)``, contiguous, modified in place.
        counts: sample counts of shear_x, rotate and shear_y.
        coeffs: float32 ``(n, 8)`` from :func:`_affine_coeffs`, on the CPU.
    """
    n, c, h, w = x.shape
    dev = x.device
    n_sx, n_rot, _ = counts
    nx = n_sx + n_rot  # samples with a per-pixel x; y: from n_sx on
    # One plane per per-pixel coordinate: (a0, a1, a2) of the x maps, then of the y maps.
    maps = torch.cat([coeffs[:nx, :3], coeffs[n_sx:, 3:6]])
    a0, a1, a2 = _on(maps, dev).view(-1, 3, 1, 1).unbind(1)
    lin_x, lin_y = _pixel_centres(h, w, dev)
    # The grid as the grid_sample version computed it, a0 x + (a1 y + a2), then
    # grid_sample's CPU unnormalisation (align_corners=False) and rounding (half to even);
    # anything outside the image lands on the black border at -1 or ``size``.
    grid = a0 * lin_x + (a1 * lin_y + a2)  # x planes, then y planes
    for g, size in ((grid[:nx], w), (grid[nx:], h)) if h != w else ((grid, w),):
        g.add_(1.0).mul_(size / 2).sub_(0.5).round_().clamp_(-1, size)
    gx, gy = grid[:nx], grid[nx:]
    # Index into the bordered (H + 2) x (W + 2) image: (y + 1) (W + 2) + x + 1. The constant
    # W + 3 rides on the cached row (or column) offsets.
    wp = w + 2
    index = torch.empty(n, h, w, device=dev)
    rows, cols = _index_lines(h, w, dev)  # y (W + 2) + W + 3; x + W + 3
    if n_sx:  # y is the row's own
        torch.add(gx[:n_sx], rows, out=index[:n_sx])
    if n_rot:
        torch.add(gx[n_sx:], gy[:n_rot], alpha=wp, out=index[n_sx:nx]).add_(wp + 1)
    if n > nx:  # shear_y: x is the column's own
        torch.add(cols, gy[n_rot:], alpha=wp, out=index[nx:])
    src = x.new_zeros(n, c, h + 2, wp)
    src[..., 1:-1, 1:-1] = x
    # One index for the three channels (expand: no copy); the gather writes into x itself.
    # (A flat int32 index_select would need the index materialised per channel: slower.)
    # Via int32: the CPU's float32 -> int64 conversion is slower than both steps together.
    index = index.view(n, 1, h * w).to(torch.int32).to(torch.int64).expand(n, c, h * w)
    torch.gather(src.view(n, c, -1), 2, index, out=x.view(n, c, h * w))


@functools.lru_cache(maxsize=16)
def _index_lines(h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Offsets in a (H + 2) x (W + 2) image with a one-pixel border (cached, float32).

    Returns:
        ``(1, H, 1)`` row starts ``y (W + 2) + W + 3`` (the border included) and ``(1, 1, W)``
        columns with the border offset, ``x + W + 3``.
    """
    wp = w + 2
    rows = torch.arange(h, device=device, dtype=torch.float32) * wp + (wp + 1)
    cols = torch.arange(w, device=device, dtype=torch.float32) + (wp + 1)
    return rows.view(1, h, 1), cols.view(1, 1, w)


def _op_translate_(x: Tensor, shifts: Tensor) -> None:
    """Translate by whole pixels, black fill, in place: one gather of whole rows.

    Output pixel ``(y, x)`` takes input pixel ``(y + ty, x + tx)``, black outside the image:
    each output row is one contiguous window of a black-padded copy of the images, so one row
    gather (as in :func:`_translate_crop`) moves ``W`` bytes at a time instead of one byte per
    indexed pixel.

    Args:
        x: uint8 ``(n, 3, H, W)``, contiguous, modified in place.
        shifts: float32 ``(n, 2)`` whole-pixel ``(tx, ty)``, ``|tx| <= W``, ``|ty| <= H``, on
            the CPU.
    """
    n, c, h, w = x.shape
    dev = x.device
    # Padding by the largest shifts keeps every window inside its own padded plane.
    px, py = (int(s) for s in shifts.abs().amax(0).tolist())
    span = w + 2 * px
    padded = x.new_zeros(n, c, h + 2 * py, span)
    padded[..., py : py + h, px : px + w] = x
    # Window start of each output row: its plane, its row, its sample's shift.
    rows = torch.arange(py * span + px, (py + h) * span + px, span, device=dev)
    planes = torch.arange(n * c, device=dev).view(n, c, 1)
    starts = torch.add(rows, planes, alpha=(h + 2 * py) * span)
    starts += _on(shifts[:, 1].mul(span).add_(shifts[:, 0]).long(), dev).view(n, 1, 1)
    windows = padded.view(-1).unfold(0, w, 1)
    torch.index_select(windows, 0, starts.view(-1), out=x.view(-1, w))


@functools.lru_cache(maxsize=16)
def _pixel_centres(h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates in [-1, 1] (align_corners=False): ``(1, 1, W)``, ``(1, H, 1)``."""
    lin_x = (torch.arange(w, device=device, dtype=torch.float32) * 2 + 1) / w - 1
    lin_y = (torch.arange(h, device=device, dtype=torch.float32) * 2 + 1) / h - 1
    return lin_x.view(1, 1, w), lin_y.view(1, h, 1)
