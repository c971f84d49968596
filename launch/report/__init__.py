"""Paper-style tables and plots from training run directories: ``python -m launch.report``.

    python -m launch.report runs/ --out reports/      # report.md + PNG plots

Where things live:

- ``load``: reading a run directory back (``config.yaml``, ``final.json``, ``metrics.jsonl``,
  ``train.jsonl``) into a :class:`Run`;
- ``tables``: grouping runs that differ only in the seed, mean ± std over seeds, the Markdown
  tables (the paper's layouts and the pivot layout);
- ``plots``: the matplotlib PNGs (recall vs class size, bank histogram, bank entropy, get
  histogram, curves);
- ``cli``: :func:`build_report` (tables + plots into ``report.md``) and the argument parser
  :func:`main`.

The names below are the public API (``from launch.report import bank_entropy`` etc.).
"""

from .cli import build_report, main
from .load import METRICS, Run, find_runs, get_key, is_run_dir, load_run
from .plots import (
    CURVES_SIZE,
    DPI,
    ENTROPY_SIZE,
    RECALL_SIZE,
    bank_hist_size,
    get_hist_size,
    plot_bank_entropy,
    plot_bank_histogram,
    plot_curves,
    plot_get_histogram,
    plot_recall_vs_size,
)
from .tables import (
    METRIC_TITLES,
    Group,
    bank_entropy,
    base_head_value,
    fmt,
    group_runs,
    groups_table,
    mean_curve,
    mean_std,
    non_ema_value,
    pivot_table,
    run_bank_entropy,
    runs_table,
    strip_seed,
)

__all__ = [
    "CURVES_SIZE",
    "DPI",
    "ENTROPY_SIZE",
    "METRICS",
    "METRIC_TITLES",
    "RECALL_SIZE",
    "Group",
    "Run",
    "bank_entropy",
    "bank_hist_size",
    "base_head_value",
    "build_report",
    "find_runs",
    "fmt",
    "get_hist_size",
    "get_key",
    "group_runs",
    "groups_table",
    "is_run_dir",
    "load_run",
    "main",
    "mean_curve",
    "mean_std",
    "non_ema_value",
    "pivot_table",
    "plot_bank_entropy",
    "plot_bank_histogram",
    "plot_curves",
    "plot_get_histogram",
    "plot_recall_vs_size",
    "run_bank_entropy",
    "runs_table",
    "strip_seed",
]
