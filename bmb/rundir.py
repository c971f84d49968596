"""Run identity: which run a run directory (and each checkpoint in it) belongs to, and which config
changes a resume may make.

A run directory ``out_dir/name`` holds, besides the outputs listed in ``bmb/engine.py``
(checkpoints are written and resumed by ``bmb/resume.py``)::

    run.json        {"run_id", "created", "config"}: the run's id and the config it was started with
    history.jsonl   one JSON event per line: start, resume (with the cadence keys that changed),
                    config_change (opted-in hyperparameter changes, old and new values), finish

Every checkpoint (and its seal, see ``bmb/checkpoint.py``) carries the run id. Resuming compares
the requested config with the checkpoint's: :data:`RESUMABLE` keys may change; any other change is
refused before anything in the run directory is written, unless ``train.allow_config_change=true``
(then it is recorded in ``history.jsonl``); :data:`FIXED` keys never change, since the state in
the checkpoint means something else under them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from bmb.config import Config, config_to_dict, flatten

RUN_FILE = "run.json"
HISTORY_FILE = "history.jsonl"
# Outputs of a run that a fresh start would overwrite or mix with.
RESULT_FILES = ("final.json", "metrics.jsonl", "train.jsonl")

# Keys a resume may change freely: they decide when things happen and where, not what is learnt.
RESUMABLE = {
    "name": "the run directory's own name (a renamed or moved run directory)",
    "train.out_dir": "where the run directory lives",
    "train.resume": "how to resume",
    "train.allow_config_change": "this opt-in itself",
    "train.threads": "CPU threads (speed only)",
    "train.progress": "the progress bar",
    "train.log_every": "scalar logging cadence",
    "train.trackers": "where the scalars are also logged",
    # Evaluation cadence does not touch training; note that the last-20 protocol then averages
    # rows taken at both cadences (each resume and its changes are in history.jsonl).
    "train.eval_every": "evaluation cadence",
    "train.checkpoint_every": "checkpoint cadence",
    "train.keep_checkpoints": "checkpoints kept",
    # Extending (or shortening) a run is what resuming is for, *as long as nothing depends on the
    # total*: with the constant schedule and no weight annealing, the total number of steps only
    # says where to stop, so a 20-step run extended to 40 takes exactly the steps a 40-step run
    # takes. The cosine schedule (lr at step t depends on T) and annealing (progress t / T) do
    # depend on it: there a change of the total rewrites the schedule half way (the steps done
    # followed one T, the rest another; the result matches neither run), so it is treated as a
    # hyperparameter change (refused unless opted in) -- see :func:`classify`.
    "train.epochs": "the run's length",
    "train.max_steps": "the run's length",
}
TOTAL_KEYS = ("train.epochs", "train.max_steps")

# Keys that never change on resume, even opted in: the checkpointed state means something else
# under another value (other weights' shapes, another optimizer's moments, another dataset's
# reader position or bank; the N-hat estimator's running sum is only kept in "mean" mode), or the
# result would be mislabeled (final.json's "algorithm").
FIXED_PREFIXES = ("model.",)
FIXED = {"method.algorithm", "method.bank_size", "method.estimate", "optim.name", "data.dataset", "data.backend",
         "data.order", "train.seed"}


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; nothing in it was changed. The message names the
    run directory and, for config changes, the keys with both values."""


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)


def _defaults() -> dict[str, Any]:
    return flatten(config_to_dict(Config()))


@dataclasses.dataclass
class Change:
    key: str
    old: Any  # the checkpoint's value
    new: Any  # the requested value
    kind: str  # "free", "guarded" (needs the opt-in) or "fixed"

    def describe(self) -> str:
        return f"{self.key}: {self.old!r} (checkpoint) -> {self.new!r} (requested)"

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, "from": self.old, "to": self.new}


def _total(flat: dict[str, Any]) -> int:
    return flat.get("train.max_steps") or flat["train.epochs"] * flat["train.iters_per_epoch"]


