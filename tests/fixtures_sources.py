"""Tiny source datasets in the exact on-disk formats the real ones use.

- CIFAR-10/100 python version: pickles with bytes keys (``b"data"`` uint8 N x 3072 planar,
  ``b"labels"`` / ``b"fine_labels"``), meta file, folder + ``.tar.gz``.
- Downsampled ImageNet: ``train_data_batch_<n>`` / ``val_data`` dicts (``data``, ``labels``
  1..1000, ``mean``) as pickle or ``.npz``.
- A JPEG tree ``train/<wnid>/<name>.JPEG`` for split lists.

Each writer returns the ground truth (HWC uint8 images, 0-based labels) for round-trip checks.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from shards.sources import CIFAR


def hwc_to_planar(x: np.ndarray) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` -> ``(N, 3*H*W)`` (R plane, G plane, B plane)."""
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), -1))


def _images(rng: np.random.Generator, n: int, side: int) -> np.ndarray:
    # Smooth-ish content with noise: realistic PNG sizes, and any pixel error would show.
    base = rng.integers(0, 256, (n, 1, 1, 3), dtype=np.int64)
    ramp = np.arange(side)[None, :, None, None] * 3 + np.arange(side)[None, None, :, None]
    noise = rng.integers(0, 16, (n, side, side, 3))
    return ((base + ramp + noise) % 256).astype(np.uint8)


def write_cifar(
    root: Path,
    dataset: str = "cifar10",
    train_per_class: int | list[int] = 20,
    test_per_class: int = 3,
    seed: int = 0,
    archive: bool = True,
) -> dict:
    """Write ``root/<folder>/`` and (``archive``) ``root/<archive>``; returns paths and truth."""
    spec = CIFAR[dataset]
    c = spec["num_classes"]
    rng = np.random.default_rng(seed)
    per = [train_per_class] * c if isinstance(train_per_class, int) else list(train_per_class)
    ytr = rng.permutation(np.repeat(np.arange(c), per))
    yte = rng.permutation(np.repeat(np.arange(c), test_per_class))
    xtr, xte = _images(rng, len(ytr), 32), _images(rng, len(yte), 32)
    folder = Path(root) / spec["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    lk = spec["label_key"].encode()

    def dump(name: str, x: np.ndarray, y: np.ndarray) -> None:
        d = {
            b"batch_label": name.encode(),
            lk: [int(v) for v in y],
            b"data": hwc_to_planar(x),
            b"filenames": [f"img_{i}.png".encode() for i in range(len(y))],
        }
        if dataset == "cifar100":
            d[b"coarse_labels"] = [int(v) // 5 for v in y]
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)

    parts = np.array_split(np.arange(len(ytr)), len(spec["train"]))
    for name, idx in zip(spec["train"], parts):
        dump(name, xtr[idx], ytr[idx])
    dump(spec["test"][0], xte, yte)
    names = [f"class{k}".encode() for k in range(c)]
    with open(folder / spec["meta"], "wb") as f:
        pickle.dump({spec["names_key"].encode(): names, b"num_cases_per_batch": 10}, f, protocol=2)
    path = Path(root) / spec["archive"]
    if archive:
        with tarfile.open(path, "w:gz") as t:
            t.add(folder, arcname=spec["folder"])
    return {
        "folder": folder,
        "archive": path,
        "train": (xtr, ytr),
        "test": (xte, yte),
        "class_names": [n.decode() for n in names],
    }


def write_downsampled_imagenet(
    root: Path,
    train_labels: list[np.ndarray],
    val_labels: np.ndarray,
    side: int = 32,
    fmt: str = "pickle",
    seed: int = 0,
) -> dict:
    """Write ``train_data_batch_<i>`` per entry of ``train_labels`` (0-based, map_clsloc order)
    and ``val_data``; labels are stored 1-based like the real files."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    xs = []

    def dump(name: str, x: np.ndarray, y: np.ndarray, train: bool) -> None:
        d = {"data": hwc_to_planar(x), "labels": [int(v) + 1 for v in y]}
        if train:
            d["mean"] = hwc_to_planar(x).mean(0).astype(np.float64)
        if fmt == "npz":
            np.savez(root / f"{name}.npz", **{k: np.asarray(v) for k, v in d.items()})
        else:
            with open(root / name, "wb") as f:
                pickle.dump(d, f)

    for i, y in enumerate(train_labels, 1):
        x = _images(rng, len(y), side)
        xs.append(x)
        dump(f"train_data_batch_{i}", x, np.asarray(y), True)
    xv = _images(rng, len(val_labels), side)
    dump("val_data", xv, np.asarray(val_labels), False)
    return {
        "train": (np.concatenate(xs), np.concatenate(train_labels).astype(np.int64)),
        "val": (xv, np.asarray(val_labels, np.int64)),
    }


def write_jpeg_tree(root: Path, relpaths: list[str], seed: int = 0) -> dict[str, bytes]:
    """A tiny RGB JPEG (random 6..20 px sides) at each relative path; returns path -> bytes."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in relpaths:
        f = Path(root) / p
        f.parent.mkdir(parents=True, exist_ok=True)
        w, h = (int(v) for v in rng.integers(6, 21, 2))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            buf, format="JPEG", quality=80
        )
        f.write_bytes(buf.getvalue())
        out[p] = buf.getvalue()
    return out
