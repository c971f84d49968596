"""Checkpoint files: atomic writes, discovery of the newest *complete* checkpoint, rotation.

Layout inside a run directory::

    checkpoints/ckpt-00001000.pt          shared state (written by rank 0, last)
    checkpoints/ckpt-00001000.rank1.pt    per-rank state of rank 1 (rank 0's is in the main file)

Every file is written to a temporary name in the same folder, flushed to disk, then renamed, so
a crash or a kill never leaves a truncated file under a final name. A checkpoint counts as
complete when its main file loads and every rank file it lists exists; a corrupt one is skipped
in favour of the previous one.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

_MAIN = re.compile(r"^ckpt-(\d{8})\.pt$")


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def load_complete(folder: str | Path, rank: int = 0, warn=print) -> tuple[dict, dict | None] | None:
    """Newest complete checkpoint as ``(main state, this rank's state or None)``; None if there is none.

    Corrupt or incomplete checkpoints are reported through ``warn`` and skipped.
    """
    for step, path in reversed(list_checkpoints(folder)):
        try:
            main = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(main, dict) or main.get("step") != step:
                raise ValueError("not a bmb checkpoint or wrong step")
            missing = [r for r in range(1, main.get("world_size", 1)) if not rank_path(folder, step, r).is_file()]
            if missing:
                raise ValueError(f"rank files missing for ranks {missing}")
            mine = None
            if rank > 0:
                mine = torch.load(rank_path(folder, step, rank), map_location="cpu", weights_only=False)
            return main, mine
        except Exception as e:  # a truncated zip, a bad pickle, a missing rank file ...
            warn(f"[checkpoint] skipping {path.name}: {type(e).__name__}: {e}")
    return None


def prune(folder: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (main and rank files)."""
    ckpts = list_checkpoints(folder)
    for step, _ in ckpts[: max(len(ckpts) - keep, 0)]:
        for p in Path(folder).glob(f"ckpt-{step:08d}.*"):
            p.unlink(missing_ok=True)
