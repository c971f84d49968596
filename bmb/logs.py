"""The run's logs: ``train.jsonl``, ``metrics.jsonl`` and the experiment trackers.

The JSONL files are always written (``launch/report`` reads them). The same scalars also go to
the trackers of ``train.trackers`` through Accelerate (``Accelerator(log_with=...)``,
``init_trackers``, ``log``; ``end_training``, called by ``launch/train.py``, closes them):

=============== ==============================================================================
tensorboard     the run directory's ``tb/`` (the default)
wandb           project ``bmb``, run name = ``name``, files under the run directory's ``wandb/``
mlflow          experiment ``bmb``, run name = ``name``; where: ``MLFLOW_TRACKING_URI`` (mlflow's
                default: ``./mlruns``)
aim             the repository ``train.out_dir/.aim`` (shared by the runs there), run name = ``name``
=============== ==============================================================================

Training scalars are logged as ``train/<key>``, evaluation numbers as ``eval/<key>``, at the step
they belong to; the config is stored with each tracker as flat ``section.key`` hyperparameters.

Only rank 0 writes (the other ranks' :class:`RunLogs` do nothing). After a resume,
:meth:`RunLogs.start` cuts both JSONL files back to the checkpoint's step: the steps after it are
redone, and logged again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bmb.config import TRACKERS, Config, ConfigError, config_to_dict, flatten

PROJECT = "bmb"  # the trackers' project / experiment name


class LogFileError(ValueError):
    """A JSONL file of the run directory with a line that is not a JSON object (not a truncated
    last line: that one is dropped); the message names the file and the line number."""


def read_jsonl(path: str | Path) -> tuple[list[dict[str, Any]], bytes]:
    """The rows of a JSONL file, and its truncated tail (``b""`` when it ends with a newline).

    A last line without its newline is what a kill (or a full disk) in the middle of an append
    leaves: it is returned as the tail, not parsed as a row -- unless it is a complete JSON
    object that only lost its newline. Any other line that is not a JSON object raises
    :class:`LogFileError` naming ``path`` and the line number.
    """
    path = Path(path)
    data = path.read_bytes()
    body, _, tail = data.rpartition(b"\n") if not data.endswith(b"\n") else (data, b"", b"")
    rows = []
    for no, line in enumerate(body.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            row = e
        if not isinstance(row, dict):
            why = row if isinstance(row, ValueError) else f"a JSON {type(row).__name__}, not an object"
            raise LogFileError(f"{path}:{no}: not a JSON object ({why}); the file is corrupt in the middle "
                               "(not a truncated last line): repair or delete that line and re-run") from None
        rows.append(row)
    if tail.strip():
        try:
            row = json.loads(tail)
        except ValueError:
            return rows, tail
        if isinstance(row, dict):
            rows.append(row)
            return rows, b""
    return rows, tail


def repair_tail(path: str | Path) -> None:
    """Make ``path`` end with a complete line before appending to it: a truncated last line is
    cut off (said on stderr); a complete row that only lost its newline gets it back."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    rows, tail = read_jsonl(path)
    with open(path, "rb+") as f:
        f.seek(-1, 2)
        if f.read(1) == b"\n":
            return
        if not tail.strip():  # a whole row without its newline
            f.write(b"\n")
            return
        f.truncate(path.stat().st_size - len(tail))
    print(f"WARNING: {path}: dropped a truncated last line ({len(tail)} bytes: {tail[:60]!r}...), left by "
          "a process killed while appending to it", file=sys.stderr)


def _available(name: str) -> bool:
    from accelerate import utils

    return bool(getattr(utils, f"is_{name}_available")())


def make_trackers(cfg: Config, run_dir: str | Path) -> list[Any]:
    """Accelerate trackers for ``train.trackers`` (for ``Accelerator(log_with=...)``); nothing is
    written until :meth:`RunLogs.start` starts them.

    Raises:
        ConfigError: a tracker whose package is not installed (named, with the pip command).
    """
    from accelerate.tracking import AimTracker, MLflowTracker, TensorBoardTracker, WandBTracker

    missing = [n for n in cfg.train.trackers if not _available(n)]
    if missing:
        raise ConfigError(f"train.trackers: {', '.join(missing)} not installed (or not a version Accelerate "
                          f"supports): pip install {' '.join(missing)}, or leave {' and '.join(missing)} out of "
                          f"train.trackers (now {cfg.train.trackers!r}; any of {', '.join(TRACKERS)}, or [])")
    run_dir = Path(run_dir)
    make = {
        "tensorboard": lambda: TensorBoardTracker("tb", run_dir),
        "wandb": lambda: WandBTracker(PROJECT, name=cfg.name, dir=str(run_dir)),
        "mlflow": lambda: MLflowTracker(PROJECT, run_name=cfg.name),
        "aim": lambda: AimTracker(cfg.name, str(Path(cfg.train.out_dir) / ".aim"), experiment=PROJECT),
    }
    return [make[n]() for n in cfg.train.trackers]


def tracker_config(cfg: Config) -> dict[str, Any]:
    """The config as flat ``section.key`` hyperparameters (lists as text: what every tracker takes)."""
    return {k: str(v) if isinstance(v, (list, tuple)) else v for k, v in flatten(config_to_dict(cfg)).items()}


class RunLogs:
    """Writes one run's scalar logs.

    Args:
        run_dir: the run directory.
        accelerator: its trackers (``log_with``) get the scalars; rank 0 (``is_main_process``)
            writes.
    """

    def __init__(self, run_dir: str | Path, accelerator: Any) -> None:
        self.run_dir, self.acc, self.main = Path(run_dir), accelerator, accelerator.is_main_process

    def start(self, history: list[dict[str, Any]], step: int, cfg: Config) -> None:
        """Make the logs end at ``step`` (``metrics.jsonl`` = ``history``, the evaluations kept in
        the checkpoint) and start the trackers with the config."""
        if not self.main:
            return
        (self.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        train_log = self.run_dir / "train.jsonl"
        if train_log.exists():
            repair_tail(train_log)
            rows, _ = read_jsonl(train_log)
            train_log.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))
        self.acc.init_trackers(PROJECT, tracker_config(cfg))

    def train(self, step: int, values: dict[str, float]) -> None:
        """One ``train.jsonl`` row (smoothed training scalars), also as ``train/<key>`` scalars."""
        if not self.main:
            return
        with open(self.run_dir / "train.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        self.acc.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def metrics(self, row: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` row (an evaluation); its numbers also as ``eval/<key>`` scalars."""
        if not self.main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.acc.log({f"eval/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"},
                     step=row["step"])
