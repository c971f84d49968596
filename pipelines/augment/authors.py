"""The BMB authors' strong augmentation: RandAugment(3, 4) of ``ildoonet/pytorch-randaugment``
and their fixed-size Cutout, batched.

Their ``dataset/utils.py`` imports ``RandAugment`` (the package of GitHub
``ildoonet/pytorch-randaugment``, last commit 2020-01-29) and builds every strong view with
``RandAugment(3, 4)``: per image, 3 ops drawn uniformly **with replacement** from its 16-op list
(:data:`AUTHORS_OPS`), each at the one fixed value ``m / 30 * (max - min) + min`` of its range
(:data:`AUTHORS_RANGES`, :func:`authors_value`), the geometric ones with a random sign. At 32/64
px a ``CutoutDefault(S / 2)`` follows on the normalised tensor (:func:`fixed_cutout_boxes`).

Here each op maps onto the kernels of :mod:`~pipelines.augment.policy` (invert = solarize at 0,
posterize at ``max(1, int(v))`` bits, shears about the top-left corner, translations of ``v``
whole pixels), plus two of their own: ``solarize_add`` (:func:`_op_solarize_add_`) and
``cutout_abs`` (a ``v``-px box of colour (125, 123, 114)). One slot at a time, so that the op
order within a sample is theirs. Their quirks, kept (``docs/fidelity.md``): Invert and a
Solarize at threshold 34 (at m = 4) invert most of the image; the enhance ops all *reduce*
(factor 0.34 at m = 4; the identity would be m = 15); Posterize keeps 1 bit; translations are
absolute pixels (13 px at m = 4, whatever the image size); ``CutoutAbs`` centres its box at
``np.random.uniform(w)``, i.e. uniform on ``(1, w]``, not ``[0, w)``. Design notes:
``docs/augmentation.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from pipelines.augment._common import Rows, _check_generator, _check_images, _draw_count, _kept, _rand
from pipelines.augment.color import _op_solarize_
from pipelines.augment.cutout import _cutout_
from pipelines.augment.policy import OPS, apply_rand_augment

#: Their op list, in their order (``augment_list()``).
AUTHORS_OPS: tuple[str, ...] = (
    "autocontrast",
    "equalize",
    "invert",
    "rotate",
    "posterize",
    "solarize",
    "solarize_add",
    "color",
    "contrast",
    "brightness",
    "sharpness",
    "shear_x",
    "shear_y",
    "cutout_abs",
    "translate_x_abs",
    "translate_y_abs",
)

#: ``(min, max)`` of each op's range in their units (degrees, bits, levels, factors, pixels).
AUTHORS_RANGES: dict[str, tuple[float, float]] = {
    "autocontrast": (0, 1),
    "equalize": (0, 1),
    "invert": (0, 1),
    "rotate": (0, 30),
    "posterize": (0, 4),
    "solarize": (0, 256),
    "solarize_add": (0, 110),
    "color": (0.1, 1.9),
    "contrast": (0.1, 1.9),
    "brightness": (0.1, 1.9),
    "sharpness": (0.1, 1.9),
    "shear_x": (0.0, 0.3),
    "shear_y": (0.0, 0.3),
    "cutout_abs": (0, 40),
    "translate_x_abs": (0.0, 100),
    "translate_y_abs": (0.0, 100),
}

#: Ops whose value gets a random sign (theirs: ``if random.random() > 0.5: v = -v``).
SIGNED = ("rotate", "shear_x", "shear_y", "translate_x_abs", "translate_y_abs")

#: Colour of ``CutoutAbs`` boxes.
CUTOUT_ABS_FILL = (125, 123, 114)


def authors_value(name: str, magnitude: float) -> float:
    """Their magnitude rule: ``magnitude / 30 * (max - min) + min`` of op ``name``'s range."""
    lo, hi = AUTHORS_RANGES[name]
    return float(magnitude) / 30 * float(hi - lo) + lo


