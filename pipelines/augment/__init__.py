"""Batched, device-side weak and strong views (FixMatch) for uint8 image batches.

Every function takes a whole uint8 batch ``(N, 3, H, W)`` on any device and a
``torch.Generator``; each sample gets its own random parameters, and the work is batched tensor
ops (no Python loop over samples). The same generator state gives the same views on every
device. :class:`ViewMaker` makes all the views of one training step. Modules:
:mod:`~pipelines.augment.geometry` (weak-view crops and flips, centre crop),
:mod:`~pipelines.augment.policy` (RandAugment: op list, magnitudes, per-sample application),
:mod:`~pipelines.augment.color` and :mod:`~pipelines.augment.affine` (its op kernels),
:mod:`~pipelines.augment.cutout`, :mod:`~pipelines.augment.views` (:class:`ViewMaker`,
normalisation). Design notes: ``docs/augmentation.md``.
"""

from pipelines.augment.cutout import cutout
from pipelines.augment.geometry import center_crop, weak_view
from pipelines.augment.policy import (
    MAGNITUDE_RANGES,
    OPS,
    apply_rand_augment,
    rand_augment,
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
    normalize,
    strong_view,
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
    "apply_rand_augment",
    "center_crop",
    "cutout",
    "normalize",
    "rand_augment",
    "sample_rand_augment",
    "strong_view",
    "weak_view",
]
