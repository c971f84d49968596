"""Reading run directories back: ``config.yaml``, ``final.json``, ``metrics.jsonl``, ``train.jsonl``.

A run directory is what ``bmb/trainer.py`` writes. :func:`find_runs` finds them, :func:`load_run`
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


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type(v: Any) -> str:
    return f"{type(v).__name__} {json.dumps(v)[:40]}"


# Keys of a metrics row that hold a number (a split's keys too: "val_top1" ...), and those that
# hold one number per class.
_NUMERIC = ("step", "epoch", "seconds", *METRICS)
_NUMERIC_SUFFIXES = tuple(f"_{k}" for k in METRICS)
_PER_CLASS_SUFFIXES = ("per_class_recall", "_class_counts", "nhat", "labeled_counts")


def _check_row(row: Any, where: str, numbers_only: bool) -> dict[str, Any]:
    """``row`` of ``metrics.jsonl`` / ``train.jsonl`` (``numbers_only``: every value a number),
    checked: a JSON object, an integer ``step``, numbers where the report reads numbers.

    Raises:
        ValueError: naming ``where`` (file:line) and the key.
    """
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {_type(row)}")
    if not _is_int(row.get("step")):
        raise ValueError(f"{where}: 'step' must be an integer, got {_type(row.get('step'))}")
    for k, v in row.items():
        if isinstance(v, list):
            if k.endswith(_PER_CLASS_SUFFIXES) and not all(_is_number(x) for x in v):
                raise ValueError(f"{where}: {k!r} must be a list of numbers (one per class), got {_type(v)}")
        elif (numbers_only or k in _NUMERIC or k.endswith(_NUMERIC_SUFFIXES)) and not (v is None or _is_number(v)):
            raise ValueError(f"{where}: {k!r} must be a number, got {_type(v)}")
    return row


def _read_jsonl(path: Path, numbers_only: bool = False) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n"):
                break  # a line the running trainer is writing right now
            raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
        rows.append(_check_row(row, f"{path}:{i}", numbers_only))
    return rows


def _check_config(config: Any, path: Path) -> dict[str, Any]:
    """``config.yaml`` as the report reads it: a mapping of sections (mappings), a string name."""
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: must be a mapping of config sections, got {type(config).__name__}")
    if not isinstance(config.get("name", ""), (str, type(None))):
        raise ValueError(f"{path}: key 'name' must be a string, got {_type(config['name'])}")
    for section in ("model", "method", "data", "train"):
        if not isinstance(config.get(section, {}), (dict, type(None))):
            raise ValueError(f"{path}: key {section!r} must be a mapping, got {_type(config[section])}")
    return config


def _check_final(result: Any, path: Path) -> dict[str, Any]:
    """``final.json``: an object with the metrics as numbers and per-class lists of one length."""
    if not isinstance(result, dict):
        raise ValueError(f"{path}: must be a JSON object, got {_type(result)}")
    missing = [k for k in METRICS + ("per_class_recall",) if k not in result]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    for k in (*METRICS, "steps", "seconds"):
        if k in result and not (result[k] is None or _is_number(result[k])):
            raise ValueError(f"{path}: {k!r} must be a number, got {_type(result[k])}")
    for k in ("per_class_recall", "labeled_counts", "class_names", "evaluations"):
        v = result.get(k)
        ok = _is_int if k in ("labeled_counts", "evaluations") else (
            (lambda x: isinstance(x, str)) if k == "class_names" else _is_number)
        if v is not None and not (isinstance(v, list) and all(ok(x) for x in v)):
            kind = "strings" if k == "class_names" else "integers" if ok is _is_int else "numbers"
            raise ValueError(f"{path}: {k!r} must be a list of {kind}, got {_type(v)}")
    _check_lengths({k: result[k] for k in ("per_class_recall", "labeled_counts", "class_names") if result.get(k)},
                   str(path))
    return result


def _check_lengths(lists: dict[str, list], where: str, classes: int | None = None) -> None:
    """Every per-class list in ``lists`` has ``classes`` entries (default: the first list's)."""
    if not lists:
        return
    n = len(next(iter(lists.values()))) if classes is None else classes
    bad = {k: len(v) for k, v in lists.items() if len(v) != n}
    if bad:
        raise ValueError(f"{where}: per-class lists of unequal length ({n} classes; "
                         + ", ".join(f"{k} has {m}" for k, m in bad.items()) + ")")


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
            config = _check_config(yaml.safe_load((path / "config.yaml").read_text()), path / "config.yaml")
        except yaml.YAMLError as e:
            raise ValueError(f"{path / 'config.yaml'}: not valid YAML ({e})") from None
    metrics = _read_jsonl(path / "metrics.jsonl")
    train = _read_jsonl(path / "train.jsonl", numbers_only=True)
    final_path = path / "final.json"
    result = None
    if final_path.is_file():
        try:
            result = _check_final(json.loads(final_path.read_text()), final_path)
        except json.JSONDecodeError as e:
            raise ValueError(f"{final_path}: not valid JSON ({e})") from None
    classes = len(result["per_class_recall"]) if result else None
    for i, row in enumerate(metrics):
        lists = {k: v for k, v in row.items() if isinstance(v, list) and k.endswith(_PER_CLASS_SUFFIXES)}
        _check_lengths(lists, f"{path / 'metrics.jsonl'}: row {i + 1} (step {row['step']})", classes)
        classes = classes if classes is not None or not lists else len(next(iter(lists.values())))
    if result is not None:
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
