"""The tiny dataset the backend tests share: 3 classes, 24 labeled / 40 unlabeled / 13 test
8 px images written by ``shards.writer.write_dataset`` (the ``dataset`` fixture in
``tests/conftest.py``), and a way to corrupt one of its images."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from pipelines.shard_index import build_index

HAS_FFCV = importlib.util.find_spec("ffcv") is not None
FFCV = pytest.mark.skipif(not HAS_FFCV, reason="no ffcv")
SIZES = {"labeled": 24, "unlabeled": 40, "test": 13}
NUM_CLASSES = 3


def make_arrays(seed: int = 0, size: int = 8) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in SIZES.items():
        images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        labels = rng.integers(0, NUM_CLASSES, n).astype(np.int64)
        out[split] = (images, labels)
    return out


def write_fixture(path: Path, formats: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from shards.writer import write_dataset

    arrays = make_arrays()
    write_dataset(
        path,
        name="tiny",
        class_names=[f"c{i}" for i in range(NUM_CLASSES)],
        splits=arrays,
        formats=formats,
        shard_size=8,
    )
    return arrays


def corrupt_png(root: Path, split: str, key: str) -> Path:
    """Overwrite the middle of sample ``key``'s PNG with garbage, keeping every size intact."""
    index = build_index(root, split)
    i = index.keys.index(key)
    shard = index.shards[index.shard[i]]
    raw = bytearray(shard.read_bytes())
    off, size = int(index.offset[i]), int(index.size[i])
    raw[off + 8 : off + size] = b"\x00" * (size - 8)  # keep the PNG signature, kill the chunks
    shard.write_bytes(bytes(raw))
    return shard
