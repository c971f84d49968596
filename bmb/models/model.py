"""The BMB network: one shared encoder and two linear heads on its pooled feature.

The **base head** is trained exactly like FixMatch (no rebalancing) and exists to make the
encoder good; the **aux head** is the rebalanced classifier and the one used for predictions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from bmb.models.encoders import build_encoder


class ModelOutput(NamedTuple):
    features: torch.Tensor  # (B, D) pooled encoder features
    base_logits: torch.Tensor  # (B, C)
    aux_logits: torch.Tensor  # (B, C)


class BMBModel(nn.Module):
    """Encoder + base head + aux head.

    Args:
        encoder: module mapping ``(B, 3, H, W)`` to ``(B, D)`` with attribute ``out_dim = D``.
        num_classes: ``C``.
    """

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.feat_dim = int(encoder.out_dim)
        self.num_classes = num_classes
        self.base_head = nn.Linear(self.feat_dim, num_classes)
        self.aux_head = nn.Linear(self.feat_dim, num_classes)

    @classmethod
    def build(cls, encoder: str, num_classes: int, **encoder_kwargs) -> BMBModel:
        return cls(build_encoder(encoder, **encoder_kwargs), num_classes)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        z = self.encoder(x)
        return ModelOutput(z, self.base_head(z), self.aux_head(z))
