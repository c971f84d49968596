"""The webdataset readers' view of a dataset directory: splits and the tar shard index.

The format itself (manifest, tar layout and reader) is :mod:`shards.format`; turning the
encoded samples into pixels is :mod:`pipelines.decode`.

A tar shard is seekable, so instead of streaming it we index its member headers once
(``key -> image offset/size``, label, stable index) and then read any sample with one seek.
That gives the webdataset backend the tensor backend's exact sampling semantics (global
per-epoch permutation, each rank a slice of every global batch, O(1) resume) over the same
shard files.

Training splits are written in a seeded shuffled order (``splits.<s>.order`` in the manifest,
see docs/datasets.md "Sample order"); the index is keyed by each sample's stable index, never by
its file position. Streaming readers call :func:`warn_if_class_sorted` for datasets built
before that (no ``order`` record: the shards are in class order).
"""

from __future__ import annotations

import shlex
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shards.format import (
    DISJOINT,
    MANIFEST,
    Sample,
    dataset_file,
    decode_image,
    iter_tar_samples,
    load_manifest,
    sample_fields,
    sample_key,
    shard_samples,
    split_order,
    split_overlap,
)


def split_info(root: Path, manifest: dict[str, Any], split: str) -> dict[str, Any]:
    if split not in manifest["splits"]:
        raise ValueError(
            f"{root / MANIFEST}: no split {split!r} (has {sorted(manifest['splits'])})"
        )
    return manifest["splits"][split]


class _Placeholder(str):
    """A ``<word>`` of :func:`rebuild_command` the user fills in: the only words left unquoted."""


_SOURCE, _CLASS_MAP = _Placeholder("<source>"), _Placeholder("<class-map-folder>")
_SPLIT_LISTS, _COMMAND = _Placeholder("<split-list-folder>"), _Placeholder("<command>")
_OPTIONS = _Placeholder("<options-of-the-original-build>")


def rebuild_command(root: Path, manifest: dict[str, Any]) -> str:
    """The ``bmb-shards`` command that rebuilds the dataset at ``root`` with today's writer.

    Everything the manifest records is filled in (split rule, seed, formats, shard size); what it
    does not record (ImageNet-LT split-list and ImageNet127 class-map folders) is left as a
    ``<placeholder>``. The command replaces the dataset in place (``--overwrite``). Every word
    taken from the manifest is shell-quoted (a manifest is data: pasting the command must not
    run any of it); only this function's own placeholders are left bare.
    """
    rule = manifest.get("split_rule") or {}
    source = manifest.get("source") or {}
    kind, path = source.get("kind"), source.get("path") or _SOURCE
    name = rule.get("rule")

    def num(x: Any) -> str:
        return f"{x:g}" if isinstance(x, float) else str(x)

    args: list[str]
    if name == "demo-lt":
        args = ["demo"]
        for key, flag in (
            ("num_classes", "--num-classes"),
            ("n1", "--n1"),
            ("m1", "--m1"),
            ("gamma_l", "--gamma-l"),
            ("gamma_u", "--gamma-u"),
            ("test_per_class", "--test-per-class"),
            ("size", "--size"),
        ):
            if key in rule:
                args += [flag, num(rule[key])]
    elif name == "imagenet-mismatch":
        args = ["imagenet-mismatch", "--source", path]
        for key, flag in (("n1", "--n1"), ("m1", "--m1"), ("gamma_l", "--gamma-l"),
                          ("gamma_u", "--gamma-u"), ("max_side", "--max-side")):  # fmt: skip
            if rule.get(key):
                args += [flag, num(rule[key])]
    elif name in ("cifar-lt", "subset-lt"):
        if name == "cifar-lt":
            args = ["cifar-lt", "--source", path, "--dataset", str(kind)]
        else:
            src_kind = "imagenet" if str(kind).startswith("imagenet") else str(kind)
            args = ["subset-lt", "--source", path, "--source-kind", src_kind]
            if rule.get("classes"):
                args += ["--classes", ",".join(str(c) for c in rule["classes"])]
        for key, flag in (("n1", "--n1"), ("m1", "--m1"), ("gamma_l", "--gamma-l"),
                          ("gamma_u", "--gamma-u")):  # fmt: skip
            args += [flag, num(rule[key])]
    elif name in ("imagenet127", "imagenet127-jpeg"):
        where = "--source" if name == "imagenet127" else "--from-jpeg"
        args = ["imagenet127", where, path, "--meta-dir", _CLASS_MAP,
                "--labeled-ratio", num(rule["labeled_ratio"]), "--rounding", rule.get("rounding", "floor")]  # fmt: skip
        if rule.get("labeled_list"):
            args += ["--labeled-list", f"<{rule['labeled_list']}>"]
        if rule.get("max_side"):
            args += ["--max-side", str(rule["max_side"])]
    elif name == "imagenet-lt":
        args = ["imagenet-lt", "--imagenet-root", path, "--split-lists", _SPLIT_LISTS,
                "--labeled-ratio", num(rule["labeled_ratio"])]  # fmt: skip
        if rule.get("max_side"):
            args += ["--max-side", str(rule["max_side"])]
    else:
        args = [_COMMAND, _OPTIONS]
    if name in ("demo-lt", "cifar-lt", "subset-lt", "imagenet-mismatch") and split_overlap(manifest) == DISJOINT:
        args += ["--split-rule", DISJOINT]  # not today's default
    args += ["--seed", str(manifest.get("seed", 0))]
    formats = ["wds"]
    for fmt in ("arrays", "ffcv"):
        if any((sp or {}).get(fmt) for sp in manifest["splits"].values()):
            formats.append(fmt)
    args += ["--formats", ",".join(formats)]
    counts = [int(e["count"]) for e in manifest["splits"]["unlabeled"]["shards"]]
    if len(counts) > 1:  # a single shard's count is the split size, not the shard size
        args += ["--shard-size", str(counts[0])]
    args += ["--out", str(root), "--overwrite"]
    return "bmb-shards " + " ".join(
        a if isinstance(a, _Placeholder) else shlex.quote(str(a)) for a in args
    )


