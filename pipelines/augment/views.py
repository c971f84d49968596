"""The views a training step needs: :class:`ViewMaker`, strong views, normalisation.

:class:`ViewMaker` crops every weak and strong view of a step in one call (straight from the
distinct images), gives the strong rows RandAugment and Cutout in their own memory, all in
``torch.inference_mode``, and normalises outside it. Same generator state, same views, on every
device (parameters are drawn on the generator's device, in an order that never depends on the
pixels). Design notes: ``docs/augmentation.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipelines.augment._common import Rows, _check_images, _draw_count, _kept, _rand
from pipelines.augment.authors import (
    apply_authors_rand_augment,
    fixed_cutout_boxes,
    sample_authors_rand_augment,
)
from pipelines.augment.cutout import _check_cutout, _cutout_, cutout_boxes
from pipelines.augment.geometry import CROPS, center_crop, weak_view
from pipelines.augment.policy import apply_rand_augment, sample_rand_augment

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def strong_from_weak(
    x: Tensor,
    generator: torch.Generator,
    *,
    num_ops: int = 2,
    cutout: float = 0.5,
    owned: bool = False,
    fill: int = 127,
    rows: Rows | None = None,
) -> Tensor:
    """FixMatch strong views of weak views ``x``: RandAugment, then Cutout.

    Draws, in this order: the ops and magnitudes (:func:`~pipelines.augment.policy.
    sample_rand_augment`), then three ``U(0, 1)`` per sample for the Cutout box (drawn even
    when ``cutout`` is 0); then :func:`~pipelines.augment.policy.apply_rand_augment` does the
    pixel work.

    Args:
        x: uint8 ``(N, 3, S, S)`` weak views (:func:`~pipelines.augment.geometry.weak_view`).
        generator: source of all randomness (any device).
        num_ops: RandAugment ops per sample.
        cutout: maximum Cutout side as a fraction of the image side (FixMatch: 0.5); 0 disables.
        owned: whether ``x`` may serve as scratch memory (it then holds scratch data
            afterwards, or the result): saves fresh memory.
        fill: gray level of the Cutout squares.
        rows: ``(total, keep)``: ``x`` is rows ``keep`` of a call over ``total`` views (the
            parameters are drawn for all ``total``, the pixel work done for these).

    Returns:
        uint8 ``(N, 3, S, S)``: a new tensor unless ``owned``.
    """
    _check_images(x)
    _check_cutout(cutout, fill)
    n, _, h, w = x.shape
    nd = _draw_count(n, rows)
    ops, mags = (_kept(t, rows) for t in sample_rand_augment(nd, generator, num_ops=num_ops))
    u = _kept(_rand(generator, (nd, 3)), rows)  # Cutout's draws, after RandAugment's
    boxes = cutout_boxes(u, cutout, h, w) if cutout > 0 else None
    return apply_rand_augment(x, ops, mags, boxes=boxes, fill=fill, owned=owned)


# ----------------------------------------------------------------------------- trainer API


@functools.lru_cache(maxsize=16)
def _view_sources(n_l: int, n_u: int, num_strong: int) -> Tensor:
    """int64 image of every view of :class:`ViewMaker` (cached): each labeled image once, then
    the unlabeled images ``1 + num_strong`` times."""
    return torch.cat([torch.arange(n_l), torch.arange(n_l, n_l + n_u).repeat(1 + num_strong)])


def _part_rows(
    n_l: int, n_u: int, num_strong: int, part: tuple[int, int], device: torch.device
) -> dict[str, Rows | None]:
    """Which rows of each draw of a global step slice ``part = (r, R)`` keeps (``None`` each
    when ``R == 1``): the labeled and unlabeled slices, the combined crop call's views
    ``[labeled | unlabeled | unlabeled x num_strong]``, its weak part ``[labeled | unlabeled]`` and
    the strong views."""
    r, world = part
    if not 0 <= r < world:
        raise ValueError(f"part must be (rank, world) with 0 <= rank < world, got {part}")
    if world == 1:
        return dict.fromkeys(("labeled", "unlabeled", "weak", "views", "strong"))
    big_l, big_u = n_l * world, n_u * world
    lab = torch.arange(r * n_l, (r + 1) * n_l, device=device)
    unl = torch.arange(r * n_u, (r + 1) * n_u, device=device)
    strong = torch.cat([k * big_u + unl for k in range(num_strong)]) if num_strong else unl[:0]
    views = torch.cat([lab, big_l + unl, big_l + big_u + strong])
    return {"labeled": (big_l, lab), "unlabeled": (big_u, unl), "weak": (big_l + big_u, views[: n_l + n_u]),
            "views": (big_l + big_u * (1 + num_strong), views), "strong": (big_u * num_strong, strong)}


POLICIES = ("fixmatch", "authors")
VIEW_RULES = ("square", "authors_imagenet")
CUTOUT_MODES = ("random", "fixed", "none")


@dataclass(kw_only=True)
class ViewSettings:
    """What a step's views are: the one home of these settings and their defaults, shared by
    :class:`ViewMaker` and the DALI loader's views (:class:`pipelines.dali_views.DaliViews`)."""

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
    policy: str = "fixmatch"
    """RandAugment: ``"fixmatch"`` (``num_ops`` of 14 ops, magnitude drawn per op, after the
    crop) or ``"authors"`` (the BMB authors' RandAugment(``num_ops``, 4),
    :mod:`~pipelines.augment.authors`, before the crop as theirs; the presets give 3 ops)."""
    cutout_mode: str = "random"
    """``"random"`` (FixMatch: side up to ``cutout`` x the side, gray), ``"fixed"`` (the authors'
    ``CutoutDefault(S // 2)`` after crop and flip, filled with the mean colour) or ``"none"``."""
    view_rule: str = "square"
    """``"square"``: the batches hold whole images, every view cropped here (``crop``);
    ``"authors_imagenet"``: the reader already cut every view's crop
    (:mod:`pipelines.imagenet_views`): labeled ``(B, 3, S, S)``, unlabeled ``(B, 3, S, S (1 +
    num_strong))`` strips, weak crop first; here only the flips, RandAugment and Cutout."""

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.num_strong < 0 or self.num_ops < 0:
            raise ValueError(
                f"num_strong ({self.num_strong}) and num_ops ({self.num_ops}) must be >= 0"
            )
        if not 0.0 <= self.cutout <= 1.0:
            raise ValueError(f"cutout must be in [0, 1], got {self.cutout}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.view_rule not in VIEW_RULES:
            raise ValueError(f"view_rule must be one of {VIEW_RULES}, got {self.view_rule!r}")
        if self.cutout_mode not in CUTOUT_MODES:
            raise ValueError(f"cutout_mode must be one of {CUTOUT_MODES}, got {self.cutout_mode!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} must be 3 values (std > 0)")
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    @staticmethod
    def config_kwargs(cfg: Any) -> dict[str, Any]:
        """The settings of a run config (``cfg.data``: image_size, crop, mean, std,
        rand_augment, cutout; ``cfg.method.num_strong``): the one mapping from config keys to
        views, used by the trainer's :class:`ViewMaker` and the DALI loader's views alike.
        ``data.rand_augment=authors`` is their RandAugment(3, 4)."""
        d = cfg.data
        authors = d.rand_augment == "authors"
        return dict(
            image_size=d.image_size, crop=d.crop, num_strong=cfg.method.num_strong,
            mean=d.mean, std=d.std, policy=d.rand_augment, num_ops=3 if authors else 2,
            cutout_mode=d.cutout, view_rule=d.view_rule,
        )


@dataclass(kw_only=True)
class ViewMaker(ViewSettings):
    """The views one training step needs, normalised, on the batch's device (settings:
    :class:`ViewSettings`)."""

    def __call__(
        self,
        labeled: Tensor,
        unlabeled: Tensor,
        generator: torch.Generator,
        part: tuple[int, int] = (0, 1),
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Weak views of both batches and ``num_strong`` strong views of the unlabeled one.

        Args:
            labeled: uint8 ``(B_L, 3, H, W)``.
            unlabeled: uint8 ``(B_U, 3, H, W)``.
            generator: source of all randomness (any device).
            part: ``(r, R)``: the batches are slice ``r`` of ``R`` equal contiguous slices of a
                global batch (rank ``r`` of a distributed step). Every parameter is drawn for the
                global batch (the same draws on every rank, from the same generator state) and
                this slice's rows are kept, so a sample's views do not depend on ``R``: ``R``
                processes together make the views one process makes of the whole batch.

        Returns:
            float32 ``(B_L, 3, S, S)`` weak labeled, ``(B_U, 3, S, S)`` weak unlabeled, and a
            list of ``num_strong`` ``(B_U, 3, S, S)`` strong views; ``S = image_size``.
        """
        n_l, n_u = labeled.shape[0], unlabeled.shape[0]
        # The uint8 views in inference mode: hundreds of small ops, each spared autograd's
        # dispatch and view bookkeeping (~10% of the call at 64 px on the CPU). Normalised
        # outside it, so that the outputs are ordinary tensors (autograd may save them).
        with torch.inference_mode():
            weak, strong = self._views(labeled, unlabeled, generator, part)
        weak = self.normalize(weak)
        strong_f = list(self.normalize(strong).split(n_u)) if self.num_strong else []
        return weak[:n_l], weak[n_l:], strong_f

    def uint8_views(
        self,
        labeled: Tensor,
        unlabeled: Tensor,
        generator: torch.Generator,
        part: tuple[int, int] = (0, 1),
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """:meth:`__call__` before normalisation: the same views as uint8.

        For views that travel between processes (4x fewer bytes than float32); normalise them
        on arrival with :meth:`normalize`. Same generator state, same views as :meth:`__call__`.
        """
        n_l, n_u = labeled.shape[0], unlabeled.shape[0]
        weak, strong = self._views(labeled, unlabeled, generator, part)
        return weak[:n_l], weak[n_l:], list(strong.split(n_u)) if self.num_strong else []

    def normalize(self, views: Tensor) -> Tensor:
        """uint8 views -> float32 with this maker's mean and std."""
        return normalize(views, self.mean, self.std)

    def _views(
        self,
        labeled: Tensor,
        unlabeled: Tensor,
        generator: torch.Generator,
        part: tuple[int, int] = (0, 1),
    ) -> tuple[Tensor, Tensor]:
        """uint8 weak views ``(B_L + B_U, ...)`` and strong views ``(num_strong * B_U, ...)``."""
        _check_images(labeled, "labeled")
        _check_images(unlabeled, "unlabeled")
        n_l, n_u = labeled.shape[0], unlabeled.shape[0]
        rows = _part_rows(n_l, n_u, self.num_strong, part, generator.device)
        if self.view_rule == "authors_imagenet":
            return self._reader_cut_views(labeled, unlabeled, generator, rows)
        if self.policy == "authors":
            return self._authors_views(labeled, unlabeled, generator, rows)
        kw = {"crop": self.crop, "out_size": self.image_size, "translate": self.translate}
        # Samples are independent, so every view's crop runs in one call over
        # [labeled, unlabeled, unlabeled x num_strong]; the strong rows then get RandAugment and
        # Cutout (strong_from_weak). Fewer, larger kernels: per-op overhead dominates small images.
        if labeled.shape[1:] == unlabeled.shape[1:]:
            # Cropped straight from the n_l + n_u distinct images (``source``: the image of
            # each view), without concatenating the unlabeled batch 1 + num_strong times.
            images = unlabeled if n_l == 0 else torch.cat([labeled, unlabeled])
            source = _view_sources(n_l, n_u, self.num_strong)
            views = weak_view(images, generator, source=source, rows=rows["views"], **kw)
        else:
            batches = [labeled, unlabeled] + [unlabeled] * self.num_strong
            per = [rows["labeled"]] + [rows["unlabeled"]] * (1 + self.num_strong)
            views = torch.cat([weak_view(b, generator, rows=r, **kw) for b, r in zip(batches, per)])
        weak, strong = views[: n_l + n_u], views[n_l + n_u :]
        if self.num_strong:
            # RandAugment and Cutout may work in the strong rows' own memory (owned): the weak
            # rows before them are never written.
            strong = strong_from_weak(
                strong, generator, num_ops=self.num_ops, owned=True, rows=rows["strong"],
                cutout=self.cutout if self.cutout_mode == "random" else 0.0,
            )
            strong = self._fixed_cutout(strong, generator, rows["strong"])
        return weak, strong

    def _authors_views(
        self, labeled: Tensor, unlabeled: Tensor, generator: torch.Generator, rows: dict[str, Rows | None]
    ) -> tuple[Tensor, Tensor]:
        """:meth:`_views` with the authors' policy: their RandAugment on the whole images, then
        the crop and flip, then the fixed Cutout (their order). Draws: the weak crops, the
        RandAugment ops, the strong crops, the Cutout places."""
        kw = {"crop": self.crop, "out_size": self.image_size, "translate": self.translate}
        n_l = labeled.shape[0]
        images = unlabeled if n_l == 0 else torch.cat([labeled, unlabeled])
        weak = weak_view(images, generator, rows=rows["weak"], **kw)
        if not self.num_strong:
            return weak, weak[:0]
        src = unlabeled.repeat(self.num_strong, 1, 1, 1)
        draw = sample_authors_rand_augment(src.shape[0], generator, num_ops=self.num_ops, rows=rows["strong"])
        src = apply_authors_rand_augment(src, draw, owned=True)
        strong = weak_view(src, generator, rows=rows["strong"], **kw)
        return weak, self._fixed_cutout(strong, generator, rows["strong"])

    def _reader_cut_views(
        self, labeled: Tensor, unlabeled: Tensor, generator: torch.Generator, rows: dict[str, Rows | None]
    ) -> tuple[Tensor, Tensor]:
        """:meth:`_views` of reader-cut crops (``view_rule="authors_imagenet"``): the weak views
        flipped; the strong ones RandAugment (after the reader's crop), Cutout, flip. Draws: the
        weak flips, the RandAugment ops, the Cutout places, the strong flips."""
        s, k = self.image_size, self.num_strong
        if labeled.shape[-2:] != (s, s) or unlabeled.shape[-2:] != (s, s * (1 + k)):
            raise ValueError(
                f"view_rule=authors_imagenet expects reader-cut crops: labeled (B, 3, {s}, {s}) and "
                f"unlabeled (B, 3, {s}, {s * (1 + k)}), got {tuple(labeled.shape)} and {tuple(unlabeled.shape)}"
            )
        flip = {"crop": "translate", "out_size": s, "translate": 0.0}
        weak = weak_view(torch.cat([labeled, unlabeled[..., :s]]), generator, rows=rows["weak"], **flip)
        if not k:
            return weak, weak[:0]
        strong = torch.cat([unlabeled[..., s * (j + 1) : s * (j + 2)] for j in range(k)])
        if self.policy == "authors":
            draw = sample_authors_rand_augment(strong.shape[0], generator, num_ops=self.num_ops, rows=rows["strong"])
            strong = apply_authors_rand_augment(strong, draw, owned=True)
        else:
            strong = strong_from_weak(
                strong, generator, num_ops=self.num_ops, owned=True, rows=rows["strong"],
                cutout=self.cutout if self.cutout_mode == "random" else 0.0,
            )
        strong = self._fixed_cutout(strong, generator, rows["strong"])
        return weak, weak_view(strong, generator, rows=rows["strong"], **flip)

    def _fixed_cutout(self, strong: Tensor, generator: torch.Generator, rows: Rows | None) -> Tensor:
        """The authors' ``CutoutDefault(S // 2)`` (only with ``cutout_mode="fixed"``): their
        zero after normalisation is the mean colour, here rounded to uint8."""
        if self.cutout_mode != "fixed":
            return strong
        n, _, h, w = strong.shape
        u = _kept(_rand(generator, (_draw_count(n, rows), 2)), rows)
        boxes = fixed_cutout_boxes(u, self.image_size // 2, h, w)
        fill = torch.tensor([round(255 * m) for m in self.mean], dtype=torch.uint8, device=strong.device)
        _cutout_(strong, boxes, fill.view(1, 3, 1, 1))
        return strong

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
