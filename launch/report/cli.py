"""The command line: :func:`build_report` puts the tables and the plots together into
``report.md`` and PNGs; :func:`main` is ``python -m launch.report``'s argument parser.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .load import METRICS, find_runs, is_run_dir, load_run
from .plots import (
    plot_bank_entropy,
    plot_bank_histogram,
    plot_curves,
    plot_get_histogram,
    plot_recall_vs_size,
)
from .tables import METRIC_TITLES, footer, group_runs, groups_table, pivot_table, runs_table

_DESCRIPTION = """Paper-style tables and plots from run directories.

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
    parts += [footer(runs), "", "## Runs", "", runs_table(runs, digits), ""]
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
        description=_DESCRIPTION,
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
