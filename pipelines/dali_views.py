"""Views in the loader (``data.views=loader``): DALI makes every view of a training step.

With ``data.backend=dali`` and ``data.views=loader`` the DALI pipelines emit, per step, the
labeled weak view and the unlabeled weak view and ``num_strong`` strong views, already
normalised float32 NCHW, on the decode device (the GPU with ``mixed`` decode); the trainer
then skips its :class:`~pipelines.augment.ViewMaker` (the :class:`ViewBatch` carries the
views). Everything downstream (losses, bank) is unchanged.

The views follow :class:`~pipelines.augment.ViewMaker`'s recipe (docs/augmentation.md) as far
as DALI's operators allow:

- **weak**: a random horizontal flip plus either a pad-and-crop translation by up to
  ``translate * size`` px with **reflect** padding (edge pixel not repeated, as ViewMaker and
  FixMatch) -- built from slices, flips and concatenations, then one ``fn.slice`` at a
  uniform integer offset -- or ``fn.random_resized_crop`` (area 0.08-1, ratio 3/4-4/3, 10
  attempts, bilinear without antialiasing). The normalisation, flip and HWC -> CHW transpose
  are one ``fn.crop_mirror_normalize``.
- **strong**: its own weak crop and flip, then RandAugment built from DALI's ``auto_aug``
  (``auto_aug.core.select`` over ``auto_aug.augmentations``, re-ranged) with ``num_ops`` ops
  per sample and a magnitude drawn per op per sample, then Cutout as ``fn.erase`` (one gray
  127 square per sample, side ``U{0 .. size/2 - 1}``, centred at a uniform pixel, its
  top-left corner clamped at 0 first, clipped at the far borders).

How this RandAugment differs from ours and from DALI's stock ``rand_augment(data, n, m)``:
docs/fidelity.md (ledger row 26). In short: DALI looks each op's parameter up in a table of
``num_magnitude_bins`` magnitudes, so the per-op uniform draw of FixMatch becomes a uniform
draw of one of :data:`MAGNITUDE_BINS` bin midpoints of FixMatch's range. Geometric ops
(nearest-neighbour, black fill, shears about the centre), solarize, posterize and the
Color/Brightness/Contrast blends (PIL's truncating arithmetic, written here with DALI's
arithmetic operators) give ViewMaker's pixels at the same magnitude; autocontrast rounds where
PIL truncates (one level), equalize is DALI's (OpenCV's table), sharpness also filters the
1-px border (tests/test_dali_views.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.auto_aug import augmentations as aa
from nvidia.dali.auto_aug.core import augmentation, select
from nvidia.dali.data_node import DataNode

from pipelines.augment.views import ViewSettings
from pipelines.base import Batch, to_device

MAGNITUDE_BINS = 60
"""Magnitude levels per op: the midpoints of 60 equal cells of each FixMatch range (posterize:
12 bins per kept-bit count 4..8, so that its draw is exactly uniform)."""

GEOMETRY_FILL = 0
"""Fill of rotations, shears and translations (black, as PIL's defaults and ViewMaker)."""

CUTOUT_FILL = 127

RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)

# The op list is pipelines.augment's OPS: the same 14 ops in the same order.

# PIL's convert("L"): (19595 R + 38470 G + 7471 B + 2**15) >> 16, exact in float32.
_LUMA = np.array([19595.0, 38470.0, 7471.0], dtype=np.float32)


@dataclass
class ViewBatch(Batch):
    """A :class:`~pipelines.base.Batch` whose views were made by the loader.

    ``labeled`` and ``unlabeled`` hold the weak views (float32, normalised) rather than uint8
    images; ``views`` is ``(labeled weak, unlabeled weak, [strong] * num_strong)``, exactly what
    :class:`~pipelines.augment.ViewMaker` returns, and the trainer uses it instead of calling
    its ViewMaker.
    """

    views: tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]] | None = None

    def to(self, device: torch.device | str, non_blocking: bool = True) -> ViewBatch:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        views = None
        if self.views is not None:
            lw, uw, strong = self.views
            views = (mv(lw), mv(uw), [mv(s) for s in strong])
        return ViewBatch(
            mv(self.labeled),
            mv(self.labels),
            mv(self.unlabeled),
            mv(self.unlabeled_index),
            mv(self.unlabeled_labels),
            views,
        )


