"""Building algorithms in tests: the context as arguments, hyperparameters as MethodConfig overrides."""

from __future__ import annotations

from typing import Any

import torch

from bmb.algorithms import BMB, AlgorithmContext
from bmb.config import MethodConfig


def make_bmb(num_classes: int, feat_dim: int, labeled_counts: Any, unlabeled_size: int, *,
             generator: torch.Generator | None = None, collectives: Any = None, device: Any = "cpu",
             **method: Any) -> BMB:
    """``BMB(MethodConfig(**method), AlgorithmContext(...))``; the other hyperparameters keep their
    one default (bmb.config)."""
    ctx = AlgorithmContext(num_classes, feat_dim, torch.as_tensor(labeled_counts), unlabeled_size,
                           generator=generator, collectives=collectives, device=device)
    return BMB(MethodConfig(**method), ctx)
