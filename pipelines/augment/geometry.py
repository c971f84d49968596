"""Weak-view geometry: random translate (pad-and-crop) and random-resized crops with flips.

Each view gets its own shift (or crop box) and flip; a translate crop is one gather of whole
source rows (a row reflected at both ends is periodic, and a flipped, shifted row is one window
of that period), a random-resized crop is a separable bilinear resample equal to
``grid_sample(bilinear, border, align_corners=False)`` up to float rounding. Also the centre
crop of the evaluation path. Design notes: ``docs/augmentation.md``.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from pipelines.augment._common import Rows, _check_generator, _check_images, _draw_count, _kept, _on, _rand

CROPS = ("translate", "rrc")

# Largest float intermediate (bytes) of one block of views in the CPU resized crop.
_CPU_BLOCK_BYTES = 2 << 20


def _reflect(index: Tensor, size: int) -> Tensor:
    """Reflect (edge pixel not repeated) indices in ``[-(size-1), 2*(size-1)]`` into range."""
    index = index.abs()
    return (size - 1) - (size - 1 - index).abs()


def _translate_crop(
    images: Tensor,
    generator: torch.Generator,
    out_hw: tuple[int, int],
    translate: float,
    flip: bool,
    source: Tensor | None,
    rows: Rows | None = None,
) -> Tensor:
    """Reflect pad-and-crop + flip of every view; view ``i`` crops image ``source[i]``.

    Args:
        images: uint8 ``(M, 3, H, W)``.
        generator: source of the shifts and flips.
        out_hw: output size.
        translate: maximum shift as a fraction of the output side.
        flip: whether to flip half of the views horizontally.
        source: int64 ``(N,)`` image of each view, or ``None`` for one view per image.

    Returns:
        uint8 ``(N, 3, oh, ow)``.
    """
    m, c, h, w = images.shape
    n = m if source is None else len(source)
    oh, ow = out_hw
    py, px = round(translate * oh), round(translate * ow)
    # Reflect padding repeats no edge pixel, so it reaches at most size - 1 pixels out.
    if py > h - 1 or px > w - 1:
        raise ValueError(f"translate={translate} is too large for a {h}x{w} input")
    gd, nd = generator.device, _draw_count(n, rows)
    dy = _kept(torch.randint(-py, py + 1, (nd,), generator=generator, device=gd), rows)
    dx = _kept(torch.randint(-px, px + 1, (nd,), generator=generator, device=gd), rows)
    mirror = _kept((_rand(generator, (nd,)) < 0.5).long(), rows)
    dev = images.device
    dy, dx, mirror = _on(dy, dev), _on(dx, dev), _on(mirror if flip else mirror.zero_(), dev)
    # Reflecting a row at both ends without repeating the edge pixel makes it periodic, with
    # period P = 2W - 2: x0 .. x(W-1) x(W-2) .. x1 | x0 .. . That sequence is also symmetric
    # about 0, so its mirror image is itself shifted by half a period (W - 1): a flipped,
    # shifted, reflect-padded crop row is one contiguous window of it, and no padded or
    # mirrored copy of the images is needed. Source rows: one period plus the W pixels after
    # it, so that every window of <= W pixels starting in the first period fits, built from
    # whole-row copies only (narrower strided copies are 2-3x slower per byte on the CPU).
    period = max(2 * w - 2, 1)
    span = period + w
    ext = images.new_empty(m, c, h, span)
    ext[..., :w] = images
    if w > 1:
        # x(W-1) .. x0 at W - 1: both its ends coincide with the pixels already there.
        ext[..., w - 1 : period + 1] = images.flip(-1)
    ext[..., period:] = images
    # Every output row is ``ow`` contiguous source bytes, so one row gather (index_select on
    # all length-``ow`` windows of the flat source) does the whole crop; an element-wise
    # gather with an int64 index per pixel is 2-4x slower on the CPU.
    windows = ext.view(-1).unfold(0, ow, 1)
    row_windows, channels = _crop_lines(h, oh, py, c, span, dev)
    rows = row_windows.index_select(0, dy + py)  # (N, oh): offsets of the source rows
    image = torch.arange(n, device=dev) if source is None else _on(source, dev)
    # Start of each view's window in the period, plus its image's offset; then of each row.
    first = torch.remainder(dx - mirror * (w - 1) + (w - ow) // 2, period)
    first += image * (c * h * span)
    starts = (first.view(n, 1, 1) + channels) + rows.view(n, 1, oh)
    return windows.index_select(0, starts.view(-1)).view(n, c, oh, ow)


@functools.lru_cache(maxsize=16)
def _crop_lines(
    h: int, oh: int, py: int, c: int, row: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Offset tables of :func:`_translate_crop` (cached: the same every call).

    Args:
        h: source rows per channel.
        oh: output rows.
        py: largest vertical shift.
        c: channels.
        row: bytes per source row.
        device: where the tables live.

    Returns:
        int64 ``(2 py + 1, oh)``: row ``py + dy`` holds the offsets of the source rows of an
        ``oh``-row crop, centred, shifted by ``dy``, reflected at the edges; int64
        ``(1, c, 1)``: the offsets of the channels.
    """
    top = (h - oh) // 2
    lines = _reflect(torch.arange(top - py, top + py + oh, device=device), h) * row
    channels = torch.arange(c, device=device).view(1, c, 1) * (h * row)
    return lines.unfold(0, oh, 1), channels


