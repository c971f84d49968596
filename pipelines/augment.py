"""Batched, device-side weak and strong views (FixMatch) for uint8 image batches.

Every function takes a whole uint8 batch ``(N, 3, H, W)`` on any device (CPU or CUDA) and a
``torch.Generator``; each sample gets its own random parameters, and the work is done with
batched tensor ops -- there is no Python loop over samples. Python loops run over the
``num_ops`` op slots and the seven kernels of RandAugment ops only, and, on the CPU, over
blocks of a few views in the random-resized crop (so that its float intermediates stay in
cache; one block on other devices).

Randomness: every parameter is drawn on the generator's device (a CPU generator may drive CUDA
images) in an order that never depends on the pixel values, then moved to the images' device.
So the same generator state gives the same parameters on every device, and the same output.

Views (FixMatch):

- weak: random horizontal flip + random translation (``crop="translate"``: pad-and-crop by up
  to ``translate * size`` px, for 32/64 px data) or random-resized-crop + flip
  (``crop="rrc"``: for full-resolution data delivered at a fixed square load size, resized to
  ``out_size``, e.g. 256 -> 224).
- strong: its own weak view, then RandAugment (``num_ops`` ops per sample, each drawn uniformly
  from :data:`OPS` with a uniformly drawn magnitude), then Cutout.

RandAugment magnitudes, drawn uniformly per op per sample from the ranges of the FixMatch
paper (Sohn et al. 2020, appendix table of RandAugment transformations):

=============  ===============  ==============================================================
op             range            meaning
=============  ===============  ==============================================================
identity       --               unchanged
autocontrast   --               per-channel stretch of [min, max] to [0, 255]
equalize       --               per-channel histogram equalisation
rotate         [-30, 30]        degrees, about the centre
solarize       [0, 256]         threshold T: pixels >= T become 255 - pixel
color          [0.05, 0.95]     blend factor towards the image from its grayscale (0 = gray)
posterize      {4, ..., 8}      bits kept per channel
contrast       [0.05, 0.95]     blend factor from the image's mean gray (0 = flat gray)
brightness     [0.05, 0.95]     blend factor from black (0 = black)
sharpness      [0.05, 0.95]     blend factor from a 3x3 smoothed image (0 = smoothed)
shear_x        [-0.3, 0.3]      x_in = x_out + s * y_out, about the centre
shear_y        [-0.3, 0.3]      y_in = y_out + s * x_out, about the centre
translate_x    [-0.3, 0.3]      fraction of the width, rounded to whole pixels
translate_y    [-0.3, 0.3]      fraction of the height, rounded to whole pixels
cutout         [0, 0.5]         side of a gray (127) square, as a fraction of the image side
=============  ===============  ==============================================================

The colour ops follow PIL's ``ImageOps``/``ImageEnhance`` arithmetic (luma weights, SMOOTH
kernel, truncating blends): the tests check them bit-exact against PIL, per op.
Geometric ops sample nearest-neighbour and fill with black, as PIL's ``rotate``/``transform``
do by default; shears act about the image centre (PIL's act about the top-left corner, which
also shifts the image -- translation is a separate op already).

Implementation, tuned for one CPU thread (the same code runs on CUDA): pixels stay uint8
wherever the arithmetic allows, and most work is a handful of passes over the batch.

- translate crop: a row gather. Each output row is one contiguous window of the source row
  extended by one period of its reflection, which also holds the mirror image (see
  :func:`_translate_crop`); no padded or flipped copy of the batch.
- random-resized crop: separable bilinear -- a gather of whole uint8 source rows, a vertical
  blend, a gather of columns, a horizontal blend; equal to ``grid_sample`` (bilinear, border,
  ``align_corners=False``) up to float rounding, i.e. at most one level.
- RandAugment: per op slot, the samples are sorted by op (one row permutation) and each group
  of ops runs in place on its contiguous run: posterize and solarize as uint8 arithmetic,
  color / brightness / sharpness as float32 blends of one float copy, autocontrast /
  equalize / contrast as one per-sample, per-channel lookup-table gather, shears and
  rotations as one uint8 pixel gather that picks exactly the pixels ``grid_sample``
  (nearest, zeros) picks, and translations as one gather of whole rows.
- Cutout: uint8 bit operations with a per-sample box mask; in :class:`ViewMaker` it runs on
  RandAugment's sorted copy before the one permutation back.
- :class:`ViewMaker` makes the uint8 views in ``torch.inference_mode`` (no autograd
  bookkeeping per op) and normalises them outside it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor

from pipelines.base import to_device

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAGNITUDE_RANGES",
    "OPS",
    "ViewMaker",
    "apply_rand_augment",
    "center_crop",
    "cutout",
    "normalize",
    "rand_augment",
    "sample_rand_augment",
    "strong_view",
    "weak_view",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The order groups ops that share work: after sorting a slot's samples by op index, the two
# histogram ops and the five geometric ops each form one contiguous run handled by one kernel.
OPS: tuple[str, ...] = (
    "identity",
    "autocontrast",
    "equalize",
    "solarize",
    "posterize",
    "contrast",
    "brightness",
    "color",
    "sharpness",
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
_OP = {name: i for i, name in enumerate(OPS)}

#: Uniform magnitude range of each op that has one (FixMatch paper); posterize draws integers.
MAGNITUDE_RANGES: dict[str, tuple[float, float]] = {
    "rotate": (-30.0, 30.0),
    "solarize": (0.0, 256.0),
    "color": (0.05, 0.95),
    "posterize": (4.0, 8.0),
    "contrast": (0.05, 0.95),
    "brightness": (0.05, 0.95),
    "sharpness": (0.05, 0.95),
    "shear_x": (-0.3, 0.3),
    "shear_y": (-0.3, 0.3),
    "translate_x": (-0.3, 0.3),
    "translate_y": (-0.3, 0.3),
}

_CROPS = ("translate", "rrc")

# Largest float intermediate (bytes) of one block of views in the CPU resized crop.
_CPU_BLOCK_BYTES = 2 << 20


# ----------------------------------------------------------------------------- helpers


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


def _reflect(index: Tensor, size: int) -> Tensor:
    """Reflect (edge pixel not repeated) indices in ``[-(size-1), 2*(size-1)]`` into range."""
    index = index.abs()
    return (size - 1) - (size - 1 - index).abs()


# ----------------------------------------------------------------------------- crops


def _translate_crop(
    images: Tensor,
    generator: torch.Generator,
    out_hw: tuple[int, int],
    translate: float,
    flip: bool,
    source: Tensor | None,
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
    gd = generator.device
    dy = torch.randint(-py, py + 1, (n,), generator=generator, device=gd)
    dx = torch.randint(-px, px + 1, (n,), generator=generator, device=gd)
    mirror = (_rand(generator, (n,)) < 0.5).long()
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
    sx, tx, sy, ty = (_on(p, dev) for p in _rrc_maps(n, h, w, generator, scale, ratio, flip))
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
    crop: str = "translate",
    out_size: int | None = None,
    translate: float = 0.125,
    flip: bool = True,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """FixMatch weak view: random horizontal flip + random translation or resized crop.

    ``crop="translate"``: each sample is shifted by an integer ``(dy, dx)`` drawn uniformly
    from ``[-p, p]`` with ``p = round(translate * out_size)`` -- pad-and-crop with **reflect**
    padding, as FixMatch's reference code does: it adds no black border that the network could
    key on and keeps every output pixel real image content. With ``out_size`` smaller than the
    input, the window is centred before the shift.

    ``crop="rrc"``: random-resized-crop (area fraction ``scale``, aspect ratio ``ratio``,
    first of 10 draws that fits) resized bilinearly to ``out_size``.

    Args:
        images: uint8 ``(N, 3, H, W)`` on any device.
        generator: source of all randomness; may live on another device than ``images``.
        crop: ``"translate"`` or ``"rrc"``.
        out_size: output side S; ``None`` keeps ``H x W`` (translate) or ``min(H, W)`` (rrc).
        translate: maximum shift as a fraction of the output side (translate mode).
        flip: whether to flip half of the samples horizontally.
        scale: area fraction range of the crop (rrc mode).
        ratio: aspect-ratio range of the crop (rrc mode).

    Returns:
        uint8 ``(N, 3, S, S)`` on ``images.device``.
    """
    _check_images(images)
    _check_generator(generator)
    return _weak_view(
        images,
        generator,
        None,
        crop=crop,
        out_size=out_size,
        translate=translate,
        flip=flip,
        scale=scale,
        ratio=ratio,
    )


def _weak_view(
    images: Tensor,
    generator: torch.Generator,
    source: Tensor | None,
    *,
    crop: str,
    out_size: int | None,
    translate: float,
    flip: bool = True,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """:func:`weak_view` of ``images[source]`` (``images`` when ``None``), without the copy.

    Args:
        images: uint8 ``(M, 3, H, W)``.
        generator: source of all randomness.
        source: int64 ``(N,)`` image of each view, or ``None`` for one view per image.
        crop, out_size, translate, flip, scale, ratio: as in :func:`weak_view`.

    Returns:
        uint8 ``(N, 3, S, S)``; the random draws are those of :func:`weak_view` on N images.
    """
    h, w = images.shape[-2:]
    if crop == "translate":
        if not 0.0 <= translate < 1.0:
            raise ValueError(f"translate must be in [0, 1), got {translate}")
        oh, ow = (h, w) if out_size is None else (out_size, out_size)
        if not (0 < oh <= h and 0 < ow <= w):
            raise ValueError(f"out_size={out_size} must be in [1, {min(h, w)}] for {h}x{w} input")
        return _translate_crop(images, generator, (oh, ow), translate, flip, source)
    if crop == "rrc":
        size = min(h, w) if out_size is None else out_size
        if size <= 0:
            raise ValueError(f"out_size must be positive, got {out_size}")
        if not (0 < scale[0] <= scale[1] <= 1.0) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"bad rrc scale={scale} or ratio={ratio}")
        return _rrc(images, generator, size, scale, ratio, flip, source)
    raise ValueError(f"crop must be one of {_CROPS}, got {crop!r}")


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


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 -> float32 ``(x / 255 - mean) / std`` per channel, on the images' device.

    Args:
        images: uint8 ``(N, C, H, W)``.
        mean: ``C`` channel means in [0, 1] units.
        std: ``C`` channel standard deviations in [0, 1] units.

    Returns:
        float32 ``(N, C, H, W)``.
    """
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise ValueError(
            f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    c = images.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} must have {c} entries")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {tuple(std)}")
    scale, shift = _normalize_constants(tuple(mean), tuple(std), images.device)
    # x * 1/(255 std) - mean/std, in place (a broadcasting addcmul is 5x slower on CPU).
    return images.float().mul_(scale).add_(shift)


