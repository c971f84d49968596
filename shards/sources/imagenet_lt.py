"""ImageNet-LT (Liu et al. 2019): the pinned split lists (:data:`IMAGENET_LT_LISTS`) and their
reader (:func:`read_split_list`); the JPEGs themselves are read by the builder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------------------------
# Published files, pinned (URLs at fixed commits; git blob ids are certain, see docs/datasets.md)
_LT = (
    "https://raw.githubusercontent.com/facebookresearch/classifier-balancing/"
    "f162adef63fdf592d0b8a0f6e52bc481fc08785f/data/ImageNet_LT/"
)
IMAGENET_LT_LISTS = {
    "ImageNet_LT_train.txt": (
        _LT + "ImageNet_LT_train.txt",
        "a063f095fcd475db4cf8b0658c4b73955535bbf9",
    ),
    "ImageNet_LT_val.txt": (
        _LT + "ImageNet_LT_val.txt",
        "3ed3188b2f44829ce2dec1cc27040d8d40984088",
    ),
    "ImageNet_LT_test.txt": (
        _LT + "ImageNet_LT_test.txt",
        "76a2fb9749d6cd29e765cc4f8c270f2504131e2f",
    ),
}


# ----------------------------------------------------------------------------------------------
# ImageNet-LT split lists


@dataclass
class ListSplit:
    """One split list: relative paths, labels, and the list file (for error messages)."""

    file: Path
    paths: list[str]
    labels: np.ndarray


def read_split_list(path: Path) -> ListSplit:
    """Parse ``<relative path> <0-based label>`` lines."""
    paths: list[str] = []
    labels: list[int] = []
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"{path}: cannot read split list ({e.strerror})") from e
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"{path}:{i}: expected '<path> <label>', got {line!r}")
        paths.append(parts[0])
        labels.append(int(parts[1]))
    if not paths:
        raise ValueError(f"{path}: empty split list")
    return ListSplit(Path(path), paths, np.asarray(labels, np.int64))


def wnid_names(splits: list[ListSplit], num_classes: int) -> list[str]:
    """Class names (wnids) from the list paths; checks one wnid per label across all lists."""
    names: dict[int, str] = {}
    for sp in splits:
        for i, (p, y) in enumerate(zip(sp.paths, sp.labels.tolist()), 1):
            parts = p.split("/")
            w = parts[-2] if len(parts) >= 2 else f"class_{y:04d}"
            if names.setdefault(y, w) != w:
                raise ValueError(f"{sp.file}:{i}: label {y} is {w} here but {names[y]} elsewhere")
    return [names.get(k, f"class_{k:04d}") for k in range(num_classes)]
