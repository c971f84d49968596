"""Checkpoint files: atomic sealed writes, safe verified loads, discovery, rotation.

Layout inside a run directory::

    checkpoints/ckpt-00001000.pt              shared state (written by rank 0, last)
    checkpoints/ckpt-00001000.pt.json         its seal: sha256, size, run id, step
    checkpoints/ckpt-00001000.rank1.pt        per-rank state of rank 1 (rank 0's is in the main file)
    checkpoints/ckpt-00001000.rank1.pt.json   its seal

Every file is written to a temporary name in the same folder while its SHA-256 is computed,
flushed to disk, its seal written (atomically), then the file is renamed into place, so a file
under a final name always has its seal, and a crash or a kill never leaves a truncated file under
a final name.

Loading never runs code from a file: the seal is checked first (a missing seal, another size or
another hash: the file is refused, like a truncated one), then the file is read with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers (dicts, lists,
numbers, strings, None). What bmb stores is exactly that (generator and RNG states are uint8
tensors); DeepSpeed's ZeRO optimizer state holds a few of DeepSpeed's own classes, which the
trainer allow-lists by name (:func:`deepspeed_safe_globals`) for DeepSpeed runs only.

Pruning and discovery read the seals only (small JSON files), so they can tell this run's
checkpoints from anyone else's without loading any checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

_MAIN = re.compile(r"^ckpt-(\d{8})\.pt$")
# The temp names atomic_save writes before its renames (tempfile.mkstemp: 8 characters of [a-z0-9_]).
_TEMP = re.compile(r"^\.ckpt-\d{8}(\.rank\d+)?\.pt(\.json)?\.[a-z0-9_]{8}\.tmp$")
SEAL_SUFFIX = ".json"
FORMAT = 2  # 1: unsealed, pickled with weights_only=False (before run identities)
_CHUNK = 1 << 22


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted or used (no seal, bad hash, not loadable ...)."""


class CheckpointWriteError(OSError):
    """A checkpoint (or its seal) could not be written (a full disk, a quota ...); the message names
    the file. Nothing was left under its name: the previous checkpoints are intact."""


class _HashingWriter:
    """A write-only file object that hashes what passes through it (``torch.save`` writes to it).
    ``error``: the OSError a write raised (``torch.save`` reports it only as "unexpected pos")."""

    def __init__(self, f: Any) -> None:
        self.f, self.h, self.size = f, hashlib.sha256(), 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        self.h.update(data)
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = e
            raise
        self.size += n
        return n

    def flush(self) -> None:
        self.f.flush()


def seal_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SEAL_SUFFIX)