def _rrc(
    images: Tensor,
    generator: torch.Generator,
    out_size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip: bool,
    source: Tensor | None,
    rows: Rows | None = None,
) -> Tensor:
    """Random-resized-crop + flip, bilinear, of every view; view ``i`` crops image ``source[i]``.

    Sampling as ``grid_sample(mode="bilinear", padding_mode="border", align_corners=False)``
    on the crop's affine grid, but separably: each sample's grid is a product of one row map
    and one column map, so the bilinear weights factor into a vertical blend of two gathered
    source rows (whole uint8 rows, cheap) followed by a horizontal blend of two gathered
    columns. Results agree with grid_sample's to float rounding (at most one level after
    rounding to uint8; test_rrc_matches_grid_sample).

    Args:
        images: uint8 ``(M, 3, H, W)``.
        generator: source of the crops and flips.
        out_size: output side S.
        scale: area fraction range of the crop.
        ratio: aspect-ratio range of the crop.
        flip: whether to flip half of the views horizontally.
        source: int64 ``(N,)`` image of each view, or ``None`` for one view per image.

    Returns:
        uint8 ``(N, 3, S, S)``.
    """
    images = images.contiguous()  # gathered by rows
    m, c, h, w = images.shape
    n = m if source is None else len(source)
    dev = images.device
    maps = _rrc_maps(_draw_count(n, rows), h, w, generator, scale, ratio, flip)
    sx, tx, sy, ty = (_on(_kept(p, rows), dev) for p in maps)
    lin = (torch.arange(out_size, device=dev, dtype=torch.float32) * 2 + 1) / out_size - 1
    x_lo, x_hi, x_w = _bilinear_taps(sx[:, None] * lin + tx[:, None], w)  # (N, S) each
    y_lo, y_hi, y_w = _bilinear_taps(sy[:, None] * lin + ty[:, None], h)
    image = torch.arange(n, device=dev) if source is None else _on(source, dev)
    planes = ((image[:, None] * c + torch.arange(c, device=dev)) * h)[:, :, None]  # (N, 3, 1)
    row_lo, row_hi = planes + y_lo[:, None, :], planes + y_hi[:, None, :]  # (N, 3, S)
    rows = images.view(m * c * h, w)
    out = images.new_empty(n, c, out_size, out_size)
    # On the CPU, blocks of views small enough that the float intermediates stay in cache:
    # batch-sized ones (~150 MB each at 224 px) are bound by memory traffic and page faults,
    # ~6x slower in all. One block on other devices.
    block = n if dev.type != "cpu" else max(1, _CPU_BLOCK_BYTES // (c * out_size * w * 4))
    for a in range(0, n, block):
        b = min(a + block, n)
        k = b - a
        # Vertical pass: rows y_lo and y_hi of each output row's source plane (whole uint8
        # rows: a cheap row gather), blended.
        top = rows.index_select(0, row_lo[a:b].reshape(-1)).float().view(k, c, out_size, w)
        bottom = rows.index_select(0, row_hi[a:b].reshape(-1)).float().view(k, c, out_size, w)
        top.lerp_(bottom, y_w[a:b, None, :, None])
        # Horizontal pass: columns x_lo and x_hi of every row (one index per view, expanded).
        shape = (k, c, out_size, out_size)
        left = top.gather(3, x_lo[a:b, None, None, :].expand(shape))
        left.lerp_(top.gather(3, x_hi[a:b, None, None, :].expand(shape)), x_w[a:b, None, None, :])
        # Rounded to nearest (ties up); a blend of in-range values needs no clamp.
        out[a:b] = left.add_(0.5).to(torch.int32)
    return out


def _rrc_maps(
    n: int,
    h: int,
    w: int,
    generator: torch.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip: bool,
    attempts: int = 10,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draw ``n`` random-resized-crop boxes (+ flips) of an ``h x w`` image.

    Returns:
        float32 ``(n,)`` each, on the generator's device: ``sx, tx, sy, ty``, the affine map
        output -> input of each crop in grid_sample's normalised coordinates
        (align_corners=False): ``x_in = sx * x_out + tx``, ``y_in = sy * y_out + ty``.
    """
    area = h * w
    u = _rand(generator, (n, attempts, 2))
    pos = _rand(generator, (n, 3))
    s = scale[0] + u[..., 0] * (scale[1] - scale[0])
    log_r = math.log(ratio[0]) + u[..., 1] * (math.log(ratio[1]) - math.log(ratio[0]))
    r = torch.exp(log_r)
    cw, ch = torch.sqrt(s * area * r), torch.sqrt(s * area / r)  # (N, attempts)
    ok = (cw <= w) & (ch <= h)
    # First attempt that fits, as torchvision does; if none fits, the largest centred box
    # whose aspect ratio lies within ``ratio``.
    first = ok.int().argmax(1, keepdim=True)
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    in_ratio = min(max(w / h, ratio[0]), ratio[1])
    fb_w, fb_h = (min(w, h * in_ratio), h) if w / h > in_ratio else (w, min(h, w / in_ratio))
    found = ok.any(1)
    cw = torch.where(found, cw, torch.full_like(cw, fb_w))
    ch = torch.where(found, ch, torch.full_like(ch, fb_h))
    x0 = torch.where(found, pos[:, 0] * (w - cw), (w - cw) / 2)
    y0 = torch.where(found, pos[:, 1] * (h - ch), (h - ch) / 2)
    sign = 1.0 - 2.0 * (pos[:, 2] < 0.5).float() if flip else torch.ones_like(cw)
    sx, sy = sign * cw / w, ch / h
    tx, ty = (x0 + cw / 2) * 2 / w - 1, (y0 + ch / 2) * 2 / h - 1
    return sx, tx, sy, ty


def _bilinear_taps(grid: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear taps of normalised coordinates along one axis, as grid_sample's border mode.

    Args:
        grid: float32 coordinates in [-1, 1] units (align_corners=False), any shape.
        size: length of the axis in pixels.

    Returns:
        int64 lower and upper pixel indices and the float32 weight of the upper one.
    """
    # grid_sample's CPU unnormalisation, then the border mode's clip to [0, size - 1].
    pos = grid.add(1.0).mul_(size / 2).sub_(0.5).clamp_(0, size - 1)
    lo = pos.floor()
    weight = pos.sub_(lo)
    lo = lo.long()
    return lo, (lo + 1).clamp_(max=size - 1), weight


def weak_view(
    images: Tensor,
    generator: torch.Generator,
    *,
    source: Tensor | None = None,
    crop: str = "translate",
    out_size: int | None = None,
    translate: float = 0.125,
    flip: bool = True,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rows: Rows | None = None,
) -> Tensor:
    """FixMatch weak views: random horizontal flip + random translation or resized crop.

    ``crop="translate"``: each view is shifted by an integer ``(dy, dx)`` drawn uniformly
    from ``[-p, p]`` with ``p = round(translate * out_size)`` -- pad-and-crop with **reflect**
    padding, as FixMatch's reference code does: it adds no black border that the network could
    key on and keeps every output pixel real image content. With ``out_size`` smaller than the
    input, the window is centred before the shift.

    ``crop="rrc"``: random-resized-crop (area fraction ``scale``, aspect ratio ``ratio``,
    first of 10 draws that fits) resized bilinearly to ``out_size``.

    View ``i`` crops image ``source[i]`` (:class:`~pipelines.augment.views.ViewMaker` crops
    several views of one image this way, without copying the batch): the same views, from the
    same draws, as ``weak_view(images[source])``.

    Args:
        images: uint8 ``(M, 3, H, W)`` on any device.
        generator: source of all randomness; may live on another device than ``images``.
        source: int64 ``(N,)`` image of each view, or ``None`` for one view per image
            (``N = M``).
        crop: ``"translate"`` or ``"rrc"``.
        out_size: output side S; ``None`` keeps ``H x W`` (translate) or ``min(H, W)`` (rrc).
        translate: maximum shift as a fraction of the output side (translate mode).
        flip: whether to flip half of the views horizontally.
        scale: area fraction range of the crop (rrc mode).
        ratio: aspect-ratio range of the crop (rrc mode).
        rows: ``(total, keep)``: these views are rows ``keep`` of a call over ``total`` views
            (the parameters are drawn for all ``total``, the pixel work done for these).

    Returns:
        uint8 ``(N, 3, S, S)`` on ``images.device``.
    """
    _check_images(images)
    _check_generator(generator)
    h, w = images.shape[-2:]
    if crop == "translate":
        if not 0.0 <= translate < 1.0:
            raise ValueError(f"translate must be in [0, 1), got {translate}")
        oh, ow = (h, w) if out_size is None else (out_size, out_size)
        if not (0 < oh <= h and 0 < ow <= w):
            raise ValueError(f"out_size={out_size} must be in [1, {min(h, w)}] for {h}x{w} input")
        return _translate_crop(images, generator, (oh, ow), translate, flip, source, rows)
    if crop == "rrc":
        size = min(h, w) if out_size is None else out_size
        if size <= 0:
            raise ValueError(f"out_size must be positive, got {out_size}")
        if not (0 < scale[0] <= scale[1] <= 1.0) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"bad rrc scale={scale} or ratio={ratio}")
        return _rrc(images, generator, size, scale, ratio, flip, source, rows)
    raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")


def center_crop(images: Tensor, out_size: int) -> Tensor:
    """Central ``out_size`` square (eval path of the 224 px setting).

    Args:
        images: ``(N, C, H, W)`` with ``H, W >= out_size``.
        out_size: side of the crop.

    Returns:
        ``(N, C, out_size, out_size)``, a view of ``images``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if not 0 < out_size <= min(h, w):
        raise ValueError(f"out_size={out_size} must be in [1, {min(h, w)}] for {h}x{w} input")
    top, left = (h - out_size) // 2, (w - out_size) // 2
    return images[..., top : top + out_size, left : left + out_size]
