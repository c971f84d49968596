"""Run-directory helpers for the run-trust tests (tests/test_run_trust*.py): the tiny settings they
train with (checkpoints every 5 steps, 5 kept), the ``launch/train.py`` arguments of a run, and
reading/sealing what a run wrote."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tests import demo_data

# demo_data.TINY, but a checkpoint every 5 steps (4 per run), all kept: resume has something to pick.
TINY = [("train.checkpoint_every=5" if s.startswith("train.checkpoint_every=") else s) for s in demo_data.TINY]
TINY.append("train.keep_checkpoints=5")


def args(data, out, name: str, *extra: str) -> list[str]:
    """``launch/train.py`` arguments of run ``name`` of the demo config on ``data`` under ``out``."""
    return ["--config", demo_data.CONFIG, *TINY, f"data.dataset={data}", f"train.out_dir={out}", f"name={name}",
            *extra]


def snapshot(d: Path) -> dict:
    """Every file under ``d``: bytes and mtime; every folder: mtime (a refusal must change none,
    nor add or remove anything)."""
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted([d, *d.rglob("*")])}


def ckpts(d: Path) -> list[str]:
    return sorted(p.name for p in (d / "checkpoints").glob("ckpt-*.pt"))


def final(d: Path) -> dict:
    return json.loads((d / "final.json").read_text())


def seal(path: Path, run_id: str, step: int) -> None:
    """Seal a file the way bmb does (sha256 + size + run id + step in ``<file>.json``): what an
    attacker who read the docs, or a tool, could produce."""
    data = path.read_bytes()
    path.with_name(path.name + ".json").write_text(json.dumps(
        {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "run_id": run_id,
         "step": step, "format": 2}))


def run_id_of(d: Path) -> str | None:
    p = d / "run.json"
    return json.loads(p.read_text())["run_id"] if p.is_file() else None
