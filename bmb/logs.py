"""The run's logs: ``train.jsonl``, ``metrics.jsonl`` and TensorBoard scalars (``tb/``).

Only rank 0 writes (the other ranks' :class:`RunLogs` do nothing). After a resume,
:meth:`RunLogs.start` cuts both JSONL files back to the checkpoint's step: the steps after it are
redone, and logged again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class RunLogs:
    """Writes one run's scalar logs.

    Args:
        run_dir: the run directory.
        main: whether this is the process that writes (rank 0).
        log: where warnings go.
    """

    def __init__(self, run_dir: str | Path, main: bool, log: Any = print) -> None:
        self.run_dir, self.main, self.log = Path(run_dir), main, log
        self.tb = None

    def start(self, history: list[dict[str, Any]], step: int) -> None:
        """Make the logs end at ``step`` (``metrics.jsonl`` = ``history``, the evaluations kept in
        the checkpoint) and open the TensorBoard writer."""
        if not self.main:
            return
        (self.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        train_log = self.run_dir / "train.jsonl"
        if train_log.exists():
            rows = [json.loads(line) for line in train_log.read_text().splitlines() if line.strip()]
            train_log.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"))
        except ImportError:
            self.log("[warn] tensorboard is not installed: no TensorBoard scalars")

    def train(self, step: int, values: dict[str, float]) -> None:
        """One ``train.jsonl`` row (smoothed training scalars), also as ``train/<key>`` scalars."""
        if not self.main:
            return
        with open(self.run_dir / "train.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, step)

    def metrics(self, row: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` row (an evaluation); its numbers also as ``eval/<key>`` scalars."""
        if not self.main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step",):
                    self.tb.add_scalar(f"eval/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
