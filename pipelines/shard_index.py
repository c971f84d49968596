"""Reading the dataset directory: manifest, tar shard index, image decode.

A tar shard is seekable, so instead of streaming it we index its member headers once
(``key -> image offset/size``, label, stable index) and then read any sample with one seek.
That gives the webdataset backend the tensor backend's exact sampling semantics (global
per-epoch permutation, equal rank shares, O(1) resume) over the same shard files.

Training splits are written in a seeded shuffled order (``splits.<s>.order`` in the manifest,
see docs/datasets.md "Sample order"); the index is keyed by each sample's stable index, never by
its file position. Streaming readers call :func:`warn_if_class_sorted` for datasets built
before that (no ``order`` record: the shards are in class order).
"""

from __future__ import annotations

import io
import json
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_BLOCK = 512
_IMAGE_EXTS = ("png", "jpg", "jpeg")


def load_manifest(root: Path) -> dict[str, Any]:
    """Read ``root/manifest.json`` (only the keys the readers need are checked)."""
    path = root / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{path}: no manifest.json; not a dataset directory")
    try:
        manifest = json.loads(path.read_text())
        manifest["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e!r})") from e
    return manifest


def split_info(root: Path, manifest: dict[str, Any], split: str) -> dict[str, Any]:
    if split not in manifest["splits"]:
        raise ValueError(
            f"{root / 'manifest.json'}: no split {split!r} (has {sorted(manifest['splits'])})"
        )
    return manifest["splits"][split]


def file_order(manifest: dict[str, Any], split: str) -> np.ndarray:
    """int64 ``(N,)``: the stable index of the sample at each file position of ``split``.

    Mirrors ``shards.order.file_order`` (pipelines import nothing from shards): ``shuffled``
    is ``numpy.random.RandomState(seed).permutation(count)``; no record or ``index`` is the
    identity.
    """
    info = manifest["splits"][split]
    n, rec = int(info["count"]), info.get("order")
    if rec is None or rec.get("kind") == "index":
        return np.arange(n, dtype=np.int64)
    if rec.get("kind") == "shuffled":
        return np.random.RandomState(int(rec["seed"])).permutation(n).astype(np.int64)
    raise ValueError(f"split {split!r}: unknown sample order {rec!r} in manifest.json")


def rebuild_command(root: Path, manifest: dict[str, Any]) -> str:
    """The ``bmb-shards`` command that rebuilds the dataset at ``root`` with today's writer.

    Everything the manifest records is filled in (split rule, seed, formats, shard size); what it
    does not record (ImageNet-LT split-list and ImageNet127 class-map folders) is left as a
    ``<placeholder>``. The command replaces the dataset in place (``--overwrite``).
    """
    rule = manifest.get("split_rule") or {}
    source = manifest.get("source") or {}
    kind, path = source.get("kind"), source.get("path") or "<source>"
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
    elif name == "imagenet127":
        args = ["imagenet127", "--source", path, "--meta-dir", "<class-map-folder>",
                "--labeled-ratio", num(rule["labeled_ratio"])]  # fmt: skip
    elif name == "imagenet-lt":
        args = ["imagenet-lt", "--imagenet-root", path, "--split-lists", "<split-list-folder>",
                "--labeled-ratio", num(rule["labeled_ratio"])]  # fmt: skip
        if rule.get("max_side"):
            args += ["--max-side", str(rule["max_side"])]
    else:
        args = ["<command>", "<options-of-the-original-build>"]
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
    return "bmb-shards " + " ".join(a if a.startswith("<") else shlex.quote(a) for a in args)


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


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").strip()
    return int(field, 8) if field else 0


def index_shard(path: Path) -> list[tuple[str, dict[str, tuple[int, int]], dict[str, bytes]]]:
    """Parse one tar shard's headers (plain ustar, as the builder writes).

    Returns:
        ``[(key, {ext: (data_offset, size)}, {ext: small member bytes for cls/idx})]`` in file
        order, one entry per sample key.

    Raises:
        ValueError: truncated or malformed shard, naming the file and the member.
    """
    samples: dict[str, tuple[dict[str, tuple[int, int]], dict[str, bytes]]] = {}
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        pos = 0
        while True:
            header = f.read(_BLOCK)
            if len(header) == 0:
                break  # tolerate a missing end-of-archive marker only at a member boundary
            if len(header) < _BLOCK:
                raise ValueError(f"{path}: truncated shard (partial header at byte {pos})")
            if header == b"\0" * _BLOCK:
                break
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            try:
                size = _octal(header[124:136])
            except ValueError as e:
                raise ValueError(f"{path}: malformed tar header at byte {pos} ({name!r})") from e
            typeflag = header[156:157]
            data = pos + _BLOCK
            if data + size > file_size:
                raise ValueError(
                    f"{path}: truncated shard: member {name!r} needs {size} bytes at {data}, "
                    f"file has {file_size}"
                )
            if typeflag in (b"0", b"\0"):
                base = name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                entry = samples.setdefault(key, ({}, {}))
                entry[0][ext] = (data, size)
                if ext in ("cls", "idx"):
                    entry[1][ext] = f.read(size)
                    f.seek(data + size)
            pos = data + (size + _BLOCK - 1) // _BLOCK * _BLOCK
            f.seek(pos)
    return [(k, m, s) for k, (m, s) in samples.items()]


