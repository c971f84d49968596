"""Batched, device-side weak and strong views (FixMatch) for uint8 image batches.

Every function takes a whole uint8 batch ``(N, 3, H, W)`` on any device (CPU or CUDA) and a
``torch.Generator``; each sample gets its own random parameters, and the work is done with
batched tensor ops -- there is no Python loop over samples (Python loops run over the
``num_ops`` op slots and the four groups of RandAugment ops only).

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
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import Tensor

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


def _rand(generator: torch.Generator, shape: tuple[int, ...]) -> Tensor:
    """U(0, 1) float32 of ``shape`` on the generator's device."""
    return torch.rand(shape, generator=generator, device=generator.device)


def _reflect(index: Tensor, size: int) -> Tensor:
    """Reflect (edge pixel not repeated) indices in ``[-(size-1), 2*(size-1)]`` into range."""
    index = index.abs()
    return (size - 1) - (size - 1 - index).abs()


def _to_uint8(x: Tensor) -> Tensor:
    """Clamp to [0, 255] and truncate, as PIL's blends do."""
    # Via int32: CPU float32 -> uint8 conversion is not vectorised and twice as slow.
    return x.clamp_(0, 255).to(torch.int32).to(torch.uint8)


# ----------------------------------------------------------------------------- crops


def _translate_crop(
    images: Tensor,
    generator: torch.Generator,
    out_hw: tuple[int, int],
    translate: float,
    flip: bool,
) -> Tensor:
    n, c, h, w = images.shape
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
    dy, dx, mirror = dy.to(dev), dx.to(dev), mirror.to(dev) if flip else mirror.zero_().to(dev)
    # Source: the images with reflect-padded columns, and (for flips) their mirror images,
    # uint8 (N, 1 or 2, 3, H, W + 2 px).
    wp = w + 2 * px
    src = images.new_empty(n, 2 if flip else 1, c, h, wp)
    src[:, 0, :, :, px : px + w] = images
    if px:
        src[:, 0, :, :, :px] = images[..., 1 : px + 1].flip(-1)
        src[:, 0, :, :, px + w :] = images[..., w - px - 1 : w - 1].flip(-1)
    if flip:
        src[:, 1] = src[:, 0].flip(-1)
    # Every output row is ``ow`` contiguous source bytes, so one row gather (index_select on
    # all length-``ow`` windows of the flat source) does the whole crop; an element-wise
    # gather with an int64 index per pixel is 2-4x slower on the CPU.
    windows = src.view(-1).unfold(0, ow, 1)
    top, left = (h - oh) // 2, (w - ow) // 2
    rows = _reflect(top + dy[:, None] + torch.arange(oh, device=dev), h)  # (N, oh)
    plane = (torch.arange(n, device=dev) * src.shape[1] + mirror)[:, None] * c + torch.arange(
        c, device=dev
    )  # (N, 3): index of each output channel's source plane
    starts = (plane[:, :, None] * h + rows[:, None, :]) * wp + (px + left + dx).view(n, 1, 1)
    return windows.index_select(0, starts.view(-1)).view(n, c, oh, ow)