@functools.lru_cache(maxsize=16)
def _normalize_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[Tensor, Tensor]:
    """float32 ``(1, C, 1, 1)`` ``1 / (255 std)`` and ``-mean / std`` on ``device`` (cached)."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device)
    return scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)


# ----------------------------------------------------------------------------- RandAugment


def sample_rand_augment(
    n: int, generator: torch.Generator, *, num_ops: int = 2
) -> tuple[Tensor, Tensor]:
    """Draw per-sample RandAugment ops and magnitudes.

    Args:
        n: number of samples.
        generator: source of randomness; results live on its device.
        num_ops: ops applied in sequence to each sample.

    Returns:
        ``ops``: int64 ``(n, num_ops)`` indices into :data:`OPS`;
        ``magnitudes``: float32 ``(n, num_ops)`` in each op's units (see
        :data:`MAGNITUDE_RANGES`; 0 for ops without a magnitude).
    """
    _check_generator(generator)
    if num_ops < 0:
        raise ValueError(f"num_ops must be >= 0, got {num_ops}")
    gd = generator.device
    ops = torch.randint(0, len(OPS), (n, num_ops), generator=generator, device=gd)
    u = _rand(generator, (n, num_ops))
    lo, span = _magnitude_bounds(gd)
    mags = lo[ops] + u * span[ops]
    # Posterize: bits uniform over the integers 4..8.
    bits = MAGNITUDE_RANGES["posterize"][0] + torch.floor(u * 5).clamp_(max=4)
    mags = torch.where(ops == _OP["posterize"], bits, mags)
    return ops, mags


@functools.lru_cache(maxsize=8)
def _magnitude_bounds(device: torch.device) -> tuple[Tensor, Tensor]:
    """float32 ``(len(OPS),)`` lower ends and widths of the magnitude ranges (cached)."""
    lo = torch.tensor([MAGNITUDE_RANGES.get(o, (0.0, 0.0))[0] for o in OPS], device=device)
    hi = torch.tensor([MAGNITUDE_RANGES.get(o, (0.0, 0.0))[1] for o in OPS], device=device)
    return lo, hi - lo


def _luma(x: Tensor) -> Tensor:
    """PIL's ``convert("L")``: ``(19595 R + 38470 G + 7471 B + 2**15) >> 16`` (exact in fp32).

    Args:
        x: uint8 or float ``(n, 3, H, W)``.

    Returns:
        float32 ``(n, 1, H, W)`` with integer values.
    """
    r, g, b = x.float().unbind(1)
    # Plane by plane with fused multiply-adds: every partial sum is an integer below 2**24, so
    # the result is exact in any order, and this reads each plane once (a broadcast multiply
    # and a channel sum take two passes over all three planes).
    y = (r * 19595.0).add_(g, alpha=38470.0).add_(b, alpha=7471.0)
    return y.add_(32768.0).mul_(1.0 / 65536.0).floor_().unsqueeze(1)


def _store_(dst: Tensor, x: Tensor, clamp: bool) -> None:
    """Write float ``x`` into uint8 ``dst``, truncating like PIL's blends.

    Args:
        dst: uint8 destination, same shape as ``x``.
        x: float32 values; clamped to [0, 255] in place first when ``clamp``.
        clamp: whether ``x`` may leave [0, 255]. A blend with a factor in [0, 1] stays between
            its two (in-range, integer) ends, float rounding included, so it needs no clamp.
    """
    if clamp:
        x.clamp_(0, 255)
    # Via int32: CPU float32 -> uint8 conversion is not vectorised and twice as slow.
    dst.copy_(x.to(torch.int32))


def _op_posterize_(x: Tensor, mask: Tensor) -> None:
    """Keep the top bits of every value, in place: one uint8 AND per pixel.

    Args:
        x: uint8 ``(n, 3, H, W)``, modified in place.
        mask: uint8 ``(n, 1, 1, 1)`` bit masks (:func:`_byte_params`).
    """
    x.bitwise_and_(mask)


def _op_solarize_(x: Tensor, thr: Tensor) -> None:
    """Pixels ``>= thr`` become ``255 - pixel``, in place (five uint8 passes).

    Args:
        x: uint8 ``(n, 3, H, W)``, modified in place.
        thr: uint8 ``(n, 1, 1, 1)`` thresholds (:func:`_byte_params`).
    """
    # T - min(v, T) is 0 exactly where v >= T; clamped to 1 and minus 1 (wrapping), that is
    # 255 there and 0 elsewhere, and 255 - v == v ^ 255 for uint8. Plain uint8 arithmetic:
    # comparisons, which produce bool, take ~15x longer per pixel on the CPU.
    flip = torch.minimum(x, thr)
    x.bitwise_xor_(torch.sub(thr, flip, out=flip).clamp_(max=1).sub_(1))


def _op_blends_(
    x: Tensor, xf: Tensor, gray: Tensor, counts: list[int], m: Tensor, clamp: bool
) -> None:
    """Color, brightness and sharpness, in place: one float copy for all, one store.

    PIL's ``ImageEnhance`` blends, degenerate + factor * (image - degenerate) in float32
    (two roundings), truncated: from the image's grayscale (color), from black (brightness,
    factor * image), from the 3x3 SMOOTH-filtered image (sharpness).

    Args:
        x: uint8 ``(n, 3, H, W)``: ``counts[0]`` color, ``counts[1]`` brightness, then
            sharpness samples; modified in place.
        xf: ``x`` as float32, modified.
        gray: float32 ``(counts[0], 1, H, W)`` luma of the color samples (:func:`_luma`).
        counts: samples of color and brightness.
        m: float32 ``(n, 1, 1, 1)`` factors.
        clamp: whether a factor may lie outside [0, 1].
    """
    n_col, n_br = counts
    if n_col:
        xf[:n_col].sub_(gray).mul_(m[:n_col]).add_(gray)
    if n_br:
        xf[n_col : n_col + n_br].mul_(m[n_col : n_col + n_br])
    if x.shape[0] > n_col + n_br:
        _sharpen_(xf[n_col + n_br :], m[n_col + n_br :])
    _store_(x, xf, clamp)


def _sharpen_(xf: Tensor, m: Tensor) -> None:
    """Blend float32 images from their 3x3 SMOOTH-filtered versions, in place.

    Args:
        xf: float32 ``(n, 3, H, W)`` with integer values, modified in place.
        m: float32 ``(n, 1, 1, 1)`` factors.
    """
    # PIL's SMOOTH kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded; the 1-px border is left as
    # is (so the blend leaves it unchanged too). Separable box sums beat conv2d on CPU here.
    r = xf[..., :, :-2] + xf[..., :, 1:-1]
    r += xf[..., :, 2:]
    box = r[..., :-2, :] + r[..., 1:-1, :]
    box += r[..., 2:, :]
    centre = xf[..., 1:-1, 1:-1]
    # round(S / 13): S / 13 is never within float error of a tie (its fraction is k / 13), so
    # rounding S * fl(1/13) to nearest is exact (test_sharpness_rounding checks every S).
    smooth = box.add_(centre, alpha=4.0).mul_(1.0 / 13.0).round_()
    # Blend into the interior of xf itself, so that one contiguous store writes the result
    # (the border of xf still holds the original pixels).
    centre.sub_(smooth).mul_(m).add_(smooth)


def _lut_tables(
    x: Tensor, index: Tensor, n_ac: int, n_eq: int, m: Tensor, gray: Tensor | None
) -> Tensor:
    """Autocontrast, equalize and contrast lookup tables, PIL-exact.

    Args:
        x: uint8 ``(n, 3, H, W)``: ``n_ac`` autocontrast, ``n_eq`` equalize, then contrast
            samples.
        index: int32 ``(n * 3, H * W)``: the pixel values plus ``256 *`` their row number.
        n_ac: autocontrast samples.
        n_eq: equalize samples.
        m: float32 ``(n, 1, 1, 1)`` magnitudes (used for the contrast samples).
        gray: float32 ``(n - n_ac - n_eq, 1, H, W)`` luma of the contrast samples (:func:`_luma`),
            or ``None`` when there are none.

    Returns:
        uint8 ``(n * 3 * 256,)``: the per-sample, per-channel tables, one after the other.
    """
    n, c, h, w = x.shape
    dev = x.device
    levels = _levels(dev)
    # Float64 throughout: exact for these integers, and CPU integer division is slow. The
    # tables stay unrounded: the final clamp to [0, 255] and the truncating conversion to
    # uint8 floor them, as PIL's int() and // do (truncation is floor on values >= 0). Few,
    # whole-table ops: at 32-64 px, per-op overhead is most of the cost.
    tables = torch.empty(n * c, 256, dtype=torch.float64, device=dev)
    k_ac, k = n_ac * c, (n_ac + n_eq) * c
    changes = []  # per autocontrast / equalize table: False where it is the identity
    if k:
        hi = x[: n_ac + n_eq].view(k, h * w).amax(1, keepdim=True)  # last non-empty bins
    if n_ac:
        # autocontrast: map [lo, hi] linearly onto [0, 255] (unchanged when hi <= lo), with
        # PIL's Python arithmetic: level * scale + offset, offset = -lo * scale. (tensor /
        # tensor: torch computes ``scalar / tensor`` via a reciprocal, an ulp off.)
        lo_a = x[:n_ac].view(k_ac, h * w).amin(1, keepdim=True).double()
        hi_a = hi[:k_ac].double()
        scale = torch.div(levels[:, 255:], hi_a - lo_a)
        torch.mul(levels, scale, out=tables[:k_ac]).sub_(lo_a * scale)
        changes.append(hi_a > lo_a)
    if n_eq:
        # equalize: lut[i] = (step // 2 + #pixels below i) // step, with
        # step = (#pixels - #pixels in the last non-empty bin) // 255 (unchanged when step == 0).
        # All histograms in one bincount of the rows' offset values.
        flat = index[k_ac:k].view(-1)
        if flat.device.type == "cpu":
            hist = torch.bincount(flat, minlength=k * 256)[k_ac * 256 :]
        else:  # CUDA's bincount reads the maximum value on the host: a sync per call
            ones = torch.ones(flat.numel(), dtype=torch.int64, device=flat.device)
            hist = flat.new_zeros(k * 256, dtype=torch.int64).scatter_add_(0, flat.long(), ones)
            hist = hist[k_ac * 256 :]
        hist = hist.view(-1, 256)
        below = torch.cumsum(hist, 1, dtype=torch.float64, out=tables[k_ac:k]).sub_(hist)
        step = below.gather(1, hi[k_ac:].long()) // 255  # #pixels below the last bin // 255
        # A division of integers, truncated later: exact, since a true quotient is at least
        # 1 / divisor away from the next integer up.
        below.add_(step // 2).div_(step)
        changes.append(step > 0)
    if k:  # identity tables: the rows above may hold inf or nan (division by zero) there
        torch.where(torch.cat(changes), tables[:k], levels, out=tables[:k])
    if n_ac + n_eq < n:  # contrast: blend from the rounded mean of the luma image
        mean = gray.mean(dim=(1, 2, 3)).add_(0.5).floor_()[:, None]
        # mean + m (level - mean): exact in float64 (the float32 mean and m promote, so fused
        # or not, the same); PIL blends in float32, hence the rounding to float32 before the
        # truncation.
        con = torch.addcmul(mean, m[n_ac + n_eq :].view(-1, 1), levels - mean).float()
        tables.view(n, c, 256)[n_ac + n_eq :] = con[:, None]
    return tables.view(-1).clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=128)
def _table_offsets(rows: int, device: torch.device) -> Tensor:
    """int32 ``(rows, 1)`` start of each row's table, ``256 * row``, on ``device`` (cached)."""
    return torch.arange(0, rows * 256, 256, device=device, dtype=torch.int32).view(rows, 1)


