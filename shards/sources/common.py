"""What every source reader shares: fetching pinned published files (checked by md5 or git
blob id) and reading pickles with a restricted unpickler that only rebuilds numpy arrays and
plain containers, so a malicious "dataset" file cannot run code. Every error is a
``ValueError`` naming the file and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np


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
