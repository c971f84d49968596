"""Run identity: which run a run directory (and each checkpoint in it) belongs to, and which config
changes a resume may make.

A run directory ``out_dir/name`` holds, besides the outputs listed in ``bmb/trainer.py``
(checkpoints are written and resumed by ``bmb/checkpointer.py``)::

    run.json        {"run_id", "created", "config"}: the run's id and the config it was started with
    history.jsonl   one JSON event per line: start, resume (with the cadence keys that changed),
                    config_change (opted-in hyperparameter changes, old and new values),
                    dataset_change (opted-in rebuilt dataset: both build ids), diverged, finish

How a run starts there (afresh, or resumed from which checkpoint; the refusals) is decided by
:meth:`RunDir.plan`, reading only, and recorded by :meth:`RunDir.record`. Beside it lies
``out_dir/.<name>.lock`` (:class:`RunLock`) while a training runs. Before anything is written,
:func:`claim` takes the lock and refuses links planted in the directory and JSONL logs
corrupt other than in their last line (:func:`check_run_dir`).

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bmb import checkpoint as ckpt
from bmb.config import Config, config_to_dict, dump_config, flatten
from bmb.logs import LogFileError, read_jsonl, repair_tail
from shards.outdir import PidLock

RUN_FILE = "run.json"
HISTORY_FILE = "history.jsonl"
# Outputs of a run that a fresh start would overwrite or mix with.
RESULT_FILES = ("final.json", "metrics.jsonl", "train.jsonl")
# What a run writes in its directory: none of these may be a symbolic link (a write would go
# wherever it points), nor anything under the folders.
RUN_ENTRIES = (RUN_FILE, HISTORY_FILE, *RESULT_FILES, "config.yaml", "checkpoints", "export", "tb")
LOG_FILES = (HISTORY_FILE, "metrics.jsonl", "train.jsonl")

# Keys a resume may change freely: they decide when things happen and where, not what is learnt.
RESUMABLE = {
    "name": "the run directory's own name (a renamed or moved run directory)",
    "train.out_dir": "where the run directory lives",
    "train.resume": "how to resume",
    "train.allow_config_change": "this opt-in itself",
    "train.allow_dataset_change": "the dataset opt-in (the change itself is recorded in history.jsonl)",
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
    path = Path(run_dir) / HISTORY_FILE
    repair_tail(path)  # a line cut by a kill is not glued to this one
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    return read_jsonl(path)[0]


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


def dataset_change(run_dir: Path, main: dict[str, Any], current: str | None, allowed: bool) -> dict | None:
    """Compare the dataset ``build_id`` a checkpoint (``main``) was trained on with the one at
    ``data.dataset`` now. Same, or either unknown (a checkpoint from before build ids were
    recorded, a hand-made manifest): None. Different: :class:`RunDirError` naming both, unless
    ``allowed`` (``train.allow_dataset_change``): then ``{"from", "to"}`` for ``history.jsonl``."""
    saved = main.get("dataset_build_id")
    if not isinstance(saved, str) or not isinstance(current, str) or saved == current:
        return None
    if not allowed:
        raise RunDirError(
            f"run dir {run_dir}: refusing to resume run {main['run_id']} (step {main['step']}): the dataset at "
            f"data.dataset={main['config']['data']['dataset']} was rebuilt -- build_id {saved} (checkpoint) -> "
            f"{current} (now). Nothing was written. Point data.dataset at the dataset the run was trained on, start "
            "a new run (another name=...), or continue on the new data with train.allow_dataset_change=true "
            f"(recorded in {HISTORY_FILE}).")
    return {"from": saved, "to": current}


# ---------------------------------------------------------------------------- how a run starts
@dataclasses.dataclass
class StartPlan:
    """How a run starts, decided reading only (:meth:`RunDir.plan`). ``loaded``: the checkpoint
    to resume from (the loader's object, with ``.main``: rank 0's file), None for a fresh start."""

    loaded: Any = None
    run_id: str | None = None
    path: str = ""  # the checkpoint file (as asked, or found)
    shown: str = ""  # ... as the log names it
    step: int = 0
    changes: list[Change] = dataclasses.field(default_factory=list)
    adopted: bool = False  # resumed from a checkpoint file into a directory without run.json
    config: dict[str, Any] | None = None  # the checkpoint's config
    later: list[Path] = dataclasses.field(default_factory=list)  # this run's checkpoints past it
    dataset_change: dict[str, Any] | None = None

    @property
    def fresh(self) -> bool:
        return self.loaded is None

    @property
    def retune(self) -> bool:
        """An opted-in hyperparameter change: the restored state must take the requested values."""
        return any(c.kind == "guarded" for c in self.changes)


class RunDir:
    """The run directory ``out_dir/name``: how a run starts in it (:meth:`plan`, reading only) and
    the record of that start (:meth:`record`, rank 0)."""

    def __init__(self, path: str | Path, log: Callable[[str], None] = print) -> None:
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"
        self.log = log

    def plan(self, cfg: Config, build_id: str | None, newest: Callable[[list, str], tuple | None],
             load: Callable[[Path], Any]) -> StartPlan:
        """Decide, reading only, how this run starts: afresh, or from which checkpoint. ``newest``:
        ``(candidates, run_id) -> (path, loaded) | None``, the newest one every rank can load;
        ``load``: ``path -> loaded`` (raises :class:`CheckpointError`). Raises :class:`RunDirError`
        (on every rank) before anything in the run directory is written when it cannot start as asked."""
        run_dir, mode = self.path, cfg.train.resume
        ident = read_identity(run_dir)
        results = results_present(run_dir)
        all_ckpts = [p for _, p in ckpt.list_checkpoints(self.ckpt_dir)]
        if mode == "none":
            if all_ckpts or results:
                refuse_leftovers(
                    run_dir, "train.resume=none starts a new run here, but the directory is in use", ident, all_ckpts,
                    results, "Start the new run elsewhere (another name=... or train.out_dir=...), move or delete "
                    "this directory, or continue its run with train.resume=auto.")
            return StartPlan()
        if mode == "auto":
            own, other = ckpt.split_by_run(self.ckpt_dir, ident["run_id"] if ident else None)
            if ident is None:
                if other or results:
                    refuse_leftovers(
                        run_dir, f"no {RUN_FILE}, so it cannot tell which run these belong to", None,
                        [p for _, p in other], results, "Move or delete them (or the directory) to start afresh, or "
                        "use another name=...")
                return StartPlan()
            if other:
                self.log(f"[checkpoint] ignoring {len(other)} file(s) in {self.ckpt_dir} not sealed by run "
                         f"{ident['run_id']} (they are never loaded nor pruned): "
                         + ", ".join(p.name for _, p in other))
            found = newest(own, ident["run_id"])
            if found is None:
                if own or results:
                    refuse_leftovers(
                        run_dir, f"no usable checkpoint of run {ident['run_id']} to resume from, and starting over "
                        "would overwrite its results", ident, [p for _, p in own], results,
                        "To start over, move or delete the directory (or those files); to keep it, use another "
                        "name=...; to resume from a particular checkpoint, train.resume=<path>.")
                return StartPlan()
            path, loaded = found
        else:
            path = Path(mode)
            if not path.is_file():
                raise FileNotFoundError(f"train.resume: checkpoint file not found: {path}")
            try:
                loaded = load(path)
            except ckpt.CheckpointError as e:
                raise RunDirError(f"run dir {run_dir}: train.resume={path}: {e}") from None
            main = loaded.main
            if ident is not None and ident["run_id"] != main["run_id"]:
                raise RunDirError(f"run dir {run_dir} holds run {ident['run_id']}, but {path} belongs to run "
                                  f"{main['run_id']}; nothing was written. Resume it in its own directory or a "
                                  "new one (another name=...)")
            if ident is None and (all_ckpts or results):
                refuse_leftovers(run_dir, f"no {RUN_FILE}, so it cannot tell which run these belong to", None,
                                 all_ckpts, results, "Resume into an empty directory.")
        main = loaded.main
        # This run's checkpoints past the one resumed from are off the new timeline (skipped as
        # unusable, or abandoned by resuming from an older file): set aside once the checks pass,
        # so that neither a later resume=auto nor pruning mistakes them for the newest.
        own_now, _ = ckpt.split_by_run(self.ckpt_dir, main["run_id"])
        later = [p for s, p in own_now if s > main["step"]]
        changes = classify(main["config"], cfg)
        refuse_changes(run_dir, main["run_id"], main["step"], changes, cfg.train.allow_config_change)
        dataset = dataset_change(run_dir, main, build_id, cfg.train.allow_dataset_change)
        step = int(main["step"])
        shown = str(path if mode != "auto" else ckpt.main_path(self.ckpt_dir, step))
        return StartPlan(loaded, main["run_id"], str(path), shown, step, changes, ident is None, main["config"],
                         later, dataset)

    def record(self, plan: StartPlan, run_id: str, cfg: Config) -> None:
        """Rank 0, after :meth:`plan` accepted: the run's files say what this run is."""
        run_dir = self.path
        run_dir.mkdir(parents=True, exist_ok=True)
        gone = ckpt.clean_orphans(self.ckpt_dir)  # temp files of writers killed mid-save (the lock is ours)
        if gone:
            self.log(f"[checkpoint] removed {len(gone)} unfinished temp file(s) of killed writers: {', '.join(gone)}")
        if plan.fresh:
            write_identity(run_dir, run_id, config_to_dict(cfg))
            append_history(run_dir, "start", run_id, step=0)
        else:
            if plan.adopted:  # resumed from a checkpoint file into an empty directory
                write_identity(run_dir, run_id, plan.config, adopted_from=plan.path)
            if plan.later:
                ckpt.set_aside(self.ckpt_dir, plan.later, "set-aside")
                self.log(f"[checkpoint] moved checkpoint(s) of run {run_id} past step {plan.step} (unusable, "
                         f"or abandoned by this resume) to {self.ckpt_dir / 'set-aside'}: "
                         + ", ".join(p.name for p in plan.later))
            append_history(run_dir, "resume", run_id, step=plan.step, checkpoint=plan.path,
                           changed=[c.as_json() for c in plan.changes if c.kind == "free"],
                           set_aside=[p.name for p in plan.later])
            guarded = [c for c in plan.changes if c.kind == "guarded"]
            if guarded:
                append_history(run_dir, "config_change", run_id, step=plan.step,
                               changes=[c.as_json() for c in guarded])
                self.log(f"[config] run {run_id} continues at step {plan.step} with "
                         + "; ".join(c.describe() for c in guarded) + " (train.allow_config_change=true; "
                         f"recorded in {run_dir / HISTORY_FILE})")
            if plan.dataset_change:
                append_history(run_dir, "dataset_change", run_id, step=plan.step, **plan.dataset_change)
                self.log(f"[data] run {run_id} continues at step {plan.step} on a rebuilt dataset: build_id "
                         f"{plan.dataset_change['from']} -> {plan.dataset_change['to']} (train.allow_dataset_change)")
        dump_config(cfg, run_dir / "config.yaml")


