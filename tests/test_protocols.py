"""Evaluation protocols of docs/method.md on hand-made metric logs.

- last 20 evaluations averaged (CIFAR-LT top-1, ImageNet127 mean recall),
- best validation top-1 picks the evaluation whose *test* metrics are reported (ImageNet-LT),
- many / medium / few by the labeled count with the ImageNet-LT 20% and 50% thresholds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bmb.config import load_config
from bmb.evaluate import final_result
from bmb.metrics import group_recall, shot_groups
from bmb.protocols import best_test, best_val, last_n, select_result

SHARED_LT = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet_lt"


def _row(
    step: int, top1: float, recall: list[float], val_top1: float | None = None, **extra
) -> dict:
    row = {
        "step": step,
        "epoch": step / 10,
        "top1": top1,
        "mean_recall": sum(recall) / len(recall),
        "per_class_recall": recall,
        "many": recall[0],
        "medium": recall[1],
        "few": recall[2],
        **extra,
    }
    if val_top1 is not None:
        row["val_top1"] = val_top1
    return row


def _history(n: int) -> list[dict]:
    # Evaluation i has top-1 i/100 and per-class recall (i, 2i, 3i)/1000: means are easy by hand.
    return [_row(10 * i, i / 100, [i / 1000, 2 * i / 1000, 3 * i / 1000]) for i in range(1, n + 1)]


def test_last20_averages_exactly_the_last_twenty():
    out = last_n(_history(25), 20)
    # Evaluations 6..25: mean index 15.5.
    assert out["top1"] == pytest.approx(0.155)
    assert out["per_class_recall"] == pytest.approx([0.0155, 0.031, 0.0465])
    assert out["mean_recall"] == pytest.approx((0.0155 + 0.031 + 0.0465) / 3)
    assert (out["many"], out["medium"], out["few"]) == pytest.approx((0.0155, 0.031, 0.0465))
    assert out["evaluations"] == [10 * i for i in range(6, 26)]
    assert out["protocol"] == "mean of the last 20 evaluations"
    assert select_result(_history(25), "last20") == out


def test_last20_with_fewer_evaluations_uses_all_of_them():
    out = last_n(_history(4), 20)
    assert out["top1"] == pytest.approx(0.025)  # mean of 1..4 over 100
    assert out["protocol"] == "mean of the last 4 evaluations"


def test_last20_ignores_nan_entries():
    """A class absent from the evaluation set (recall NaN) or an empty shot group does not poison the mean."""
    h = _history(3)
    h[1]["per_class_recall"] = [float("nan"), 0.5, 0.5]
    h[1]["few"] = float("nan")
    out = last_n(h, 20)
    assert out["per_class_recall"][0] == pytest.approx((0.001 + 0.003) / 2)
    assert out["few"] == pytest.approx((0.003 + 0.009) / 2)
    all_nan = last_n([_row(1, 0.1, [float("nan"), 0.1, 0.2])], 20)
    assert math.isnan(all_nan["per_class_recall"][0])


def test_last20_without_evaluations_is_an_error():
    with pytest.raises(ValueError, match="no evaluations"):
        last_n([], 20)


def test_best_val_reports_the_test_metrics_of_the_best_val_evaluation():
    h = [
        _row(100, 0.30, [0.3, 0.2, 0.1], val_top1=0.40),
        _row(200, 0.50, [0.6, 0.5, 0.4], val_top1=0.45),  # best val
        _row(300, 0.55, [0.7, 0.5, 0.3], val_top1=0.44),  # best test, not selected
        _row(400, 0.20, [0.2, 0.2, 0.2], val_top1=0.45),  # tie on val: the first one wins
    ]
    out = best_val(h, "val")
    assert out["top1"] == 0.50 and out["per_class_recall"] == [0.6, 0.5, 0.4]
    assert (out["many"], out["medium"], out["few"]) == (0.6, 0.5, 0.4)
    assert out["evaluations"] == [200]
    assert "best val top-1 (0.4500 at step 200)" in out["protocol"]
    assert select_result(h, "best_val", val_split="val") == out


def test_best_test_selects_on_the_reported_split_and_says_so():
    h = [
        _row(100, 0.30, [0.3, 0.2, 0.1], val_top1=0.40),
        _row(200, 0.50, [0.6, 0.5, 0.4], val_top1=0.45),  # best val
        _row(300, 0.55, [0.7, 0.5, 0.3], val_top1=0.44),  # best test: selected
        _row(400, 0.55, [0.2, 0.2, 0.2], val_top1=0.10),  # tie on test: the first one wins
        _row(500, float("nan"), [0.0, 0.0, 0.0]),
    ]
    out = best_test(h)
    assert out["top1"] == 0.55 and out["per_class_recall"] == [0.7, 0.5, 0.3]
    assert out["evaluations"] == [300]
    assert "best TEST top-1 at step 300" in out["protocol"] and "optimistic" in out["protocol"]
    assert select_result(h, "best_test") == out
    assert best_val(h, "val")["top1"] < out["top1"]  # the honest protocol picks another row here
    with pytest.raises(ValueError, match="no evaluations"):
        best_test([])


def test_best_val_errors_name_the_missing_key():
    with pytest.raises(ValueError, match="'val_top1'"):
        best_val(_history(3), "val")
    with pytest.raises(ValueError, match="validation split"):
        select_result(_history(3), "best_val")
    with pytest.raises(ValueError, match="unknown evaluation protocol 'last10'"):
        select_result(_history(3), "last10")


@pytest.mark.parametrize("many_above, few_at_most", [(20, 4), (50, 10)])
def test_shot_thresholds_at_the_boundaries(many_above: int, few_at_most: int):
    """many: n > many_above; medium: few_at_most < n <= many_above; few: n <= few_at_most."""
    counts = [many_above + 1, many_above, few_at_most + 1, few_at_most, 1]
    g = shot_groups(counts, many_above, few_at_most)
    assert g["many"].tolist() == [True, False, False, False, False]
    assert g["medium"].tolist() == [False, True, True, False, False]
    assert g["few"].tolist() == [False, False, False, True, True]
    recall = torch.tensor([0.9, 0.6, 0.4, 0.2, 0.0], dtype=torch.float64)
    assert group_recall(recall, g) == pytest.approx({"many": 0.9, "medium": 0.5, "few": 0.1})


def test_shot_thresholds_reject_inverted_bounds():
    with pytest.raises(ValueError, match="few_at_most"):
        shot_groups([1, 2, 3], 4, 20)


@pytest.mark.skipif(not SHARED_LT.is_dir(), reason="../shared/data/imagenet_lt not present")
@pytest.mark.parametrize("pct, many_above, few_at_most", [(20, 20, 4), (50, 50, 10)])
def test_imagenet_lt_subset_thresholds_match_the_standard_split(
    pct: int, many_above: int, few_at_most: int
):
    """On the real ImageNet-LT subsets the labeled-count thresholds select the same classes as
    thresholds on the full train count (many > 100, few <= 20): 385 / 469 / 146 classes."""
    rows = [
        tuple(map(int, line.split()))
        for line in (SHARED_LT / f"ImageNet_LT_train_semi_{pct}_sample_num.txt")
        .read_text()
        .splitlines()
        if line.strip()
    ]
    labeled = [r[0] for r in rows]
    total = torch.tensor([r[1] for r in rows])
    assert len(labeled) == 1000 and labeled == [math.ceil(pct * n / 100) for n in total.tolist()]
    g = shot_groups(labeled, many_above, few_at_most)
    assert [int(g[k].sum()) for k in ("many", "medium", "few")] == [385, 469, 146]
    assert torch.equal(g["many"], total > 100) and torch.equal(g["few"], total <= 20)
    # The thresholds are hit exactly by some classes, so an off-by-one would move them.
    lab = torch.tensor(labeled)
    assert int((lab == many_above).sum()) > 0 and int((lab == few_at_most).sum()) > 0
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "launch" / "configs" / f"imagenet_lt_{pct}.yaml"
    )
    assert (cfg.train.many_above, cfg.train.few_at_most) == (many_above, few_at_most)


def test_final_result_applies_the_protocol():
    """``final_result`` (what ``Trainer.finalize`` writes to final.json) on a hand-made history:
    the best-val row's test metrics."""
    cfg = load_config(
        None,
        [
            "data.dataset=x",
            "data.val_split=val",
            "train.eval_protocol=best_val",
            "name=t",
            "train.many_above=20",
            "train.few_at_most=4",
        ],
    )
    history = [
        _row(100, 0.3, [0.3, 0.2, 0.1], val_top1=0.2, seconds=1.0),
        _row(200, 0.6, [0.6, 0.5, 0.4], val_top1=0.5, seconds=2.0),
        _row(300, 0.4, [0.4, 0.4, 0.4], val_top1=0.3, seconds=3.0),
    ]
    final = final_result(cfg, history, 300, torch.tensor([30, 10, 2]), ["a", "b", "c"], (20, 4), "run-x")
    final = json.loads(json.dumps(final))  # as final.json holds it
    assert final["top1"] == 0.6 and final["per_class_recall"] == [0.6, 0.5, 0.4]
    assert final["evaluations"] == [200] and final["steps"] == 300 and final["seconds"] == 3.0
    assert (final["many_above"], final["few_at_most"]) == (20, 4)
    assert final["labeled_counts"] == [30, 10, 2] and final["algorithm"] == "bmb"
