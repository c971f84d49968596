"""Metrics (recall, many/medium/few) and the N-hat estimator."""

import math

import pytest
import torch

from bmb.estimate import UnlabeledCountEstimator
from bmb.metrics import (
    ConfusionMatrix,
    group_recall,
    mean_recall,
    per_class_recall,
    shot_groups,
    top1,
)


def test_recall_by_hand():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 0, 1, 1, 0, 2])
    r = per_class_recall(preds, labels, 4)
    assert r[:3].tolist() == pytest.approx([0.75, 0.5, 1.0]) and math.isnan(r[3])
    assert mean_recall(r) == pytest.approx(0.75)
    assert top1(torch.nn.functional.one_hot(preds, 4).float(), labels) == pytest.approx(5 / 7)
    cm = ConfusionMatrix(4)
    cm.update(preds, labels, valid=torch.tensor([1, 1, 1, 1, 1, 1, 0]).bool())
    assert cm.top1() == pytest.approx(4 / 6) and math.isnan(cm.per_class_recall()[2])


def test_shot_groups_imagenet_lt_thresholds():
    counts = torch.tensor([256, 21, 20, 5, 4, 1])
    g = shot_groups(counts, many_above=20, few_at_most=4)  # 20% subset
    assert g["many"].tolist() == [True, True, False, False, False, False]
    assert g["medium"].tolist() == [False, False, True, True, False, False]
    assert g["few"].tolist() == [False, False, False, False, True, True]
    g50 = shot_groups(torch.tensor([640, 51, 50, 11, 10, 3]), many_above=50, few_at_most=10)
    assert g50["many"].sum() == 2 and g50["medium"].sum() == 2 and g50["few"].sum() == 2
    rec = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    assert group_recall(rec, g) == pytest.approx({"many": 0.8, "medium": 0.4, "few": 0.1})


def test_estimator_mean_and_ema():
    e = UnlabeledCountEstimator(3, unlabeled_size=600)
    assert e.value().tolist() == [200, 200, 200]  # uniform before any update
    e.update(torch.tensor([4.0, 0.0, 2.0]), 8)
    e.update(torch.tensor([2.0, 0.0, 4.0]), 8)
    # mean confident fraction (3/8, 0, 3/8) x |U| = 600; the empty class is floored at 1 sample
    assert e.value().tolist() == [225.0, 1.0, 225.0]
    ema = UnlabeledCountEstimator(3, unlabeled_size=80, mode="ema", momentum=0.5)
    ema.update(torch.tensor([4.0, 0.0, 2.0]), 8)
    ema.update(torch.tensor([2.0, 0.0, 4.0]), 8)
    assert ema.value().tolist() == [30.0, 1.0, 30.0]
    ema.update(torch.tensor([0.0, 8.0, 3.0]), 16)  # a different batch: fractions (0, 0.5, 0.1875)
    assert ema.value().tolist() == [15.0, 20.0, 22.5]
    e2 = UnlabeledCountEstimator(3, unlabeled_size=600)
    e2.load_state_dict(e.state_dict())
    assert torch.equal(e2.value(), e.value()) and e2.steps == 2
    with pytest.raises(ValueError, match="shape"):
        e.update(torch.ones(4), 8)
    with pytest.raises(ValueError, match="unlabeled set of 600"):
        UnlabeledCountEstimator(3, unlabeled_size=5).load_state_dict(e.state_dict())
    old = {"mode": "mean", "momentum": 0.99, "steps": 2, "value": torch.ones(3), "sum": torch.ones(3)}
    with pytest.raises(ValueError, match="scale of one batch"):
        e2.load_state_dict(old)  # a checkpoint from before the rescale is refused, not misread


def test_default_thresholds_of_balanced_counts_make_every_class_many_shot():
    from bmb.metrics import default_thresholds, shot_groups

    many, few = default_thresholds([6, 6, 6, 6, 6])
    assert few < many
    groups = shot_groups([6, 6, 6, 6, 6], many, few)
    assert groups["many"].all() and not groups["medium"].any() and not groups["few"].any()
