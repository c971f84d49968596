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

_DESCRIPTION = """\
Paper-style tables and plots from training run directories.

A RUN_DIR is one run's directory (metrics.jsonl, train.jsonl, final.json, config.yaml, as
bmb/trainer.py writes them) or a folder whose immediate sub-folders are runs. Runs are grouped
(by default: runs whose resolved configs differ only in the seed and bookkeeping keys such as
train.out_dir) and every number is a run's result under its evaluation protocol (final.json; for
a run still going, the protocol applied to the evaluations so far, marked *), shown in percent
as mean ± sample std over the group's seeds.

Writes DIR/report.md (also printed) and, unless --no-plots, the PNGs that apply:

  recall_vs_class_size.png  per-class recall against the labeled class size (paper Fig. 1b)
  bank_histogram.png        the memory bank's class histogram at the end and over training (Fig. 6)
  bank_entropy.png          normalised entropy of the bank's class histogram (Fig. 5/6)
  get_histogram.png         classes of the items drawn from the bank, cumulative (Fig. 7)
  curves.png                training loss, test top-1, mean recall, pseudo-label mask rate

The bank plots appear only when some run is BMB (has a memory bank).
"""

_EPILOG = """\
examples:
  python -m launch.report runs/ --out reports/
  python -m launch.report runs/ --layout pivot --rows method.put_power --cols name --metric few
  python -m launch.report runs/bmb-s0 runs/bmb-s1 --group run --no-plots

exit status: 0 on success; 2 when a path is not a run directory or a run's file does not parse
(the message names the file).
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
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "runs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="a run directory, or a folder whose sub-folders are runs (several allowed)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="output folder for report.md and the PNGs, created if needed (default: "
        "<folder>/report when every RUN_DIR is, or sits in, the same folder; else ./report)",
    )
    ap.add_argument(
        "--group",
        default="config",
        choices=("config", "name", "run"),
        help="which runs are the seeds of one row: config = equal resolved configs apart from "
        "the seed and bookkeeping keys (a run without config.yaml falls back to its name); "
        "name = equal run names once a -s<N>/_seed<N> suffix is removed; run = every run on "
        "its own row (default: %(default)s)",
    )
    ap.add_argument(
        "--layout",
        default="groups",
        choices=("groups", "pivot"),
        help="groups = one row per group: top-1, mean recall, many/medium/few, EMA base head, "
        "non-EMA, bank entropy, steps; pivot = one --metric in a table of --rows x --cols "
        "(default: %(default)s). Both are followed by a table of every run",
    )
    ap.add_argument(
        "--rows",
        default="method.algorithm",
        metavar="KEY",
        help="pivot layout: what the rows are, a dotted config key (e.g. method.put_power; "
        "data.dataset shows the folder's name), 'name' (the run name without its seed suffix) "
        "or 'group' (the group's label) (default: %(default)s)",
    )
    ap.add_argument(
        "--cols",
        default="data.dataset",
        metavar="KEY",
        help="pivot layout: what the columns are, as --rows (default: %(default)s)",
    )
    ap.add_argument(
        "--metric",
        default="top1",
        choices=METRICS,
        help="pivot layout: the number in each cell: top-1 accuracy, mean per-class recall, or "
        "the mean recall of the many/medium/few-shot classes (default: %(default)s; for "
        "ImageNet127, whose test set is imbalanced: mean_recall)",
    )
    ap.add_argument(
        "--digits",
        type=int,
        default=1,
        metavar="N",
        help="decimals of the percentages (default: %(default)s; bank entropy always has 2)",
    )
    ap.add_argument(
        "--no-plots",
        action="store_true",
        help="write report.md only: no PNGs (matplotlib is not imported)",
    )
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
