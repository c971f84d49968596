"""Input pipeline throughput: samples/s delivered *augmented* (labeled weak + unlabeled weak +
2 strong views), for every installed backend at 32, 64 and 224 px, beside the baseline a user
would otherwise run: the FixMatch/USB reference pipeline -- per-sample PIL decode and per-sample
PIL views (flip, pad-and-crop or random-resized-crop, RandAugment, Cutout, ToTensor + Normalize;
``benchmarks/bench_augment.py``'s baseline) in DataLoader workers.

    .venv/bin/python benchmarks/bench_pipelines.py [--steps 20] [--sizes 32 64 224]
        [--backends webdataset tensor ffcv dali] [--smoke]   (the naive baseline always runs)

Prints one markdown table; exits 1 when a backend failed (after timing the others). Synthetic
data (smooth images, so PNG/JPEG sizes are realistic), built by the shard builders
(``benchmarks/_data.py``): 32/64 px as lossless PNG shards + arrays + .beton, 224 px as full-res
JPEG shards (~320x280; ``bmb-shards imagenet-lt`` on synthetic files) read at load_size 256 and
random-resized-cropped to 224 on the device. ``--smoke``: the same paths in seconds (CI).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._data import build_jpeg, build_png  # noqa: E402

# The per-sample PIL views of FixMatch/USB reference code, as bench_augment.py measures them.
from benchmarks.bench_augment import _pil_strong, _pil_weak, _PILFixMatchViews, _seed_worker  # noqa: E402
from pipelines import build_train_stream  # noqa: E402
from pipelines.augment import CIFAR10_MEAN, CIFAR10_STD, ViewMaker  # noqa: E402
from pipelines.host_memory import keep_freed_memory  # noqa: E402
from pipelines.shard_index import build_index  # noqa: E402
from shards.format import decode_image  # noqa: E402

BL, BU = 32, 64  # labeled, unlabeled samples per step
SMOKE_BATCH = (4, 8)  # the same per --smoke step


def _pil_rrc(img, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop on a PIL image (bilinear): the peers' 224 px crop."""
    from PIL import Image

    w, h = img.size
    for _ in range(10):
        area = w * h * random.uniform(*scale)
        r = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * r)), round(math.sqrt(area / r))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = random.randint(0, w - cw), random.randint(0, h - ch)
            break
    else:  # center crop at the nearest allowed aspect ratio
        cw, ch = w, h
        if w / h < ratio[0]:
            ch = round(w / ratio[0])
        elif w / h > ratio[1]:
            cw = round(h * ratio[1])
        x, y = (w - cw) // 2, (h - ch) // 2
    return img.resize((size, size), Image.BILINEAR, box=(x, y, x + cw, y + ch))


class NaiveDataset(_PILFixMatchViews):
    """The FixMatch/USB reference pipeline, one sample per item: PIL decode, then per-sample PIL
    views -- a weak view for a labeled key ``("l", i)``, weak + 2 strong views for an unlabeled
    key ``("u", i)`` -- normalised with ToTensor + Normalize (``bench_augment``'s baseline code).
    At 32/64 px the crop is reflect pad-and-crop (1/8 of the side); for full-resolution JPEGs it
    is a random-resized-crop of the decoded 256 px square to 224 before the same flip and ops."""

    def __init__(self, root: Path, size: int, fixed: bool):
        self.index = {"l": build_index(root, "labeled"), "u": build_index(root, "unlabeled")}
        self.size, self.fixed = size, fixed
        self.pad = round(0.125 * size) if fixed else 0
        self.mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR10_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.index["u"])

    def _crop(self, img):
        return img if self.fixed else _pil_rrc(img, 224)

    def __getitem__(self, key):
        from PIL import Image

        split, i = key
        index = self.index[split]
        with open(index.shards[index.shard[i]], "rb") as f:
            f.seek(int(index.offset[i]))
            data = f.read(int(index.size[i]))
        hw = (self.size, self.size) if self.fixed else (256, 256)
        img = Image.fromarray(decode_image(data, hw, self.fixed))
        views = [_pil_weak(self._crop(img), self.pad)]
        if split == "u":
            views += [_pil_strong(self._crop(img), self.pad) for _ in range(2)]
        return split, [self._to_tensor(v) for v in views], int(index.labels[i])


class _StepKeys:
    """Batch sampler: per step ``bl`` random labeled keys and ``bu`` random unlabeled keys."""

    def __init__(self, n_labeled: int, n_unlabeled: int, steps: int, batch: tuple[int, int] = (BL, BU), seed: int = 0):
        self.n_l, self.n_u, self.steps, self.rng = n_labeled, n_unlabeled, steps, random.Random(seed)
        self.bl, self.bu = batch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield ([("l", self.rng.randrange(self.n_l)) for _ in range(self.bl)]
                   + [("u", self.rng.randrange(self.n_u)) for _ in range(self.bu)])


def _collate_step(items):
    """(labeled weak, labels), (unlabeled weak, strong 1, strong 2) batches of one step."""
    lab = [(v[0], y) for split, v, y in items if split == "l"]
    unl = [v for split, v, _ in items if split == "u"]
    weak_l = torch.stack([v for v, _ in lab])
    labels = torch.tensor([y for _, y in lab])
    return weak_l, labels, *(torch.stack([v[k] for v in unl]) for k in range(3))


