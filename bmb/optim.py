"""The optimizer and the learning-rate schedule a run trains with (``optim.*`` keys)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from bmb.config import Config

_IMPL_FLAGS = ("fused", "foreach")


def build_optimizer(cfg: Config, params: Iterable[nn.Parameter],
                    device: torch.device | str | None = None) -> torch.optim.Optimizer:
    """The configured optimizer for parameters that will live on ``device``.

    On CUDA it is the fused implementation (``fused=True``, which AdamW, Adam and SGD all have:
    the whole update of a chunk of tensors in one kernel, where foreach launches one per
    elementwise op; under fp16 loss scaling the inf check also stays on the device, where the
    unfused step reads it on the host).
    Elsewhere torch's default (a per-parameter loop on the CPU): the CPU step is unchanged. The
    parameters may still be on the CPU here (Accelerate moves them later): the fused kernels'
    device check runs at the first step. No config key: it is the same update up to rounding.

    A checkpoint's param groups carry the flags of the optimizer that wrote it; on loading, this
    optimizer keeps its own (the device decides, not the checkpoint), so that a run resumed on
    another device, or from a checkpoint written before this choice, gets the device's best.
    """
    o = cfg.optim
    impl = {"fused": True} if device is not None and torch.device(device).type == "cuda" else {}
    if o.name == "adamw":  # decoupled: w <- w (1 - lr wd), the authors' WeightEMA decay (docs/fidelity.md)
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, **impl)
    elif o.name == "adam":
        opt = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, **impl)
    else:
        opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                              weight_decay=o.weight_decay, **impl)
    opt.register_load_state_dict_pre_hook(_keep_own_implementation)
    return opt


def _keep_own_implementation(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Load-state-dict pre-hook: the incoming groups take this optimizer's fused/foreach flags
    (torch then places the restored step counters as this implementation wants them)."""
    mine = optimizer.param_groups
    groups = [{**g, **{k: mine[i][k] for k in _IMPL_FLAGS if k in mine[i]}} if i < len(mine) else g
              for i, g in enumerate(state_dict["param_groups"])]
    return {**state_dict, "param_groups": groups}


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """Multiplier of the base lr at a step: linear warm-up, then constant or cosine to 0 (moving
    every step, or held through each epoch with ``optim.schedule_unit=epoch``)."""
    total, warm, cosine = cfg.total_steps, cfg.optim.warmup_steps, cfg.optim.schedule == "cosine"
    per_epoch = cfg.train.iters_per_epoch if cfg.optim.schedule_unit == "epoch" else 1

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if not cosine:
            return 1.0
        step -= step % per_epoch  # the epoch's first step
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warm, total) / max(total - warm, 1)))

    return f


def retune(optimizer: torch.optim.Optimizer, scheduler: Any, cfg: Config) -> None:
    """After an opted-in config change on resume: the restored optimizer and schedule take the
    requested lr, weight decay (and SGD momentum), at the schedule's current step."""
    o = cfg.optim
    groups = optimizer.param_groups
    for g in groups:
        g["initial_lr"], g["weight_decay"] = o.lr, o.weight_decay
        if o.name == "sgd":
            g["momentum"], g["nesterov"] = o.momentum, o.nesterov
    factor = lr_lambda(cfg)(scheduler.last_epoch)
    for g in groups:
        g["lr"] = o.lr * factor
    # Through the schedule's own state (its base lrs and the lr it last set), not its attributes.
    scheduler.load_state_dict({**scheduler.state_dict(), "base_lrs": [o.lr for _ in groups],
                               "_last_lr": [g["lr"] for g in groups]})
