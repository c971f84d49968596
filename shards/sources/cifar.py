"""CIFAR-10/100, python version: the pinned archives and their reader (:func:`load_cifar`),
from the ``.tar.gz`` or the extracted folder; the pickles are read by the restricted
unpickler of :mod:`shards.sources.common`.
"""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shards.sources.common import (
    _labels,
    _load_pickle_bytes,
    _planar_to_hwc,
    md5_file,
)

# ----------------------------------------------------------------------------------------------
# Published files, pinned (URLs at fixed commits; git blob ids are certain, see docs/datasets.md)

CIFAR = {
    "cifar10": {
        "archive": "cifar-10-python.tar.gz",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "label_key": "labels",
        "names_key": "label_names",
        "num_classes": 10,
    },
    "cifar100": {
        "archive": "cifar-100-python.tar.gz",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "label_key": "fine_labels",
        "names_key": "fine_label_names",
        "num_classes": 100,
    },
}


# ----------------------------------------------------------------------------------------------
# CIFAR


@dataclass
class ArraySource:
    """A fixed-size, class-labeled source held in memory.

    Attributes:
        train_x, test_x: uint8 ``(N, H, W, 3)``.
        train_y, test_y: int64 ``(N,)`` in ``0..C-1``.
        class_names: C names.
        record: the manifest's ``source`` entry.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str]
    record: dict[str, Any]


def load_cifar(source: str | Path, dataset: str, expected_md5: str | None = None) -> ArraySource:
    """Read CIFAR-10/100 (python version) from its ``.tar.gz`` or the extracted folder.

    Args:
        source: the archive, the ``cifar-*-py*`` folder, or a folder containing either.
        dataset: ``cifar10`` or ``cifar100``.
        expected_md5: check the archive against this md5 (the published one when downloaded).
    """
    spec = CIFAR[dataset]
    src = Path(source)
    if src.is_dir() and (src / spec["archive"]).is_file() and not (src / spec["folder"]).is_dir():
        src = src / spec["archive"]
    if src.is_dir() and (src / spec["folder"]).is_dir():
        src = src / spec["folder"]
    if not src.exists():
        raise ValueError(
            f"{src}: CIFAR source not found (pass the .tar.gz, its folder, or --download)"
        )
    files: dict[str, bytes] = {}
    names = spec["train"] + spec["test"] + [spec["meta"]]
    if src.is_file():
        md5 = md5_file(src)
        if expected_md5 is not None and md5 != expected_md5:
            raise ValueError(f"{src}: md5 mismatch (got {md5}, expected {expected_md5})")
        try:
            with tarfile.open(src, "r:*") as t:
                members = {m.name.rsplit("/", 1)[-1]: m for m in t if m.isfile()}
                for n in names:
                    if n not in members:
                        raise ValueError(f"{src}: archive has no member '{spec['folder']}/{n}'")
                    files[n] = t.extractfile(members[n]).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"{src}: corrupt or unreadable archive ({e})") from e
        checksum = {"md5": md5}
    else:
        h = hashlib.md5()
        for n in names:
            p = src / n
            if not p.is_file():
                raise ValueError(f"{p}: missing CIFAR file")
            files[n] = p.read_bytes()
            h.update(n.encode() + b"\0" + files[n])
        checksum = {"md5_files": h.hexdigest()}
    c = spec["num_classes"]

    def batches(group: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for n in group:
            where = f"{src}:{n}" if src.is_file() else str(src / n)
            d = _load_pickle_bytes(files[n], where)
            y = _labels(d, spec["label_key"], where, 0, c - 1)
            xs.append(_planar_to_hwc(d["data"], where, len(y)))
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)

    train_x, train_y = batches(spec["train"])
    test_x, test_y = batches(spec["test"])
    for x, n in ((train_x, "train"), (test_x, "test")):
        if x.shape[1:] != (32, 32, 3):
            raise ValueError(f"{src}: {n} images are {x.shape[1:3]}, CIFAR is 32x32")
    where = f"{src}:{spec['meta']}"
    meta = _load_pickle_bytes(files[spec["meta"]], where)
    if spec["names_key"] not in meta:
        raise ValueError(f"{where}: missing key {spec['names_key']!r}; found {sorted(meta)}")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[spec["names_key"]]]
    if len(class_names) != c:
        raise ValueError(f"{where}: {len(class_names)} class names, expected {c}")
    record = {"kind": dataset, "path": str(Path(source).resolve()), "checksum": checksum}
    return ArraySource(train_x, train_y, test_x, test_y, class_names, record)