def _rrc(
    images: Tensor,
    generator: torch.Generator,
    out_size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip: bool,
    attempts: int = 10,
) -> Tensor:
    """Random-resized-crop + flip, bilinear, all samples in one ``grid_sample``."""
    n, _, h, w = images.shape
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
    dev = images.device
    # Affine map output -> input in grid_sample's normalised coords (align_corners=False).
    sx, sy = (sign * cw / w).to(dev), (ch / h).to(dev)
    tx, ty = ((x0 + cw / 2) * 2 / w - 1).to(dev), ((y0 + ch / 2) * 2 / h - 1).to(dev)
    lin = (torch.arange(out_size, device=dev, dtype=torch.float32) * 2 + 1) / out_size - 1
    gx = (sx[:, None] * lin + tx[:, None])[:, None, :].expand(n, out_size, out_size)
    gy = (sy[:, None] * lin + ty[:, None])[:, :, None].expand(n, out_size, out_size)
    grid = torch.stack([gx, gy], dim=-1)
    out = F.grid_sample(
        images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return _to_uint8(out.add_(0.5))


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
    n, _, h, w = images.shape
    if crop == "translate":
        if not 0.0 <= translate < 1.0:
            raise ValueError(f"translate must be in [0, 1), got {translate}")
        oh, ow = (h, w) if out_size is None else (out_size, out_size)
        if not (0 < oh <= h and 0 < ow <= w):
            raise ValueError(f"out_size={out_size} must be in [1, {min(h, w)}] for {h}x{w} input")
        return _translate_crop(images, generator, (oh, ow), translate, flip)
    if crop == "rrc":
        size = min(h, w) if out_size is None else out_size
        if size <= 0:
            raise ValueError(f"out_size must be positive, got {out_size}")
        if not (0 < scale[0] <= scale[1] <= 1.0) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"bad rrc scale={scale} or ratio={ratio}")
        return _rrc(images, generator, size, scale, ratio, flip)
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
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=images.device)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=images.device)
    # x * 1/(255 std) - mean/std, in place (a broadcasting addcmul is 5x slower on CPU).
    return images.float().mul_(scale.view(1, c, 1, 1)).add_(shift.view(1, c, 1, 1))


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
    lo = torch.tensor([MAGNITUDE_RANGES.get(o, (0.0, 0.0))[0] for o in OPS], device=gd)
    hi = torch.tensor([MAGNITUDE_RANGES.get(o, (0.0, 0.0))[1] for o in OPS], device=gd)
    mags = lo[ops] + u * (hi - lo)[ops]
    # Posterize: bits uniform over the integers 4..8.
    bits = lo[_OP["posterize"]] + torch.floor(u * 5).clamp_(max=4)
    mags = torch.where(ops == _OP["posterize"], bits, mags)
    return ops, mags


def _luma(x: Tensor) -> Tensor:
    """PIL's ``convert("L")``: ``(19595 R + 38470 G + 7471 B + 2**15) >> 16`` (exact in fp32).

    Args:
        x: uint8 or float ``(n, 3, H, W)``.

    Returns:
        float32 ``(n, 1, H, W)`` with integer values.
    """
    weights = torch.tensor([19595.0, 38470.0, 7471.0], device=x.device).view(1, 3, 1, 1)
    y = (x.float() * weights).sum(dim=1, keepdim=True)
    return torch.floor(y.add_(32768.0).mul_(1.0 / 65536.0))


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """PIL ``Image.blend(degenerate, x, factor)``: truncating, clamped; factor ``(n,)``."""
    out = (x - degenerate).mul_(factor.view(-1, 1, 1, 1)).add_(degenerate)
    return _to_uint8(out)


def _lut_histogram(index: Tensor, n_autocontrast: int, levels: Tensor) -> Tensor:
    """Autocontrast (first ``n_autocontrast`` samples) and equalize (the rest) tables, PIL-exact.

    Args:
        index: int64 ``(n, 3, H*W)`` pixel values.
        n_autocontrast: leading samples that autocontrast; the others equalize.
        levels: float64 ``(256,)`` = 0..255.

    Returns:
        float64 ``(n, 3, 256)`` per-sample, per-channel lookup tables.
    """
    n, c, hw = index.shape
    # Per-(sample, channel) histograms in one scatter-add of ones along the value axis.
    ones = torch.ones(n * c, hw, dtype=torch.int32, device=index.device)
    hist = torch.zeros(n * c, 256, dtype=torch.int32, device=index.device)
    hist = hist.scatter_add_(1, index.view(n * c, hw), ones).double()
    # Float64 throughout: exact for these integers, and CPU integer division is slow.
    nonzero = hist > 0
    hi = (nonzero * levels).argmax(1, keepdim=True)  # last non-empty bin
    lo = nonzero.to(torch.uint8).argmax(1, keepdim=True)  # first non-empty bin
    # autocontrast: map [lo, hi] linearly onto [0, 255] (unchanged when hi <= lo), truncating
    # exactly like PIL's Python arithmetic. (tensor / tensor, as torch computes
    # ``scalar / tensor`` via a reciprocal, an ulp off.)
    span = (hi - lo).clamp(min=1).double()
    scale = torch.full_like(span, 255.0) / span
    ac = torch.floor(levels * scale + (-lo * scale)).clamp_(0, 255)
    ac = torch.where(hi > lo, ac, levels)
    # equalize: lut[i] = (step // 2 + #pixels below i) // step, with
    # step = (#pixels - #pixels in the last non-empty bin) // 255 (unchanged when step == 0).
    step = torch.floor((hw - hist.gather(1, hi)) / 255)
    below = hist.cumsum(1) - hist
    eq = torch.floor((below + torch.floor(step / 2)) / step.clamp(min=1)).clamp_(max=255)
    eq = torch.where(step > 0, eq, levels)
    is_ac = (torch.arange(n * c, device=index.device) < n_autocontrast * c)[:, None]
    return torch.where(is_ac, ac, eq).view(n, c, 256)


