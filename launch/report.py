"""Paper-style tables and plots from run directories.

    python -m launch.report RUN_DIR [RUN_DIR ...] [--out DIR] [--group config|name|run]
                            [--layout groups|pivot --rows KEY --cols KEY --metric top1]

A RUN_DIR is a training run's directory (``metrics.jsonl``, ``train.jsonl``, ``final.json``,
``config.yaml``; see ``bmb/engine.py``) or a folder holding several. Runs are grouped (by default:
runs whose resolved configs differ only in the seed and bookkeeping keys) and every number is the
run's result under its evaluation protocol, reported as mean ± sample std over the group's seeds.

Writes ``DIR/report.md`` (also printed) and PNGs:

- ``recall_vs_class_size.png``: per-class recall against the labeled class size (paper Fig. 1b);
- ``bank_histogram.png``: the memory bank's class histogram at the end and over training (Fig. 6);
- ``bank_entropy.png``: normalised entropy of the bank's class histogram over training (Fig. 5/6);
- ``get_histogram.png``: classes of the items drawn from the bank, cumulative (Fig. 7);
- ``curves.png``: training loss, test top-1, mean recall and pseudo-label mask rate.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
METRICS = ("top1", "mean_recall", "many", "medium", "few")
METRIC_TITLES = {
    "top1": "top-1",
    "mean_recall": "mean recall",
    "many": "many",
    "medium": "medium",
    "few": "few",
}
DPI = 100
# Figure sizes in inches; pixel size = inches x DPI (rows: one per group shown).
CURVES_SIZE = (11.0, 8.0)
RECALL_SIZE = (10.0, 6.5)
ENTROPY_SIZE = (7.0, 4.5)


def bank_hist_size(n_rows: int) -> tuple[float, float]:
    return (11.0, 2.6 * n_rows + 0.8)


def get_hist_size(n_rows: int) -> tuple[float, float]:
    return (8.0, 2.4 * n_rows + 0.8)


# ---------------------------------------------------------------------------- loading
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


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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


# ---------------------------------------------------------------------------- grouping
def strip_seed(name: str) -> str:
    """``demo-bmb-s2`` -> ``demo-bmb``; ``x_seed10`` -> ``x``."""
    return _SEED_SUFFIX.sub("", name) or name


@dataclass
class Group:
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
            flat = {k: v for k, v in _flatten(r.config).items() if k not in _BOOKKEEPING}
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


def _footer(runs: list[Run]) -> str:
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


# ---------------------------------------------------------------------------- plots
def _figure(size: tuple[float, float]) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    return Figure(figsize=size, dpi=DPI, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _class_order(counts: list[int]) -> list[int]:
    """Class indices from the most to the least labeled (stable: ties keep class order)."""
    return sorted(range(len(counts)), key=lambda k: -counts[k])


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _mean_curve(
    runs_xy: list[tuple[list[float], list[float]]],
) -> tuple[list[float], list[float], list[float]]:
    """Mean and std over runs at the steps every run logged (seeds share their logging steps)."""
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


def plot_curves(groups: list[Group], path: Path) -> Path:
    """2 x 2: training loss, test top-1, test mean recall, mask rate (mean ± std band over seeds)."""
    fig = _figure(CURVES_SIZE)
    axes = fig.subplots(2, 2)
    panels = [
        (axes[0, 0], "train", "loss", "training loss (smoothed)"),
        (axes[0, 1], "metrics", "top1", "test top-1 (evaluated head)"),
        (axes[1, 0], "metrics", "mean_recall", "test mean recall"),
        (axes[1, 1], "train", "mask", "unlabeled mask rate (passes τ)"),
    ]
    for ax, source, key, title in panels:
        for i, g in enumerate(groups):
            xy = []
            for r in g.runs:
                rows = r.train if source == "train" else r.metrics
                k = key if key != "mask" else ("mask_aux" if r.algorithm == "bmb" else "mask_base")
                xs, ys = _series(rows, k)
                if xs:
                    xy.append((xs, ys))
            steps, mean, std = _mean_curve(xy)
            if not steps:
                continue
            scale = 1.0 if source == "train" and key == "loss" else 100.0
            m = [scale * v for v in mean]
            ax.plot(
                steps,
                m,
                color=f"C{i}",
                label=f"{g.label} ({len(xy)})",
                marker="o" if len(steps) < 30 else None,
                markersize=3,
            )
            ax.fill_between(
                steps,
                [a - scale * s for a, s in zip(m, std)],
                [a + scale * s for a, s in zip(m, std)],
                color=f"C{i}",
                alpha=0.2,
                linewidth=0,
            )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss" if key == "loss" else "%")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, title="group (seeds)", title_fontsize=8)
    return _save(fig, path)


def plot_recall_vs_size(groups: list[Group], path: Path) -> Path | None:
    """Per-class recall (protocol result) against labeled class size, classes sorted by size."""
    ref = next((r for g in groups for r in g.runs if r.result.get("labeled_counts")), None)
    if ref is None:
        return None
    counts = list(ref.result["labeled_counts"])
    order = _class_order(counts)
    names = ref.result.get("class_names") or [str(k) for k in range(len(counts))]
    fig = _figure(RECALL_SIZE)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1, 2])
    x = list(range(len(counts)))
    top.bar(x, [counts[k] for k in order], color="0.55")
    top.set_yscale("log")
    top.set_ylabel("labeled images")
    top.set_title("per-class recall against class size (classes sorted by labeled count)")
    for i, g in enumerate(groups):
        per_run = [
            r.result["per_class_recall"]
            for r in g.runs
            if list(r.result.get("labeled_counts") or []) == counts
        ]
        if not per_run:
            continue
        for rec in per_run:  # each run (seed) as faint points
            bottom.scatter(
                x, [100 * rec[k] for k in order], color=f"C{i}", alpha=0.35, s=10, linewidths=0
            )
        mean = [mean_std([rec[k] for rec in per_run])[0] for k in order]
        bottom.plot(
            x,
            [100 * v for v in mean],
            color=f"C{i}",
            marker="o",
            markersize=3,
            label=f"{g.label}: mean recall {100 * mean_std([r.result['mean_recall'] for r in g.runs])[0]:.1f}",
        )
    bottom.set_ylabel("recall (%)")
    bottom.set_ylim(-3, 103)
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=8)
    if len(counts) <= 30:
        bottom.set_xticks(x, [f"{names[k]}\n{counts[k]}" for k in order], fontsize=7)
    else:
        bottom.set_xlabel("class rank by labeled count")
    return _save(fig, path)


def _bank_groups(groups: list[Group]) -> list[tuple[int, Group]]:
    return [
        (i, g)
        for i, g in enumerate(groups)
        if any(r.metrics and "bank_class_counts" in r.metrics[-1] for r in g.runs)
    ]


def plot_bank_histogram(groups: list[Group], path: Path) -> Path | None:
    """Per BMB group: final bank class histogram (bars) and class shares over training (heatmap)."""
    bank = _bank_groups(groups)
    if not bank:
        return None
    fig = _figure(bank_hist_size(len(bank)))
    axes = fig.subplots(len(bank), 2, squeeze=False, width_ratios=[1, 1.4])
    for row, (i, g) in enumerate(bank):
        runs = [r for r in g.runs if r.metrics and "bank_class_counts" in r.metrics[-1]]
        c = len(runs[0].metrics[-1]["bank_class_counts"])
        counts = list(runs[0].result.get("labeled_counts") or [0] * c)
        order = _class_order(counts) if len(counts) == c else list(range(c))
        final = [mean_std([r.metrics[-1]["bank_class_counts"][k] for r in runs])[0] for k in order]
        ax = axes[row, 0]
        ax.bar(range(c), final, color=f"C{i}")
        size = sum(final)
        ax.axhline(size / c, color="k", linestyle="--", linewidth=1, label="balanced")
        ax.set_title(
            f"{g.label}: bank at step {runs[0].metrics[-1]['step']}, mean of {len(runs)} runs "
            f"(H/log C = {bank_entropy(final):.2f})",
            fontsize=9,
        )
        ax.set_xlabel("class (most to least labeled)")
        ax.set_ylabel("items in bank")
        ax.legend(fontsize=7)
        # Heatmap of class shares over the evaluations of the first run (seeds look alike).
        rows = [m for m in runs[0].metrics if "bank_class_counts" in m]
        grid = []
        for k in order:
            grid.append(
                [m["bank_class_counts"][k] / max(sum(m["bank_class_counts"]), 1) for m in rows]
            )
        ax = axes[row, 1]
        steps = [m["step"] for m in rows]
        # Each column centred on its evaluation step (evaluations are evenly spaced).
        half = (steps[-1] - steps[0]) / max(len(steps) - 1, 1) / 2 or 0.5
        im = ax.imshow(
            grid,
            aspect="auto",
            origin="upper",
            cmap="viridis",
            vmin=0.0,
            extent=(steps[0] - half, steps[-1] + half, c - 0.5, -0.5),
            interpolation="nearest",
        )
        ax.set_title(f"class share over training ({runs[0].name})", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("class (most to least labeled)")
        fig.colorbar(im, ax=ax, label="share of bank")
    return _save(fig, path)


def plot_bank_entropy(groups: list[Group], path: Path) -> Path | None:
    """Normalised entropy of the bank's class histogram over training, per group (mean over seeds)."""
    bank = _bank_groups(groups)
    if not bank:
        return None
    fig = _figure(ENTROPY_SIZE)
    ax = fig.subplots()
    for i, g in bank:
        xy = []
        for r in g.runs:
            rows = [m for m in r.metrics if "bank_class_counts" in m]
            pts = [(m["step"], bank_entropy(m["bank_class_counts"])) for m in rows]
            pts = [(s, h) for s, h in pts if not math.isnan(h)]
            if pts:
                xy.append(([s for s, _ in pts], [h for _, h in pts]))
        steps, mean, std = _mean_curve(xy)
        if steps:
            ax.plot(steps, mean, color=f"C{i}", marker="o", markersize=3, label=g.label)
            ax.fill_between(
                steps,
                [m - s for m, s in zip(mean, std)],
                [m + s for m, s in zip(mean, std)],
                color=f"C{i}",
                alpha=0.2,
                linewidth=0,
            )
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("entropy / log C")
    ax.set_title("memory bank class balance (1 = balanced)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _shares(rows: list[dict[str, Any]], key: str, order: list[int]) -> list[float]:
    """Per-class share of ``row[key]`` (classes in ``order``), averaged over rows (one per run)."""
    per_run = []
    for m in rows:
        v = m.get(key) or [0] * len(order)
        tot = float(sum(v)) or 1.0
        per_run.append([v[k] / tot for k in order])
    return [mean_std([p[j] for p in per_run])[0] for j in range(len(order))]


def plot_get_histogram(groups: list[Group], path: Path) -> Path | None:
    """Per BMB group: share of each class among the items drawn from the bank (cumulative), with
    the bank's own class share and the unlabeled estimate N-hat for comparison (paper Fig. 7)."""
    bank = [
        (i, g)
        for i, g in _bank_groups(groups)
        if any(r.metrics and "get_class_counts" in r.metrics[-1] for r in g.runs)
    ]
    if not bank:
        return None
    fig = _figure(get_hist_size(len(bank)))
    axes = fig.subplots(len(bank), 1, squeeze=False)
    for row, (i, g) in enumerate(bank):
        runs = [r for r in g.runs if r.metrics and "get_class_counts" in r.metrics[-1]]
        last = [r.metrics[-1] for r in runs]
        c = len(last[0]["get_class_counts"])
        counts = list(runs[0].result.get("labeled_counts") or [0] * c)
        order = _class_order(counts) if len(counts) == c else list(range(c))

        ax = axes[row, 0]
        ax.bar(
            range(c),
            _shares(last, "get_class_counts", order),
            color=f"C{i}",
            label="drawn from bank (cumulative)",
        )
        ax.plot(
            range(c),
            _shares(last, "bank_class_counts", order),
            color="k",
            marker="o",
            markersize=3,
            label="bank at the end",
        )
        ax.plot(
            range(c),
            _shares(last, "nhat", order),
            color="0.5",
            linestyle="--",
            marker="x",
            markersize=4,
            label="N̂ (unlabeled estimate)",
        )
        total = sum(sum(m["get_class_counts"]) for m in last) / len(last)
        ax.set_title(f"{g.label}: classes of {total:.0f} drawn items per run", fontsize=9)
        ax.set_xlabel("class (most to least labeled)")
        ax.set_ylabel("share")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)


