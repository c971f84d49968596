"""Input pipeline throughput: samples/s delivered *augmented* (labeled weak + unlabeled weak +
2 strong views), for every installed backend at 32, 64 and 224 px, beside a naive baseline
(per-sample PIL decode + the same augmentation applied per sample -- 1-image batches -- in
DataLoader workers).

    .venv/bin/python benchmarks/bench_pipelines.py [--steps 20] [--sizes 32 64 224]
        [--backends webdataset tensor ffcv dali]   (the naive baseline always runs)

Prints one markdown table. Synthetic data (smooth images, so PNG/JPEG sizes are realistic):
32/64 px as lossless PNG shards + arrays + .beton, 224 px as full-res JPEG shards (~320x280)
read at load_size 256 and random-resized-cropped to 224 on the device.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipelines import build_train_stream
from pipelines.augment import ViewMaker
from pipelines.host_memory import keep_freed_memory
from pipelines.shard_index import build_index
from shards.format import decode_image

BL, BU = 32, 64


def smooth_images(n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    low = rng.integers(0, 256, (n, 3, h // 8 + 1, w // 8 + 1)).astype(np.float32)
    up = torch.nn.functional.interpolate(torch.from_numpy(low), size=(h, w), mode="bilinear")
    noise = torch.randn(up.shape) * 8
    return (up + noise).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def build_png(root: Path, size: int, n: int, formats: tuple[str, ...]) -> None:
    from shards.writer import write_dataset

    rng = np.random.default_rng(0)
    splits = {
        s: (smooth_images(k, size, size, rng), rng.integers(0, 10, k))
        for s, k in (("labeled", n // 4), ("unlabeled", n), ("test", 64))
    }
    write_dataset(
        root,
        name=f"bench{size}",
        class_names=[str(i) for i in range(10)],
        splits=splits,
        formats=formats,
        shard_size=512,
        workers=2,
    )


def build_jpeg(root: Path, n: int, ffcv: bool = False) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    splits = {}
    for split, k in (("labeled", n // 4), ("unlabeled", n), ("test", 16)):
        (root / split).mkdir(parents=True)
        rel = f"{split}/{split}-000000.tar"
        imgs = smooth_images(k, 280, 320, rng)
        with tarfile.open(root / rel, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(k):
                buf = io.BytesIO()
                Image.fromarray(imgs[i]).save(buf, "JPEG", quality=90)
                for ext, data in (
                    ("jpg", buf.getvalue()),
                    ("cls", str(i % 10).encode()),
                    ("idx", str(i).encode()),
                ):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        beton = None
        if ffcv and split != "test":
            from shards.ffcv_out import write_beton

            write_beton(
                root / f"{split}.beton", [root / rel], np.arange(k) % 10, "jpg", np.arange(k)
            )
            beton = {"file": f"{split}.beton", "sha256": ""}
        splits[split] = {
            "count": k,
            "shards": [{"file": rel, "count": k, "sha256": ""}],
            "arrays": None,
            "ffcv": beton,
        }
    (root / "manifest.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "num_classes": 10,
                "image_size": None,
                "encoding": "jpg",
                "splits": splits,
            }
        )
    )


class NaiveDataset(Dataset):
    """One sample per item: PIL decode + its own views, like a torchvision-style pipeline."""

    def __init__(self, root: Path, split: str, size: int, fixed: bool, views: ViewMaker):
        self.index, self.size, self.fixed, self.views = build_index(root, split), size, fixed, views

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        with open(self.index.shards[self.index.shard[i]], "rb") as f:
            f.seek(int(self.index.offset[i]))
            data = f.read(int(self.index.size[i]))
        hw = (self.size, self.size) if self.fixed else (256, 256)
        x = torch.from_numpy(decode_image(data, hw, self.fixed)).permute(2, 0, 1)[None]
        g = torch.Generator().manual_seed(int(i))
        weak, weak_u, strong = self.views(x, x, g)  # per-sample augment (1-image batches)
        return weak[0], weak_u[0], strong[0][0], strong[1][0], int(self.index.labels[i])


def time_stream(stream, views: ViewMaker, steps: int, warmup: int = 3) -> float:
    g = torch.Generator().manual_seed(0)
    it = iter(stream)
    for _ in range(warmup):
        b = next(it)
        views(b.labeled, b.unlabeled, g)
    t = time.perf_counter()
    for _ in range(steps):
        b = next(it)
        views(b.labeled, b.unlabeled, g)
    return steps * (BL + BU) / (time.perf_counter() - t)


def time_naive(root: Path, size: int, fixed: bool, views: ViewMaker, steps: int, workers: int) -> float:
    dl = DataLoader(
        NaiveDataset(root, "unlabeled", size, fixed, views),
        batch_size=BL + BU,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=True,
    )
    it = iter(dl)
    for _ in range(2):
        next(it)
    n = min(steps, len(dl) - 3)
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * (BL + BU) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 224])
    ap.add_argument("--device", default="cpu", help="where batches are delivered and augmented")
    ap.add_argument("--workers", type=int, default=2,
                    help="decode workers/threads of every pipeline, the naive one included")
    ap.add_argument("--backends", nargs="+", default=["webdataset", "tensor", "ffcv", "dali"],
                    help="backends to time beside the naive baseline (default: all installed)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    keep_freed_memory()  # as launch/train.py does: every pipeline, the naive one included

    has_ffcv = importlib.util.find_spec("ffcv") is not None and "ffcv" in args.backends
    has_dali = (
        importlib.util.find_spec("nvidia") is not None
        and importlib.util.find_spec("nvidia.dali") is not None
        and "dali" in args.backends
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            root = Path(tmp) / f"d{size}"
            fixed = size <= 64
            if fixed:
                build_png(
                    root,
                    size,
                    4096 if size == 32 else 2048,
                    ("wds", "arrays") + (("ffcv",) if has_ffcv else ()),
                )
                views = ViewMaker(image_size=size)
            else:
                build_jpeg(root, 768, ffcv=has_ffcv)
                views = ViewMaker(image_size=224, crop="rrc")
            steps = args.steps if fixed else max(4, args.steps // 4)
            naive = f"naive (per sample, {args.workers} workers)"
            res = {naive: time_naive(root, size, fixed, views, steps, args.workers)}
            kw = dict(labeled_batch=BL, unlabeled_batch=BU, device=args.device)
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
                        build_train_stream(backend, root, **kw, **opts), views, steps
                    )
                except Exception as e:  # report, keep measuring the others
                    print(f"{label} @ {size}px failed: {e}")
            base = res[naive]
            for label, v in res.items():
                rows.append((size, label, v, v / base))
    print("\n| px | pipeline | samples/s (augmented) | x naive |\n|---|---|---|---|")
    for size, label, v, r in rows:
        print(f"| {size} | {label} | {v:,.0f} | {r:.1f} |")


if __name__ == "__main__":
    main()