@dataclass(frozen=True)
class AuthorsDraw:
    """One batch's random draws for :func:`apply_authors_rand_augment`.

    Attributes:
        ops: int64 ``(N, K)`` indices into :data:`AUTHORS_OPS`, applied left to right.
        negative: bool ``(N, K)``: the signed ops' value is negated.
        where: float32 ``(N, K, 2)`` U(0, 1) draws placing a ``cutout_abs`` box (x, y).
    """

    ops: Tensor
    negative: Tensor
    where: Tensor


def sample_authors_rand_augment(
    n: int, generator: torch.Generator, *, num_ops: int = 3, rows: Rows | None = None
) -> AuthorsDraw:
    """Draw ``num_ops`` ops per sample, uniformly with replacement, their signs and box places.

    Order of the draws: ops, signs, box places (all drawn whatever the ops are), on the
    generator's device. ``rows``: draw for a call over ``rows[0]`` samples and keep ``rows[1]``
    (:data:`~pipelines.augment._common.Rows`), so a rank's part of a global batch gets the
    parameters one process would give those samples.
    """
    _check_generator(generator)
    if num_ops < 0:
        raise ValueError(f"num_ops must be >= 0, got {num_ops}")
    gd, nd = generator.device, _draw_count(n, rows)
    ops = torch.randint(0, len(AUTHORS_OPS), (nd, num_ops), generator=generator, device=gd)
    negative = _rand(generator, (nd, num_ops)) < 0.5
    where = _rand(generator, (nd, num_ops, 2))
    return AuthorsDraw(_kept(ops, rows), _kept(negative, rows), _kept(where, rows))


def _kernel_args(name: str, value: float, h: int, w: int) -> tuple[int, float, float]:
    """``(our op index, magnitude, sign factor)`` of one of their ops at ``value``: what
    :func:`~pipelines.augment.policy.apply_rand_augment` must do (identity for the two ops
    handled here)."""
    if name == "invert":  # solarize at 0: every pixel inverted
        return OPS.index("solarize"), 0.0, 1.0
    if name == "posterize":  # v = max(1, int(v)) bits
        return OPS.index("posterize"), float(max(1, int(value))), 1.0
    if name == "translate_x_abs":  # ours: a fraction of the side, rounded to whole pixels
        return OPS.index("translate_x"), value / w, -1.0
    if name == "translate_y_abs":
        return OPS.index("translate_y"), value / h, -1.0
    if name in ("solarize_add", "cutout_abs"):
        return OPS.index("identity"), 0.0, 1.0
    return OPS.index(name), value, (-1.0 if name in SIGNED else 1.0)