def time_stream(stream, views: ViewMaker, steps: int, warmup: int = 3) -> float:
    """Samples/s of ``stream`` with ``views`` made of each batch, over ``steps`` after ``warmup``."""
    g = torch.Generator().manual_seed(0)
    it = iter(stream)
    for _ in range(warmup):
        b = next(it)
        views(b.labeled, b.unlabeled, g)
    n, t = 0, time.perf_counter()
    for _ in range(steps):
        b = next(it)
        views(b.labeled, b.unlabeled, g)
        n += len(b.labeled) + len(b.unlabeled)
    return n / (time.perf_counter() - t)


def time_naive(root: Path, size: int, fixed: bool, steps: int, workers: int, warmup: int = 2,
               batch: tuple[int, int] = (BL, BU)) -> float:
    """Samples/s of the FixMatch/USB reference pipeline (:class:`NaiveDataset`) in ``workers``
    DataLoader worker processes: per step ``batch`` = (labeled weak, unlabeled weak + 2 strong)
    views, the work the other rows do."""
    ds = NaiveDataset(root, size, fixed)
    dl = DataLoader(
        ds,
        batch_sampler=_StepKeys(len(ds.index["l"]), len(ds.index["u"]), steps + warmup, batch),
        num_workers=workers,
        collate_fn=_collate_step,
        worker_init_fn=_seed_worker,
        persistent_workers=True,
    )
    it = iter(dl)
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * sum(batch) / (time.perf_counter() - t)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 224])
    ap.add_argument("--device", default="cpu", help="where batches are delivered and augmented")
    ap.add_argument("--workers", type=int, default=2,
                    help="decode workers/threads of every pipeline, the naive one included")
    ap.add_argument("--backends", nargs="+", default=["webdataset", "tensor", "ffcv", "dali"],
                    help="backends to time beside the naive baseline (default: all installed)")
    ap.add_argument("--smoke", action="store_true",
                    help=f"CI check: tiny datasets at 32 and 224 px, 1 step of {SMOKE_BATCH} images, 1 worker "
                         "(seconds; the numbers mean nothing)")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.warmup, args.batch = 3, (BL, BU)
    if args.smoke:
        args.steps, args.sizes, args.workers, args.warmup, args.batch = 1, [32, 224], 1, 1, SMOKE_BATCH
    return args


def dataset_sizes(size: int, smoke: bool) -> int:
    """Unlabeled images of the synthetic dataset at ``size`` px (a quarter as many labeled)."""
    if smoke:
        return 160
    return 4096 if size == 32 else 2048 if size <= 64 else 768


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(2)
    keep_freed_memory()  # as launch/train.py does: every pipeline, the naive one included

    has_ffcv = importlib.util.find_spec("ffcv") is not None and "ffcv" in args.backends
    has_dali = (
        importlib.util.find_spec("nvidia") is not None
        and importlib.util.find_spec("nvidia.dali") is not None
        and "dali" in args.backends
    )
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            root = Path(tmp) / f"d{size}"
            fixed = size <= 64
            n = dataset_sizes(size, args.smoke)
            if fixed:
                build_png(root, size, n, ("wds", "arrays") + (("ffcv",) if has_ffcv else ()), workers=args.workers)
                views = ViewMaker(image_size=size)
            else:
                build_jpeg(root, n, ffcv=has_ffcv, workers=args.workers)
                views = ViewMaker(image_size=224, crop="rrc")
            steps = args.steps if fixed or args.smoke else max(4, args.steps // 4)
            naive = f"per-sample PIL, FixMatch/USB-style ({args.workers} workers)"
            res = {naive: time_naive(root, size, fixed, steps, args.workers, min(args.warmup, 2), args.batch)}
            kw = dict(labeled_batch=args.batch[0], unlabeled_batch=args.batch[1], device=args.device)
            w = args.workers
            cands = {}
            if "webdataset" in args.backends:
                cands[f"webdataset ({w} workers)"] = ("webdataset", {"num_workers": w})
            if fixed and "tensor" in args.backends:
                cands["tensor"] = ("tensor", {})
            if has_ffcv:
                cands[f"ffcv ({w} threads)"] = ("ffcv", {"num_workers": w})
            if has_dali:
                where = "gpu" if args.device.startswith("cuda") else "cpu"
                cands[f"dali {where} ({w} threads)"] = ("dali", {"num_threads": w})
            for label, (backend, opts) in cands.items():
                try:
                    res[label] = time_stream(
                        build_train_stream(backend, root, **kw, **opts), views, steps, args.warmup
                    )
                except Exception as e:  # report, keep measuring the others; the exit status says it
                    print(f"{label} @ {size}px failed: {type(e).__name__}: {e}", file=sys.stderr)
                    failed.append(f"{label} @ {size}px")
            base = res[naive]
            for label, v in res.items():
                rows.append((size, label, v, v / base))
    print("\n| px | pipeline | samples/s (augmented) | x per-sample PIL |\n|---|---|---|---|")
    for size, label, v, r in rows:
        print(f"| {size} | {label} | {v:,.0f} | {r:.1f} |")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
