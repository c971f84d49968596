"""Downsampled ImageNet 32/64 (Chrabaszcz et al. 2017; :func:`scan_downsampled_imagenet`) and
the 1000 -> 127 class map of ImageNet-127 (:func:`load_imagenet127_map`), derived from the
pinned public label files (:data:`IMAGENET127_META`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shards.sources.common import (
    _labels,
    _planar_to_hwc,
    load_data_file,
    md5_file,
)

# ----------------------------------------------------------------------------------------------
# Published files, pinned (URLs at fixed commits; git blob ids are certain, see docs/datasets.md)
_COSSL = (
    "https://raw.githubusercontent.com/YUE-FAN/CoSSL/9c7b8401b912bf266297c2763300892daa9a0495/"
    "prepare_small_imagenet_127/"
)
_WMIGFTL = (
    "https://raw.githubusercontent.com/minyoungg/wmigftl/1ad3b2afd6216e93007ad3a64cf19d86372e1574/"
    "label_sets/"
)
# file name -> (url, git blob sha1). The 1000->127 map is derived from Huh et al.'s published
# val labels (the same join as the project's reference table), so only public files are needed.
IMAGENET127_META = {
    "map_clsloc.txt": (_COSSL + "map_clsloc.txt", "4e4d8d337120f4a7463a15b850914aca0b876d9e"),
    "synset_words_up_down_127.txt": (
        _COSSL + "synset_words_up_down_127.txt",
        "69967b5197081aec95781acfa3e6b9ad0474015b",
    ),
    "val.txt": (_WMIGFTL + "val.txt", "7a300a39c194fa459f43da5273cbaef35185ace9"),
    "val_up_down_127.txt": (
        _WMIGFTL + "hierarchy/val_up_down_127.txt",
        "2de990a6aae3b935f82676a920f5bbeebd77be23",
    ),
    "synsets.txt": (_WMIGFTL + "synsets.txt", "88aa58f966b3c4b7264a52bb71dcb25e856f6c1f"),
}

# The authors' full-resolution ImageNet127 labeled list (1%; their 10% list's blob is not
# served by the copies we know), for ``imagenet127 --from-jpeg --labeled-list ... --download``.
_BMB = (
    "https://raw.githubusercontent.com/wujianP/ImbalancedSSL/8eff1ff29bdb9530f1926d959c7286a39422c376/"
    "BMB/dataset/imagenet127_LT/"
)
IMAGENET127_LISTS = {
    "ImageNet127_LT_train_semi_1_labeled.txt": (
        _BMB + "ImageNet127_LT_train_semi_1_labeled.txt",
        "e22ddaef5dd2d56cc8c6e22b8699fbba66dd7898",
    ),
}


# ----------------------------------------------------------------------------------------------
# Downsampled ImageNet (Chrabaszcz et al. 2017)

_TRAIN_RE = re.compile(r"^train_data_batch_(\d+)(\.npz)?$")
_VAL_RE = re.compile(r"^val_data(\.npz)?$")


@dataclass
class DownsampledImageNet:
    """Locations of the downsampled-ImageNet batch files and their (0-based) labels.

    Attributes:
        train_files, val_file: the batch files, train in batch-number order.
        train_y, val_y: int64 labels ``0..999`` in ``map_clsloc.txt`` order (file label - 1).
        train_sizes: images per train file (to map global index -> file).
        side: image side (32 or 64).
    """

    root: Path
    train_files: list[Path]
    val_file: Path
    train_y: np.ndarray
    val_y: np.ndarray
    train_sizes: list[int]
    side: int

    def record(self) -> dict[str, Any]:
        h = hashlib.sha256()
        for f in [*self.train_files, self.val_file]:
            h.update(f.name.encode() + b"\0" + md5_file(f).encode())
        return {
            "kind": f"imagenet{self.side}",
            "path": str(self.root.resolve()),
            "checksum": {"sha256_of_md5s": h.hexdigest()},
        }

    def load_images(self, f: Path) -> np.ndarray:
        """uint8 ``(N, side, side, 3)`` of one batch file."""
        d = load_data_file(f)
        y = _labels(d, "labels", str(f), 1, 1000)
        x = _planar_to_hwc(d["data"], str(f), len(y))
        if x.shape[1] != self.side:
            raise ValueError(f"{f}: images are {x.shape[1]} px, other files are {self.side} px")
        return x


def scan_downsampled_imagenet(root: str | Path) -> DownsampledImageNet:
    """Find ``train_data_batch_*`` and ``val_data`` (pickle or .npz) under ``root``; read labels.

    Reads every file once (pickles cannot be read partially; ``.npz`` labels load alone).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: downsampled ImageNet folder not found")
    train: dict[int, Path] = {}
    val: Path | None = None
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        if m := _TRAIN_RE.match(p.name):
            train.setdefault(int(m.group(1)), p)
        elif _VAL_RE.match(p.name):
            val = val or p
    if not train:
        raise ValueError(f"{root}: no train_data_batch_<n> files found")
    if val is None:
        raise ValueError(f"{root}: no val_data file found")
    nums = sorted(train)
    if nums != list(range(1, len(nums) + 1)):
        raise ValueError(f"{root}: train batches {nums} are not numbered 1..{len(nums)}")
    files = [train[i] for i in nums]
    ys, sizes, side = [], [], None
    for f in [*files, val]:
        if f.suffix == ".npz":
            try:
                with np.load(f, allow_pickle=False) as z:
                    if "labels" not in z.files or "data" not in z.files:
                        raise ValueError(
                            f"{f}: missing key(s) {[k for k in ('data', 'labels') if k not in z.files]}"
                            f"; found keys {sorted(z.files)}"
                        )
                    d = {"labels": z["labels"], "data_shape": z["data"].shape}
            except ValueError:
                raise
            except Exception as e:
                raise ValueError(f"{f}: not a readable .npz ({type(e).__name__}: {e})") from e
            y = _labels({"data": None, **d}, "labels", str(f), 1, 1000)
            s = int(round((d["data_shape"][1] / 3) ** 0.5))
            if len(d["data_shape"]) != 2 or 3 * s * s != d["data_shape"][1]:
                raise ValueError(f"{f}: 'data' must be (N, 3*H*W), got {d['data_shape']}")
        else:
            d = load_data_file(f)
            y = _labels(d, "labels", str(f), 1, 1000)
            s = _planar_to_hwc(d["data"], str(f), len(y)).shape[1]
        if side is not None and s != side:
            raise ValueError(f"{f}: images are {s} px, other files are {side} px")
        side = s
        ys.append(y - 1)
        sizes.append(len(y))
    return DownsampledImageNet(
        root, files, val, np.concatenate(ys[:-1]), ys[-1], sizes[:-1], int(side)
    )