@functools.lru_cache(maxsize=8)
def _levels(device: torch.device) -> Tensor:
    """float64 ``(1, 256)`` the levels 0..255 on ``device`` (cached)."""
    return torch.arange(256, device=device, dtype=torch.float64).view(1, 256)


def _op_lut_(x: Tensor, n_ac: int, n_eq: int, m: Tensor, gray: Tensor | None) -> None:
    """Autocontrast, equalize and contrast as per-sample, per-channel tables, one gather.

    Args:
        x: uint8 ``(n, 3, H, W)``, sorted by op: ``n_ac`` autocontrast, ``n_eq`` equalize,
            then contrast samples; modified in place.
        n_ac: autocontrast samples.
        n_eq: equalize samples.
        m: float32 ``(n, 1, 1, 1)`` magnitudes.
        gray: float32 luma of the contrast samples (:func:`_luma`), or ``None`` if none.
    """
    n, c, h, w = x.shape
    # One int32 index into the flattened (n * 3 * 256) tables: the pixel value plus its
    # (sample, channel) table's offset. It also serves the equalize histograms, and the flat
    # index_select is as fast as an int64 gather along the last dim at 32-64 px, ~10% faster
    # at 224 px (half the index traffic).
    index = x.view(n * c, h * w).to(torch.int32).add_(_table_offsets(n * c, x.device))
    lut = _lut_tables(x, index, n_ac, n_eq, m, gray)
    torch.index_select(lut, 0, index.view(-1), out=x.view(-1))


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


