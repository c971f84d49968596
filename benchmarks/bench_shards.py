"""Shard-building throughput: CIFAR-10-LT (32 px) and ImageNet127-like (64 px) PNG shards.

    .venv/bin/python benchmarks/bench_shards.py [--workers 1 2] [--n64 20000] [--smoke]

Sources are synthetic arrays shaped like the real ones (smooth colour ramps plus noise, so PNG
sizes are in the range of natural images; real photos compress differently -- treat bytes per
image as indicative). Prints a table: images encoded per second (wall clock, including tar
writing and sha256) and shard bytes per image.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from shards.build import BuildOptions, lt_from_arrays
from shards.sources import ArraySource
from shards.writer import write_dataset


def images(rng: np.random.Generator, n: int, side: int) -> np.ndarray:
    base = rng.integers(0, 256, (n, 1, 1, 3), dtype=np.int64)
    ramp = np.arange(side)[None, :, None, None] * 3 + np.arange(side)[None, None, :, None]
    return ((base + ramp + rng.integers(0, 24, (n, side, side, 3))) % 256).astype(np.uint8)


def shard_bytes(out: Path, m: dict) -> int:
    return sum(
        (out / sh["file"]).stat().st_size for sp in m["splits"].values() for sh in sp["shards"]
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--n64", type=int, default=20000, help="64 px images in the second case")
    ap.add_argument("--smoke", action="store_true",
                    help="CI check: a 1/100 CIFAR-like source, 64 images at 64 px, 1 worker (the numbers mean nothing)")
    a = ap.parse_args(argv)
    # CIFAR-10's shape (per class: 5000 train, 1000 test images) and the LT rule's N1 / M1; / 100 in a smoke run.
    scale = 100 if a.smoke else 1
    if a.smoke:
        a.workers, a.n64 = [1], 64
    rng = np.random.default_rng(0)
    ytr = np.repeat(np.arange(10), 5000 // scale)
    cifar = ArraySource(
        images(rng, 50000 // scale, 32),
        ytr,
        images(rng, 10000 // scale, 32),
        np.repeat(np.arange(10), 1000 // scale),
        [f"c{k}" for k in range(10)],
        {"kind": "cifar10", "path": "synthetic", "checksum": {}},
    )
    x64 = images(rng, a.n64, 64)
    y64 = rng.integers(0, 127, a.n64)
    rows = []
    for w in a.workers:
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            m = lt_from_arrays(
                BuildOptions(Path(d) / "c", workers=w, progress=False),
                cifar,
                rule="cifar-lt",
                n1=1500 // scale,
                m1=3000 // scale,
                gamma_l=100,
                gamma_u=100,
                seed=0,
            )
            dt = time.perf_counter() - t
            n = sum(sp["count"] for sp in m["splits"].values())
            rows.append(
                (
                    f"CIFAR-10-LT 32px (N1={1500 // scale},M1={3000 // scale},g=100)",
                    w,
                    n,
                    dt,
                    shard_bytes(Path(d) / "c", m) / n,
                )
            )
            n = a.n64
            t = time.perf_counter()
            m = write_dataset(
                Path(d) / "i",
                name="in127-like",
                class_names=[str(k) for k in range(127)],
                splits={
                    "labeled": (x64[:0], y64[:0]),
                    "unlabeled": (x64, y64),
                    "test": (x64[:0], y64[:0]),
                },
                workers=w,
            )
            dt = time.perf_counter() - t
            rows.append(("ImageNet127-like 64px", w, n, dt, shard_bytes(Path(d) / "i", m) / n))
    print("| case | workers | images | seconds | images/s | shard bytes/image |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, w, n, dt, bpi in rows:
        print(f"| {name} | {w} | {n} | {dt:.2f} | {n / dt:.0f} | {bpi:.0f} |")


if __name__ == "__main__":
    main()
