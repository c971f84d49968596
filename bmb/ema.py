"""Exponential moving average of a model's weights (evaluation uses the EMA model)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ModelEMA:
    """Keeps ``ema = decay * ema + (1 - decay) * model`` for parameters; buffers are copied.

    Args:
        model: the model being trained (unwrapped, not DDP).
        decay: in [0, 1); 0.999 in the paper; 0 keeps an exact copy of the model (no EMA: the
            authors' ``--disable_ema_model`` evaluates the trained model itself).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ModelEMA: decay must be in [0, 1), got {decay!r}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_p = [p for p in self.module.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        if ema_p and self.decay == 0.0:
            torch._foreach_copy_(ema_p, src_p)
        elif ema_p:
            torch._foreach_lerp_(ema_p, src_p, 1.0 - self.decay)
        for eb, mb in zip(self.module.buffers(), model.buffers()):
            eb.copy_(mb)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.module.load_state_dict(state["module"])
