"""RandAugment's pixel-value ops, PIL-exact: posterize, solarize, the enhance blends, LUT ops.

Every kernel works in place on a contiguous run of samples that drew the same op (the batch is
sorted by op, :mod:`pipelines.augment.policy`): posterize and solarize as uint8 arithmetic;
color, brightness and sharpness as float32 blends of one float copy (PIL's ``ImageEnhance``
arithmetic, truncated); autocontrast, equalize and contrast as one per-sample, per-channel
lookup-table gather (PIL's ``ImageOps`` arithmetic). Design notes: ``docs/augmentation.md``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


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


def _byte_params(m: Tensor) -> Tensor:
    """uint8 posterize masks and solarize thresholds of all magnitudes ``m``: ``(..., 2)``.

    Computed for every entry at once (meaningless for the other ops): posterize keeps the top
    ``round(m)`` bits, ``floor(v / 2**s) * 2**s == v & (256 - 2**s)`` for ``s = 8 - bits`` in
    [0, 8]; solarize inverts pixels ``>= ceil(m)`` (thresholds above 255 change nothing and
    are identity by :func:`_slot_ranks`).
    """
    mask = 256 - torch.exp2((8 - m.round()).clamp_(0, 8))
    return torch.stack([mask, torch.ceil(m).clamp_(0, 255)], -1).to(torch.uint8)
