"""Reading run directories back: ``config.yaml``, ``final.json``, ``metrics.jsonl``, ``train.jsonl``.

A run directory is what ``bmb/engine.py`` writes. :func:`find_runs` finds them, :func:`load_run`
reads one into a :class:`Run`; a run still going (no ``final.json``) gets its evaluation protocol
applied to the evaluations logged so far.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The keys every final.json holds (with per_class_recall), and the metrics the tables report.
METRICS = ("top1", "mean_recall", "many", "medium", "few")


@dataclass
class Run:
    """One run directory, read back.

    Attributes:
        path: the run directory.
        config: the resolved config as a nested dict (``{}`` if ``config.yaml`` is missing).
        result: ``final.json``, or (run still going) the protocol applied to ``metrics.jsonl``.
        metrics: one dict per evaluation.
        train: smoothed training scalars, one dict per ``log_every`` steps.
        finished: whether ``final.json`` exists.
    """

    path: Path
    config: dict[str, Any]
    result: dict[str, Any]
    metrics: list[dict[str, Any]]
    train: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = True

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.result.get("name") or self.path.name)

    @property
    def algorithm(self) -> str:
        return str(self.result.get("algorithm") or get_key(self.config, "method.algorithm") or "?")

    @property
    def seed(self) -> Any:
        return get_key(self.config, "train.seed")

    @property
    def protocol_rows(self) -> list[dict[str, Any]]:
        """The evaluations the protocol used (last 20, or the best-val one)."""
        steps = set(self.result.get("evaluations") or [])
        return [r for r in self.metrics if r.get("step") in steps] or self.metrics[-1:]

    def protocol_value(self, key: str) -> float:
        """``key`` of the metrics rows under the run's protocol (mean over its evaluations)."""
        vals = [r[key] for r in self.protocol_rows if isinstance(r.get(key), (int, float))]
        vals = [v for v in vals if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else float("nan")


def get_key(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n"):
                break  # a line the running trainer is writing right now
            raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
    return rows


def is_run_dir(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() or (path / "final.json").is_file()


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories among ``paths``: each one itself, or its immediate sub-folders that are runs."""
    found: list[Path] = []
    for p in paths:
        if not p.is_dir():
            raise ValueError(f"{p}: no such directory")
        if is_run_dir(p):
            found.append(p)
            continue
        subs = sorted(s for s in p.iterdir() if s.is_dir() and is_run_dir(s))
        if not subs:
            raise ValueError(
                f"{p}: not a run directory (no metrics.jsonl or final.json) and holds none"
            )
        found += subs
    return list(dict.fromkeys(found))


def load_run(path: Path) -> Run:
    """Read one run directory; a run without ``final.json`` gets its protocol result computed."""
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        try:
            config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path / 'config.yaml'}: not valid YAML ({e})") from None
    metrics = _read_jsonl(path / "metrics.jsonl")
    train = _read_jsonl(path / "train.jsonl")
    final_path = path / "final.json"
    if final_path.is_file():
        try:
            result = json.loads(final_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{final_path}: not valid JSON ({e})") from None
        missing = [k for k in METRICS + ("per_class_recall",) if k not in result]
        if missing:
            raise ValueError(f"{final_path}: missing {', '.join(missing)}")
        return Run(path, config, result, metrics, train, finished=True)
    if not metrics:
        raise ValueError(f"{path}: no evaluations yet (metrics.jsonl is empty)")
    from bmb.protocols import select_result

    protocol = get_key(config, "train.eval_protocol") or "last20"
    result = select_result(metrics, protocol, val_split=get_key(config, "data.val_split"))
    result.update(
        {
            "steps": metrics[-1]["step"],
            "name": config.get("name", path.name),
            "algorithm": get_key(config, "method.algorithm"),
        }
    )
    return Run(path, config, result, metrics, train, finished=False)