def warn_if_class_sorted(
    root: Path, manifest: dict[str, Any], reader: str, splits: tuple[str, ...]
) -> bool:
    """Warn when a streaming reader meets training splits written in class order.

    Datasets built before the writer shuffled the training splits have no ``order`` record; a
    reader that streams shards through a shuffle buffer then delivers batches of a few classes
    (BatchNorm statistics, the unlabeled-count estimate, mask rate and memory bank all skew).

    Returns:
        Whether it warned.
    """
    sorted_ = [s for s in splits if (manifest["splits"][s].get("order") or {}).get("kind")
               != "shuffled"]  # fmt: skip
    if not sorted_:
        return False
    warnings.warn(
        f"{root}: split(s) {', '.join(sorted_)} are stored in index (class) order (built before "
        f"the shards were shuffled), so the {reader} reader, which streams shards through a "
        "shuffle buffer, delivers batches of only a few classes. Rebuild the dataset (same "
        f"samples, shuffled shards):\n    {rebuild_command(root, manifest)}\nor read it with "
        "backend 'tensor', 'ffcv' or 'webdataset' order='index' (global permutations).",
        UserWarning,
        stacklevel=3,
    )
    return True


@dataclass
class SplitIndex:
    """Where every sample of a split lives.

    Attributes:
        shards: shard file paths.
        shard: int32 ``(N,)`` shard number of sample ``i`` (``i`` = stable index).
        offset: int64 ``(N,)`` byte offset of its image member's data.
        size: int64 ``(N,)`` byte size of its image member.
        labels: int64 ``(N,)`` labels from the ``.cls`` members.
        keys: the sample keys (``%08d``), for error messages.
    """

    shards: list[Path]
    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    labels: np.ndarray
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)


def index_shard(path: Path) -> list[Sample]:
    """One shard's header index: ``[(key, {ext: (data offset, size)}, {ext: bytes})]`` in file
    order, the bytes of the ``.cls``/``.idx`` members only (image data is located, not read).

    Raises:
        ValueError: truncated or malformed shard, naming the file and the member.
    """
    return list(shard_samples(path, skip_images=True))


def indexed_shards(
    root: Path, info: dict[str, Any], split: str
) -> Iterator[tuple[Path, list[Sample]]]:
    """``(path, index_shard(path))`` of each shard of a split, checked to exist and to hold
    the number of samples the manifest lists.

    Raises:
        ValueError: a missing, truncated or malformed shard or a count other than the
            manifest's, naming the shard.
    """
    for entry in info["shards"]:
        path = dataset_file(root, entry["file"])
        if not path.is_file():
            raise ValueError(f"missing shard {path} (listed in manifest split {split!r})")
        samples = index_shard(path)
        if len(samples) != entry["count"]:
            raise ValueError(
                f"{path}: {len(samples)} samples, manifest says {entry['count']} "
                "(truncated or foreign shard?)"
            )
        yield path, samples


