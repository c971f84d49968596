"""Grouping runs and the Markdown tables of the report.

Runs that differ only in the seed (and bookkeeping keys) form a :class:`Group`; every number is
the mean ± sample std over a group's seeds. Layouts: :func:`groups_table` (one row per group,
overall / many / medium / few, as the paper's ImageNet-LT table), :func:`pivot_table` (rows x
columns of one metric, the paper's per-setting layout) and :func:`runs_table` (one row per run).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bmb.config import flatten

from .load import METRICS, Run, get_key

# Keys that do not change what a run computes: runs differing only in these are seeds of one group.
_BOOKKEEPING = {
    "name",
    "train.seed",
    "train.out_dir",
    "train.resume",
    "train.progress",
    "train.threads",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
    "data.workers",
    "data.eval_batch",
}
_SEED_SUFFIX = re.compile(r"[-_.]?(?:s|seed)\d+$")
METRIC_TITLES = {
    "top1": "top-1",
    "mean_recall": "mean recall",
    "many": "many",
    "medium": "medium",
    "few": "few",
}


# ---------------------------------------------------------------------------- grouping
def strip_seed(name: str) -> str:
    """``demo-bmb-s2`` -> ``demo-bmb``; ``x_seed10`` -> ``x``."""
    return _SEED_SUFFIX.sub("", name) or name


@dataclass
class Group:
    """Runs shown as one table row (the seeds of one setting), under ``label``."""

    label: str
    runs: list[Run]

    @property
    def algorithm(self) -> str:
        algs = sorted({r.algorithm for r in self.runs})
        return "/".join(algs)

    def values(self, fn: Any) -> list[float]:
        return [fn(r) for r in self.runs]


def group_runs(runs: list[Run], mode: str = "config") -> list[Group]:
    """Groups in first-seen order.

    ``config``: equal resolved configs apart from the seed and bookkeeping keys (a run without
    ``config.yaml`` falls back to its name); ``name``: equal names once a ``-s<N>``/``_seed<N>``
    suffix is removed; ``run``: every run on its own.
    """
    if mode not in ("config", "name", "run"):
        raise ValueError(f"unknown grouping {mode!r}: use config, name or run")
    keyed: dict[str, list[Run]] = {}
    flats: dict[str, dict[str, Any]] = {}
    for r in runs:
        if mode == "run":
            key = str(r.path)
        elif mode == "name" or not r.config:
            key = "name:" + strip_seed(r.name)
        else:
            flat = {k: v for k, v in flatten(r.config).items() if k not in _BOOKKEEPING}
            # A key only one side has (a config key added between runs) does not split a group.
            key = next(
                (
                    k
                    for k, f in flats.items()
                    if all(f[x] == flat[x] for x in f.keys() & flat.keys())
                ),
                json.dumps(flat, sort_keys=True),
            )
            flats.setdefault(key, flat)
        keyed.setdefault(key, []).append(r)
    groups = []
    for members in keyed.values():
        if mode == "run":
            label = members[0].name
        else:
            label = ", ".join(dict.fromkeys(strip_seed(m.name) for m in members))
        groups.append(Group(label, members))
    # Distinct groups may share a stripped name (same name, different config): disambiguate.
    seen: dict[str, int] = {}
    for g in groups:
        seen[g.label] = seen.get(g.label, 0) + 1
        if seen[g.label] > 1:
            g.label = f"{g.label} ({seen[g.label]})"
    return groups


# ---------------------------------------------------------------------------- numbers
def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1; None for one value) of the non-NaN values."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), None
    return sum(vals) / len(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def fmt(values: list[float], digits: int = 1, scale: float = 100.0) -> str:
    """``"56.2 ± 0.3"`` in percent; ``"—"`` when nothing is known."""
    m, s = mean_std(values)
    if math.isnan(m):
        return "—"
    text = f"{scale * m:.{digits}f}"
    return text if s is None else f"{text} ± {scale * s:.{digits}f}"


def mean_curve(
    runs_xy: list[tuple[list[float], list[float]]],
) -> tuple[list[float], list[float], list[float]]:
    """Mean and std over runs (the seeds of a group) of ``(steps, values)`` curves, at the steps
    every run logged (seeds share their logging steps); std 0.0 where one run is known."""
    if not runs_xy:
        return [], [], []
    common = set(runs_xy[0][0])
    for xs, _ in runs_xy[1:]:
        common &= set(xs)
    steps = sorted(common)
    means, stds = [], []
    for s in steps:
        vals = [ys[xs.index(s)] for xs, ys in runs_xy]
        m, sd = mean_std(vals)
        means.append(m)
        stds.append(sd or 0.0)
    return steps, means, stds


def bank_entropy(counts: list[float]) -> float:
    """Entropy of the bank's class histogram divided by ``log C`` (1 = perfectly balanced)."""
    total = float(sum(counts))
    if total <= 0 or len(counts) < 2:
        return float("nan")
    h = -sum((c / total) * math.log(c / total) for c in counts if c > 0)
    return h / math.log(len(counts))


