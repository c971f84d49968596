"""Views in the loader against the trainer's ViewMaker, both on the DALI backend: samples/s
delivered augmented (each step: 32 labeled weak + 64 unlabeled weak + 2 strong views,
normalised float32), as in ``bench_pipelines.py``.

    .venv/bin/python benchmarks/bench_dali_views.py [--steps 20] [--rounds 3] [--sizes 32 64]
        [--threads 2] [--device cpu] [--smoke]

``dali + ViewMaker``: the DALI stream delivers uint8 images, ``ViewMaker`` makes the views (the
default ``data.views=trainer``). ``dali views=loader``: the DALI pipelines make them
(``data.views=loader``, ``pipelines/dali_views.py``). The two are timed alternately,
``--rounds`` times each (median and best reported: the best is the least disturbed run), so
that load from other jobs hits both alike.
Synthetic smooth images as PNG shards (32/64 px, translate crop) or ~320x280 JPEG shards read at
load_size 256 and random-resized-cropped to 224 (``--sizes 224``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._data import build_jpeg, build_png  # noqa: E402
from benchmarks.bench_pipelines import BL, BU, SMOKE_BATCH  # noqa: E402
from pipelines import build_train_stream  # noqa: E402
from pipelines.augment import ViewMaker  # noqa: E402
from pipelines.dali_views import DaliViews  # noqa: E402
from pipelines.host_memory import keep_freed_memory  # noqa: E402


def time_it(stream, views: ViewMaker | None, steps: int, warmup: int = 3) -> float:
    """Samples/s of ``steps`` steps after ``warmup`` (views by ``views``, else the loader's)."""
    g = torch.Generator().manual_seed(0)
    it = iter(stream)

    def step() -> int:
        b = next(it)
        if views is None:
            lw, uw, strong = b.views
        else:
            lw, uw, strong = views(b.labeled, b.unlabeled, g)
        if lw.is_cuda:
            torch.cuda.synchronize()
        return len(lw) + len(uw)

    for _ in range(warmup):
        step()
    n, t = 0, time.perf_counter()
    for _ in range(steps):
        n += step()
    return n / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--threads", type=int, default=2, help="DALI threads (and torch threads)")
    ap.add_argument("--device", default="cpu", help="cuda: mixed decode, views on the GPU")
    ap.add_argument("--smoke", action="store_true",
                    help="CI check: a tiny 224 px JPEG set (the script's own branch: JPEG shards, load_size, "
                         "random-resized crop), 1 step, 1 round (the numbers mean nothing)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.rounds, args.sizes, args.threads = 1, 1, [224], 1
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            root = Path(tmp) / f"d{size}"
            if size <= 64:
                build_png(root, size, 160 if args.smoke else 4096 if size == 32 else 2048, ("wds",),
                          workers=args.threads)
                crop, s, steps = "translate", size, args.steps
            else:
                build_jpeg(root, 160 if args.smoke else 768, workers=args.threads)
                crop, s, steps = "rrc", 224, args.steps if args.smoke else max(4, args.steps // 4)
            bl, bu = SMOKE_BATCH if args.smoke else (BL, BU)
            kw = dict(labeled_batch=bl, unlabeled_batch=bu, device=args.device,
                      num_threads=args.threads)  # fmt: skip
            if crop == "rrc":
                kw["load_size"] = 256
            maker = ViewMaker(image_size=s, crop=crop)
            warmup = 1 if args.smoke else 3
            loader = DaliViews(image_size=s, crop=crop)
            res: dict[str, list[float]] = {"dali + ViewMaker": [], "dali views=loader": []}
            for _ in range(args.rounds):
                res["dali + ViewMaker"].append(
                    time_it(build_train_stream("dali", root, **kw), maker, steps, warmup)
                )
                res["dali views=loader"].append(
                    time_it(build_train_stream("dali", root, views=loader, **kw), None, steps, warmup)
                )
            for label, v in res.items():
                rows.append((size, label, statistics.median(v), v))
    print(f"\n| px | pipeline ({args.threads} threads, {args.device}) | median | best | runs |")
    print("|---|---|---:|---:|---|")
    for size, label, med, v in rows:
        runs = ", ".join(f"{x:,.0f}" for x in v)
        print(f"| {size} | {label} | {med:,.0f} | {max(v):,.0f} | {runs} |")


if __name__ == "__main__":
    main()