def build_index(root: Path, split: str, manifest: dict[str, Any] | None = None) -> SplitIndex:
    """Index all shards of ``split`` and check them against the manifest.

    Raises:
        ValueError: missing/truncated shard, a sample lacking its image/label/index member,
            a count different from the manifest's, or stable indices out of order -- each
            naming the shard and key.
    """
    manifest = manifest or load_manifest(root, strict=False)
    info = split_info(root, manifest, split)
    order = split_order(manifest, split)  # file position -> stable index
    shards, shard_no, offsets, sizes, labels, keys = [], [], [], [], [], []
    for s_i, (path, samples) in enumerate(indexed_shards(root, info, split)):
        shards.append(path)
        for key, spans, small in samples:
            pos = len(keys)
            want = int(order[pos]) if pos < len(order) else None
            img, label, _ = sample_fields(path, key, spans, small, want)
            shard_no.append(s_i)
            offsets.append(spans[img][0])
            sizes.append(spans[img][1])
            labels.append(label)
            keys.append(key)
    num_classes = manifest.get("num_classes")
    if len(keys) != len(order):
        raise ValueError(
            f"{root / MANIFEST}: split {split!r} count {len(order)} but its shards hold "
            f"{len(keys)} samples"
        )
    # Key everything by stable index: sample i of the index is the sample with .idx == i.
    at = np.empty(len(keys), np.int64)
    at[order] = np.arange(len(keys))
    shard_no, offsets, sizes = (np.asarray(a)[at] for a in (shard_no, offsets, sizes))
    labels, keys = np.asarray(labels, dtype=np.int64)[at], [keys[j] for j in at]
    lab = np.asarray(labels, dtype=np.int64)
    if num_classes is not None and lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        bad = int(np.nonzero((lab < 0) | (lab >= num_classes))[0][0])
        raise ValueError(
            f"{shards[shard_no[bad]]}: sample {keys[bad]!r} label {lab[bad]} outside "
            f"[0, {num_classes})"
        )
    return SplitIndex(
        shards,
        np.asarray(shard_no, np.int32),
        np.asarray(offsets, np.int64),
        np.asarray(sizes, np.int64),
        lab,
        keys,
    )


def sample_location(root: Path, manifest: dict[str, Any], split: str, index: int) -> str:
    """``<shard>: sample '<key>'`` of the sample with stable index ``index`` of ``split`` (for
    messages of readers that do not track shards, e.g. DALI's)."""
    info = split_info(root, manifest, split)
    pos = np.nonzero(split_order(manifest, split) == int(index))[0]
    counts = np.cumsum([int(e["count"]) for e in info["shards"]])
    if pos.size == 0 or pos[0] >= counts[-1]:
        return f"{root / MANIFEST}: split {split!r}: sample {sample_key(index)!r} (not in the split)"
    shard = info["shards"][int(np.searchsorted(counts, pos[0], side="right"))]["file"]
    return f"{dataset_file(root, shard)}: sample {sample_key(index)!r}"


def first_undecodable(
    root: Path, manifest: dict[str, Any], split: str, max_pixels: int, budget_s: float = 120.0
) -> str | None:
    """``<shard>: sample '<key>': cannot decode image (...)`` of the first image of ``split``
    that :func:`shards.format.decode_image` refuses, searched for at most ``budget_s`` seconds
    (``None``: none found). For a library that stopped on an image without naming it."""
    import time

    t0 = time.monotonic()
    fixed = manifest.get("image_size")
    for entry in split_info(root, manifest, split)["shards"]:
        path = dataset_file(root, entry["file"])
        for key, data in iter_tar_samples(path):
            ext = next((e for e in ("png", "jpg", "jpeg") if e in data), None)
            try:
                if ext is None:
                    raise ValueError(f"no image member (has {sorted(data)})")
                decode_image(data[ext], tuple(fixed) if fixed else None, True, max_pixels)
            except Exception as e:  # PIL raises many types for corrupt data
                return f"{path}: sample {key!r}: cannot decode image ({e})"
            if time.monotonic() - t0 > budget_s:
                return None
    return None
