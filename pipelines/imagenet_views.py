"""The BMB authors' ImageNet view geometry, done where the image still has its own shape: in the
reader.

Their ``imagenet_get_transforms`` (``BMB/dataset/utils.py``): every view resizes the image's
shorter side to 256 (aspect ratio kept, torchvision's ``Resize(256)``: the longer side becomes
``int(256 * long / short)``), then takes its **own** uniformly placed 224 crop (``RandomCrop``)
and a flip; evaluation takes the centre 224 crop (``CenterCrop``). Batches must have one shape,
so the readers resize and crop (``data.view_rule=authors_imagenet``), and hand over per sample
the ``k`` crops side by side: a ``(224, 224 k)`` strip, ``k = 1`` for a labeled sample, ``1 +
num_strong`` for an unlabeled one (weak first), the centre crop for evaluation. The trainer
(:class:`~pipelines.augment.ViewMaker`) splits the strip, flips, and gives the strong crops
RandAugment -- after the crop, where theirs comes before it (``docs/fidelity.md``).

The crop places of a sample come from ``numpy.random.default_rng((seed, stream, batch, row))``,
``row`` its place in the global batch (``rank x local batch + j``): the same sample gets the same
crops in whichever worker decodes it, in a resumed run, and for any number of ranks.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from shards.images import MAX_PIXELS, check_pixels

AUTHORS_IMAGENET = "authors_imagenet"
VIEW_RULES = ("square", AUTHORS_IMAGENET)
_STREAMS = {"labeled": 1, "unlabeled": 2, "eval": 3}


@dataclass(frozen=True)
class ImageNetViews:
    """How a reader cuts one stream's samples (see the module docstring).

    Attributes:
        resize: the shorter side after resizing (their 256: ``data.load_size``).
        crop: the side of every crop (224: ``data.image_size``).
        crops: crops per sample, side by side; ``0``: the one centre crop (evaluation).
        seed, stream: the key of the crop places (``stream``: ``labeled``, ``unlabeled`` or
            ``eval``), with the batch number and the sample's row in the global batch.
        rank: this reader's rank: its samples are rows ``rank x B + j`` of the global batch.
    """

    resize: int = 256
    crop: int = 224
    crops: int = 0
    seed: int = 0
    stream: str = "eval"
    rank: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.crop <= self.resize:
            raise ValueError(f"crop ({self.crop}) must be in [1, resize = {self.resize}]")
        if self.crops < 0 or self.stream not in _STREAMS:
            raise ValueError(f"bad crops={self.crops} or stream={self.stream!r}")

    def for_stream(self, stream: str, crops: int, rank: int) -> ImageNetViews:
        return replace(self, stream=stream, crops=crops, rank=rank)

    @property
    def out_hw(self) -> tuple[int, int]:
        """``(H, W)`` of one sample: the strip of ``crops`` crops (one for evaluation)."""
        return self.crop, self.crop * max(self.crops, 1)

    def rng(self, batch: int | None, j: int, local_batch: int) -> np.random.Generator:
        """The crop places' generator of sample ``j`` of this rank's part (``local_batch``
        samples) of global batch ``batch`` (``None``: evaluation, nothing drawn)."""
        row = self.rank * local_batch + j
        return np.random.default_rng([self.seed, _STREAMS[self.stream], batch or 0, row])


def resized_size(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)`` of an ``h x w`` image: the shorter side becomes ``size``, the
    longer ``int(size * long / short)``."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def crop_corners(h: int, w: int, crop: int, k: int, rng: np.random.Generator | None) -> np.ndarray:
    """``(max(k, 1), 2)`` top-left corners (top, left) of ``crop`` squares in an ``h x w`` image:
    ``k`` uniform ones (``RandomCrop``: every corner in ``[0, h - crop] x [0, w - crop]`` equally
    likely), or for ``k = 0`` the centre one (``CenterCrop``: ``round((h - crop) / 2)``)."""
    if k == 0:
        return np.array([[int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))]])
    return np.stack([rng.integers(0, h - crop + 1, k), rng.integers(0, w - crop + 1, k)], 1)


def decode_views(
    data: bytes, views: ImageNetViews, rng: np.random.Generator | None, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Decode one encoded image and cut its views: uint8 ``(crop, crop * max(crops, 1), 3)``.
    An image whose header declares more than ``max_pixels`` pixels is refused before decoding
    (:func:`shards.images.check_pixels`).

    The image is decoded at the smallest JPEG scale that still covers the resized size
    (``draft``, as :func:`shards.format.decode_image`), resized bilinearly (PIL, antialiased) so
    that its shorter side is ``views.resize``, then cut.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        check_pixels(img.height, img.width, max_pixels)
        nh, nw = resized_size(img.height, img.width, views.resize)
        img.draft("RGB", (nw, nh))
        rgb = img.convert("RGB")
    return cut_views(rgb, (nh, nw), views, rng)


def cut_views(rgb: Any, hw: tuple[int, int], views: ImageNetViews, rng: np.random.Generator | None) -> np.ndarray:
    """Resize a decoded PIL RGB image to ``hw`` (:func:`resized_size` of its stored size; bilinear,
    antialiased) and cut its views: uint8 ``(crop, crop * max(crops, 1), 3)``."""
    from PIL import Image

    nh, nw = hw
    arr = np.asarray(rgb.resize((nw, nh), Image.BILINEAR))
    c = views.crop
    corners = crop_corners(nh, nw, c, views.crops, rng)
    return np.concatenate([arr[t : t + c, s : s + c] for t, s in corners], axis=1)