def _write_json_atomic(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """``torch.save`` to a temp file beside ``path`` (hashing as it writes), fsync, write the seal
    ``path.json`` (``sha256``, ``bytes``, ``format`` and ``meta``, e.g. run id and step), then
    rename the file over ``path``. Returns the seal."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    w: _HashingWriter | None = None
    try:
        with os.fdopen(fd, "wb") as f:
            w = _HashingWriter(f)
            torch.save(obj, w)
            f.flush()
            os.fsync(f.fileno())
        seal = {**(meta or {}), "file": path.name, "sha256": w.h.hexdigest(), "bytes": w.size, "format": FORMAT}
        _write_json_atomic(seal, seal_path(path))
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        err = w.error if w is not None and w.error is not None else e
        if isinstance(err, OSError):
            raise CheckpointWriteError(err.errno, f"cannot write checkpoint {path}: {err.strerror or err} (disk "
                                       "full?); nothing was left under that name, the earlier checkpoints are "
                                       "intact") from None
        raise
    return seal


def read_seal(path: str | Path) -> dict[str, Any] | None:
    """The seal of a checkpoint file, or None when it has none (or an unreadable one)."""
    try:
        seal = json.loads(seal_path(path).read_text())
    except (OSError, ValueError):
        return None
    return seal if isinstance(seal, dict) and isinstance(seal.get("sha256"), str) else None


def sha256_of(path: str | Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def verify(path: str | Path) -> dict[str, Any]:
    """Check ``path`` against its seal; returns the seal.

    Raises:
        CheckpointError: no seal (an unsealed file: written by something else, or by bmb before
            checkpoints were sealed), another size, or another SHA-256.
    """
    path = Path(path)
    seal = read_seal(path)
    if seal is None:
        raise CheckpointError(f"{path.name} has no seal ({seal_path(path).name} missing or unreadable): "
                              "not written by this version of bmb, refusing to load it")
    digest, size = sha256_of(path)
    if size != seal.get("bytes") or digest != seal["sha256"]:
        raise CheckpointError(f"{path.name} does not match its seal (sha256 {digest[:16]}…, {size} bytes; "
                              f"sealed {seal['sha256'][:16]}…, {seal.get('bytes')} bytes): corrupt or modified")
    return seal


def deepspeed_safe_globals() -> list[Any]:
    """The DeepSpeed classes a ZeRO optimizer ``state_dict()`` holds (loss scaler, stage enum,
    fragment addresses): allow-listed for ``weights_only`` loads in DeepSpeed runs only."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]


def load_verified(path: str | Path, extra_globals: list[Any] | tuple = ()) -> tuple[Any, dict[str, Any]]:
    """``(object, seal)`` of a sealed checkpoint file: verified, then loaded with ``weights_only=True``.

    Raises:
        CheckpointError: see :func:`verify`; also a file that does not unpickle as plain data.
    """
    seal = verify(path)
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (a disallowed global), a bad zip, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{Path(path).name} is not a plain-data checkpoint ({type(e).__name__}: "
                              f"{first[:300]})") from None
    return obj, seal


def main_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"ckpt-{step:08d}.pt"


def rank_path(folder: Path, step: int, rank: int) -> Path:
    return Path(folder) / f"ckpt-{step:08d}.rank{rank}.pt"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, main file)`` of every main checkpoint file, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _MAIN.match(p.name))]
    return sorted(found)


def split_by_run(folder: str | Path, run_id: str | None) -> tuple[list[tuple[int, Path]], list[tuple[int, Path]]]:
    """Main checkpoint files of run ``run_id`` (by their seals) and all the others, oldest first.

    "Others" are files sealed by another run, or without a (readable) seal.
    """
    own, other = [], []
    for step, path in list_checkpoints(folder):
        seal = read_seal(path)
        mine = run_id is not None and seal is not None and seal.get("run_id") == run_id and seal.get("step") == step
        (own if mine else other).append((step, path))
    return own, other


def prune(folder: str | Path, keep: int, run_id: str) -> list[int]:
    """Delete all but the newest ``keep`` checkpoints of run ``run_id`` (main and rank files, and
    their seals); another run's files and unsealed files are never touched. Returns the deleted steps."""
    own, _ = split_by_run(folder, run_id)
    gone = [step for step, _ in own[: max(len(own) - keep, 0)]]
    for step in gone:
        files = [p for p in Path(folder).glob(f"ckpt-{step:08d}.*") if not p.name.endswith(SEAL_SUFFIX)]
        for p in files:  # a data file, then its seal (read first: it names the run)
            seal = read_seal(p)
            if seal is not None and seal.get("run_id") == run_id:
                p.unlink(missing_ok=True)
                seal_path(p).unlink(missing_ok=True)
    return gone


def set_aside(folder: str | Path, mains: list[Path], sub: str) -> list[Path]:
    """Move the given main checkpoint files, with their rank files and seals, into ``folder/sub/``
    (out of sight of discovery and pruning, kept for inspection). Returns the moved files' new paths."""
    dest = Path(folder) / sub
    dest.mkdir(exist_ok=True)
    moved = []
    for main in mains:
        step = main.name[len("ckpt-"): len("ckpt-") + 8]
        for p in sorted(Path(folder).glob(f"ckpt-{step}.*")):
            os.replace(p, dest / p.name)
            moved.append(dest / p.name)
    return moved


def clean_orphans(folder: str | Path) -> list[str]:
    """Delete the temp files a killed :func:`atomic_save` left in ``folder`` (only names of exactly
    its pattern, ``.ckpt-00001000.pt.<8 chars>.tmp`` and the seals' ``.ckpt-00001000.pt.json.<8
    chars>.tmp``; plain files, not links). Call it only while no writer of this run is live."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = sorted(p.name for p in folder.iterdir() if _TEMP.match(p.name) and p.is_file() and not p.is_symlink())
    for name in gone:
        (folder / name).unlink(missing_ok=True)
    return gone