# ---------------------------------------------------------------------------- the report
def build_report(
    run_dirs: list[Path],
    out: Path,
    group: str = "config",
    layout: str = "groups",
    rows: str = "method.algorithm",
    cols: str = "data.dataset",
    metric: str = "top1",
    digits: int = 1,
    plots: bool = True,
) -> tuple[str, list[Path]]:
    """Write ``out/report.md`` and the PNGs; returns the Markdown and the files written.

    Raises:
        ValueError: a path is not a run directory, or a run's files do not parse (names the file).
    """
    runs = [load_run(p) for p in find_runs(run_dirs)]
    groups = group_runs(runs, group)
    out.mkdir(parents=True, exist_ok=True)
    parts = ["# Report", "", f"{len(runs)} runs in {len(groups)} groups.", ""]
    if layout == "pivot":
        parts += [
            f"## {METRIC_TITLES.get(metric, metric)} by {rows} and {cols}",
            "",
            pivot_table(groups, rows, cols, metric, digits),
            "",
        ]
    elif layout == "groups":
        parts += ["## Results", "", groups_table(groups, digits), ""]
    else:
        raise ValueError(f"unknown layout {layout!r}: use groups or pivot")
    parts += [_footer(runs), "", "## Runs", "", runs_table(runs, digits), ""]
    written: list[Path] = []
    if plots:
        for fn, name in (
            (plot_recall_vs_size, "recall_vs_class_size.png"),
            (plot_bank_histogram, "bank_histogram.png"),
            (plot_bank_entropy, "bank_entropy.png"),
            (plot_get_histogram, "get_histogram.png"),
            (plot_curves, "curves.png"),
        ):
            p = fn(groups, out / name)
            if p is not None:
                written.append(p)
        if written:
            parts += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in written] + [""]
    text = "\n".join(parts)
    md = out / "report.md"
    md.write_text(text)
    return text, [md, *written]