def run_bank_entropy(run: Run) -> float:
    """Bank entropy averaged over the protocol's evaluations (NaN for runs without a bank)."""
    vals = [
        bank_entropy(r["bank_class_counts"]) for r in run.protocol_rows if "bank_class_counts" in r
    ]
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def base_head_value(run: Run) -> float:
    """Top-1 of the EMA base head beside BMB's evaluated EMA aux head (FixMatch: it *is* the result)."""
    return run.protocol_value("ema_base_top1") if run.algorithm == "bmb" else float("nan")


def non_ema_value(run: Run) -> float:
    """Top-1 of the evaluated head of the non-EMA model (``raw_aux`` for BMB, ``raw_base`` for FixMatch)."""
    return run.protocol_value("raw_aux_top1" if run.algorithm == "bmb" else "raw_base_top1")


# ---------------------------------------------------------------------------- tables
def groups_table(groups: list[Group], digits: int = 1) -> str:
    """One row per group: overall / many / medium / few as in the paper's ImageNet-LT table."""
    has_bank = any(r.algorithm == "bmb" for g in groups for r in g.runs)
    head = (
        [
            "run",
            "algorithm",
            "seeds",
            "top-1",
            "mean recall",
            "many",
            "medium",
            "few",
            "EMA base head",
            "non-EMA",
        ]
        + (["bank entropy"] if has_bank else [])
        + ["steps"]
    )
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|",
    ]
    for g in groups:
        seeds = [r.seed for r in g.runs]
        cells = [
            g.label + ("*" if any(not r.finished for r in g.runs) else ""),
            g.algorithm,
            ", ".join(str(s) for s in seeds) if None not in seeds else str(len(seeds)),
        ]
        cells += [fmt(g.values(lambda r, k=k: r.result[k]), digits) for k in METRICS]
        cells += [fmt(g.values(base_head_value), digits), fmt(g.values(non_ema_value), digits)]
        if has_bank:
            cells.append(fmt(g.values(run_bank_entropy), 2, scale=1.0))
        steps = sorted({r.result.get("steps") for r in g.runs}, key=str)
        cells.append("/".join(str(s) for s in steps))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell_key(run: Run, key: str, label: str) -> str:
    if key == "group":
        return label
    if key == "name":
        return strip_seed(run.name)
    value = get_key(run.config, key)
    if value is None:
        return "—"
    if key == "data.dataset":
        return Path(str(value)).name
    return str(value)


def pivot_table(groups: list[Group], rows: str, cols: str, metric: str, digits: int = 1) -> str:
    """Rows x columns of one metric (the paper's per-setting layout, e.g. algorithm x dataset)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    cells: dict[tuple[str, str], list[Run]] = {}
    row_keys: list[str] = []
    col_keys: list[str] = []
    for g in groups:
        for r in g.runs:
            rk, ck = _cell_key(r, rows, g.label), _cell_key(r, cols, g.label)
            row_keys.append(rk)
            col_keys.append(ck)
            cells.setdefault((rk, ck), []).append(r)
    row_keys, col_keys = list(dict.fromkeys(row_keys)), list(dict.fromkeys(col_keys))
    head = [f"{rows} \\ {cols}"] + col_keys
    lines = ["| " + " | ".join(head) + " |", "|---|" + "|".join(["---:"] * len(col_keys)) + "|"]
    for rk in row_keys:
        vals = [fmt([r.result[metric] for r in cells.get((rk, ck), [])], digits) for ck in col_keys]
        lines.append("| " + " | ".join([rk] + vals) + " |")
    return "\n".join(lines)


def runs_table(runs: list[Run], digits: int = 1) -> str:
    lines = [
        "| run | algorithm | seed | top-1 | mean recall | many | medium | few | steps | seconds | protocol |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        vals = [fmt([r.result[k]], digits) for k in METRICS]
        secs = r.result.get("seconds")
        lines.append(
            "| "
            + " | ".join(
                [
                    r.name + ("" if r.finished else "*"),
                    r.algorithm,
                    str(r.seed),
                    *vals,
                    str(r.result.get("steps", "—")),
                    f"{secs:.0f}" if isinstance(secs, (int, float)) else "—",
                    str(r.result.get("protocol", "—")),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def footer(runs: list[Run]) -> str:
    protocols = sorted({re.sub(r"\(.*\)", "(…)", str(r.result.get("protocol", "?"))) for r in runs})
    shots = sorted(
        {(r.result.get("many_above"), r.result.get("few_at_most")) for r in runs}, key=str
    )
    shot_txt = "; ".join(f"many > {a}, few ≤ {b} labeled" for a, b in shots if a is not None)
    notes = [
        f"Values in %, mean ± sample std (ddof 1) over the seeds of each group; protocol: "
        f"{'; '.join(protocols)}."
    ]
    if shot_txt:
        notes.append(f"Shot groups by labeled count: {shot_txt}.")
    notes.append(
        "Results are the EMA model's evaluated head (BMB: aux head; FixMatch: base head). EMA base head: "
        "top-1 of BMB's EMA base head; non-EMA: top-1 of the evaluated head without EMA; both under the "
        "same protocol. Bank entropy: entropy of the bank's class histogram / log C (1 = balanced)."
    )
    if any(not r.finished for r in runs):
        notes.append(
            "\\* still running (no final.json): protocol applied to the evaluations so far."
        )
    return "\n".join(notes)