def _op_tables(magnitude: float, h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per op of :data:`AUTHORS_OPS`: our op index (int64), magnitude and the factor a negative
    draw multiplies it by (float32), each ``(16,)``."""
    args = [_kernel_args(name, authors_value(name, magnitude), h, w) for name in AUTHORS_OPS]
    ours, mags, neg = zip(*args)
    return torch.tensor(ours), torch.tensor(mags), torch.tensor(neg)


def _op_solarize_add_(x: Tensor, add: float, threshold: int = 128) -> None:
    """Theirs ``SolarizeAdd``: ``uint8(clip(x + add, 0, 255))``, then pixels ``>= threshold``
    inverted; in place. For integer pixels and ``add >= 0`` the first step is a saturating add of
    ``floor(add)``."""
    a = int(math.floor(add))
    x.clamp_(max=255 - a).add_(a)
    _op_solarize_(x, torch.full((x.shape[0], 1, 1, 1), threshold, dtype=torch.uint8, device=x.device))


def cutout_abs_boxes(where: Tensor, side: float, h: int, w: int) -> Tensor:
    """Their ``CutoutAbs`` boxes as ``(N, 2, 2)`` [first, last + 1) rows and columns.

    Centre ``np.random.uniform(w)`` (numpy's ``low=w, high=1``: uniform on ``(1, w]``), corner
    ``int(max(0, c - side / 2))``, far corner ``min(w, corner + side)``, drawn by PIL's
    ``rectangle`` inclusive of the far corner (truncated to int) and clipped to the image.
    """
    size = torch.tensor([float(w), float(h)], device=where.device)
    centre = size + (1 - size) * where  # (N, 2): x, y
    start = torch.floor((centre - side / 2).clamp_(min=0))
    stop = torch.minimum(torch.floor(torch.minimum(size, start + side)) + 1, size)
    return torch.stack([start, stop], -1).flip(1)  # rows first, as cutout_boxes


def fixed_cutout_boxes(u: Tensor, length: int, h: int, w: int) -> Tensor:
    """Their ``CutoutDefault(length)``: centre ``(randint(h), randint(w))``, rows
    ``clip(y - length // 2, 0, h) .. clip(y + length // 2, 0, h)`` (likewise columns).

    Args:
        u: float32 ``(N, 2)`` U(0, 1) draws (y, x).

    Returns:
        float32 ``(N, 2, 2)`` boxes, as :func:`~pipelines.augment.cutout.cutout_boxes`.
    """
    size = torch.tensor([float(h), float(w)], device=u.device)
    centre = torch.floor(u * size)
    half = length // 2
    lo = torch.minimum((centre - half).clamp_(min=0), size)
    hi = torch.minimum((centre + half).clamp_(min=0), size)
    return torch.stack([lo, hi], -1)


def apply_authors_rand_augment(
    images: Tensor, draw: AuthorsDraw, *, magnitude: float = 4, owned: bool = False
) -> Tensor:
    """Their RandAugment on uint8 ``(N, 3, H, W)`` images with the ops of ``draw``.

    Returns:
        uint8 ``(N, 3, H, W)`` on ``images.device``: a new tensor unless ``owned``.
    """
    _check_images(images)
    n, _, h, w = images.shape
    ops = draw.ops.to("cpu", torch.int64)
    if ops.dim() != 2 or ops.shape[0] != n:
        raise ValueError(f"draw.ops must be ({n}, K) for {n} images, got {tuple(ops.shape)}")
    if ops.numel() and (ops.min() < 0 or ops.max() >= len(AUTHORS_OPS)):
        raise ValueError(f"draw.ops must be in [0, {len(AUTHORS_OPS)}), got {ops.unique().tolist()}")
    negative = draw.negative.to("cpu")
    ours, mags, neg = _op_tables(magnitude, h, w)
    sign = torch.where(negative, neg[ops], torch.ones(()))
    add = authors_value("solarize_add", magnitude)
    side = authors_value("cutout_abs", magnitude)
    fill = torch.tensor(CUTOUT_ABS_FILL, dtype=torch.uint8, device=images.device).view(1, 3, 1, 1)
    x = images if owned else images.clone(memory_format=torch.contiguous_format)
    for k in range(ops.shape[1]):
        x = apply_rand_augment(
            x, ours[ops[:, k : k + 1]], (mags[ops[:, k]] * sign[:, k])[:, None],
            owned=True, shear_origin=True,
        )
        for _rows, part in _rows_of(x, ops[:, k], "solarize_add"):
            _op_solarize_add_(part, add)
        for rows, part in _rows_of(x, ops[:, k], "cutout_abs"):
            _cutout_(part, cutout_abs_boxes(draw.where[rows.to(draw.where.device), k], side, h, w), fill)
    return x


def _rows_of(x: Tensor, ops: Tensor, name: str) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield once ``(rows, part)`` for the samples that drew ``name`` (CPU int64 ``rows``,
    ``part = x[rows]``), and write ``part`` back into ``x`` afterwards; nothing when none did."""
    rows = (ops == AUTHORS_OPS.index(name)).nonzero().view(-1)
    if len(rows):
        idx = rows.to(x.device)
        part = x.index_select(0, idx)
        yield rows, part
        x.index_copy_(0, idx, part)
