"""For the shard builder tests (tests/test_shards*.py, tests/test_trust_data.py): tiny splits to
write and :data:`DEMO` flags to build with, and reading a built dataset back."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shards.format import decode_image, iter_tar_samples

# ``bmb-shards demo`` flags for a tiny 3-class dataset of 8x8 images (seconds to build).
DEMO = ["--num-classes", "3", "--n1", "12", "--m1", "20", "--gamma-l", "2", "--gamma-u", "2", "--test-per-class", "4",
        "--size", "8", "--shard-size", "8", "--workers", "1", "--no-progress"]  # fmt: skip


def tiny_splits(seed: int = 0) -> dict:
    """Random 8x8 RGB ``labeled`` (23), ``unlabeled`` (37) and ``test`` (11) splits of 3 classes:
    split -> (images N x 8 x 8 x 3 uint8, labels N)."""
    rng = np.random.default_rng(seed)

    def mk(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 3, n)

    return {"labeled": mk(23), "unlabeled": mk(37), "test": mk(11)}


def read_split(d: Path, m: dict, split: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """All images and labels of a split in index order, read back from its tar shards, and the
    idx of each sample in file order."""
    xs, ys, idx = [], [], []
    for sh in m["splits"][split]["shards"]:
        for key, mem in iter_tar_samples(d / sh["file"]):
            xs.append(decode_image(mem[m["encoding"]]))
            ys.append(int(mem["cls"]))
            idx.append(int(mem["idx"]))
            assert key == f"{idx[-1]:08d}"
    assert sorted(idx) == list(range(len(idx)))
    rows = np.argsort(idx)
    return np.stack(xs)[rows] if xs else np.zeros((0,)), np.array(ys)[rows], idx


def tree_bytes(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (relative path -> bytes)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