def read_map_clsloc(path: Path) -> list[str]:
    """``map_clsloc.txt`` -> the 1000 wnids in 1-based-index order (list index = label - 1)."""
    wnids: dict[int, str] = {}
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            raise ValueError(f"{path}:{i}: expected 'wnid index name', got {line!r}")
        wnids[int(parts[1])] = parts[0]
    if sorted(wnids) != list(range(1, 1001)):
        raise ValueError(f"{path}: indices must be exactly 1..1000")
    return [wnids[i] for i in range(1, 1001)]


def derive_wnid_to_127(val_txt: Path, val127_txt: Path, synsets_txt: Path) -> dict[str, int]:
    """Join Huh et al.'s val labels (1k) with their 127-class relabelling: wnid -> 127 label.

    Raises:
        ValueError: files out of step, or a 1k class whose images map to two 127 classes.
    """
    synsets = [ln.split()[0] for ln in Path(synsets_txt).read_text().splitlines() if ln.strip()]
    a = Path(val_txt).read_text().splitlines()
    b = Path(val127_txt).read_text().splitlines()
    if len(a) != len(b):
        raise ValueError(f"{val_txt} and {val127_txt} have different line counts")
    out: dict[str, int] = {}
    for i, (la, lb) in enumerate(zip(a, b), 1):
        (na, ya), (nb, yb) = la.split(), lb.split()
        if na != nb:
            raise ValueError(f"{val127_txt}:{i}: image {nb} != {na} in {val_txt}")
        w = synsets[int(ya)]
        if out.setdefault(w, int(yb)) != int(yb):
            raise ValueError(f"{val127_txt}:{i}: class {w} maps to two 127-classes")
    return out


