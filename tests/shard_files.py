"""Reading a built dataset back, for the shard builder tests (tests/test_shards*.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shards.format import decode_image, iter_tar_samples


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