@dataclass(kw_only=True)
class DaliViews(ViewSettings):
    """What the loader's views are: :class:`~pipelines.augment.ViewMaker`'s settings, plus the
    number of magnitude levels DALI's ops are tabulated at."""

    magnitude_bins: int = field(default=MAGNITUDE_BINS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.policy != "fixmatch" or self.cutout_mode == "fixed":
            raise ValueError(
                f"the DALI loader's views (data.views=loader) make FixMatch's RandAugment and Cutout "
                f"only, not policy={self.policy!r} / cutout_mode={self.cutout_mode!r}: use "
                "data.views=trainer for data.rand_augment=authors or data.cutout=fixed"
            )
        if self.magnitude_bins < 1 or self.magnitude_bins % 5:
            raise ValueError(
                f"magnitude_bins must be a positive multiple of 5, got {self.magnitude_bins}"
            )

    # ------------------------------------------------------------------ the DALI graph
    def make(self, images: DataNode, in_hw: tuple[int, int], strong: bool) -> list[DataNode]:
        """The views of ``images`` (uint8 HWC, ``in_hw``): ``[weak]`` or, with ``strong``,
        ``[weak, strong_1, ..., strong_K]``; each float32 CHW, normalised."""
        coin = fn.random.coin_flip(probability=0.5, dtype=types.INT32)
        out = [self._normalize(self._crop(images, in_hw), mirror=coin)]
        if strong:
            for _ in range(self.num_strong):
                v = self._crop(images, in_hw)
                v = fn.flip(v, horizontal=fn.random.coin_flip(probability=0.5, dtype=types.INT32))
                v = rand_augment(v, self.num_ops, self.image_size, self.magnitude_bins)
                if self.cutout > 0 and self.cutout_mode == "random":
                    v = cutout(v, self.cutout, self.image_size)
                out.append(self._normalize(v))
        return out

    def _normalize(self, v: DataNode, mirror: DataNode | int = 0) -> DataNode:
        return fn.crop_mirror_normalize(
            v,
            mirror=mirror,
            mean=[255.0 * m for m in self.mean],
            std=[255.0 * s for s in self.std],
            dtype=types.FLOAT,
            output_layout="CHW",
        )

    def _crop(self, images: DataNode, in_hw: tuple[int, int]) -> DataNode:
        s = self.image_size
        if self.crop == "rrc":
            return fn.random_resized_crop(
                images,
                size=[s, s],
                random_area=list(RRC_SCALE),
                random_aspect_ratio=list(RRC_RATIO),
                num_attempts=10,
                antialias=False,
            )
        return translate_crop(images, in_hw, s, self.translate)


def _reflect_pad(images: DataNode, p: int, h: int, w: int) -> DataNode:
    """Reflect padding by ``p`` px on every side (edge pixel not repeated: numpy's
    ``mode="reflect"``), from slices, flips and concatenations."""
    left = fn.flip(images[:, 1 : p + 1], horizontal=1)
    right = fn.flip(images[:, w - 1 - p : w - 1], horizontal=1)
    x = fn.cat(left, images, right, axis=1)
    top = fn.flip(x[1 : p + 1], horizontal=0, vertical=1)
    bottom = fn.flip(x[h - 1 - p : h - 1], horizontal=0, vertical=1)
    return fn.cat(top, x, bottom, axis=0)


def translate_crop(images: DataNode, in_hw: tuple[int, int], size: int, translate: float):
    """A ``size`` square shifted by ``(dy, dx)`` uniform in ``[-p, p]`` from the centre,
    ``p = round(translate * size)``, reflect-padded: ViewMaker's translate crop (no flip)."""
    h, w = in_hw
    p = round(translate * size)
    if h < size or w < size:
        raise ValueError(f"a {h}x{w} input is smaller than the {size} px views")
    if p > h - 1 or p > w - 1:
        raise ValueError(f"translate={translate} is too large for a {h}x{w} input")
    padded = _reflect_pad(images, p, h, w) if p else images
    shift = fn.random.uniform(values=list(range(2 * p + 1)), shape=(2,), dtype=types.INT32)
    top = np.array([(h - size) // 2, (w - size) // 2], dtype=np.int32)
    start = shift + types.Constant(top, dtype=types.INT32)
    return fn.slice(padded, start=start, shape=[size, size], axis_names="HW")


def cutout(images: DataNode, max_side: float, size: int) -> DataNode:
    """FixMatch Cutout as ``fn.erase``: side ``floor(U * max_side * size)`` px, centred at a
    uniform pixel, its top-left corner clamped at 0 first (as ViewMaker's ``cutout_boxes``)."""
    import nvidia.dali.math as dmath

    sides = max(1, int(np.ceil(max_side * size)))
    side = fn.random.uniform(values=list(range(sides)), dtype=types.INT32)
    centre = fn.random.uniform(values=list(range(size)), shape=(2,), dtype=types.INT32)
    anchor = dmath.max(centre - (side + 1) // 2, 0)  # floor(centre - side / 2), clamped
    # fn.erase clips the region at the far borders.
    return fn.erase(
        images,
        anchor=fn.cast(anchor, dtype=types.FLOAT),
        shape=fn.cast(fn.stack(side, side), dtype=types.FLOAT),
        axis_names="HW",
        fill_value=CUTOUT_FILL,
    )


# ----------------------------------------------------------------------------- RandAugment


def _midpoints(lo: float, hi: float, n: int) -> np.ndarray:
    return (lo + (np.arange(n) + 0.5) * (hi - lo) / n).astype(np.float32)


@augmentation
def _color(data, factor):
    """PIL's ``ImageEnhance.Color``: from the image's integer luma (``convert("L")``) towards
    the image, ``floor(L + f (x - L))`` in float32 as ViewMaker (DALI's stock ``color`` is
    ``fn.saturation``, an HSV-space scaling)."""
    import nvidia.dali.math as dmath

    weighted = fn.reductions.sum(data * types.Constant(_LUMA), axis_names="C", keep_dims=True)
    luma = dmath.floor((weighted + 32768.0) * (1.0 / 65536.0))
    return fn.cast_like(dmath.floor(luma + (data - luma) * factor), data)


@augmentation
def _contrast(data, factor):
    """PIL's ``ImageEnhance.Contrast``: from the rounded mean of the integer luma towards the
    image, truncated, as ViewMaker (float32 here, float64 there: an ulp apart at most)."""
    import nvidia.dali.math as dmath

    weighted = fn.reductions.sum(data * types.Constant(_LUMA), axis_names="C", keep_dims=True)
    luma = dmath.floor((weighted + 32768.0) * (1.0 / 65536.0))
    mean = dmath.floor(fn.reductions.mean(luma, axis_names="HW", keep_dims=True) + 0.5)
    out = dmath.clamp(mean + (data - mean) * factor, 0.0, 255.0)
    return fn.cast_like(dmath.floor(out), data)


@augmentation
def _brightness(data, factor):
    """PIL's ``ImageEnhance.Brightness``: ``floor(f x)`` (DALI's ``fn.brightness`` rounds)."""
    import nvidia.dali.math as dmath

    return fn.cast_like(dmath.floor(data * factor), data)


@augmentation
def _equalize(data, _):
    """DALI's ``equalize`` (OpenCV's formula; PIL's lookup table differs slightly), via the
    non-deprecated ``fn.equalize``."""
    return fn.equalize(data)


@augmentation(param_device="auto")
def _sharpness(data, kernel):
    """PIL's ``ImageEnhance.Sharpness`` as one 3x3 filter (``fn.filter``); PIL leaves the
    1-px border unchanged, DALI filters it too."""
    return fn.filter(data, kernel)


def _shear(axis: int, size: int):
    centre = [size / 2.0, size / 2.0]

    def op(data, shear, fill_value=GEOMETRY_FILL, interp_type=None):
        mt = fn.transforms.shear(shear=shear, center=centre)
        return fn.warp_affine(
            data, matrix=mt, fill_value=fill_value, interp_type=interp_type, inverse_map=False
        )

    op.__name__ = "shear_x" if axis == 0 else "shear_y"
    return op


def suite(size: int, bins: int = MAGNITUDE_BINS) -> list:
    """The 14 ops of :data:`OPS` as DALI ``auto_aug`` augmentations, each with a table of
    ``bins`` magnitudes: the midpoints of ``bins`` equal cells of its FixMatch range
    (:data:`pipelines.augment.MAGNITUDE_RANGES`), for ``size`` px square images."""
    mid = lambda lo, hi: _midpoints(lo, hi, bins)  # noqa: E731
    blend = mid(0.05, 0.95)  # enhancement factors: 0 = degenerate image, 1 = unchanged
    bits = (4 + np.arange(bins) * 5 // bins).astype(np.float32)  # uniform on 4..8
    shift_px = np.round(mid(-0.3, 0.3) * size).astype(np.float32)
    shear_x = augmentation(
        _shear(0, size), mag_range=mid(-0.3, 0.3), randomly_negate=False,
        mag_to_param=aa.warp_x_param, name="shear_x",
    )  # fmt: skip
    shear_y = augmentation(
        _shear(1, size), mag_range=mid(-0.3, 0.3), randomly_negate=False,
        mag_to_param=aa.warp_y_param, name="shear_y",
    )  # fmt: skip
    return [
        aa.identity,
        aa.auto_contrast,
        _equalize.augmentation(name="equalize"),
        aa.solarize.augmentation(mag_range=mid(0.0, 256.0)),
        aa.posterize.augmentation(mag_range=bits, mag_to_param=aa.poster_mask_uint8),
        _contrast.augmentation(mag_range=blend, name="contrast"),
        _brightness.augmentation(mag_range=blend, name="brightness"),
        _color.augmentation(mag_range=blend, randomly_negate=False, name="color"),
        _sharpness.augmentation(
            mag_range=blend, mag_to_param=aa.sharpness_kernel_shifted, name="sharpness"
        ),
        aa.rotate.augmentation(mag_range=mid(-30.0, 30.0), randomly_negate=False),
        shear_x,
        shear_y,
        aa.translate_x_no_shape.augmentation(mag_range=shift_px, randomly_negate=False),
        aa.translate_y_no_shape.augmentation(mag_range=shift_px, randomly_negate=False),
    ]


def rand_augment(images: DataNode, num_ops: int, size: int, bins: int = MAGNITUDE_BINS):
    """FixMatch-like RandAugment with DALI's ``auto_aug``: per sample, ``num_ops`` ops drawn
    uniformly from :func:`suite` and, per op, a magnitude bin drawn uniformly (DALI's own
    ``rand_augment`` uses one fixed bin ``m`` for every op and sample). Geometric ops sample
    nearest-neighbour and fill black. Needs ``enable_conditionals=True``."""
    if num_ops == 0:
        return images
    ops = suite(size, bins)
    op_idx = fn.random.uniform(values=list(range(len(ops))), shape=(num_ops,), dtype=types.INT32)
    mag = fn.random.uniform(values=list(range(bins)), shape=(num_ops,), dtype=types.INT32)
    for i in range(num_ops):
        images = select(
            ops,
            op_idx[i],
            images,
            magnitude_bin=mag[i],
            num_magnitude_bins=bins,
            fill_value=GEOMETRY_FILL,
            interp_type=types.INTERP_NN,
        )
    return images


# ----------------------------------------------------------------------------- to torch


def float_to_torch(views) -> torch.Tensor:
    """float32 ``(B, C, H, W)`` from a DALI batch of CHW views, never aliasing DALI's buffers
    (a GPU batch stays on the GPU)."""
    from nvidia.dali.backend import TensorListGPU

    dense = views.as_tensor()
    if isinstance(views, TensorListGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        device = torch.device("cuda", torch.cuda.current_device())
        out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(dense, copy=True))


def moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else to_device(t, device)


# ----------------------------------------------------------------- reader-cut views (authors)
def cut_views(images: DataNode, shape: DataNode, cut: Any) -> DataNode:
    """The authors' ImageNet view geometry in the pipeline (``data.view_rule=authors_imagenet``,
    :mod:`pipelines.imagenet_views`): resize the shorter side to ``cut.resize`` (the longer to
    ``long * resize // short``, torchvision's truncation), then ``cut.crops`` independent crops
    of side ``cut.crop``, each corner uniform over every integer position, side by side (HWC, the
    strip along W); ``cut.crops == 0``: the centre crop (corner ``round((size - crop) / 2)``,
    half to even as torchvision's). The same geometry as the webdataset reader; the resize is
    DALI's linear (antialiased) interpolation, the random stream DALI's.

    Args:
        images: the decoded images (CPU or GPU).
        shape: their ``(H, W, C)`` as a CPU node (``fn.peek_image_shape`` of the encoded
            images): every size and corner is computed on the CPU, as argument inputs must be.
    """
    import nvidia.dali.math as dmath

    r, c = cut.resize, cut.crop
    hw = fn.cast(shape, dtype=types.INT32)
    h, w = hw[0], hw[1]
    short = dmath.min(h, w)
    nh, nw = (h * r) // short, (w * r) // short
    images = fn.resize(images, size=fn.cast(fn.stack(nh, nw), dtype=types.FLOAT),
                       interp_type=types.INTERP_LINEAR, antialias=True)
    spans = [nh - c, nw - c]  # largest corner per axis
    if cut.crops == 0:
        halves = [s // 2 for s in spans]
        corner = [m + (m % 2) * (s % 2) for m, s in zip(halves, spans)]  # round half to even
        return fn.slice(images, start=fn.stack(*corner), shape=[c, c], axes=[0, 1])
    crops = []
    for _ in range(cut.crops):
        u = fn.random.uniform(range=[0.0, 1.0], shape=[2])
        corner = [dmath.floor(u[i] * fn.cast(spans[i] + 1, dtype=types.FLOAT)) for i in (0, 1)]
        start = fn.cast(fn.stack(*corner), dtype=types.INT32)
        crops.append(fn.slice(images, start=start, shape=[c, c], axes=[0, 1]))
    return crops[0] if len(crops) == 1 else fn.cat(*crops, axis=1)
