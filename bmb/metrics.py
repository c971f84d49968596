"""Classification metrics for long-tailed evaluation.

Per-class recall is the primary quantity: mean recall (balanced accuracy) for ImageNet127,
top-1 on a balanced test set (CIFAR-LT, equal to mean recall there), and many/medium/few-shot
splits by each class's *labeled* count for ImageNet-LT.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ConfusionMatrix:
    """Accumulates a ``(C, C)`` confusion matrix (rows: true class, columns: prediction)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, preds: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add predictions ``(B,)`` against labels ``(B,)``; ``valid`` masks out padding rows."""
        preds, labels = preds.detach().cpu().long(), labels.detach().cpu().long()
        if valid is not None:
            keep = valid.detach().cpu().bool()
            preds, labels = preds[keep], labels[keep]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"ConfusionMatrix.update: labels outside [0, {self.num_classes})")
        idx = labels * self.num_classes + preds
        self.matrix += torch.bincount(idx, minlength=self.num_classes**2).view(self.num_classes, self.num_classes)

    def top1(self) -> float:
        total = int(self.matrix.sum())
        return float(self.matrix.diag().sum()) / total if total else 0.0

    def per_class_recall(self) -> torch.Tensor:
        """float64 ``(C,)``; NaN for classes with no samples."""
        support = self.matrix.sum(1).to(torch.float64)
        return self.matrix.diag().to(torch.float64) / support  # 0/0 -> NaN on purpose

    def mean_recall(self) -> float:
        return mean_recall(self.per_class_recall())


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the label."""
    return float((logits.argmax(-1) == labels).float().mean())


def per_class_recall(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Recall of every class, float64 ``(C,)`` (NaN where a class has no samples)."""
    cm = ConfusionMatrix(num_classes)
    cm.update(preds, labels)
    return cm.per_class_recall()


def mean_recall(recall: torch.Tensor) -> float:
    """Mean over classes present in the evaluation set (NaN entries ignored)."""
    r = recall[~torch.isnan(recall)]
    return float(r.mean()) if r.numel() else 0.0


def shot_groups(labeled_counts: Sequence[int] | torch.Tensor, many_above: int, few_at_most: int
                ) -> dict[str, torch.Tensor]:
    """Boolean class masks: many ``n > many_above``, medium ``few_at_most < n <= many_above``, few ``n <= few_at_most``.

    ImageNet-LT 20%: ``many_above=20, few_at_most=4``; 50%: ``50, 10`` (docs/method.md).
    """
    if few_at_most >= many_above:
        raise ValueError(f"shot_groups: few_at_most ({few_at_most}) must be < many_above ({many_above})")
    n = torch.as_tensor(labeled_counts)
    return {"many": n > many_above, "medium": (n > few_at_most) & (n <= many_above), "few": n <= few_at_most}


def group_recall(recall: torch.Tensor, groups: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean recall within each group of classes (NaN when a group is empty)."""
    return {name: (mean_recall(recall[mask]) if bool(mask.any()) else float("nan")) for name, mask in groups.items()}


def default_thresholds(labeled_counts: Sequence[int] | torch.Tensor) -> tuple[int, int]:
    """Many/few thresholds when a setting defines none: the top and bottom thirds of classes by count."""
    n = torch.as_tensor(labeled_counts).sort(descending=True).values
    c = n.numel()
    many, few = int(n[max(c // 3 - 1, 0)]) - 1, int(n[min(2 * c // 3, c - 1)])
    # Near-balanced counts make the thirds meet: then the classes are many-shot, none few-shot.
    return many, min(few, many - 1)
