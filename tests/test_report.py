"""``python -m launch.report`` on hand-written run directories: table values and PNGs.

The runs are written by hand (``metrics.jsonl``, ``train.jsonl``, ``final.json``, ``config.yaml``
as ``bmb/trainer.py`` writes them), so every number in the table is known in advance.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from launch import report

ROOT = Path(__file__).resolve().parents[1]
COUNTS = [40, 20, 8, 2]  # labeled counts of the 4 synthetic classes
NAMES = ["a", "b", "c", "d"]
N_EVAL = 25  # > 20, so last-20 must drop the first 5


def _config(name: str, algorithm: str, seed: int, **method) -> dict:
    return {
        "name": name,
        "model": {"encoder": "small", "width": 8},
        "method": {"algorithm": algorithm, "put_power": 3.0, **method},
        "data": {"dataset": "data/synth", "val_split": None},
        "train": {"seed": seed, "eval_protocol": "last20", "out_dir": "runs", "threads": 1},
    }


def write_run(
    root: Path,
    name: str,
    algorithm: str,
    seed: int,
    result: dict,
    *,
    bank: list[int] | None = None,
    finished: bool = True,
    dataset: str = "data/synth",
    **method,
) -> Path:
    """A run directory whose protocol result is ``result`` (top1, many, medium, few as fractions).

    Metric rows before the last 20 carry deliberately different values (0.05 / 0.3) so that a
    report ignoring the protocol's evaluations would show them.
    """
    d = root / name
    d.mkdir(parents=True)
    cfg = _config(name, algorithm, seed, **method)
    cfg["data"]["dataset"] = dataset
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    recall = [result["many"], result["medium"], result["medium"], result["few"]]
    rows, train = [], []
    for i in range(1, N_EVAL + 1):
        step = 10 * i
        late = i > N_EVAL - 20
        row = {
            "step": step,
            "epoch": step / 50,
            "top1": result["top1"] if late else 0.05,
            "mean_recall": result["top1"] if late else 0.05,
            "per_class_recall": recall if late else [0.05] * 4,
            "many": result["many"],
            "medium": result["medium"],
            "few": result["few"],
            "seconds": float(step),
        }
        if algorithm == "bmb":
            row.update(
                {
                    "ema_base_top1": 0.6 if late else 0.3,
                    "ema_base_mean_recall": 0.6,
                    "raw_aux_top1": 0.7 if late else 0.3,
                    "raw_aux_mean_recall": 0.7,
                    # The bank fills up over training: empty first, then the given histogram.
                    "bank_class_counts": (bank if i > 3 else [0, 0, 0, 0]),
                    "get_class_counts": [4 * i, 3 * i, 2 * i, i],
                    "nhat": [400, 200, 80, 20],
                }
            )
        else:
            row.update(
                {
                    "ema_aux_top1": 0.1,
                    "ema_aux_mean_recall": 0.1,
                    "raw_base_top1": 0.8 if late else 0.3,
                    "raw_base_mean_recall": 0.8,
                }
            )
        rows.append(row)
        train.append(
            {
                "step": step,
                "loss": 2.0 / i,
                "base_l": 1.0 / i,
                "base_u": 0.1,
                "aux_l": 0.5 / i,
                "aux_u": 0.1,
                "mb": 0.05,
                "mask_base": i / N_EVAL,
                "mask_aux": i / (2 * N_EVAL),
                "bank_size": min(10 * i, 32),
            }
        )
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    if finished:
        final = {
            **result,
            "mean_recall": result["top1"],
            "per_class_recall": recall,
            "protocol": "mean of the last 20 evaluations",
            "evaluations": [r["step"] for r in rows[-20:]],
            "steps": 10 * N_EVAL,
            "seconds": 10.0 * N_EVAL,
            "algorithm": algorithm,
            "name": name,
            "labeled_counts": COUNTS,
            "class_names": NAMES,
            "many_above": 20,
            "few_at_most": 4,
        }
        (d / "final.json").write_text(json.dumps(final))
    return d


def _res(top1: float, many: float, medium: float, few: float) -> dict:
    return {"top1": top1, "many": many, "medium": medium, "few": few}


@pytest.fixture()
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    write_run(root, "bmb-s0", "bmb", 0, _res(0.50, 0.80, 0.50, 0.20), bank=[8, 8, 8, 8])
    write_run(root, "bmb-s1", "bmb", 1, _res(0.52, 0.82, 0.52, 0.22), bank=[16, 8, 4, 4])
    write_run(root, "bmb-s2", "bmb", 2, _res(0.57, 0.87, 0.57, 0.27), bank=[16, 8, 4, 4])
    write_run(root, "fm-s0", "fixmatch", 0, _res(0.40, 0.90, 0.30, 0.00))
    write_run(root, "fm-s1", "fixmatch", 1, _res(0.44, 0.92, 0.34, 0.00))
    write_run(root, "fm-s2", "fixmatch", 2, _res(0.45, 0.94, 0.35, float("nan")))
    return root


def _table_rows(text: str) -> dict[str, list[str]]:
    """First Markdown table of the report: label -> cells."""
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if len(cells) != len(head):
            break  # the next table
        out[cells[0]] = dict(zip(head, cells))
    return out


def test_groups_table_mean_and_sample_std(runs: Path, tmp_path: Path):
    text, files = report.build_report([runs], tmp_path / "out", plots=False)
    rows = _table_rows(text)
    assert set(rows) == {"bmb", "fm"}
    bmb, fm = rows["bmb"], rows["fm"]
    # top-1 0.50, 0.52, 0.57: mean 53.0; sample std sqrt((9 + 1 + 16) / 2) = 3.6.
    assert bmb["top-1"] == "53.0 ± 3.6" and bmb["mean recall"] == "53.0 ± 3.6"
    assert (
        bmb["many"] == "83.0 ± 3.6" and bmb["medium"] == "53.0 ± 3.6" and bmb["few"] == "23.0 ± 3.6"
    )
    # 0.40, 0.44, 0.45: mean 43.0; std sqrt((9 + 1 + 4) / 2) = 2.6458.
    assert fm["top-1"] == "43.0 ± 2.6" and fm["many"] == "92.0 ± 2.0"
    assert fm["few"] == "0.0 ± 0.0"  # the NaN seed is left out, not counted as 0
    assert bmb["seeds"] == "0, 1, 2" and bmb["algorithm"] == "bmb" and bmb["steps"] == "250"
    # Logged heads under the same protocol (last 20 rows: 0.6 / 0.7, earlier rows 0.3).
    assert bmb["EMA base head"] == "60.0 ± 0.0" and bmb["non-EMA"] == "70.0 ± 0.0"
    assert fm["EMA base head"] == "—" and fm["non-EMA"] == "80.0 ± 0.0"
    # Bank entropy / log 4: [8,8,8,8] -> 1; [16,8,4,4] -> 1.75 ln2 / ln4 = 0.875 (twice).
    h = [1.0, 0.875, 0.875]
    assert bmb["bank entropy"] == f"{np.mean(h):.2f} ± {np.std(h, ddof=1):.2f}" == "0.92 ± 0.07"
    assert fm["bank entropy"] == "—"
    assert "many > 20, few ≤ 4 labeled" in text
    assert files == [tmp_path / "out" / "report.md"]
    assert (tmp_path / "out" / "report.md").read_text() == text


def test_runs_table_lists_every_run(runs: Path, tmp_path: Path):
    text, _ = report.build_report([runs], tmp_path / "out", plots=False)
    runs_part = text.split("## Runs")[1]
    rows = _table_rows(runs_part)
    assert set(rows) == {f"{p}-s{s}" for p in ("bmb", "fm") for s in range(3)}
    assert rows["bmb-s2"]["top-1"] == "57.0" and rows["fm-s2"]["few"] == "—"


def test_pivot_layout_per_setting(tmp_path: Path):
    root = tmp_path / "runs"
    for s, (a, b) in enumerate([(0.30, 0.60), (0.34, 0.62)]):
        write_run(
            root, f"x-bmb-s{s}", "bmb", s, _res(a, 0, 0, 0), bank=[1, 1, 1, 1], dataset="data/set-a"
        )
        write_run(
            root, f"y-bmb-s{s}", "bmb", s, _res(b, 0, 0, 0), bank=[1, 1, 1, 1], dataset="data/set-b"
        )
        write_run(root, f"x-fm-s{s}", "fixmatch", s, _res(a - 0.1, 0, 0, 0), dataset="data/set-a")
    text, _ = report.build_report([root], tmp_path / "out", layout="pivot", plots=False)
    rows = _table_rows(text)
    assert rows["bmb"]["set-a"] == "32.0 ± 2.8" and rows["bmb"]["set-b"] == "61.0 ± 1.4"
    assert rows["fixmatch"]["set-a"] == "22.0 ± 2.8" and rows["fixmatch"]["set-b"] == "—"
    # A sweep: rows = beta, columns = the algorithm.
    text, _ = report.build_report(
        [root],
        tmp_path / "out",
        layout="pivot",
        rows="data.dataset",
        cols="method.algorithm",
        metric="many",
        plots=False,
    )
    assert "| data.dataset \\ method.algorithm | bmb | fixmatch |" in text


def test_grouping_modes(tmp_path: Path):
    root = tmp_path / "runs"
    write_run(root, "b-s0", "bmb", 0, _res(0.5, 0, 0, 0), bank=[1, 1, 1, 1])
    write_run(root, "b-s1", "bmb", 1, _res(0.6, 0, 0, 0), bank=[1, 1, 1, 1])
    write_run(root, "beta0-s0", "bmb", 0, _res(0.4, 0, 0, 0), bank=[4, 0, 0, 0], put_power=0.0)
    # Same name as b-s*, but a different beta: a config group of its own, labelled apart.
    write_run(root, "b-s2", "bmb", 2, _res(0.9, 0, 0, 0), bank=[1, 1, 1, 1], put_power=1.0)
    # A key only one run has (added to the config later) does not split the group.
    cfg = yaml.safe_load((root / "b-s1" / "config.yaml").read_text())
    cfg["method"]["bank_check_every"] = 100
    (root / "b-s1" / "config.yaml").write_text(yaml.safe_dump(cfg))
    loaded = [report.load_run(p) for p in report.find_runs([root])]
    by_config = report.group_runs(loaded, "config")
    assert [(g.label, sorted(r.name for r in g.runs)) for g in by_config] == [
        ("b", ["b-s0", "b-s1"]),
        ("b (2)", ["b-s2"]),
        ("beta0", ["beta0-s0"]),
    ]
    by_name = report.group_runs(loaded, "name")
    assert [(g.label, len(g.runs)) for g in by_name] == [("b", 3), ("beta0", 1)]
    assert len(report.group_runs(loaded, "run")) == 4
    with pytest.raises(ValueError, match="grouping 'seed'"):
        report.group_runs(loaded, "seed")


def test_unfinished_run_uses_the_protocol_on_its_metrics(tmp_path: Path):
    root = tmp_path / "runs"
    write_run(
        root, "live-s0", "bmb", 0, _res(0.5, 0.6, 0.5, 0.4), bank=[2, 2, 2, 2], finished=False
    )
    text, _ = report.build_report([root], tmp_path / "out", plots=False)
    rows = _table_rows(text)
    assert rows["live*"]["top-1"] == "50.0" and rows["live*"]["many"] == "60.0"
    assert "still running" in text


def test_strip_seed_and_formatting():
    assert report.strip_seed("demo-bmb-s2") == "demo-bmb"
    assert report.strip_seed("x_seed10") == "x" and report.strip_seed("plain") == "plain"
    assert (
        report.fmt([0.5]) == "50.0" and report.fmt([]) == "—" and report.fmt([float("nan")]) == "—"
    )
    assert report.fmt([0.1, 0.2, 0.3], digits=2) == "20.00 ± 10.00"
    assert report.bank_entropy([0, 0, 0, 5]) == 0.0 and math.isnan(report.bank_entropy([0, 0]))
    steps, mean, std = report.mean_curve(
        [([1, 2, 3], [1.0, 2.0, 3.0]), ([2, 3, 4], [4.0, 6.0, 8.0])]
    )
    assert (
        steps == [2, 3]
        and mean == [3.0, 4.5]
        and std == pytest.approx([math.sqrt(2), math.sqrt(4.5)])
    )


def test_bad_inputs_name_the_path(tmp_path: Path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "missing: no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    bad = write_run(tmp_path / "r", "bad-s0", "bmb", 0, _res(0.5, 0, 0, 0), bank=[1, 1, 1, 1])
    with open(bad / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    assert report.main([str(bad), "--no-plots"]) == 2
    assert f"{bad / 'metrics.jsonl'}:26" in capsys.readouterr().err
    text = (bad / "metrics.jsonl").read_text()
    (bad / "metrics.jsonl").write_text(
        text.replace("{not json\n", '{"step": 260, "to')
    )  # being written
    assert len(report.load_run(bad).metrics) == N_EVAL
    (bad / "final.json").write_text('{"top1": 0.5}')
    with pytest.raises(ValueError, match="final.json: missing mean_recall"):
        report.load_run(bad)


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        report.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out DIR", "--group", "--layout", "--rows KEY", "--cols KEY", "--metric"):
        assert f"  {option}" in text, option
    assert "  --digits N" in text and "  --no-plots" in text and "examples:" in text
    flat = " ".join(text.split())  # argparse wraps to the terminal's width
    assert "(default: config)" in flat and "(default: method.algorithm)" in flat


# ------------------------------------------------------------------ plots
def _png(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)  # (H, W, 4) floats in [0, 1]
    return (img[..., :3] * 255).round().astype(int)


def _has_color(img: np.ndarray, hex_color: str, min_pixels: int = 20) -> bool:
    rgb = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img - rgb).max(-1) <= 8).sum()) >= min_pixels


C0, C1 = "#1f77b4", "#ff7f0e"  # matplotlib's first two cycle colors: group 0 (bmb), group 1 (fm)


def test_plots_decode_to_images_of_the_expected_size(runs: Path, tmp_path: Path):
    out = tmp_path / "out"
    _, files = report.build_report([runs], out)
    names = [f.name for f in files]
    assert names == [
        "report.md",
        "recall_vs_class_size.png",
        "bank_histogram.png",
        "bank_entropy.png",
        "get_histogram.png",
        "curves.png",
    ]
    one_bank_group = 1
    expected = {
        "curves.png": report.CURVES_SIZE,
        "recall_vs_class_size.png": report.RECALL_SIZE,
        "bank_entropy.png": report.ENTROPY_SIZE,
        "bank_histogram.png": report.bank_hist_size(one_bank_group),
        "get_histogram.png": report.get_hist_size(one_bank_group),
    }
    for name, (w, h) in expected.items():
        img = _png(out / name)
        assert img.shape[:2] == (round(h * report.DPI), round(w * report.DPI)), name
        assert img.std() > 10, f"{name} is blank"
    # Both groups are drawn where both appear; the bank plots only show the BMB group.
    for name in ("curves.png", "recall_vs_class_size.png"):
        img = _png(out / name)
        assert _has_color(img, C0) and _has_color(img, C1), name
    for name in ("bank_histogram.png", "bank_entropy.png", "get_histogram.png"):
        img = _png(out / name)
        assert _has_color(img, C0) and not _has_color(img, C1), name
    md = (out / "report.md").read_text()
    assert all(f"]({n})" in md for n in expected)


def test_no_bank_plots_without_bmb_runs(tmp_path: Path):
    root = tmp_path / "runs"
    write_run(root, "fm-s0", "fixmatch", 0, _res(0.4, 0.5, 0.4, 0.3))
    _, files = report.build_report([root], tmp_path / "out")
    assert [f.name for f in files] == ["report.md", "recall_vs_class_size.png", "curves.png"]


def test_module_entry_point(runs: Path, tmp_path: Path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.report",
            str(runs),
            "--out",
            str(tmp_path / "o"),
            "--no-plots",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| bmb | bmb | 0, 1, 2 | 53.0 ± 3.6 |" in proc.stdout
    assert (tmp_path / "o" / "report.md").is_file()


def test_beta_sweep_gets_one_bank_row_per_group(tmp_path: Path):
    """A beta sweep (paper Fig. 5/6): one histogram row per group, entropy ordered as the banks."""
    root = tmp_path / "runs"
    write_run(root, "beta0-s0", "bmb", 0, _res(0.4, 0, 0, 0), bank=[20, 8, 3, 1], put_power=0.0)
    write_run(root, "beta3-s0", "bmb", 0, _res(0.5, 0, 0, 0), bank=[8, 8, 8, 8], put_power=3.0)
    out = tmp_path / "out"
    text, _ = report.build_report([root], out)
    rows = _table_rows(text)
    assert float(rows["beta0"]["bank entropy"]) < float(rows["beta3"]["bank entropy"]) == 1.0
    w, h = report.bank_hist_size(2)
    for name in ("bank_histogram.png", "bank_entropy.png", "get_histogram.png"):
        img = _png(out / name)
        assert _has_color(img, C0) and _has_color(img, C1), name
    assert _png(out / "bank_histogram.png").shape[:2] == (
        round(h * report.DPI),
        round(w * report.DPI),
    )


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _edit_row(path: Path, line: int, edit) -> None:
    rows = [json.loads(r) for r in path.read_text().splitlines()]
    edit(rows[line - 1])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _set_config(d: Path, text: str) -> None:
    (d / "config.yaml").write_text(text)


# (tamper, the message naming the file and line / key); issue #20: the report on wrong-typed rows
# or config.yaml gives a named error (exit 2), not a traceback; unequal per-class lists are an error.
WRONG_TYPES = {
    "metrics-row-not-object": (lambda d: (d / "metrics.jsonl").write_text(
        (d / "metrics.jsonl").read_text() + "[1, 2]\n"), "metrics.jsonl:26: a row must be a JSON object"),
    "metrics-step-string": (lambda d: _edit_row(d / "metrics.jsonl", 3, lambda r: r.update(step="30")),
                            "metrics.jsonl:3: 'step' must be an integer"),
    "metrics-top1-string": (lambda d: _edit_row(d / "metrics.jsonl", 25, lambda r: r.update(top1="0.5")),
                            "metrics.jsonl:25: 'top1' must be a number"),
    "metrics-recall-strings": (lambda d: _edit_row(d / "metrics.jsonl", 25, lambda r: r.update(
        per_class_recall=["a", "b", "c", "d"])), "metrics.jsonl:25: 'per_class_recall' must be a list of numbers"),
    "train-loss-string": (lambda d: _edit_row(d / "train.jsonl", 4, lambda r: r.update(loss="nan?")),
                          "train.jsonl:4: 'loss' must be a number"),
    "final-not-object": (lambda d: (d / "final.json").write_text("[0.5]"), "final.json: must be a JSON object"),
    "final-top1-string": (lambda d: _edit_json(d / "final.json", lambda r: r.update(top1="50%")),
                          "final.json: 'top1' must be a number"),
    "final-counts-strings": (lambda d: _edit_json(d / "final.json", lambda r: r.update(labeled_counts="40,20,8,2")),
                             "final.json: 'labeled_counts' must be a list of integers"),
    "config-a-list": (lambda d: _set_config(d, "- name\n- bmb\n"), "config.yaml: must be a mapping"),
    "config-train-a-list": (lambda d: _set_config(d, "name: x\ntrain: [1, 2]\n"),
                            "config.yaml: key 'train' must be a mapping"),
    "config-name-a-list": (lambda d: _set_config(d, "name: [1, 2]\n"), "config.yaml: key 'name' must be a string"),
    # Unequal per-class lists: an error naming them, not a silently truncated plot.
    "final-short-recall": (lambda d: _edit_json(d / "final.json", lambda r: r.update(per_class_recall=[0.5] * 3)),
                           "final.json: per-class lists of unequal length (3 classes; labeled_counts has 4"),
    "metrics-short-bank": (lambda d: _edit_row(d / "metrics.jsonl", 25, lambda r: r.update(
        bank_class_counts=[1, 2, 3])), "metrics.jsonl: row 25 (step 250): per-class lists of unequal length "
                                       "(4 classes; bank_class_counts has 3)"),
}


@pytest.mark.parametrize("case", list(WRONG_TYPES))
def test_wrong_typed_files_give_a_named_error(tmp_path: Path, capsys, case):
    tamper, message = WRONG_TYPES[case]
    d = write_run(tmp_path / "r", "bmb-s0", "bmb", 0, _res(0.5, 0.8, 0.5, 0.2), bank=[1, 1, 1, 1])
    tamper(d)
    assert report.main([str(d), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"report: {d}" in err and message in err, err
