"""The RandAugment policy: the op list, magnitude sampling, and per-sample op application.

:data:`OPS` and :data:`MAGNITUDE_RANGES` are FixMatch's RandAugment (14 ops, one uniformly drawn
magnitude per op per sample); :func:`sample_rand_augment` draws ``num_ops`` ops per sample.
Applying them: per op slot, the samples are sorted by op (one row permutation) so that each
kernel of :mod:`~pipelines.augment.color` and :mod:`~pipelines.augment.affine` runs in place
on one contiguous run, and one permutation at the end puts the samples back in order. Design
notes: ``docs/augmentation.md``.
"""

from __future__ import annotations

import functools
import math
from itertools import accumulate

import torch
from torch import Tensor

from pipelines.augment._common import _check_generator, _check_images, _on, _rand
from pipelines.augment.affine import _op_affine_
from pipelines.augment.color import (
    _byte_params,
    _luma,
    _op_blends_,
    _op_lut_,
    _op_posterize_,
    _op_solarize_,
)
from pipelines.augment.cutout import _cutout_

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


def _affine_coeffs(
    ops: Tensor, m: Tensor, h: int, w: int, shear_origin: bool = False
) -> Tensor:
    """Affine maps of the geometric ops, for any-shaped ``ops``/``m`` (CPU) -> ``(..., 8)``.

    Output -> input in pixel coordinates centred on the image, (x, y) -> (a x + b y + c,
    d x + e y + f); only one parameter is non-trivial per op, so one form covers all five (and
    gives the identity for every other op). Rotation is PIL's (counter-clockwise as displayed,
    y pointing down). Shears act about the centre, or with ``shear_origin`` about the top-left
    corner (PIL's plain ``AFFINE (1, m, 0, 0, 1, 0)``, as the BMB authors' RandAugment: the
    centred shear plus a shift of ``m H / 2`` px). Rescaled to grid_sample's [-1, 1]
    coordinates (align_corners=False); the last two entries are the translations in whole
    pixels (x, y), clamped to the image side (a longer one leaves only black).
    """
    # Each op's magnitude where the op is drawn, else 0: rotate, shear_x, shear_y, translate_x,
    # translate_y.
    drawn = ops[..., None] == _GEOMETRIC
    angle, shx, shy, mx, my = torch.where(drawn, m[..., None], 0.0).unbind(-1)
    theta = angle * (math.pi / 180)
    tx, ty = torch.round(mx * w), torch.round(my * h)
    cos, sin = torch.cos(theta), torch.sin(theta)
    cx, cy = tx * (2 / w), ty * (2 / h)
    if shear_origin:
        cx, cy = cx + shx * (h / w), cy + shy * (w / h)
    return torch.stack(
        [
            cos,
            (shx - sin) * (h / w),
            cx,
            (sin + shy) * (w / h),
            cos,
            cy,
            tx.clamp(-w, w),
            ty.clamp(-h, h),
        ],
        -1,
    )


_GEOMETRIC = torch.tensor(
    [_OP[o] for o in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")]
)


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


def apply_rand_augment(
    images: Tensor,
    ops: Tensor,
    magnitudes: Tensor,
    *,
    boxes: Tensor | None = None,
    fill: int | Tensor = 127,
    owned: bool = False,
    shear_origin: bool = False,
) -> Tensor:
    """Apply given per-sample RandAugment ops, then Cutout boxes (the strong view's pixel work).

    Per op slot, the samples are sorted by op (on the CPU; one row permutation) and each group
    of ops runs in place on its contiguous run of the sorted batch: posterize and solarize as
    uint8 arithmetic, autocontrast, equalize and contrast as one lookup-table gather, color,
    brightness and sharpness as float blends, the five geometric ops as one pixel gather. The
    Cutout boxes are filled on the sorted copy too, before the one permutation back.

    Args:
        images: uint8 ``(N, 3, H, W)``.
        ops: int ``(N, K)`` indices into :data:`OPS`, applied left to right.
        magnitudes: float ``(N, K)`` in each op's units (:data:`MAGNITUDE_RANGES`).
        boxes: float ``(N, 2, 2)`` Cutout boxes from
            :func:`~pipelines.augment.cutout.cutout_boxes` (any device), or ``None``: no Cutout.
        fill: gray level of the Cutout boxes, or a uint8 ``(1, 3, 1, 1)`` colour on the images'
            device.
        shear_origin: shears about the top-left corner instead of the centre
            (:func:`_affine_coeffs`).
        owned: whether ``images`` may serve as scratch memory (it then holds scratch data
            afterwards, or the result): saves fresh memory.

    Returns:
        uint8 ``(N, 3, H, W)`` on ``images.device``: a new tensor unless ``owned``.
    """
    _check_images(images)
    n = images.shape[0]
    if ops.dim() != 2 or ops.shape[0] != n or magnitudes.shape != ops.shape:
        raise ValueError(
            f"ops {tuple(ops.shape)} and magnitudes {tuple(magnitudes.shape)} must both be "
            f"({n}, K) for {n} images"
        )
    if boxes is not None and boxes.shape != (n, 2, 2):
        raise ValueError(f"boxes must have shape ({n}, 2, 2), got {tuple(boxes.shape)}")
    # One device sync at most (none for a CPU generator): the grouping needs the op codes.
    ops_cpu = ops.to("cpu", torch.int64)
    if ops_cpu.numel() and (ops_cpu.min() < 0 or ops_cpu.max() >= len(OPS)):
        raise ValueError(f"ops must be in [0, {len(OPS)}), got {ops_cpu.unique().tolist()}")
    mags_cpu = magnitudes.to("cpu", torch.float32)
    out, perm, spare = _rand_augment_sorted(
        images, ops_cpu, mags_cpu, owned=owned, shear_origin=shear_origin
    )
    if out is None:  # every op an identity: nothing sorted
        out = images if owned else images.clone(memory_format=torch.contiguous_format)
    if boxes is not None:
        _cutout_(out, boxes if perm is None else boxes[_on(perm, boxes.device)], fill)
    return out if perm is None else _take_rows(out, _on(_inverse(perm), images.device), spare)


def _rand_augment_sorted(
    images: Tensor, ops: Tensor, mags: Tensor, *, owned: bool, shear_origin: bool = False
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
        shear_origin: shears about the top-left corner (:func:`_affine_coeffs`).

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
    coeffs = _affine_coeffs(ops, mags, h, w, shear_origin).unbind(1)  # (N, 8) per slot
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
