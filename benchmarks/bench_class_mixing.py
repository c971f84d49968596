"""Class mixing of the unlabeled batches, per input backend and order.

    .venv/bin/python benchmarks/bench_class_mixing.py [--root DIR] [--batches 150] [--smoke]

The metric is the mean number of distinct classes in an unlabeled batch of 64 over the first
``--batches`` batches (about one epoch of the default set), beside the same mean for a uniform
random permutation of the same labels (simulated with a seeded generator, 20 epochs). A reader
that streams class-sorted shards through a small buffer scores far below the reference.

Without ``--root`` it builds the issue's 100-class long-tailed demo set in a temporary directory
with the ``bmb-shards`` of the checkout (``shards.cli``, in this process; so the same script
measures any version of the writer and the readers):

    bmb-shards demo --num-classes 100 --n1 40 --m1 400 --gamma-l 20 --gamma-u 20 \\
        --shard-size 300 --formats wds,arrays,ffcv

Backends whose package is missing, or whose files the dataset lacks, print ``n/a``. Every
reader runs with its defaults (webdataset ``num_workers=2``, ``order="stream"`` buffer 1000;
DALI's default buffer) except ``num_threads``/``num_workers`` fixed for a 2-core machine; the
"1 reader" row streams all shards through one buffer (``num_workers=0``), the worst case.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

BATCH = 64
DEMO = [
    "demo", "--num-classes", "100", "--n1", "40", "--m1", "400", "--gamma-l", "20",
    "--gamma-u", "20", "--shard-size", "300", "--formats", "wds,arrays,ffcv", "--no-progress",
]  # fmt: skip
# --smoke: 10 classes, 16 images per shard (2 per reader at least), one encoding worker: the same readers in seconds.
SMOKE_DEMO = [
    "demo", "--num-classes", "10", "--n1", "8", "--m1", "40", "--gamma-l", "4", "--gamma-u", "4",
    "--test-per-class", "2", "--shard-size", "16", "--formats", "wds,arrays,ffcv", "--workers", "1",
    "--no-progress",
]  # fmt: skip

# (row name, backend, options)
CASES = [
    ("tensor", "tensor", {}),
    ("webdataset order=index", "webdataset", {"num_workers": 2}),
    ("webdataset order=stream", "webdataset", {"num_workers": 2, "order": "stream"}),
    ("webdataset order=stream, 1 reader", "webdataset", {"num_workers": 0, "order": "stream"}),
    ("ffcv order=exact", "ffcv", {"num_workers": 2}),
    ("ffcv order=quasi_random", "ffcv", {"num_workers": 2, "order": "quasi_random"}),
    ("dali", "dali", {"num_threads": 2}),
]


# --smoke runs one FFCV order: each FFCV loader compiles its pipeline (seconds), and the order
# is FFCV's own.
SMOKE_SKIP = ("ffcv order=quasi_random",)


def uniform_reference(labels: np.ndarray, batch: int, epochs: int = 20, seed: int = 0) -> float:
    """Mean distinct classes per batch of a uniform random permutation of ``labels``."""
    rng = np.random.default_rng(seed)
    k = len(labels) // batch
    out = []
    for _ in range(epochs):
        y = labels[rng.permutation(len(labels))][: k * batch].reshape(k, batch)
        out.extend(len(np.unique(row)) for row in y)
    return float(np.mean(out))


def distinct_per_batch(backend: str, root: Path, batches: int, **options) -> float:
    """Mean distinct classes of the first ``batches`` unlabeled batches of ``backend``."""
    from pipelines import build_train_stream

    s = build_train_stream(backend, root, labeled_batch=8, unlabeled_batch=BATCH, seed=0, **options)
    it = iter(s)
    counts = [len(set(next(it).unlabeled_labels.tolist())) for _ in range(batches)]
    return float(np.mean(counts))


def available(backend: str, root: Path) -> bool:
    manifest = json.loads((root / "manifest.json").read_text())
    unl = manifest["splits"]["unlabeled"]
    if backend == "tensor":
        return bool(unl.get("arrays"))
    if backend == "ffcv":
        return bool(unl.get("ffcv")) and importlib.util.find_spec("ffcv") is not None
    if backend == "dali":  # find_spec("nvidia.dali") raises when no nvidia package is installed at all
        return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, help="dataset directory (default: build the demo set)")
    ap.add_argument("--batches", type=int, default=150, help="unlabeled batches per backend")
    ap.add_argument("--smoke", action="store_true",
                    help="CI check: a 10-class demo set, 2 batches per backend and order (one FFCV order; "
                         "the numbers mean nothing)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.batches = 2
    tmp = None
    root = a.root
    if root is None:
        tmp = tempfile.TemporaryDirectory()
        root = Path(tmp.name) / "demo100"
        demo = SMOKE_DEMO if a.smoke else DEMO
        if "ffcv" in demo[demo.index("--formats") + 1] and importlib.util.find_spec("ffcv") is None:
            demo = [*demo[:demo.index("--formats") + 1], "wds,arrays", *demo[demo.index("--formats") + 2:]]
        from shards.cli import main as bmb_shards

        with contextlib.redirect_stdout(io.StringIO()):
            if bmb_shards([*demo, "--out", str(root)]) != 0:
                raise SystemExit(f"bmb-shards {' '.join(demo)} failed")
    manifest = json.loads((root / "manifest.json").read_text())
    labels = np.load(root / "unlabeled" / "labels.npy") if (root / "unlabeled").is_dir() else None
    order = manifest["splits"]["unlabeled"].get("order", "none (class order)")
    print(f"dataset {root}: {manifest['splits']['unlabeled']['count']} unlabeled samples, "
          f"{manifest['num_classes']} classes, shards per split "
          f"{len(manifest['splits']['unlabeled']['shards'])}, unlabeled order {order}")  # fmt: skip
    print()
    print(f"| backend / order | distinct classes per batch of {BATCH} | vs. uniform | seconds |")
    print("|---|---:|---:|---:|")
    ref = uniform_reference(labels, BATCH) if labels is not None else float("nan")
    print(f"| uniform random permutation (reference) | {ref:.1f} | 100 % | - |")
    for name, backend, options in CASES:
        if a.smoke and name in SMOKE_SKIP:
            print(f"| {name} | skipped (--smoke) | | |")
            continue
        if not available(backend, root):
            print(f"| {name} | n/a | | |")
            continue
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = distinct_per_batch(backend, root, a.batches, **options)
        dt = time.perf_counter() - t0
        print(f"| {name} | {m:.1f} | {100 * m / ref:.0f} % | {dt:.0f} |", flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