def _affine_coeffs(ops: Tensor, m: Tensor, h: int, w: int) -> Tensor:
    """Affine maps of the geometric ops, for any-shaped ``ops``/``m`` (CPU) -> ``(..., 8)``.

    Output -> input in pixel coordinates centred on the image, (x, y) -> (a x + b y + c,
    d x + e y + f); only one parameter is non-trivial per op, so one form covers all five (and
    gives the identity for every other op). Rotation is PIL's (counter-clockwise as displayed,
    y pointing down). Rescaled to grid_sample's [-1, 1] coordinates (align_corners=False);
    the last two entries are the translations in whole pixels (x, y), clamped to the image
    side (a longer one leaves only black).
    """
    # Each op's magnitude where the op is drawn, else 0: rotate, shear_x, shear_y, translate_x,
    # translate_y.
    drawn = ops[..., None] == _GEOMETRIC
    angle, shx, shy, mx, my = torch.where(drawn, m[..., None], 0.0).unbind(-1)
    theta = angle * (math.pi / 180)
    tx, ty = torch.round(mx * w), torch.round(my * h)
    cos, sin = torch.cos(theta), torch.sin(theta)
    return torch.stack(
        [
            cos,
            (shx - sin) * (h / w),
            tx * (2 / w),
            (sin + shy) * (w / h),
            cos,
            ty * (2 / h),
            tx.clamp(-w, w),
            ty.clamp(-h, h),
        ],
        -1,
    )