def build_index(root: Path, split: str, manifest: dict[str, Any] | None = None) -> SplitIndex:
    """Index all shards of ``split`` and check them against the manifest.

    Raises:
        ValueError: missing/truncated shard, a sample lacking its image/label/index member,
            a count different from the manifest's, or stable indices out of order -- each
            naming the shard and key.
    """
    manifest = manifest or load_manifest(root)
    info = split_info(root, manifest, split)
    order = file_order(manifest, split)  # file position -> stable index
    shards, shard_no, offsets, sizes, labels, keys = [], [], [], [], [], []
    for s_i, entry in enumerate(info["shards"]):
        path = root / entry["file"]
        if not path.is_file():
            raise ValueError(f"missing shard {path} (listed in manifest split {split!r})")
        shards.append(path)
        samples = index_shard(path)
        if len(samples) != entry["count"]:
            raise ValueError(
                f"{path}: {len(samples)} samples, manifest says {entry['count']} "
                "(truncated or foreign shard?)"
            )
        for key, members, small in samples:
            img = [e for e in _IMAGE_EXTS if e in members]
            if not img or "cls" not in small or "idx" not in small:
                raise ValueError(
                    f"{path}: sample {key!r} lacks an image/.cls/.idx member (has {sorted(members)})"
                )
            try:
                label, idx = int(small["cls"].decode()), int(small["idx"].decode())
            except ValueError as e:
                raise ValueError(f"{path}: sample {key!r}: bad .cls/.idx ({e})") from e
            pos = len(keys)
            if pos >= len(order) or idx != order[pos]:
                want = f"{order[pos]}" if pos < len(order) else "none"
                raise ValueError(
                    f"{path}: sample {key!r} has index {idx}, expected {want} "
                    "(shards out of order or not the manifest's)"
                )
            shard_no.append(s_i)
            offsets.append(members[img[0]][0])
            sizes.append(members[img[0]][1])
            labels.append(label)
            keys.append(key)
    num_classes = manifest.get("num_classes")
    if len(keys) != len(order):
        raise ValueError(
            f"{root / 'manifest.json'}: split {split!r} count {len(order)} but its shards hold "
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


ON_CORRUPT = ("raise", "skip")


def check_on_corrupt(on_corrupt: str) -> None:
    """Raise ValueError unless ``on_corrupt`` is a known policy for unreadable images."""
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")


def output_size(manifest: dict[str, Any], load_size: int | None) -> tuple[int, int]:
    """``(H, W)`` the readers deliver: the fixed image size, else ``load_size`` squares."""
    fixed = manifest.get("image_size")
    if fixed:
        return int(fixed[0]), int(fixed[1])
    s = int(load_size or 256)
    return s, s


def decode_image(data: bytes, out_hw: tuple[int, int], fixed: bool) -> np.ndarray:
    """Decode one encoded image to uint8 ``(H, W, 3)``.

    Fixed-size datasets must already have ``out_hw``; variable-size (full-res JPEG) ones are
    resized (shorter side to the output size) and center-cropped to a square.
    """
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if not fixed:
        h, w = out_hw
        # draft() lets libjpeg decode at 1/2, 1/4, 1/8 scale when that still covers the target
        # -- most of the 224/256 px speed-up for full-res JPEGs.
        img.draft(
            "RGB", (max(h, w) * img.width // min(img.size), max(h, w) * img.height // min(img.size))
        )
    img = img.convert("RGB")
    if fixed:
        if (img.height, img.width) != tuple(out_hw):
            raise ValueError(
                f"image is {img.height}x{img.width}, dataset says {out_hw[0]}x{out_hw[1]}"
            )
        return np.asarray(img)
    target = out_hw[0]
    scale = target / min(img.size)
    nw, nh = max(target, round(img.width * scale)), max(target, round(img.height * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - target) // 2, (nh - target) // 2
    return np.asarray(img.crop((left, top, left + target, top + target)))
