"""Decoding: the size every decoding backend delivers, and how the webdataset readers decode.

Below the readers and the backends' contract (:mod:`pipelines.base` builds a :class:`Decoder`
from its :class:`~pipelines.base.ReaderSetup`; the webdataset readers of
:mod:`pipelines.wds` and :mod:`pipelines.wds_stream` call it): the delivered size
(:func:`output_size`), the corrupt-image policy (:data:`ON_CORRUPT`) and the batch decoder. The
image decoding itself is :func:`shards.images.decode_image` (the writer's and verifier's too);
the authors' ImageNet crops are :func:`pipelines.imagenet_views.decode_views`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipelines.imagenet_views import decode_views
from shards.format import DataError
from shards.images import MAX_PIXELS, decode_image

log = logging.getLogger(__name__)

HostBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]
"""A reader's host batch: uint8 images, int64 labels, int64 indices, corrupt images skipped."""


ON_CORRUPT = ("error", "skip")
"""The corrupt-image policies, in the config's words (``data.on_corrupt``): ``"error"`` stops at
the first undecodable image, naming shard and key; ``"skip"`` replaces it (:meth:`Decoder.batch`)."""


def check_on_corrupt(on_corrupt: str) -> None:
    """Raise ValueError, naming the value, unless ``on_corrupt`` is one of :data:`ON_CORRUPT`."""
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")


def output_size(manifest: dict[str, Any], load_size: int | None) -> tuple[int, int]:
    """``(H, W)`` the readers deliver: the fixed image size, else ``load_size`` squares."""
    fixed = manifest.get("image_size")
    if fixed:
        return int(fixed[0]), int(fixed[1])
    s = int(load_size or 256)
    return s, s


@dataclass(frozen=True)
class Decoder:
    """How the webdataset readers (both orders) turn encoded samples into a host batch.

    Attributes:
        out_hw: ``(H, W)`` delivered (:func:`output_size`).
        fixed: the dataset has a fixed image size (checked) rather than variable (resized and
            center-cropped, :func:`shards.images.decode_image`).
        on_corrupt: ``"error"`` or ``"skip"`` (:data:`ON_CORRUPT`; another value raises ValueError).
        max_pixels: the largest image decoded (``data.max_pixels``).
    """

    out_hw: tuple[int, int]
    fixed: bool
    on_corrupt: str
    views: Any = None  # an ImageNetViews (data.view_rule=authors_imagenet): the reader cuts the views
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        check_on_corrupt(self.on_corrupt)

    def batch(
        self,
        images: Sequence[bytes],
        labels: np.ndarray,
        idx: np.ndarray,
        where: Callable[[int], str],
        key: int | None = None,
    ) -> HostBatch:
        """Decode a batch of encoded images with their labels and stable indices.

        Args:
            where: names sample ``j`` of the batch (shard and key) in messages.
            key: the batch's number in its stream: keys the crop places of ``views``.

        Returns:
            ``(uint8 (B, 3, H, W), int64 (B,) labels, int64 (B,) indices, skipped)``. With
            ``on_corrupt="skip"`` an undecodable sample is replaced by a copy of a valid one of
            the same batch, with that sample's own label and index (so no label is ever wrong).

        Raises:
            ValueError: an undecodable image with ``on_corrupt="error"``, or a batch with no
                decodable image at all, naming the sample(s).
        """
        h, w = self.out_hw if self.views is None else self.views.out_hw
        out = np.empty((len(images), h, w, 3), dtype=np.uint8)
        ok = np.ones(len(images), dtype=bool)
        for j, data in enumerate(images):
            try:
                if self.views is not None:
                    out[j] = decode_views(data, self.views, self.views.rng(key, j, len(images)), self.max_pixels)
                    continue
                out[j] = decode_image(data, self.out_hw, self.fixed, self.max_pixels)
            except Exception as e:  # PIL raises many types for corrupt data
                if self.on_corrupt == "error":
                    raise DataError(f"{where(j)}: cannot decode image ({e})") from e
                log.warning("skipping corrupt image %s (%s)", where(j), e)
                ok[j] = False
        labels = np.array(labels, dtype=np.int64)
        idx = np.array(idx, dtype=np.int64)
        skipped = int((~ok).sum())
        if skipped:
            good = np.nonzero(ok)[0]
            if good.size == 0:
                raise DataError(f"every image of a batch is corrupt (indices {idx.tolist()})")
            bad = np.nonzero(~ok)[0]
            src = good[np.arange(bad.size) % good.size]
            out[bad], labels[bad], idx[bad] = out[src], labels[src], idx[src]
        images_ = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
        return images_, torch.from_numpy(labels), torch.from_numpy(idx), skipped