def load_imagenet127_map(meta_dir: Path) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """The 1000 -> 127 lookup in ``map_clsloc`` order, the 127 class names, and a record.

    ``meta_dir`` holds ``wnid_to_127.tsv`` (columns wnid, idx1000_in_map_clsloc,
    class127_index, ...), or ``map_clsloc.txt`` plus Huh et al.'s ``val.txt``,
    ``val_up_down_127.txt`` and ``synsets.txt`` (what ``--download`` fetches). Names come from
    ``synset_words_up_down_127.txt`` when present, else the 127 wnids.

    Returns:
        ``lut`` int64 ``(1000,)`` (0-based map_clsloc label -> 127 label), names, record.
    """
    meta_dir = Path(meta_dir)
    lut = np.full(1000, -1, np.int64)
    wnid127: dict[int, str] = {}
    tsv = meta_dir / "wnid_to_127.tsv"
    used: list[Path] = []
    if tsv.is_file():
        lines = tsv.read_text().splitlines()
        head = lines[0].split("\t") if lines else []
        need = ["idx1000_in_map_clsloc", "class127_index", "class127_wnid"]
        if any(c not in head for c in need):
            raise ValueError(f"{tsv}: header must have columns {need}, got {head}")
        ci = [head.index(c) for c in need]
        for i, ln in enumerate(lines[1:], 2):
            f = ln.split("\t")
            try:
                idx, c127, w127 = int(f[ci[0]]), int(f[ci[1]]), f[ci[2]]
            except (IndexError, ValueError) as e:
                raise ValueError(f"{tsv}:{i}: malformed row {ln!r}") from e
            if not 1 <= idx <= 1000 or not 0 <= c127 < 127:
                raise ValueError(f"{tsv}:{i}: index out of range in {ln!r}")
            lut[idx - 1] = c127
            wnid127[c127] = w127
        used.append(tsv)
    else:
        need_files = ["map_clsloc.txt", "val.txt", "val_up_down_127.txt", "synsets.txt"]
        missing = [n for n in need_files if not (meta_dir / n).is_file()]
        if missing:
            raise ValueError(
                f"{meta_dir}: needs wnid_to_127.tsv, or {need_files} (missing {missing}); "
                "pass --download to fetch the public files"
            )
        order = read_map_clsloc(meta_dir / "map_clsloc.txt")
        m = derive_wnid_to_127(
            meta_dir / "val.txt", meta_dir / "val_up_down_127.txt", meta_dir / "synsets.txt"
        )
        for i, w in enumerate(order):
            if w not in m:
                raise ValueError(f"{meta_dir / 'val.txt'}: no val image of class {w}")
            lut[i] = m[w]
        used += [meta_dir / n for n in need_files]
    if (lut < 0).any():
        raise ValueError(f"{meta_dir}: the map does not cover all 1000 classes")
    if sorted(set(lut.tolist())) != list(range(127)):
        raise ValueError(f"{meta_dir}: the map does not hit all 127 classes")
    names_file = meta_dir / "synset_words_up_down_127.txt"
    if names_file.is_file():
        rows = [ln.split(None, 1) for ln in names_file.read_text().splitlines() if ln.strip()]
        if len(rows) != 127:
            raise ValueError(f"{names_file}: expected 127 lines, got {len(rows)}")
        names = [r[1] if len(r) > 1 else r[0] for r in rows]
        used.append(names_file)
    else:
        names = [wnid127.get(i, f"class127_{i:03d}") for i in range(127)]
    h = hashlib.sha256()
    for p in used:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return lut, names, {"files": [p.name for p in used], "sha256": h.hexdigest()}


def load_wnid_to_127(meta_dir: Path) -> tuple[dict[str, int], list[str], dict[str, Any]]:
    """The 1000 -> 127 map keyed by wnid (for JPEG trees ``train/<wnid>/``), names, record.

    The same map and checks as :func:`load_imagenet127_map`; the wnid of each map_clsloc index
    comes from ``wnid_to_127.tsv``'s ``wnid`` column, else from ``map_clsloc.txt``.
    """
    meta_dir = Path(meta_dir)
    lut, names, record = load_imagenet127_map(meta_dir)
    tsv = meta_dir / "wnid_to_127.tsv"
    if tsv.is_file():
        lines = tsv.read_text().splitlines()
        head = lines[0].split("\t")
        if "wnid" not in head:
            raise ValueError(f"{tsv}: header must have a 'wnid' column, got {head}")
        wi, ii = head.index("wnid"), head.index("idx1000_in_map_clsloc")
        order = [""] * 1000
        for ln in lines[1:]:
            f = ln.split("\t")
            order[int(f[ii]) - 1] = f[wi]
    else:
        order = read_map_clsloc(meta_dir / "map_clsloc.txt")
    if len(set(order)) != 1000 or "" in order:
        raise ValueError(f"{meta_dir}: the class map must name 1000 distinct wnids")
    return {w: int(lut[i]) for i, w in enumerate(order)}, names, record