def _op_lut(x: Tensor, counts: list[int], m: Tensor) -> Tensor:
    """The six per-value ops as one per-sample, per-channel lookup table and one gather.

    Args:
        x: uint8 ``(n, 3, H, W)``, sorted by op: ``counts`` samples each of autocontrast,
            equalize, solarize, posterize, contrast, brightness.
        counts: six sample counts summing to ``n``.
        m: float32 ``(n,)`` magnitudes.

    Returns:
        uint8 ``(n, 3, H, W)``.
    """
    n, c, h, w = x.shape
    n_ac, n_eq, n_sol, n_post, n_con, n_bri = counts
    at = list(accumulate(counts, initial=0))
    index = x.reshape(n, c, h * w).long()
    levels = torch.arange(256, device=x.device, dtype=torch.float64)
    m = m.double()[:, None]
    tables = []  # float64 (k, 256) or (k, 3, 256), in sample order
    if n_ac + n_eq:
        tables.append(_lut_histogram(index[: at[2]], n_ac, levels))
    if n_sol:  # pixels >= T become 255 - pixel
        tables.append(torch.where(levels >= torch.ceil(m[at[2] : at[3]]), 255 - levels, levels))
    if n_post:  # keep the top ``bits`` bits
        q = torch.exp2(8 - m[at[3] : at[4]].round())
        tables.append(torch.floor(levels / q) * q)
    if n_con:  # blend from the rounded mean of the luma image (PIL's Contrast)
        mean = torch.floor(_luma(x[at[4] : at[5]]).mean(dim=(1, 2, 3)) + 0.5)[:, None].double()
        tables.append(torch.floor((mean + m[at[4] : at[5]] * (levels - mean)).float()))
    if n_bri:  # blend from black
        tables.append(torch.floor((m[at[5] : at[6]] * levels).float()))
    # PIL blends in float32, hence the .float() before truncating.
    lut = torch.cat([t if t.dim() == 3 else t[:, None].expand(-1, c, -1) for t in tables])
    lut = lut.clamp_(0, 255).to(torch.uint8)  # (n, 3, 256)
    return lut.gather(2, index).view(n, c, h, w)


def _op_color(x: Tensor, m: Tensor) -> Tensor:
    xf = x.float()
    return _blend(_luma(xf), xf, m)


def _op_sharpness(x: Tensor, m: Tensor) -> Tensor:
    # PIL's SMOOTH kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded; the 1-px border is left as
    # is (so the blend leaves it unchanged too). Separable box sums beat conv2d on CPU here.
    xf = x.float()
    r = xf[..., :, :-2] + xf[..., :, 1:-1]
    r += xf[..., :, 2:]
    box = r[..., :-2, :] + r[..., 1:-1, :]
    box += r[..., 2:, :]
    centre = xf[..., 1:-1, 1:-1]
    smooth = box.add_(centre, alpha=4.0).mul_(1.0 / 13.0).add_(0.5).floor_()
    out = x.clone()
    out[..., 1:-1, 1:-1] = _blend(smooth, centre, m)
    return out


def _op_affine(x: Tensor, coeffs: Tensor) -> Tensor:
    """Rotate / shear / translate, nearest-neighbour, black fill, one ``grid_sample`` for all.

    Args:
        x: uint8 ``(n, 3, H, W)``.
        coeffs: float32 ``(n, 6)`` output -> input maps from :func:`_affine_coeffs`.

    Returns:
        uint8 ``(n, 3, H, W)``.
    """
    n, _, h, w = x.shape
    a = coeffs.to(x.device).view(n, 2, 3, 1, 1)
    lin_x, lin_y = _pixel_centres(h, w, x.device)
    # (n, 2, 1, W) + (n, 2, H, 1): channel-first broadcasting is several times faster on the
    # CPU than building the (n, H, W, 2) grid directly; grid_sample takes the permuted view.
    grid = a[:, :, 0] * lin_x + (a[:, :, 1] * lin_y + a[:, :, 2])
    # Nearest sampling of integer values: the result is exact, no rounding needed.
    out = F.grid_sample(
        x.float(),
        grid.permute(0, 2, 3, 1),
        mode="nearest",
        padding_mode="zeros",
        align_corners=False,
    )
    return out.to(torch.int32).to(torch.uint8)


