"""The estimate ``N̂`` of the unlabeled class distribution (paper Eq. 6)."""

from __future__ import annotations

from typing import Any

import torch


class UnlabeledCountEstimator:
    """Keeps ``N̂``, the per-class count of confident unlabeled predictions per step.

    Each step the caller passes the per-class number of unlabeled samples whose aux-head weak
    prediction passed the threshold (summed over ranks in distributed runs). ``mode="mean"`` keeps
    the running mean since the first update (the end of warm-up); ``mode="ema"`` an exponential
    moving average with ``momentum``. Before the first update the estimate is uniform (ones).

    Args:
        num_classes: ``C``.
        mode: ``"mean"`` (default, paper) or ``"ema"``.
        momentum: EMA momentum in [0, 1) for ``mode="ema"``.
        device: where the estimate lives (the training device: updates then never wait for it).
    """

    def __init__(self, num_classes: int, mode: str = "mean", momentum: float = 0.99,
                 device: torch.device | str = "cpu") -> None:
        if mode not in ("mean", "ema"):
            raise ValueError(f"UnlabeledCountEstimator: mode must be 'mean' or 'ema', got {mode!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"UnlabeledCountEstimator: momentum must be in [0, 1), got {momentum!r}")
        self.num_classes = num_classes
        self.mode = mode
        self.momentum = momentum
        self.steps = 0  # updates so far, on the host
        self.device = torch.device(device)
        # Device state, only ever updated in place (a CUDA graph may hold it: bmb.graphs).
        self._t = torch.zeros((), dtype=torch.float64, device=self.device)  # updates so far
        self._sum = torch.zeros(num_classes, dtype=torch.float64, device=self.device)  # mean: running sum
        self._value = torch.ones(num_classes, dtype=torch.float64, device=self.device)

    def update(self, step_counts: torch.Tensor) -> None:
        """Fold in one step's per-class counts, ``(C,)``."""
        c = torch.as_tensor(step_counts).detach().to(self.device, torch.float64)
        if c.shape != (self.num_classes,):
            raise ValueError(f"UnlabeledCountEstimator.update: counts must have shape ({self.num_classes},), got {tuple(c.shape)}")
        self.steps += 1
        self.fold(c)

    def fold(self, counts: torch.Tensor) -> None:
        """The device half of :meth:`update` (the caller counts ``steps``): fixed-shape, in-place
        work a CUDA graph can capture. ``counts``: float64 ``(C,)`` on ``device``.

        Mean mode keeps the exact running sum of the counts and divides once; EMA mode takes the
        first counts as they are.
        """
        self._t.add_(1.0)
        if self.mode == "mean":
            self._sum.add_(counts)
            torch.div(self._sum, self._t, out=self._value)
        else:
            keep = torch.where(self._t > 1.0, self.momentum, 0.0)  # 0 at the first update
            self._value.mul_(keep).add_(counts * (1.0 - keep))

    def state_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The device tensors :meth:`fold` updates in place (updates, running sum, value): the
        same objects for the estimator's lifetime."""
        return self._t, self._sum, self._value

    def value(self) -> torch.Tensor:
        """``N̂`` clamped to >= 1 (safe as a denominator), float64 ``(C,)`` on ``device``."""
        return self._value.clamp_min(1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "momentum": self.momentum, "steps": self.steps,
                "value": self._value.cpu().clone(), "sum": self._sum.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["value"].shape != (self.num_classes,):
            raise ValueError("UnlabeledCountEstimator.load_state_dict: class count mismatch")
        self.mode, self.momentum, self.steps = state["mode"], state["momentum"], int(state["steps"])
        value = state["value"].to(self.device, torch.float64)
        self._value.copy_(value)  # in place: captured graphs keep working
        self._sum.copy_(state["sum"] if "sum" in state else value * self.steps)  # older checkpoints: no sum
        self._t.fill_(self.steps)
