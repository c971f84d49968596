"""The report's matplotlib figures, each written as a PNG (no pyplot: no global state, no display).

- ``recall_vs_class_size.png``: per-class recall against the labeled class size (paper Fig. 1b);
- ``bank_histogram.png``: the memory bank's class histogram at the end and over training (Fig. 6);
- ``bank_entropy.png``: normalised entropy of the bank's class histogram over training (Fig. 5/6);
- ``get_histogram.png``: classes of the items drawn from the bank, cumulative (Fig. 7);
- ``curves.png``: training loss, test top-1, mean recall and pseudo-label mask rate.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .tables import Group, bank_entropy, mean_curve, mean_std

DPI = 100
# Figure sizes in inches; pixel size = inches x DPI (rows: one per group shown).
CURVES_SIZE = (11.0, 8.0)
RECALL_SIZE = (10.0, 6.5)
ENTROPY_SIZE = (7.0, 4.5)


def bank_hist_size(n_rows: int) -> tuple[float, float]:
    return (11.0, 2.6 * n_rows + 0.8)


def get_hist_size(n_rows: int) -> tuple[float, float]:
    return (8.0, 2.4 * n_rows + 0.8)


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
            steps, mean, std = mean_curve(xy)
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
        steps, mean, std = mean_curve(xy)
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
