"""Readers for the source datasets and their metadata files, with strict input checks.

Every error is a ``ValueError`` naming the file and what is wrong with it. Pickles are read
with a restricted unpickler that only rebuilds numpy arrays and plain containers, so a
malicious "dataset" file cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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

_COSSL = (
    "https://raw.githubusercontent.com/YUE-FAN/CoSSL/9c7b8401b912bf266297c2763300892daa9a0495/"
    "prepare_small_imagenet_127/"
)
_WMIGFTL = (
    "https://raw.githubusercontent.com/minyoungg/wmigftl/1ad3b2afd6216e93007ad3a64cf19d86372e1574/"
    "label_sets/"
)
_LT = (
    "https://raw.githubusercontent.com/facebookresearch/classifier-balancing/"
    "f162adef63fdf592d0b8a0f6e52bc481fc08785f/data/ImageNet_LT/"
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
IMAGENET_LT_LISTS = {
    "ImageNet_LT_train.txt": (
        _LT + "ImageNet_LT_train.txt",
        "a063f095fcd475db4cf8b0658c4b73955535bbf9",
    ),
    "ImageNet_LT_val.txt": (
        _LT + "ImageNet_LT_val.txt",
        "3ed3188b2f44829ce2dec1cc27040d8d40984088",
    ),
    "ImageNet_LT_test.txt": (
        _LT + "ImageNet_LT_test.txt",
        "76a2fb9749d6cd29e765cc4f8c270f2504131e2f",
    ),
}


def md5_file(path: str | Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def git_blob_sha1(data: bytes) -> str:
    """Git's object id of a file's bytes (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def download(url: str, dest: Path, *, md5: str | None = None, git_blob: str | None = None) -> Path:
    """Fetch ``url`` to ``dest`` (atomically) and check its md5 or git blob id.

    Raises:
        ValueError: the download failed or its checksum differs (the bad file is removed).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"download of {url} failed ({e})") from e
    if md5 is not None and (got := md5_file(tmp)) != md5:
        tmp.unlink()
        raise ValueError(f"{url}: md5 mismatch (got {got}, expected {md5}); file discarded")
    if git_blob is not None and (got := git_blob_sha1(tmp.read_bytes())) != git_blob:
        tmp.unlink()
        raise ValueError(f"{url}: git blob id mismatch (got {got}, expected {git_blob})")
    tmp.replace(dest)
    return dest


def fetch_files(table: dict[str, tuple[str, str]], names: list[str], dest: Path) -> None:
    """Download those of ``names`` missing from ``dest`` (pinned URL + blob id check)."""
    for n in names:
        if not (Path(dest) / n).is_file():
            url, blob = table[n]
            print(f"downloading {url}")
            download(url, Path(dest) / n, git_blob=blob)


# ----------------------------------------------------------------------------------------------
# Pickles


class _SafeUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("builtins", "bytearray"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data file")


def _load_pickle_bytes(data: bytes, where: str) -> dict[str, Any]:
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a corrupt or foreign file
        raise ValueError(f"{where}: not a readable dataset pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def load_data_file(path: Path) -> dict[str, Any]:
    """Load one source batch: a pickle or ``.npz`` (``data``, ``labels`` ... keys)."""
    path = Path(path)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception as e:
            raise ValueError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from e
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from e
    return _load_pickle_bytes(data, str(path))


def _planar_to_hwc(data: Any, where: str, n_labels: int) -> np.ndarray:
    """``(N, 3*H*W)`` planar RGB -> uint8 ``(N, H, W, 3)``."""
    x = np.asarray(data)
    if x.dtype != np.uint8 or x.ndim != 2:
        raise ValueError(
            f"{where}: 'data' must be a uint8 (N, 3*H*W) array, got {x.dtype} {x.shape}"
        )
    side = int(round((x.shape[1] / 3) ** 0.5))
    if 3 * side * side != x.shape[1]:
        raise ValueError(f"{where}: 'data' rows of {x.shape[1]} bytes are not 3 x square images")
    if len(x) != n_labels:
        raise ValueError(f"{where}: {len(x)} images but {n_labels} labels")
    return x.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)


def _labels(d: dict[str, Any], key: str, where: str, lo: int, hi: int) -> np.ndarray:
    if "data" not in d or key not in d:
        missing = [k for k in ("data", key) if k not in d]
        raise ValueError(f"{where}: missing key(s) {missing}; found keys {sorted(d)}")
    y = np.asarray(d[key])
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: {key!r} must be a 1-D integer list, got {y.dtype} {y.shape}")
    if y.size and (y.min() < lo or y.max() > hi):
        bad = int(y[(y < lo) | (y > hi)][0])
        raise ValueError(f"{where}: label {bad} in {key!r} is out of range {lo}..{hi}")
    return y.astype(np.int64)


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


# ----------------------------------------------------------------------------------------------
# ImageNet-LT split lists


@dataclass
class ListSplit:
    """One split list: relative paths, labels, and the list file (for error messages)."""

    file: Path
    paths: list[str]
    labels: np.ndarray


def read_split_list(path: Path) -> ListSplit:
    """Parse ``<relative path> <0-based label>`` lines."""
    paths: list[str] = []
    labels: list[int] = []
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"{path}: cannot read split list ({e.strerror})") from e
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"{path}:{i}: expected '<path> <label>', got {line!r}")
        paths.append(parts[0])
        labels.append(int(parts[1]))
    if not paths:
        raise ValueError(f"{path}: empty split list")
    return ListSplit(Path(path), paths, np.asarray(labels, np.int64))


def wnid_names(splits: list[ListSplit], num_classes: int) -> list[str]:
    """Class names (wnids) from the list paths; checks one wnid per label across all lists."""
    names: dict[int, str] = {}
    for sp in splits:
        for i, (p, y) in enumerate(zip(sp.paths, sp.labels.tolist()), 1):
            parts = p.split("/")
            w = parts[-2] if len(parts) >= 2 else f"class_{y:04d}"
            if names.setdefault(y, w) != w:
                raise ValueError(f"{sp.file}:{i}: label {y} is {w} here but {names[y]} elsewhere")
    return [names.get(k, f"class_{k:04d}") for k in range(num_classes)]
