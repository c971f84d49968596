"""Start-of-run checks of a dataset directory against its ``manifest.json``.

The manifest's per-class counts drive the method (adaptive weights, the
many/medium/few groups), so a split whose labels were changed after the build would train
"normally" on inconsistent numbers. :func:`check_labels` re-counts the labels each backend will
actually read and stops before training on any difference. It reads labels only, never images:

========== =====================================================================
tensor     ``<split>/labels.npy`` (the arrays the backend gathers from)
webdataset the ``.cls`` members, read through the tar headers (image data skipped) --
           ``order="index"``, which indexes those headers at start anyway. ``order="stream"``
           exists to avoid random access (network storage), so its training splits are not
           scanned up front (its reader checks each label's range and each shard's count as it
           streams; ``bmb-shards verify`` re-counts everything).
dali       the same ``.cls`` members (DALI reads the same tar shards)
ffcv       the ``label`` field of the ``.beton`` (its metadata table, no decode)
========== =====================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipelines.shard_index import indexed_shards, split_info
from shards.format import MANIFEST, dataset_file, load_manifest

MAX_LISTED = 5  # differing classes named in the message


def _wds_labels(root: Path, info: dict[str, Any], split: str) -> tuple[np.ndarray, str]:
    labels: list[int] = []
    for path, samples in indexed_shards(root, info, split):
        for key, _, small in samples:
            try:
                labels.append(int(small["cls"].decode()))
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}: sample {key!r} has no readable .cls member") from e
    files = sorted({str(Path(e["file"]).parent) for e in info["shards"]})
    where = f"the .cls members of the {len(info['shards'])} shard(s) in " + ", ".join(
        str(root / f) for f in files
    )
    return np.asarray(labels, np.int64), where


def _array_labels(root: Path, info: dict[str, Any]) -> tuple[np.ndarray, str] | None:
    arrays = info.get("arrays")
    if not arrays:
        return None  # the tensor backend itself says that arrays are needed
    path = dataset_file(root, arrays["labels"])
    if not path.is_file():
        return None  # ditto: it names the missing file
    try:
        return np.asarray(np.load(path, allow_pickle=False)).reshape(-1), str(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable labels ({e})") from e


def _ffcv_labels(root: Path, info: dict[str, Any]) -> tuple[np.ndarray, str] | None:
    entry = info.get("ffcv")
    if not entry or not dataset_file(root, entry["file"]).is_file():
        return None  # the ffcv backend names the missing file
    from ffcv.reader import Reader

    path = dataset_file(root, entry["file"])
    reader = Reader(str(path))
    if "label" not in reader.field_names:
        raise ValueError(f"{path}: no 'label' field (has {reader.field_names})")
    field = f"f{reader.field_names.index('label')}"
    return np.asarray(reader.metadata[field], np.int64), str(path)


def split_labels(
    root: Path, manifest: dict[str, Any], split: str, backend: str
) -> tuple[np.ndarray, str] | None:
    """The labels ``backend`` will read for ``split`` and where they come from (``None``: not
    checkable here; the backend reports the missing file itself)."""
    info = split_info(root, manifest, split)
    if backend == "tensor":
        return _array_labels(root, info)
    if backend == "ffcv":
        return _ffcv_labels(root, info)
    return _wds_labels(root, info, split)  # webdataset, dali


def compare_counts(
    labels: np.ndarray, expected: list[int], split: str, where: str, manifest_path: Path
) -> None:
    """Raise a :class:`ValueError` naming the split, file and first differing classes."""
    nc = len(expected)
    labels = np.asarray(labels)
    if labels.size and (
        not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= nc
    ):
        bad = (
            labels[(labels < 0) | (labels >= nc)]
            if np.issubdtype(labels.dtype, np.integer)
            else labels
        )
        raise ValueError(
            f"split {split!r}: {where} holds label {bad.reshape(-1)[0]!r} outside [0, {nc}) "
            f"({manifest_path} has {nc} classes)"
        )
    got = np.bincount(labels.astype(np.int64), minlength=nc)
    want = np.asarray(expected, np.int64)
    diff = np.nonzero(got != want)[0]
    if diff.size == 0:
        return
    shown = "; ".join(
        f"class {k}: manifest {int(want[k])}, data {int(got[k])}" for k in diff[:MAX_LISTED]
    )
    more = f" (and {diff.size - MAX_LISTED} more classes)" if diff.size > MAX_LISTED else ""
    raise ValueError(
        f"split {split!r}: the labels in {where} do not match the per-class counts of "
        f"{manifest_path} (which set the adaptive weights and the many/medium/few groups): "
        f"{shown}{more}; {labels.size} labels, manifest count {int(want.sum())}. The data was "
        "changed after the build: rebuild the dataset (`bmb-shards verify DIR` names the "
        "changed files)"
    )


def check_labels(
    root: str | Path, backend: str, splits: tuple[str, ...], manifest: dict[str, Any] | None = None
) -> None:
    """Check that each split's labels, as ``backend`` reads them, match the manifest's
    ``class_counts``.

    Raises:
        ValueError: a mismatch, naming the split, the file(s) and the first differing classes
            with both counts; or unreadable labels.
    """
    root = Path(root)
    manifest = manifest or load_manifest(root, strict=False)
    for split in splits:
        found = split_labels(root, manifest, split, backend)
        if found is None:
            continue
        labels, where = found
        expected = split_info(root, manifest, split).get("class_counts")
        if expected is None:
            continue  # a hand-made manifest without counts: nothing to compare with
        compare_counts(labels, expected, split, where, root / MANIFEST)
