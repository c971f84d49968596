"""DALI batch -> torch ``uint8 (B, 3, H, W)``: the bulk copy against the old per-sample path.

    .venv/bin/python benchmarks/bench_dali_convert.py [--reps 50] [--smoke]

Runs a DALI CPU pipeline over synthetic 32/64 px PNG shards (batch 64) and a resized 224 px
output, keeps a few of its output batches, and times converting them both ways, alternating
A/B per repetition so that load from other jobs hits both alike. Prints microseconds per batch.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.dali_backend import _index_paths, _paths, _pipe, _to_torch
from shards.format import load_manifest
from shards.writer import write_dataset


def per_sample(images) -> torch.Tensor:
    """The replaced path: one host array per sample, ``np.stack``, then NCHW."""
    arr = np.stack([np.asarray(images[i]) for i in range(len(images))])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--smoke", action="store_true", help="CI check: 2 repetitions (the numbers mean nothing)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.reps = 2
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    print("| output | new: bulk copy (µs/batch) | old: per sample + np.stack (µs/batch) | old/new |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for size, out in ((32, 32), (64, 64), (64, 224)):
            root = Path(tmp) / f"d{size}"
            if not root.exists():
                x = rng.integers(0, 256, (256, size, size, 3), dtype=np.uint8)
                y = rng.integers(0, 10, 256)
                write_dataset(root, name="b", class_names=[str(i) for i in range(10)],
                              splits={"labeled": (x, y), "unlabeled": (x, y), "test": (x, y)},
                              shard_size=64)  # fmt: skip
            m = load_manifest(root)
            p = _pipe(_paths(root, m, "unlabeled"), index_paths=_index_paths(root, m, "unlabeled"),
                      batch_size=64, seed=0, shard_id=0, num_shards=1, shuffle=False, gpu=False,
                      fixed=out == size, out_hw=(out, out), num_threads=2, prefetch=1, buffer=1,
                      checkpoint=None, pad=False)  # fmt: skip
            batch = p.run()[0]
            assert torch.equal(_to_torch(batch), per_sample(batch))
            t_new, t_old = [], []
            for _ in range(a.reps):
                for fn, acc in ((_to_torch, t_new), (per_sample, t_old)):
                    t0 = time.perf_counter()
                    fn(batch)
                    acc.append(time.perf_counter() - t0)
            new, old = np.median(t_new) * 1e6, np.median(t_old) * 1e6
            label = f"{out} px" + (" (resized from 64 px)" if out != size else "")
            print(f"| {label} | {new:,.0f} | {old:,.0f} | {old / new:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