def classify(saved: dict[str, Any], requested: Config) -> list[Change]:
    """Every key whose value differs between a checkpoint's config (``saved``, nested dict) and the
    requested one. Keys the checkpoint predates count as their default; keys that no longer exist
    are ignored (they cannot be set any more)."""
    defaults = _defaults()
    old_flat = {**defaults, **{k: v for k, v in flatten(saved).items() if k in defaults}}
    new_flat = flatten(config_to_dict(requested))
    total_matters = (new_flat.get("optim.schedule") == "cosine" or old_flat.get("optim.schedule") == "cosine"
                     or new_flat.get("method.anneal_weights") or old_flat.get("method.anneal_weights"))
    total_changed = _total(old_flat) != _total(new_flat)
    changes = []
    for key, new in new_flat.items():
        old = old_flat.get(key)
        if old == new:
            continue
        if key in FIXED or key.startswith(FIXED_PREFIXES):
            kind = "fixed"
        elif key in TOTAL_KEYS:
            kind = "guarded" if (total_matters and total_changed) else "free"
        elif key in RESUMABLE:
            kind = "free"
        else:
            kind = "guarded"
        changes.append(Change(key, old, new, kind))
    return changes


def read_identity(run_dir: Path) -> dict[str, Any] | None:
    """``run.json`` (None when absent); an unreadable one is an error, never ignored."""
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        return None
    try:
        ident = json.loads(path.read_text())
        if not isinstance(ident, dict) or not isinstance(ident.get("run_id"), str):
            raise ValueError("no run_id")
    except (OSError, ValueError) as e:
        raise RunDirError(f"run dir {run_dir}: {RUN_FILE} is unreadable ({e}); it says which run the "
                          "directory holds -- restore it, or move the directory aside and start afresh") from None
    return ident


def write_identity(run_dir: Path, run_id: str, config: dict[str, Any], **extra: Any) -> None:
    """Write ``run.json``: the run id, when, and the config it was started with (as a dict)."""
    path = Path(run_dir) / RUN_FILE
    obj = {"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "config": config, **extra}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def append_history(run_dir: Path, event: str, run_id: str, **fields: Any) -> None:
    row = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "run_id": run_id, **fields}
    with open(Path(run_dir) / HISTORY_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def results_present(run_dir: Path) -> list[str]:
    """The result files in ``run_dir`` that hold something."""
    out = []
    for name in RESULT_FILES:
        p = Path(run_dir) / name
        if p.is_file() and p.stat().st_size > 0:
            out.append(name)
    return out


def _names(paths: list[Path], limit: int = 6) -> str:
    names = [p.name for p in paths]
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def refuse_changes(run_dir: Path, run_id: str, step: int, changes: list[Change], opted_in: bool) -> None:
    """Raise :class:`RunDirError` if ``changes`` holds a fixed change, or a guarded one without the opt-in."""
    fixed = [c for c in changes if c.kind == "fixed"]
    guarded = [c for c in changes if c.kind == "guarded"]
    if fixed:
        raise RunDirError(
            f"run dir {run_dir}: cannot resume run {run_id} (step {step}) with "
            + "; ".join(c.describe() for c in fixed)
            + ". The checkpointed state belongs to the old value, even with train.allow_config_change=true. "
            "Start a new run instead: another name=..., or train.out_dir=...")
    if guarded and not opted_in:
        why = ""
        if any(c.key in TOTAL_KEYS for c in guarded):
            why = (" (the total number of steps changes the cosine lr schedule / the weight annealing of the "
                   "steps still to come)")
        raise RunDirError(
            f"run dir {run_dir}: refusing to resume run {run_id} (step {step}) with a changed config: "
            + "; ".join(c.describe() for c in guarded) + why
            + ". Nothing was written. Re-run with the checkpoint's values, start a new run (another "
            "name=...), or continue with the new values by adding train.allow_config_change=true "
            f"(recorded in {HISTORY_FILE}).")


def refuse_leftovers(run_dir: Path, why: str, ident: dict | None, checkpoints: list[Path], results: list[str],
                     hint: str) -> None:
    parts = []
    if ident is not None:
        parts.append(f"run {ident['run_id']} ({RUN_FILE})")
    if checkpoints:
        parts.append(f"checkpoints {_names(checkpoints)}")
    if results:
        parts.append("results " + ", ".join(results))
    raise RunDirError(f"run dir {run_dir}: {why}; it holds " + "; ".join(parts) + ". Nothing was written. " + hint)