# ---------------------------------------------------------------------------- the run's lock
class RunDirLocked(RunDirError):
    """Another live training holds the run directory's lock."""


def _slurm_incarnation() -> dict[str, str]:
    job = os.environ.get("SLURM_JOB_ID")
    return {"slurm_job_id": job, "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0")} if job else {}


class RunLock(PidLock):
    """``out_dir/.<name>.lock``, held by rank 0 of a training for its whole run: a second training
    of the same run directory stops before writing anything, naming the holder (pid, host). It
    lies beside the run directory, so that a refused start leaves the directory itself untouched.
    A lock whose pid is not alive on this host (a killed run), or one of an earlier run of the same
    SLURM job (requeued after a kill, maybe on another node), is taken over, with a warning."""

    tool = "bmb-train"
    error = RunDirLocked

    def __init__(self, run_dir: Path) -> None:
        run_dir = Path(run_dir)
        super().__init__(run_dir.parent / f".{run_dir.name}.lock")
        self.run_dir = run_dir

    def _record(self) -> dict[str, Any]:
        return {**super()._record(), **_slurm_incarnation()}

    def superseded(self, info: dict[str, Any]) -> bool:
        """A lock of an earlier run of this same SLURM job (requeued, maybe on another node, after
        its process was killed): SLURM never runs two at once, so that holder is dead."""
        now = _slurm_incarnation()
        return bool(now) and info.get("slurm_job_id") == now["slurm_job_id"] and (
            info.get("slurm_restart_count") != now["slurm_restart_count"])

    def held_message(self, who: str, other_host: bool) -> str:
        hint = ("if that training is dead, delete the lock file" if other_host else
                "wait for it to finish, or train elsewhere (another name=... or train.out_dir=...)")
        return (f"run dir {self.run_dir} is in use by another training ({who}; lock file {self.path}). "
                f"Nothing was written; {hint}")

    def unreadable_message(self) -> str:
        return (f"run dir {self.run_dir}: its lock file {self.path} is unreadable; another training may be "
                "starting. If none is running on this run directory, delete that file and re-run")

    def stale_message(self, who: str) -> str:
        return (f"WARNING: taking over the stale lock {self.path} of run dir {self.run_dir} ({who}): that "
                "process is not running on this host (killed?); the run resumes from its last checkpoint")


