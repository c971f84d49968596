"""Optional FFCV ``.beton`` output, derived from a split's finished tar shards.

Fields: ``image`` (RGB), ``label`` (int), ``index`` (int). Rows are in the tar shards' file
order (row p is the sample with idx ``order[p]``, see :mod:`shards.order`), so FFCV's
page-wise ``quasi_random`` order mixes classes as well as a streaming reader of the tars does;
readers map an index to its row through the ``index`` field.
PNG datasets store raw pixels (lossless); JPEG datasets store JPEG re-encoded by FFCV at
quality 95 (FFCV cannot keep the original bytes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shards.format import decode_image, shard_samples

FFCV_HINT = "FFCV output needs the ffcv package: pip install 'bmb[ffcv]' (see docs/datasets.md)"


def require_ffcv() -> None:
    """Raise a clear error naming the extra to install when ffcv is not importable."""
    try:
        import ffcv  # noqa: F401
        import ffcv.writer  # noqa: F401
    except Exception as e:  # ImportError, or a broken native build (numba/opencv)
        raise RuntimeError(f"{FFCV_HINT} (import failed: {e})") from e


class _TarImages:
    """Indexable ``(image uint8 (H, W, 3), label, index)`` over tar shards (for FFCV's writer),
    in file order: item p is the sample with index ``order[p]``."""

    def __init__(
        self,
        files: list[Path],
        labels: np.ndarray,
        ext: str,
        order: np.ndarray,
        arrays: Any = None,
    ):
        self.labels, self.arrays, self.order = labels, arrays, order
        self.where: list[tuple[int, int, int]] = []
        self.files = [str(f) for f in files]
        if arrays is None:  # locate each image member with the one tar reader (shards.format)
            for fi, f in enumerate(self.files):
                for _key, spans, _small in shard_samples(f, skip_images=True):
                    self.where.append((fi, *spans[ext]))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, p: int) -> tuple[np.ndarray, int, int]:
        i = int(self.order[p])
        if self.arrays is not None:
            img = np.asarray(self.arrays[i])
        else:
            fi, off, size = self.where[p]
            with open(self.files[fi], "rb") as f:
                f.seek(off)
                img = decode_image(f.read(size))
        return img, int(self.labels[i]), int(i)


def write_beton(
    path: Path,
    files: list[Path],
    labels: np.ndarray,
    encoding: str,
    order: np.ndarray,
    arrays: Any = None,
) -> None:
    """Write ``path`` (a .beton) holding the samples of ``files`` in their file order.

    ``order[p]`` is the index of the tars' ``p``-th sample; ``labels`` and ``arrays`` (rows)
    are in index order.

    One FFCV worker: with several, page allocation order (hence the bytes) varies run to run.
    """
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    image = (
        RGBImageField(write_mode="raw")
        if encoding == "png"
        else RGBImageField(write_mode="jpg", jpeg_quality=95)
    )
    writer = DatasetWriter(
        str(path), {"image": image, "label": IntField(), "index": IntField()}, num_workers=1
    )
    writer.from_indexed_dataset(_TarImages(files, labels, encoding, order, arrays), chunksize=256)
