"""Data the benchmarks share (and ``tests/test_nhat_scale.py`` with ``bench_nhat.py``).

- :func:`smooth_images`, :func:`build_png`, :func:`build_jpeg`: synthetic datasets built through
  the shard builders (``shards.writer.write_dataset``; ``shards.build.build_imagenet_lt`` on
  synthetic JPEG files and split lists), so their manifests are the ones ``bmb-shards`` writes.
- :func:`imagenet_lt_counts`, :func:`step_counts`: ImageNet-LT's class sizes and a stream of
  per-step confident counts drawn from them (the N-hat scale check and its benchmark).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

SAMPLE_NUM = Path(__file__).resolve().parents[2] / "shared/data/imagenet_lt/ImageNet_LT_train_semi_20_sample_num.txt"
B_U = 64  # global unlabeled batch
CONFIDENT = 0.8  # each sample passes tau with this probability, whatever its class


def smooth_images(n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``(n, h, w, 3)``: smooth random colour fields plus noise (PNG/JPEG sizes of photos)."""
    low = rng.integers(0, 256, (n, 3, h // 8 + 1, w // 8 + 1)).astype(np.float32)
    up = torch.nn.functional.interpolate(torch.from_numpy(low), size=(h, w), mode="bilinear")
    noise = torch.randn(up.shape) * 8
    return (up + noise).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def build_png(root: Path, size: int, n: int, formats: tuple[str, ...], test: int = 64, workers: int = 2) -> dict:
    """A 10-class ``size`` px PNG dataset at ``root``: ``n // 4`` labeled, ``n`` unlabeled,
    ``test`` test images, in ``formats``, encoded by ``workers`` processes; returns the manifest."""
    from shards.writer import write_dataset

    rng = np.random.default_rng(0)
    splits = {s: (smooth_images(k, size, size, rng), rng.integers(0, 10, k))
              for s, k in (("labeled", n // 4), ("unlabeled", n), ("test", test))}
    return write_dataset(root, name=f"bench{size}", class_names=[str(i) for i in range(10)], splits=splits,
                         formats=formats, shard_size=512, workers=workers)


def build_jpeg(root: Path, n: int, ffcv: bool = False, test: int = 16, workers: int = 2) -> dict:
    """A 10-class full-resolution JPEG dataset (~320 x 280) at ``root``, built as ``bmb-shards
    imagenet-lt`` builds one: synthetic JPEG files and ImageNet-LT split lists (train ``n``,
    labeled = the first quarter of each class; val and test ``test``), ``.beton`` files too with
    ``ffcv``; returns the manifest."""
    from PIL import Image

    from shards.build import BuildOptions, build_imagenet_lt

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        for split, k in (("train", n), ("val", test), ("test", test)):
            lines = []
            for i, img in enumerate(smooth_images(k, 280, 320, rng)):
                rel = f"n{i % 10:08d}/{split}_{i:06d}.JPEG"
                (src / rel).parent.mkdir(exist_ok=True)
                Image.fromarray(img).save(src / rel, "JPEG", quality=90)
                lines.append(f"{rel} {i % 10}")
            (src / f"ImageNet_LT_{split}.txt").write_text("\n".join(lines) + "\n")
        formats = ("wds", "ffcv") if ffcv else ("wds",)
        opts = BuildOptions(Path(root), formats=formats, workers=workers, progress=False)
        return build_imagenet_lt(opts, src, src, 0.25)


def imagenet_lt_counts() -> torch.Tensor:
    """Per-class unlabeled counts, float64 ``(1000,)``: the real ImageNet-LT train sizes if present."""
    if SAMPLE_NUM.is_file():  # lines "labeled total" in label order; total = the class's size in U
        return torch.tensor([int(line.split()[1]) for line in SAMPLE_NUM.read_text().splitlines()],
                            dtype=torch.float64)
    # The real list's shape (../shared/data/SOURCES.md): 1280 ... 5 per class, 385 classes above
    # 100, 479 from 20 to 100, 136 below 20; log-linear between those points.
    k = torch.arange(1000, dtype=torch.float64)
    knots_k = torch.tensor([0.0, 385.0, 864.0, 999.0], dtype=torch.float64)
    knots_n = torch.tensor([1280.0, 100.5, 19.5, 5.0], dtype=torch.float64).log()
    seg = torch.bucketize(k, knots_k[1:-1], right=True)
    t = (k - knots_k[seg]) / (knots_k[seg + 1] - knots_k[seg])
    return torch.round((knots_n[seg] + t * (knots_n[seg + 1] - knots_n[seg])).exp())


def step_counts(n: torch.Tensor, steps: int, g: torch.Generator, chunk: int = 2000):
    """Per-step confident counts ``(C,)`` of global batches drawn from the distribution ``n``."""
    p = n / n.sum()
    for s in range(0, steps, chunk):
        m = min(chunk, steps - s)
        labels = torch.multinomial(p, m * B_U, replacement=True, generator=g).view(m, B_U)
        ok = (torch.rand(m, B_U, generator=g) < CONFIDENT).double()
        yield from torch.zeros(m, len(n), dtype=torch.float64).scatter_add_(1, labels, ok)