def _affine_coeffs(ops: Tensor, m: Tensor, h: int, w: int) -> Tensor:
    """Affine maps of the geometric ops, for any-shaped ``ops``/``m`` (CPU) -> ``(..., 6)``.

    Output -> input in pixel coordinates centred on the image, (x, y) -> (a x + b y + c,
    d x + e y + f); only one parameter is non-trivial per op, so one form covers all five (and
    gives the identity for every other op). Rotation is PIL's (counter-clockwise as displayed,
    y pointing down). Rescaled to grid_sample's [-1, 1] coordinates (align_corners=False).
    """
    zero = torch.zeros_like(m)
    theta = torch.where(ops == _OP["rotate"], m, zero) * (math.pi / 180)
    shx = torch.where(ops == _OP["shear_x"], m, zero)
    shy = torch.where(ops == _OP["shear_y"], m, zero)
    tx = torch.where(ops == _OP["translate_x"], torch.round(m * w), zero)
    ty = torch.where(ops == _OP["translate_y"], torch.round(m * h), zero)
    cos, sin = torch.cos(theta), torch.sin(theta)
    return torch.stack(
        [cos, (shx - sin) * (h / w), tx * (2 / w), (sin + shy) * (w / h), cos, ty * (2 / h)], -1
    )


@functools.lru_cache(maxsize=16)
def _pixel_centres(h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates in [-1, 1] (align_corners=False): ``(1, 1, 1, W)``, ``(1, 1, H, 1)``."""
    lin_x = (torch.arange(w, device=device, dtype=torch.float32) * 2 + 1) / w - 1
    lin_y = (torch.arange(h, device=device, dtype=torch.float32) * 2 + 1) / h - 1
    return lin_x.view(1, 1, 1, w), lin_y.view(1, 1, h, 1)


def apply_rand_augment(images: Tensor, ops: Tensor, magnitudes: Tensor) -> Tensor:
    """Apply given per-sample RandAugment ops (deterministic part of :func:`rand_augment`).

    Per op slot, samples are grouped by op (the grouping is computed on the CPU) and each
    group runs as one sub-batch: the six per-value ops share one lookup-table gather, the five
    geometric ops one pixel gather, and color and sharpness run on their own samples.

    Args:
        images: uint8 ``(N, 3, H, W)``.
        ops: int ``(N, K)`` indices into :data:`OPS`, applied left to right.
        magnitudes: float ``(N, K)`` in each op's units (:data:`MAGNITUDE_RANGES`).

    Returns:
        uint8 ``(N, 3, H, W)`` on ``images.device``.
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
    # Parameter-only work for all slots at once (small CPU tensors: few ops beat small ops).
    coeffs = _affine_coeffs(ops_cpu, mags_cpu, *images.shape[-2:])  # (N, K, 6)
    x = images
    for k in range(ops_cpu.shape[1]):
        x = _apply_slot(x, ops_cpu[:, k], mags_cpu[:, k], coeffs[:, k])
    return x


def _apply_slot(x: Tensor, codes: Tensor, mags: Tensor, coeffs: Tensor) -> Tensor:
    """Apply one op per sample.

    Args:
        x: uint8 ``(N, 3, H, W)``.
        codes: int64 ``(N,)`` op indices, on the CPU.
        mags: float32 ``(N,)`` magnitudes, on the CPU.
        coeffs: float32 ``(N, 6)`` affine maps of the geometric ops, on the CPU.

    Returns:
        uint8 ``(N, 3, H, W)``.
    """
    n, dev = x.shape[0], x.device
    counts = torch.bincount(codes, minlength=len(OPS)).tolist()
    if counts[0] == n:  # every sample drew identity
        return x
    at = list(accumulate(counts, initial=0))
    order = torch.argsort(codes, stable=True)
    coeffs = coeffs[order]
    order_dev, mags_dev = order.to(dev), mags[order].to(dev)
    out = x.clone(memory_format=torch.contiguous_format)  # identity rows stay as they are
    for first, last in _GROUPS:
        a, b = at[_OP[first]], at[_OP[last] + 1]
        if b == a:
            continue
        rows = order_dev[a:b]
        sub = x.index_select(0, rows)
        if first == "autocontrast":
            sub = _op_lut(sub, counts[_OP[first] : _OP[last] + 1], mags_dev[a:b])
        elif first == "color":
            sub = _op_color(sub, mags_dev[a:b])
        elif first == "sharpness":
            sub = _op_sharpness(sub, mags_dev[a:b])
        else:
            sub = _op_affine(sub, coeffs[a:b])
        _wide_rows(out).index_copy_(0, rows, _wide_rows(sub))
    return out


def _wide_rows(x: Tensor) -> Tensor:
    """A contiguous uint8 batch as ``(N, bytes)`` rows, as int64 words where the size allows.

    Row copies (index_copy_) move 8 bytes per element instead of 1: ~6x faster on the CPU.
    """
    rows = x.view(x.shape[0], -1)
    return rows.view(torch.int64) if rows.shape[1] % 8 == 0 else rows


# Runs of consecutive ops (in sorted op order) that execute as one sub-batch (identity: none).
_GROUPS = (
    ("autocontrast", "brightness"),
    ("color", "color"),
    ("sharpness", "sharpness"),
    ("rotate", "translate_y"),
)


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
    if not 0.0 <= size <= 1.0:
        raise ValueError(f"cutout size must be in [0, 1], got {size}")
    if not 0 <= fill <= 255:
        raise ValueError(f"cutout fill must be in [0, 255], got {fill}")
    n, _, h, w = images.shape
    u = _rand(generator, (n, 3))
    if size == 0.0:
        return images
    side = torch.floor(u[:, 0] * size * min(h, w))
    y0 = torch.floor(u[:, 1] * h - side / 2).clamp_(min=0)
    x0 = torch.floor(u[:, 2] * w - side / 2).clamp_(min=0)
    box = torch.stack([y0, y0 + side, x0, x0 + side], dim=1).to(images.device)
    rows = torch.arange(h, device=images.device, dtype=torch.float32)
    cols = torch.arange(w, device=images.device, dtype=torch.float32)
    in_r = (rows >= box[:, 0:1]) & (rows < box[:, 1:2])  # (N, H)
    in_c = (cols >= box[:, 2:3]) & (cols < box[:, 3:4])  # (N, W)
    mask = (in_r[:, :, None] & in_c[:, None, :]).to(torch.uint8).unsqueeze(1)  # (N, 1, H, W)
    # uint8 arithmetic wraps mod 256, so x + (fill - x) * mask == fill inside, x outside;
    # cheaper on CPU than masked_fill.
    return images + (fill - images) * mask


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
    x = rand_augment(x, generator, num_ops=num_ops)
    return _cutout(x, generator, size=cutout)


# ----------------------------------------------------------------------------- trainer API


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
        _check_images(labeled, "labeled")
        _check_images(unlabeled, "unlabeled")
        kw = {"crop": self.crop, "out_size": self.image_size, "translate": self.translate}
        n_l, n_u = labeled.shape[0], unlabeled.shape[0]
        # Samples are independent, so every view's crop runs in one call over
        # [labeled, unlabeled, unlabeled x num_strong]; the strong rows then get RandAugment and
        # Cutout (== strong_view). Fewer, larger kernels: per-op overhead dominates small images.
        batches = [labeled, unlabeled] + [unlabeled] * self.num_strong
        if labeled.shape[1:] == unlabeled.shape[1:]:
            views = weak_view(torch.cat(batches), generator, **kw)
        else:
            views = torch.cat([weak_view(b, generator, **kw) for b in batches])
        weak = normalize(views[: n_l + n_u], self.mean, self.std)
        strong: list[Tensor] = []
        if self.num_strong:
            s = rand_augment(views[n_l + n_u :], generator, num_ops=self.num_ops)
            s = _cutout(s, generator, size=self.cutout)
            strong = list(normalize(s, self.mean, self.std).split(n_u))
        return weak[:n_l], weak[n_l:], strong

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
