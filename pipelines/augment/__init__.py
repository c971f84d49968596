"""Batched, device-side weak and strong views (FixMatch) for uint8 image batches.

Every function takes a whole uint8 batch ``(N, 3, H, W)`` on any device and a
``torch.Generator`` (or parameters drawn from one); each sample gets its own random
parameters, and the work is batched tensor ops (no Python loop over samples). The same
generator state gives the same views on every device. One API, the one the trainer runs:
:class:`ViewMaker` makes every view of a training step with :func:`weak_view` (crop + flip)
and :func:`strong_from_weak` (:func:`sample_rand_augment`, :func:`cutout_boxes`, then
:func:`apply_rand_augment`), and :func:`normalize`; :meth:`ViewMaker.eval` uses
:func:`center_crop`.

Modules: :mod:`~pipelines.augment.geometry` (weak-view crops and flips, centre crop),
:mod:`~pipelines.augment.policy` (RandAugment: op list, magnitudes, per-sample application),
:mod:`~pipelines.augment.color` and :mod:`~pipelines.augment.affine` (its op kernels),
:mod:`~pipelines.augment.cutout`, :mod:`~pipelines.augment.views` (:class:`ViewMaker`, strong
views, normalisation). Design notes: ``docs/augmentation.md``.
"""

from pipelines.augment.cutout import cutout_boxes
from pipelines.augment.geometry import center_crop, weak_view
from pipelines.augment.policy import (
    MAGNITUDE_RANGES,
    OPS,
    apply_rand_augment,
    sample_rand_augment,
)
from pipelines.augment.views import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViewMaker,
    ViewSettings,
    normalize,
    strong_from_weak,
)

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
    "ViewSettings",
    "apply_rand_augment",
    "center_crop",
    "cutout_boxes",
    "normalize",
    "sample_rand_augment",
    "strong_from_weak",
    "weak_view",
]
