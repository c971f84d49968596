"""Evaluation: confusion matrices of a model's heads, the trainer's metrics row, the final result.

- :func:`confusion_matrices`: one pass over an evaluation source, one confusion matrix per
  (model, head) asked for; used by the trainer and by ``bmb-eval`` (``launch/eval.py``).
- :class:`Evaluator`: the trainer's evaluation of every configured split (the EMA model's aux and
  base heads, the non-EMA model's evaluated head; matrices summed over ranks) as one row of
  ``metrics.jsonl``.
- :func:`final_result`: the evaluation protocol applied to those rows (``final.json``);
  :func:`format_table`: the recall table printed at the end of a run (per class, or at 100+
  classes the groups and the worst classes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bmb.config import Config
from bmb.metrics import ConfusionMatrix, default_thresholds, group_recall, mean_recall, shot_groups
from bmb.protocols import select_result


@dataclass
class EvalResult:
    top1: float
    mean_recall: float
    per_class_recall: list[float]
    groups: dict[str, float]

    @classmethod
    def of(cls, cm: ConfusionMatrix, groups: dict[str, torch.Tensor]) -> EvalResult:
        rec = cm.per_class_recall()
        return cls(cm.top1(), mean_recall(rec), [float(v) for v in rec], group_recall(rec, groups))


def shot_thresholds(cfg: Config, labeled_counts: Sequence[int] | torch.Tensor) -> tuple[int, int]:
    """``(many_above, few_at_most)``: the configured ones, else the top/bottom thirds of classes."""
    many, few = cfg.train.many_above, cfg.train.few_at_most
    if many is None or few is None:
        d_many, d_few = default_thresholds(labeled_counts)
        many, few = (d_many if many is None else many), (d_few if few is None else few)
    return many, few


@torch.no_grad()
def confusion_matrices(source: Iterable, prepare: Callable[[torch.Tensor], torch.Tensor],
                       models: dict[str, nn.Module], heads: dict[str, tuple[str, str]], num_classes: int,
                       autocast: Callable[[], Any] = contextlib.nullcontext) -> dict[str, ConfusionMatrix]:
    """One pass over ``source`` (batches ``(uint8 images, labels[, valid])``): every model of
    ``models`` (put in eval mode) runs once per batch on ``prepare(images)``; ``heads`` maps a
    result name to ``(model name, "aux" | "base")``. The matrices are this process's only."""
    cms = {k: ConfusionMatrix(num_classes) for k in heads}
    models = {name: m.eval() for name, m in models.items()}
    for item in source:
        images, labels = item[0], item[1]
        valid = item[2] if len(item) > 2 else None
        x = prepare(images)
        with autocast():
            outs = {name: m(x) for name, m in models.items()}
        for key, (name, head) in heads.items():
            logits = outs[name].aux_logits if head == "aux" else outs[name].base_logits
            cms[key].update(logits.argmax(-1), labels, valid)
    return cms


class Evaluator:
    """The trainer's evaluation of each split in ``sources`` (split name -> this rank's source).

    Args:
        cfg: the run's config (``data.eval_split`` is the reported split).
        sources: split name -> evaluation source for this rank.
        prepare: uint8 images -> the model's input (the view maker's ``eval``, on the device).
        groups: many/medium/few class masks.
        num_classes: ``C``.
        all_reduce_sum: sums a tensor over ranks (identity in one process).
        autocast: the accelerator's autocast context.
    """

    def __init__(self, cfg: Config, sources: dict[str, Any], prepare: Callable[[torch.Tensor], torch.Tensor],
                 groups: dict[str, torch.Tensor], num_classes: int,
                 all_reduce_sum: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                 autocast: Callable[[], Any] = contextlib.nullcontext) -> None:
        self.cfg, self.sources, self.prepare, self.groups = cfg, sources, prepare, groups
        self.num_classes, self.all_reduce_sum = num_classes, all_reduce_sum
        self.device, self.autocast = device, autocast

    def split(self, source: Iterable, ema: nn.Module, raw: nn.Module, eval_head: str) -> dict[str, EvalResult]:
        """Results of the EMA aux and base heads (``ema_aux``, ``ema_base``) and of the non-EMA
        model's evaluated head (``raw_<head>``), summed over ranks."""
        heads = {"ema_aux": ("ema", "aux"), "ema_base": ("ema", "base"), f"raw_{eval_head}": ("raw", eval_head)}
        cms = confusion_matrices(source, self.prepare, {"ema": ema, "raw": raw}, heads, self.num_classes,
                                 self.autocast)
        results = {}
        for k, cm in cms.items():
            cm.matrix = self.all_reduce_sum(cm.matrix.to(self.device)).cpu()
            results[k] = EvalResult.of(cm, self.groups)
        return results

    def row(self, step: int, ema: nn.Module, raw: nn.Module, eval_head: str) -> dict[str, Any]:
        """The metrics of one evaluation: the EMA model's ``eval_head`` on every split (unprefixed
        for ``data.eval_split``, ``<split>_`` otherwise), and on the reported split the EMA model's
        other head and the non-EMA model's evaluated head."""
        head = "ema_" + eval_head
        row: dict[str, Any] = {"step": step, "epoch": step / self.cfg.train.iters_per_epoch}
        for split, source in self.sources.items():
            res = self.split(source, ema, raw, eval_head)
            main = res[head]
            prefix = "" if split == self.cfg.data.eval_split else f"{split}_"
            row.update({f"{prefix}top1": main.top1, f"{prefix}mean_recall": main.mean_recall,
                        f"{prefix}per_class_recall": main.per_class_recall,
                        **{f"{prefix}{g}": v for g, v in main.groups.items()}})
            if not prefix:
                other = "ema_base" if head == "ema_aux" else "ema_aux"
                raw_key = "raw_" + eval_head
                row.update({f"{other}_top1": res[other].top1, f"{other}_mean_recall": res[other].mean_recall,
                            f"{raw_key}_top1": res[raw_key].top1, f"{raw_key}_mean_recall": res[raw_key].mean_recall})
        return row

    def corrupt_skipped(self) -> dict[str, int]:
        """Images skipped as undecodable in the evaluation passes so far (this rank), per split."""
        return {f"{split}_corrupt_skipped": s.skipped for split, s in self.sources.items() if hasattr(s, "skipped")}


