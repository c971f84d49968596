"""Batched device-side augmentation vs. the per-sample PIL pipeline of FixMatch reference code.

Both produce, per unlabeled sample, one weak + two strong views, normalised float32:

- ``per-sample PIL``: a ``Dataset`` whose ``__getitem__`` builds the three views of one image
  with PIL (flip, reflect pad-and-crop, RandAugment: 2 of 14 ops with random magnitudes,
  Cutout), ``ToTensor`` + ``Normalize`` per view, in ``torch.utils.data.DataLoader`` worker
  processes -- the way FixMatch reference implementations do it. Written here with PIL ops
  (no torchvision); it is a benchmark baseline only, never used by the library.
- ``batched``: :class:`pipelines.augment.ViewMaker` on uint8 batches taken from a tensor in
  device memory (the tensor backend's path), in the main process.
- ``batched, W worker processes``: the same batched ViewMaker, but spread over the cores the
  way the baseline is: a ``DataLoader`` with one worker process per core and
  ``batch_size=None``, whose dataset's ``__getitem__`` draws ``--batch`` random indices from
  the uint8 image tensor and returns their views (1 torch thread and its own seeded
  generator per worker). The views reach the main process as uint8 through shared memory
  (``ViewMaker.uint8_views``) and are normalised there, on ``--device``.

All run in one process pinned to the same cores (``--cores``, default: all the process may
use): the baseline with one worker per core; the batched path in-process with 1 thread
(using one core of the set) and with one thread per core, and in one worker per core. Best
of ``--repeats`` timed windows each.

    python benchmarks/bench_augment.py                     # CPU, 32 and 64 px, batch 64
    python benchmarks/bench_augment.py --batch 256 --sizes 32
    python benchmarks/bench_augment.py --device cuda       # batched path on the GPU
    python benchmarks/bench_augment.py --omp-passive       # on a machine others are using
    python benchmarks/bench_augment.py --smoke             # CI: seconds, the same code paths
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

# --omp-passive: idle OpenMP threads sleep at once instead of spinning a while first. On a
# shared or oversubscribed machine spinning threads make every parallel op wait for a
# descheduled peer (measured: 2 threads collapsed to ~60 samples/s); on a dedicated machine
# the wake-ups cost ~3x at 64 px (2 threads: 9.4 instead of 3.2 ms per call). Only the
# in-process path with more than one thread is affected. OpenMP reads it when torch loads it,
# so it is handled before the import. The default is OpenMP's own, as `launch/train.py` runs.
_OMP_PASSIVE = "--omp-passive" in sys.argv
if _OMP_PASSIVE:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageEnhance, ImageOps  # noqa: E402
from torch.utils.data import DataLoader, Dataset, RandomSampler  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.augment import CIFAR10_MEAN, CIFAR10_STD, ViewMaker  # noqa: E402
from pipelines.host_memory import keep_freed_memory  # noqa: E402

# ----------------------------------------------------------------------------- PIL baseline


def _pil_affine(img: Image.Image, data: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, data)


# (op, low, high) with the FixMatch paper's magnitude ranges; one uniform draw per use.
_PIL_OPS = [
    (lambda im, v: im, 0.0, 0.0),
    (lambda im, v: ImageOps.autocontrast(im), 0.0, 0.0),
    (lambda im, v: ImageOps.equalize(im), 0.0, 0.0),
    (lambda im, v: im.rotate(v), -30.0, 30.0),
    (lambda im, v: ImageOps.solarize(im, v), 0.0, 256.0),
    (lambda im, v: ImageEnhance.Color(im).enhance(v), 0.05, 0.95),
    (lambda im, v: ImageOps.posterize(im, int(v)), 4.0, 8.999),
    (lambda im, v: ImageEnhance.Contrast(im).enhance(v), 0.05, 0.95),
    (lambda im, v: ImageEnhance.Brightness(im).enhance(v), 0.05, 0.95),
    (lambda im, v: ImageEnhance.Sharpness(im).enhance(v), 0.05, 0.95),
    (lambda im, v: _pil_affine(im, (1, v, 0, 0, 1, 0)), -0.3, 0.3),
    (lambda im, v: _pil_affine(im, (1, 0, 0, v, 1, 0)), -0.3, 0.3),
    (lambda im, v: _pil_affine(im, (1, 0, round(v * im.size[0]), 0, 1, 0)), -0.3, 0.3),
    (lambda im, v: _pil_affine(im, (1, 0, 0, 0, 1, round(v * im.size[1]))), -0.3, 0.3),
]


def _pil_weak(img: Image.Image, pad: int) -> Image.Image:
    if random.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # Reflect pad-and-crop, as torchvision's RandomCrop(padding_mode="reflect") does for PIL.
    w, h = img.size
    arr = np.pad(np.asarray(img), ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    y, x = random.randint(0, 2 * pad), random.randint(0, 2 * pad)
    return Image.fromarray(arr[y : y + h, x : x + w])


def _pil_strong(img: Image.Image, pad: int) -> Image.Image:
    img = _pil_weak(img, pad)
    for op, lo, hi in random.choices(_PIL_OPS, k=2):
        img = op(img, random.uniform(lo, hi))
    w, h = img.size
    side = random.uniform(0, 0.5) * min(w, h)
    x0 = max(0, int(random.uniform(0, w) - side / 2))
    y0 = max(0, int(random.uniform(0, h) - side / 2))
    img = img.copy()
    ImageDraw.Draw(img).rectangle((x0, y0, min(w, x0 + side), min(h, y0 + side)), (127,) * 3)
    return img


class _PILFixMatchViews(Dataset):
    """One weak + two strong normalised views per image, built per sample with PIL."""

    def __init__(self, images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]):
        self.images = images  # (N, H, W, 3) uint8
        self.pad = round(0.125 * images.shape[1])
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def _to_tensor(self, img: Image.Image) -> torch.Tensor:  # ToTensor + Normalize
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div_(255)
        return x.sub_(self.mean).div_(self.std)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        img = Image.fromarray(self.images[i])
        weak = _pil_weak(img, self.pad)
        strong = [_pil_strong(img, self.pad) for _ in range(2)]
        return tuple(self._to_tensor(v) for v in (weak, *strong))


def _seed_worker(worker_id: int) -> None:
    random.seed(torch.initial_seed() % 2**32)


def _worker_loader(dataset: Dataset, args: argparse.Namespace, device: torch.device, worker_init_fn,
                   **kw) -> DataLoader:
    """A DataLoader with one persistent worker process per core (``args.workers``), as both
    worker-process paths use it; ``kw``: batching and sampling."""
    return DataLoader(dataset, num_workers=args.workers, persistent_workers=True, prefetch_factor=4,
                      worker_init_fn=worker_init_fn, pin_memory=device.type == "cuda", **kw)


def bench_pil(images: np.ndarray, args: argparse.Namespace, device: torch.device) -> float:
    ds = _PILFixMatchViews(images, CIFAR10_MEAN, CIFAR10_STD)
    batches = iter(_worker_loader(
        ds, args, device, _seed_worker,
        batch_size=args.batch,
        # Random indices without an epoch end, as a long training run sees them.
        sampler=RandomSampler(ds, replacement=True, num_samples=10**9),
        drop_last=True,
    ))

    def step() -> int:
        views = [v.to(device, non_blocking=True) for v in next(batches)]
        return views[0].shape[0]

    return _timed(step, args, device)


# ----------------------------------------------------------------------------- batched


def _timed(next_batch, args: argparse.Namespace, device: torch.device) -> float:
    """Samples/s of ``next_batch()`` (returns the number of samples) after ``args.warmup`` calls."""
    for _ in range(args.warmup):
        next_batch()
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        n += next_batch()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def bench_batched(
    images: np.ndarray, args: argparse.Namespace, device: torch.device, threads: int
) -> float:
    """ViewMaker in this process with ``threads`` torch threads, on ``device`` (the trainer's path)."""
    data = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    vm = ViewMaker(image_size=data.shape[-1], mean=CIFAR10_MEAN, std=CIFAR10_STD)
    gen = torch.Generator(device=device).manual_seed(0)
    empty = data[:0]

    def step() -> int:
        idx = torch.randint(len(data), (args.batch,), generator=gen, device=device)
        vm(empty, data[idx], gen)
        return args.batch

    torch.set_num_threads(threads)
    try:
        return _timed(step, args, device)
    finally:
        torch.set_num_threads(args.workers)


class _BatchedViews(Dataset):
    """Each item: the ViewMaker views of ``batch`` random images (a worker-side batch)."""

    def __init__(self, images: torch.Tensor, batch: int):
        self.images = images  # (N, 3, H, W) uint8, shared with the workers by fork
        self.batch = batch
        self.vm = ViewMaker(image_size=images.shape[-1], mean=CIFAR10_MEAN, std=CIFAR10_STD)
        self.gen = torch.Generator().manual_seed(0)  # replaced per worker (_init_batched_worker)

    def __len__(self) -> int:
        return 10**9  # an endless stream of batches, as a long training run sees them

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        idx = torch.randint(len(self.images), (self.batch,), generator=self.gen)
        # uint8 views: a quarter of the bytes through shared memory; normalised on arrival.
        _, weak, strong = self.vm.uint8_views(self.images[:0], self.images[idx], self.gen)
        return (weak, *strong)


def _init_batched_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    torch.set_num_threads(1)
    info.dataset.gen = torch.Generator().manual_seed(info.seed % 2**63)


def bench_batched_workers(
    images: np.ndarray, args: argparse.Namespace, device: torch.device
) -> float:
    """ViewMaker in ``args.workers`` DataLoader worker processes, 1 thread each, on the CPU."""
    data = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    ds = _BatchedViews(data, args.batch)
    batches = iter(_worker_loader(ds, args, device, _init_batched_worker, batch_size=None))
    vm = ds.vm

    def step() -> int:
        views = [vm.normalize(v.to(device, non_blocking=True)) for v in next(batches)]
        return views[0].shape[0]

    # The workers have the cores; the main process's normalisation takes one thread (more would
    # spin against the workers).
    torch.set_num_threads(1)
    try:
        return _timed(step, args, device)
    finally:
        torch.set_num_threads(args.workers)


# ----------------------------------------------------------------------------- main


def synthetic_images(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth random colour fields + noise: natural-looking histograms, no download needed."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.integers(0, 256, (n, 3, 4, 4)).astype(np.float32))
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic")
    up = up + torch.from_numpy(rng.normal(0, 12, up.shape).astype(np.float32))
    return up.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="device of the in-process batched path")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--batch", type=int, default=64, help="unlabeled samples per step")
    p.add_argument("--cores", default=None, help="CPU ids to pin to, e.g. 0,1 (default: all)")
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="torch thread counts for the batched path (default: 1 and one per core)",
    )
    p.add_argument("--seconds", type=float, default=5.0, help="timed seconds per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="best of this many measurements")
    p.add_argument("--num-images", type=int, default=2048)
    p.add_argument("--omp-passive", action="store_true",
                   help="OMP_WAIT_POLICY=PASSIVE (for a shared, busy machine; see the top of this file)")
    p.add_argument("--smoke", action="store_true",
                   help="CI check: 32 px, batch 8, 64 images, one short window (seconds; the numbers mean nothing)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.batch, args.num_images, args.seconds, args.warmup, args.repeats = [32], 8, 64, 0.05, 1, 1
    keep_freed_memory()  # as launch/train.py does; forked baseline workers inherit it too

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if args.cores is not None:
        try:
            os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
        except (ValueError, OSError) as e:
            p.error(f"--cores {args.cores!r}: {e}")
    cores = sorted(os.sched_getaffinity(0))
    args.workers = len(cores)
    torch.set_num_threads(args.workers)

    threads = args.threads or sorted({1, args.workers})
    rows = []
    for size in args.sizes:
        images = synthetic_images(args.num_images, size, seed=size)
        pil = max(bench_pil(images, args, device) for _ in range(args.repeats))
        batched = [
            max(bench_batched(images, args, device, t) for _ in range(args.repeats))
            for t in threads
        ]
        workers = max(bench_batched_workers(images, args, device) for _ in range(args.repeats))
        rows.append((size, pil, [*batched, workers]))

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"date: {datetime.datetime.now():%Y-%m-%d %H:%M}  host: {platform.node()}  "
        f"cpu: {_cpu_name()}  cores: {cores}  load avg: {load}  torch {torch.__version__}  "
        f"OMP_WAIT_POLICY: {os.environ.get('OMP_WAIT_POLICY', 'OpenMP default')}  "
        f"device: {dev}"
    )
    print(f"command: python benchmarks/bench_augment.py {' '.join(sys.argv[1:])}".rstrip())
    print()
    head = "".join(
        f" batched on {args.device}, {t} thread{'s' * (t > 1)} | speed-up |" for t in threads
    )
    head += f" batched, {args.workers} worker processes | speed-up |"
    print(f"| px | batch | per-sample PIL, {args.workers} workers |{head}")
    print("|---:|---:|---:|" + "---:|---:|" * (len(threads) + 1))
    for size, pil, batched in rows:
        cells = "".join(f" {b:,.0f} | {b / pil:.1f}x |" for b in batched)
        print(f"| {size} | {args.batch} | {pil:,.0f} |{cells}")
    print("\n(samples/s; one sample = one weak + two strong normalised views)")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
