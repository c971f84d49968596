"""A split's ``.beton`` file: located through the manifest, its images' sizes checked before
any loader exists, and the row of each stable index. Read by both FFCV readers
(:mod:`pipelines.ffcv_backend` and :mod:`pipelines.ffcv_views`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from ffcv.reader import Reader

from pipelines.shard_index import split_info
from shards.format import MAX_PIXELS, DataError, dataset_file, sample_key


def beton_path(
    root: Path, split: str, manifest: dict[str, Any], max_pixels: int = MAX_PIXELS
) -> Path:
    """The split's ``.beton``, its images' sizes checked (:func:`check_beton_images`)."""
    entry = split_info(root, manifest, split).get("ffcv")
    if not entry:
        raise ValueError(
            f"{root / 'manifest.json'}: split {split!r} has no .beton; rebuild the dataset "
            "with `--formats ffcv` to use the ffcv backend"
        )
    path = dataset_file(root, entry["file"])
    if not path.is_file():
        raise ValueError(f"missing FFCV file {path} (listed in manifest split {split!r})")
    check_beton_images(path, manifest.get("image_size"), max_pixels)
    return path


def check_beton_images(path: Path, size: list[int] | None, max_pixels: int) -> None:
    """Check every image's recorded ``(H, W)`` (the .beton's metadata table, no decode): at
    most ``max_pixels`` pixels, and ``size`` where the dataset has a fixed size. FFCV sizes
    its decode buffers by the largest image, so this runs before any loader exists.

    Raises:
        DataError: naming the file, the sample key and the size.
    """
    reader = Reader(str(path))
    names = reader.field_names
    meta = reader.metadata[f"f{names.index('image')}"]
    h, w = meta["height"].astype(np.int64), meta["width"].astype(np.int64)
    bad = h * w > max_pixels
    if size:
        bad |= (h != size[0]) | (w != size[1])
    if not bad.any():
        return
    row = int(np.nonzero(bad)[0][0])
    key = sample_key(int(reader.metadata[f"f{names.index('index')}"][row]))
    want = f"over the limit of {max_pixels} pixels (data.max_pixels)"
    if h[row] * w[row] <= max_pixels:
        want = f"the dataset says {size[0]}x{size[1]}"
    raise DataError(f"{path}: sample {key!r} (row {row}): image is {h[row]}x{w[row]}, {want}")


def rows_of_indices(path: Path) -> np.ndarray:
    """int64 ``(N,)``: the .beton row holding each stable index (from the ``index`` field)."""
    reader = Reader(str(path))
    index = np.asarray(reader.metadata[f"f{reader.field_names.index('index')}"], dtype=np.int64)
    n = len(index)
    if n and not np.array_equal(np.sort(index), np.arange(n)):
        raise ValueError(
            f"{reader.file_name}: the 'index' field is not a permutation of 0..{n - 1}"
        )
    rows = np.empty(n, dtype=np.int64)
    rows[index] = np.arange(n)
    return rows