def _default_out(run_dirs: list[Path]) -> Path:
    parents = {p.resolve() if not is_run_dir(p) else p.resolve().parent for p in run_dirs}
    return (parents.pop() / "report") if len(parents) == 1 else Path("report")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m launch.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories, or folders of them"
    )
    ap.add_argument("--out", type=Path, help="output folder (default: <the runs' parent>/report)")
    ap.add_argument(
        "--group",
        default="config",
        choices=("config", "name", "run"),
        help="which runs are seeds of one row: equal configs apart from the seed (default), "
        "equal names apart from a -s<N> suffix, or none",
    )
    ap.add_argument(
        "--layout",
        default="groups",
        choices=("groups", "pivot"),
        help="groups: one row per group, overall/many/medium/few; pivot: --rows x --cols of --metric",
    )
    ap.add_argument(
        "--rows", default="method.algorithm", help="pivot rows: a dotted config key, name or group"
    )
    ap.add_argument(
        "--cols", default="data.dataset", help="pivot columns: a dotted config key, name or group"
    )
    ap.add_argument(
        "--metric",
        default="top1",
        choices=METRICS,
        help="pivot cell metric (ImageNet127: mean_recall)",
    )
    ap.add_argument("--digits", type=int, default=1, help="decimals of the percentages (default 1)")
    ap.add_argument("--no-plots", action="store_true", help="tables only")
    a = ap.parse_args(argv)
    out = a.out or _default_out(a.runs)
    try:
        text, files = build_report(
            a.runs, out, a.group, a.layout, a.rows, a.cols, a.metric, a.digits, plots=not a.no_plots
        )
    except ValueError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    print(text)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