def final_result(cfg: Config, history: list[dict[str, Any]], step: int, labeled_counts: torch.Tensor,
                 class_names: list[str], thresholds: tuple[int, int], run_id: str | None,
                 device: torch.device | None = None) -> dict[str, Any]:
    """``final.json``: the evaluation protocol (``train.eval_protocol``) applied to the history,
    with what a reader needs to interpret it."""
    result = select_result(history, cfg.train.eval_protocol, val_split=cfg.data.val_split)
    if device is not None and device.type == "cuda":
        result["max_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    result.update({"steps": step, "seconds": history[-1]["seconds"] if history else 0.0,
                   "algorithm": cfg.method.algorithm, "name": cfg.name,
                   "labeled_counts": torch.as_tensor(labeled_counts).tolist(), "class_names": class_names,
                   "many_above": thresholds[0], "few_at_most": thresholds[1], "run_id": run_id})
    return result


PER_CLASS_ROWS_BELOW = 100  # classes: from here on the console shows the groups and the worst classes
WORST_CLASSES = 10


def format_table(result: dict[str, Any]) -> str:
    """The recall table printed at the end of a run (and by ``bmb-eval``): one row per class below
    :data:`PER_CLASS_ROWS_BELOW` classes; from there on the many/medium/few groups and the
    :data:`WORST_CLASSES` classes of lowest recall (every class's recall stays in the result files,
    ``per_class_recall``). The last line: top-1, mean recall and the groups."""
    names, counts, recall = result["class_names"], result["labeled_counts"], result["per_class_recall"]
    lines = [f"\n{result['name']} ({result['algorithm']}, {result['steps']} steps, {result['protocol']})"]
    if len(names) < PER_CLASS_ROWS_BELOW:
        lines += ["| class | labeled | recall |", "|---|---:|---:|"]
        lines += [f"| {name} | {n} | {100 * r:.1f} |" for name, n, r in zip(names, counts, recall)]
    else:
        lines += _group_rows(result) + ["", f"{WORST_CLASSES} lowest recall of {len(names)} classes "
                                        "(every class: per_class_recall in the result file)",
                                        "| class | labeled | recall |", "|---|---:|---:|"]
        worst = sorted(range(len(names)), key=lambda k: (recall[k], k))[:WORST_CLASSES]
        lines += [f"| {names[k]} | {counts[k]} | {100 * recall[k]:.1f} |" for k in worst]
    lines.append(f"top-1 {100 * result['top1']:.2f}  mean recall {100 * result['mean_recall']:.2f}  "
                 f"many {100 * result['many']:.1f}  medium {100 * result['medium']:.1f}  few {100 * result['few']:.1f}"
                 f"  (many: >{result['many_above']} labeled, few: <={result['few_at_most']})")
    return "\n".join(lines)


def _group_rows(result: dict[str, Any]) -> list[str]:
    """``| group | classes | labeled per class | mean recall |`` for many, medium, few and all."""
    counts = torch.as_tensor(result["labeled_counts"])
    groups = shot_groups(counts, result["many_above"], result["few_at_most"])
    rows = ["| group | classes | labeled per class | mean recall |", "|---|---:|---:|---:|"]
    for name, mask in [*groups.items(), ("all", torch.ones_like(counts, dtype=torch.bool))]:
        n = counts[mask]
        span = f"{int(n.min())}-{int(n.max())}" if n.numel() else "-"
        value = result["mean_recall" if name == "all" else name]
        rows.append(f"| {name} | {int(mask.sum())} | {span} | {100 * value:.1f} |")
    return rows