def check_run_dir(run_dir: Path) -> None:
    """Reading only (call it holding the lock, before anything is written): raise
    :class:`RunDirError` if an entry the run writes is a symbolic link (``final.json``,
    ``checkpoints/`` ..., or anything under those folders), or if a JSONL log is corrupt other
    than in its last line (a truncated last line is dropped when the run starts)."""
    run_dir = Path(run_dir)
    links = [run_dir / n for n in RUN_ENTRIES if (run_dir / n).is_symlink()]
    for folder in ("checkpoints", "export", "tb"):
        if (run_dir / folder).is_dir() and not (run_dir / folder).is_symlink():
            links += [p for p in sorted((run_dir / folder).rglob("*")) if p.is_symlink()]
    if links:
        raise RunDirError(f"run dir {run_dir}: {', '.join(map(str, links[:6]))} "
                          f"{'is a symbolic link' if len(links) == 1 else 'are symbolic links'}; the trainer "
                          "neither writes nor reads through links in its run directory (a write would land "
                          "wherever it points). Nothing was written; remove the link(s), or use another name=...")
    for name in LOG_FILES:
        if (run_dir / name).is_file():
            try:
                read_jsonl(run_dir / name)
            except LogFileError as e:
                raise RunDirError(f"run dir {run_dir}: {e}") from None


def claim(run_dir: Path, coll: Any, main: bool) -> RunLock | None:
    """Before a training touches ``run_dir``: rank 0 (``main``) takes its :class:`RunLock` and runs
    :func:`check_run_dir`; every rank raises :class:`RunDirError` if that failed (the lock is then
    not held). Returns the held lock on rank 0 (release it when the run ends), None elsewhere."""
    lock, err = None, None
    if main:
        Path(run_dir).parent.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir)
        try:
            lock.acquire()
            check_run_dir(run_dir)
        except RunDirError as e:
            lock.release()
            err = e
    if coll.any_true(err is not None):
        raise err if err is not None else RunDirError(f"run dir {run_dir}: refused by rank 0 (see its message)")
    return lock
