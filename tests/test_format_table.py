"""The end-of-run recall table: one row per class for a few classes; at 100+ classes the
many/medium/few groups and the 10 worst classes, not 1000 rows."""

from __future__ import annotations

import re

import pytest
import torch

from bmb.evaluate import format_table


def _result(num_classes: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    counts = torch.linspace(100, 2, num_classes).round().long().tolist()  # long-tailed labeled counts
    recall = torch.rand(num_classes, generator=g).tolist()
    many, few = 40, 10
    groups = {"many": [r for n, r in zip(counts, recall) if n > many],
              "medium": [r for n, r in zip(counts, recall) if few < n <= many],
              "few": [r for n, r in zip(counts, recall) if n <= few]}
    return {"name": "run", "algorithm": "bmb", "steps": 7, "protocol": "final", "class_names":
            [f"c{k:04d}" for k in range(num_classes)], "labeled_counts": counts, "per_class_recall": recall,
            "top1": 0.5, "mean_recall": sum(recall) / num_classes, "many_above": many, "few_at_most": few,
            **{k: sum(v) / len(v) for k, v in groups.items()}}


def test_a_few_classes_get_one_row_each():
    res = _result(10)
    out = format_table(res)
    rows = [line for line in out.splitlines() if re.match(r"\| c\d{4} \|", line)]
    assert rows == [f"| c{k:04d} | {n} | {100 * r:.1f} |"
                    for k, (n, r) in enumerate(zip(res["labeled_counts"], res["per_class_recall"]))]
    assert "| group |" not in out and "lowest recall" not in out


@pytest.mark.parametrize("num_classes", [100, 1000])
def test_many_classes_show_the_groups_and_the_ten_worst(num_classes):
    res = _result(num_classes)
    out = format_table(res)
    lines = out.splitlines()
    assert len(lines) < 30  # not one row per class
    counts, recall = res["labeled_counts"], res["per_class_recall"]
    # The groups: class counts, labeled ranges and mean recall, from the thresholds.
    for name, keep in (("many", lambda n: n > 40), ("medium", lambda n: 10 < n <= 40), ("few", lambda n: n <= 10),
                       ("all", lambda n: True)):
        members = [n for n in counts if keep(n)]
        value = res["mean_recall" if name == "all" else name]
        assert f"| {name} | {len(members)} | {min(members)}-{max(members)} | {100 * value:.1f} |" in lines, name
    # The 10 lowest-recall classes, worst first, and no other class row.
    worst = sorted(range(num_classes), key=lambda k: recall[k])[:10]
    rows = [line for line in lines if re.match(r"\| c\d{4} \|", line)]
    assert rows == [f"| c{k:04d} | {counts[k]} | {100 * recall[k]:.1f} |" for k in worst]
    assert f"10 lowest recall of {num_classes} classes" in out
    assert lines[-1].startswith("top-1 50.00  mean recall")