_GEOMETRIC = torch.tensor(
    [_OP[o] for o in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")]
)


@functools.lru_cache(maxsize=16)
def _pixel_centres(h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates in [-1, 1] (align_corners=False): ``(1, 1, W)``, ``(1, H, 1)``."""
    lin_x = (torch.arange(w, device=device, dtype=torch.float32) * 2 + 1) / w - 1
    lin_y = (torch.arange(h, device=device, dtype=torch.float32) * 2 + 1) / h - 1
    return lin_x.view(1, 1, w), lin_y.view(1, h, 1)


# Order of the ops inside one slot after sorting: the ops of one kernel are adjacent, contrast
# and color (which share a luma image) too, and the translations come after the other
# geometric ops (_op_affine_). Sort key of op i: _RANK[i].
_SORTED = (
    "identity",
    "posterize",
    "solarize",
    "autocontrast",
    "equalize",
    "contrast",
    "color",
    "brightness",
    "sharpness",
    "shear_x",
    "rotate",
    "shear_y",
    "translate_x",
    "translate_y",
)
_RANK = torch.tensor([_SORTED.index(name) for name in OPS])
_BLEND = torch.tensor([name in ("brightness", "color", "sharpness") for name in OPS])
_AT = {name: i for i, name in enumerate(_SORTED)}


def _slot_ranks(ops: Tensor, m: Tensor) -> Tensor:
    """Sort keys (positions in ``_SORTED``) of CPU ``ops``, 0 (identity) for no-op draws.

    Posterize keeping 8 bits and solarize with a threshold above 255 change nothing; as
    identity they skip all work, and the kernels need not represent them.
    """
    rank = _RANK[ops]
    noop = ((ops == _OP["posterize"]) & (m.round() >= 8)) | (
        (ops == _OP["solarize"]) & (torch.ceil(m) > 255)
    )
    return rank.masked_fill_(noop, 0)


def apply_rand_augment(images: Tensor, ops: Tensor, magnitudes: Tensor) -> Tensor:
    """Apply given per-sample RandAugment ops (deterministic part of :func:`rand_augment`).

    Per op slot, the samples are sorted by op (on the CPU) and each group of ops runs in place
    on its contiguous run of the sorted batch: posterize, solarize and brightness as uint8 /
    float arithmetic, autocontrast, equalize and contrast as one lookup-table gather, color
    and sharpness on their own samples, the five geometric ops as one pixel gather.

    Args:
        images: uint8 ``(N, 3, H, W)``.
        ops: int ``(N, K)`` indices into :data:`OPS`, applied left to right.
        magnitudes: float ``(N, K)`` in each op's units (:data:`MAGNITUDE_RANGES`).

    Returns:
        uint8 ``(N, 3, H, W)`` on ``images.device`` (``images`` itself when every op is
        identity).
    """
    _check_images(images)
    n = images.shape[0]
    if ops.dim() != 2 or ops.shape[0] != n or magnitudes.shape != ops.shape:
        raise ValueError(
            f"ops {tuple(ops.shape)} and magnitudes {tuple(magnitudes.shape)} must both be "
            f"({n}, K) for {n} images"
        )
    # One device sync at most (none for a CPU generator): the grouping needs the op codes.
    ops_cpu = ops.to("cpu", torch.int64)
    if ops_cpu.numel() and (ops_cpu.min() < 0 or ops_cpu.max() >= len(OPS)):
        raise ValueError(f"ops must be in [0, {len(OPS)}), got {ops_cpu.unique().tolist()}")
    mags_cpu = magnitudes.to("cpu", torch.float32)
    out, perm, spare = _rand_augment_sorted(images, ops_cpu, mags_cpu, owned=False)
    if out is None:
        return images
    return _take_rows(out, _on(_inverse(perm), images.device), spare)


def _rand_augment_sorted(
    images: Tensor, ops: Tensor, mags: Tensor, *, owned: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """RandAugment on a sorted copy of ``images``: ``out[i]`` is sample ``perm[i]``, augmented.

    Each slot sorts the samples by op, so that every op group works in place on a contiguous
    run: one row permutation per slot (the first one makes the copy), where an index_select
    and an index_copy per group would move the data twice, and a clone per slot once more.
    The permutations alternate between two buffers (``images`` itself when ``owned``): fresh
    memory costs page faults on every call.

    Args:
        images: uint8 ``(N, 3, H, W)``, contiguous; overwritten only when ``owned``.
        ops: int64 ``(N, K)`` op indices, on the CPU.
        mags: float32 ``(N, K)`` magnitudes, on the CPU.
        owned: whether ``images`` may serve as scratch memory.

    Returns:
        ``out`` (uint8 ``(N, 3, H, W)``), ``perm`` (int64 ``(N,)``, CPU) and ``spare`` (a
        scratch buffer like ``out``, or ``None``); ``None`` for ``out`` and ``perm`` when every
        op is an identity.
    """
    n, h, w = images.shape[0], *images.shape[-2:]
    dev = images.device
    ranks = _slot_ranks(ops, mags)
    # Samples per position of _SORTED, per slot; slots where every sample drew identity skip.
    counts = [torch.bincount(r, minlength=len(_SORTED)).tolist() for r in ranks.unbind(1)]
    slots = [k for k, c in enumerate(counts) if c[0] < n]
    if not slots:
        return None, None, None
    if not images.is_contiguous():  # the row permutations view each sample as one row
        images, owned = images.contiguous(), True
    # Parameter-only work for all slots at once (small CPU tensors: few ops beat small ops).
    coeffs = _affine_coeffs(ops, mags, h, w).unbind(1)  # (N, 8) per slot
    byte_params = _byte_params(mags).unbind(1)  # (N, 2) per slot
    # The blends (brightness, color, sharpness) only need a clamp for factors outside [0, 1].
    clamp = bool((_BLEND[ops] & ((mags < 0) | (mags > 1))).any())
    out, perm, spare = None, None, images if owned else None
    for k in slots:
        # Sort the rows by op (out[i] holds sample perm[i]); the order within a run is free.
        order = torch.argsort(ranks[:, k] if perm is None else ranks[perm, k], stable=True)
        if out is None:
            out, perm = _take_rows(images, _on(order, dev)), order
        else:
            out, spare = _take_rows(out, _on(order, dev), spare), out
            perm = perm[order]
        _apply_slot_(
            out,
            counts[k],
            _on(mags[perm, k], dev).view(n, 1, 1, 1),
            _on(byte_params[k][perm], dev).view(n, 2, 1, 1),
            coeffs[k][perm],
            clamp,
        )
    return out, perm, spare


def _byte_params(m: Tensor) -> Tensor:
    """uint8 posterize masks and solarize thresholds of all magnitudes ``m``: ``(..., 2)``.

    Computed for every entry at once (meaningless for the other ops): posterize keeps the top
    ``round(m)`` bits, ``floor(v / 2**s) * 2**s == v & (256 - 2**s)`` for ``s = 8 - bits`` in
    [0, 8]; solarize inverts pixels ``>= ceil(m)`` (thresholds above 255 change nothing and
    are identity by :func:`_slot_ranks`).
    """
    mask = 256 - torch.exp2((8 - m.round()).clamp_(0, 8))
    return torch.stack([mask, torch.ceil(m).clamp_(0, 255)], -1).to(torch.uint8)


def _apply_slot_(
    x: Tensor,
    counts: list[int],
    m: Tensor,
    byte_params: Tensor,
    coeffs: Tensor,
    clamp: bool,
) -> None:
    """Apply one op per sample, in place, to a batch sorted by :func:`_slot_ranks`.

    Args:
        x: uint8 ``(N, 3, H, W)``, contiguous, sorted by op; modified in place.
        counts: samples per position of ``_SORTED``.
        m: float32 ``(N, 1, 1, 1)`` magnitudes, sorted alike, on the images' device.
        byte_params: uint8 ``(N, 2, 1, 1)`` from :func:`_byte_params`, on that device.
        coeffs: float32 ``(N, 8)`` affine maps of the geometric ops, on the CPU, sorted alike.
        clamp: whether a blend factor may lie outside [0, 1].
    """
    at = list(accumulate(counts, initial=0))

    def run(first: str, last: str) -> slice:
        return slice(at[_AT[first]], at[_AT[last] + 1])

    if (r := run("posterize", "posterize")).stop > r.start:
        _op_posterize_(x[r], byte_params[r, 0:1])
    if (r := run("solarize", "solarize")).stop > r.start:
        _op_solarize_(x[r], byte_params[r, 1:2])
    # Contrast (by lookup table) and color need the luma of their images, and color,
    # brightness and sharpness blend float copies: one conversion and one luma for all.
    n_con, n_col = counts[_AT["contrast"]], counts[_AT["color"]]
    if (r := run("contrast", "sharpness")).stop > r.start:
        xf = x[r].float()
        gray = _luma(xf[: n_con + n_col])
    if (r := run("autocontrast", "contrast")).stop > r.start:
        n_ac, n_eq = counts[_AT["autocontrast"]], counts[_AT["equalize"]]
        _op_lut_(x[r], n_ac, n_eq, m[r], gray[:n_con] if n_con else None)
    if (r := run("color", "sharpness")).stop > r.start:
        n_br = counts[_AT["brightness"]]
        _op_blends_(x[r], xf[n_con:], gray[n_con:], [n_col, n_br], m[r], clamp)
    if (r := run("shear_x", "translate_y")).stop > r.start:
        _op_affine_(x[r], counts[_AT["shear_x"] : _AT["translate_y"] + 1], coeffs[r])


def _wide_rows(x: Tensor) -> Tensor:
    """A contiguous uint8 batch as ``(N, bytes)`` rows, as int64 words where the size allows.

    Row copies (index_select / index_copy_) move 8 bytes per element instead of 1: ~6x faster
    on the CPU.
    """
    rows = x.view(x.shape[0], -1)
    return rows.view(torch.int64) if rows.shape[1] % 8 == 0 else rows


def _take_rows(x: Tensor, index: Tensor, out: Tensor | None = None) -> Tensor:
    """``x[index]`` for a contiguous uint8 batch, as a word-wise row gather.

    Args:
        x: uint8 ``(N, ...)``, contiguous.
        index: int64 ``(M,)`` rows of ``x``.
        out: optional contiguous uint8 ``(M, ...)`` to write into (must not overlap ``x``).

    Returns:
        uint8 ``(M, ...)``: ``out`` when given.
    """
    if out is None:
        out = x.new_empty(len(index), *x.shape[1:])
    torch.index_select(_wide_rows(x), 0, index, out=_wide_rows(out))
    return out


def _inverse(perm: Tensor) -> Tensor:
    """Inverse of a permutation of ``0..n-1``."""
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(len(perm)))


def rand_augment(images: Tensor, generator: torch.Generator, *, num_ops: int = 2) -> Tensor:
    """FixMatch RandAugment: ``num_ops`` random ops with random magnitudes, per sample.

    Args:
        images: uint8 ``(N, 3, H, W)``.
        generator: source of randomness (any device).
        num_ops: ops per sample.

    Returns:
        uint8 ``(N, 3, H, W)``.
    """
    _check_images(images)
    ops, mags = sample_rand_augment(images.shape[0], generator, num_ops=num_ops)
    return apply_rand_augment(images, ops, mags)


def _cutout_boxes(u: Tensor, size: float, h: int, w: int) -> Tensor:
    """Cutout squares from ``U(0, 1)`` draws ``u`` ``(N, 3)``: float ``(N, 2, 2)``.

    ``boxes[i, 0]`` is sample i's first and last + 1 row, ``boxes[i, 1]`` its columns.
    """
    side = torch.floor(u[:, :1] * size * min(h, w))  # (N, 1)
    start = torch.floor(u[:, 1:] * _positions(h, w, u.device)[1] - side / 2).clamp_(min=0)
    return torch.stack([start, start + side], -1)


def _cutout_(images: Tensor, boxes: Tensor, fill: int) -> None:
    """Fill each sample's box (from :func:`_cutout_boxes`) with ``fill``, in place."""
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


def cutout(
    images: Tensor, generator: torch.Generator, *, size: float = 0.5, fill: int = 127
) -> Tensor:
    """FixMatch Cutout: one square of side ``U(0, size) * min(H, W)`` px per sample.

    The square is centred at a uniformly drawn pixel and clipped at the borders (its top-left
    corner is clamped first, as FixMatch's reference code does).

    Args:
        images: uint8 ``(N, 3, H, W)``.
        generator: source of randomness (any device).
        size: maximum side as a fraction of the image side (FixMatch: 0.5); 0 disables.
        fill: gray level of the square.

    Returns:
        uint8 ``(N, 3, H, W)``.
    """
    _check_images(images)
    _check_generator(generator)
    _check_cutout(size, fill)
    n, _, h, w = images.shape
    u = _rand(generator, (n, 3))
    if size == 0.0:
        return images
    out = images.clone(memory_format=torch.contiguous_format)
    _cutout_(out, _cutout_boxes(u, size, h, w), fill)
    return out


def _check_cutout(size: float, fill: int) -> None:
    if not 0.0 <= size <= 1.0:
        raise ValueError(f"cutout size must be in [0, 1], got {size}")
    if not 0 <= fill <= 255:
        raise ValueError(f"cutout fill must be in [0, 255], got {fill}")


# strong_view's ``cutout`` argument shadows the function inside it.
_cutout = cutout


def strong_view(
    images: Tensor,
    generator: torch.Generator,
    *,
    num_ops: int = 2,
    cutout: float = 0.5,
    crop: str = "translate",
    out_size: int | None = None,
    translate: float = 0.125,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """FixMatch strong view: an independent weak view, RandAugment, then Cutout.

    Args:
        images: uint8 ``(N, 3, H, W)`` on any device.
        generator: source of all randomness (any device).
        num_ops: RandAugment ops per sample.
        cutout: maximum Cutout side as a fraction of the image side; 0 disables.
        crop, out_size, translate, scale, ratio: as in :func:`weak_view`.

    Returns:
        uint8 ``(N, 3, S, S)``.
    """
    x = weak_view(
        images,
        generator,
        crop=crop,
        out_size=out_size,
        translate=translate,
        scale=scale,
        ratio=ratio,
    )
    return _strong_from_weak(x, generator, num_ops=num_ops, cutout=cutout, owned=True)


def _strong_from_weak(
    x: Tensor,
    generator: torch.Generator,
    *,
    num_ops: int,
    cutout: float,
    owned: bool = False,
    fill: int = 127,
) -> Tensor:
    """RandAugment + Cutout of weak views ``x`` (:func:`rand_augment` then :func:`cutout`).

    Same draws, same result, but Cutout runs in place on RandAugment's sorted copy, before
    the one permutation back to sample order.

    Args:
        x: uint8 ``(N, 3, S, S)`` weak views.
        generator: source of all randomness.
        num_ops: RandAugment ops per sample.
        cutout: maximum Cutout side as a fraction of the image side; 0 disables.
        owned: whether ``x`` may be overwritten (and returned): saves fresh memory.
        fill: gray level of the Cutout squares.

    Returns:
        uint8 ``(N, 3, S, S)``: a new tensor, or ``x`` itself when ``owned``.
    """
    _check_cutout(cutout, fill)
    n, _, h, w = x.shape
    ops, mags = sample_rand_augment(n, generator, num_ops=num_ops)
    u = _rand(generator, (n, 3))  # Cutout's draws, after RandAugment's as in strong_view
    out, perm, spare = _rand_augment_sorted(
        x, ops.to("cpu", torch.int64), mags.to("cpu"), owned=owned
    )
    if out is None:
        out = x if owned else x.clone(memory_format=torch.contiguous_format)
    if cutout > 0:
        boxes = _cutout_boxes(u, cutout, h, w)
        _cutout_(out, boxes if perm is None else boxes[_on(perm, boxes.device)], fill)
    return out if perm is None else _take_rows(out, _on(_inverse(perm), x.device), spare)


# ----------------------------------------------------------------------------- trainer API


@functools.lru_cache(maxsize=16)
def _view_sources(n_l: int, n_u: int, num_strong: int) -> Tensor:
    """int64 image of every view of :class:`ViewMaker` (cached): each labeled image once, then
    the unlabeled images ``1 + num_strong`` times."""
    return torch.cat([torch.arange(n_l), torch.arange(n_l, n_l + n_u).repeat(1 + num_strong)])


@dataclass(kw_only=True)
class ViewMaker:
    """The views one training step needs, normalised, on the batch's device."""

    image_size: int
    """Side of every view (32/64 for the translate setting, 224 for rrc)."""
    crop: str = "translate"
    """``"translate"`` (pad-and-crop, small images) or ``"rrc"`` (random-resized-crop)."""
    num_strong: int = 2
    """Strong views per unlabeled sample (the BMB authors use 2)."""
    mean: tuple[float, ...] = IMAGENET_MEAN
    """Per-channel mean, [0, 1] units."""
    std: tuple[float, ...] = IMAGENET_STD
    """Per-channel standard deviation, [0, 1] units."""
    num_ops: int = 2
    """RandAugment ops per strong view."""
    cutout: float = 0.5
    """Maximum Cutout side as a fraction of the image side."""
    translate: float = 0.125
    """Maximum weak translation as a fraction of the image side (translate mode)."""

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.crop not in _CROPS:
            raise ValueError(f"crop must be one of {_CROPS}, got {self.crop!r}")
        if self.num_strong < 0 or self.num_ops < 0:
            raise ValueError(
                f"num_strong ({self.num_strong}) and num_ops ({self.num_ops}) must be >= 0"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean {self.mean} and std {self.std} must have 3 entries")
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    def __call__(
        self, labeled: Tensor, unlabeled: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Weak views of both batches and ``num_strong`` strong views of the unlabeled one.

        Args:
            labeled: uint8 ``(B_L, 3, H, W)``.
            unlabeled: uint8 ``(B_U, 3, H, W)``.
            generator: source of all randomness (any device).

        Returns:
            float32 ``(B_L, 3, S, S)`` weak labeled, ``(B_U, 3, S, S)`` weak unlabeled, and a
            list of ``num_strong`` ``(B_U, 3, S, S)`` strong views; ``S = image_size``.
        """
        n_l, n_u = labeled.shape[0], unlabeled.shape[0]
        # The uint8 views in inference mode: hundreds of small ops, each spared autograd's
        # dispatch and view bookkeeping (~10% of the call at 64 px on the CPU). Normalised
        # outside it, so that the outputs are ordinary tensors (autograd may save them).
        with torch.inference_mode():
            weak, strong = self._views(labeled, unlabeled, generator)
        weak = self.normalize(weak)
        strong_f = list(self.normalize(strong).split(n_u)) if self.num_strong else []
        return weak[:n_l], weak[n_l:], strong_f

    def uint8_views(
        self, labeled: Tensor, unlabeled: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """:meth:`__call__` before normalisation: the same views as uint8.

        For views that travel between processes (4x fewer bytes than float32); normalise them
        on arrival with :meth:`normalize`. Same generator state, same views as :meth:`__call__`.
        """
        n_l, n_u = labeled.shape[0], unlabeled.shape[0]
        weak, strong = self._views(labeled, unlabeled, generator)
        return weak[:n_l], weak[n_l:], list(strong.split(n_u)) if self.num_strong else []

    def normalize(self, views: Tensor) -> Tensor:
        """uint8 views -> float32 with this maker's mean and std."""
        return normalize(views, self.mean, self.std)

    def _views(
        self, labeled: Tensor, unlabeled: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """uint8 weak views ``(B_L + B_U, ...)`` and strong views ``(num_strong * B_U, ...)``."""
        _check_images(labeled, "labeled")
        _check_images(unlabeled, "unlabeled")
        kw = {"crop": self.crop, "out_size": self.image_size, "translate": self.translate}
        n_l, n_u = labeled.shape[0], unlabeled.shape[0]
        # Samples are independent, so every view's crop runs in one call over
        # [labeled, unlabeled, unlabeled x num_strong]; the strong rows then get RandAugment and
        # Cutout (== strong_view). Fewer, larger kernels: per-op overhead dominates small images.
        if labeled.shape[1:] == unlabeled.shape[1:]:
            # Cropped straight from the n_l + n_u distinct images (``source``: the image of
            # each view), without concatenating the unlabeled batch 1 + num_strong times.
            images = unlabeled if n_l == 0 else torch.cat([labeled, unlabeled])
            source = _view_sources(n_l, n_u, self.num_strong)
            views = _weak_view(images, generator, source, **kw)
        else:
            batches = [labeled, unlabeled] + [unlabeled] * self.num_strong
            views = torch.cat([weak_view(b, generator, **kw) for b in batches])
        weak, strong = views[: n_l + n_u], views[n_l + n_u :]
        if self.num_strong:
            # RandAugment and Cutout may work in the strong rows' own memory (owned): the weak
            # rows before them are never written.
            strong = _strong_from_weak(
                strong, generator, num_ops=self.num_ops, cutout=self.cutout, owned=True
            )
        return weak, strong

    def eval(self, images: Tensor) -> Tensor:
        """Evaluation input: centre crop to ``image_size`` when larger, normalised.

        Args:
            images: uint8 ``(N, 3, H, W)`` with ``H, W >= image_size``.

        Returns:
            float32 ``(N, 3, image_size, image_size)``.
        """
        _check_images(images)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = center_crop(images, self.image_size)
        return normalize(images, self.mean, self.std)
