"""The estimate ``N̂`` of the unlabeled class distribution (paper Eq. 6)."""

from __future__ import annotations

from typing import Any

import torch


class UnlabeledCountEstimator:
    """Keeps ``N̂``, the estimated number of samples of each class in the unlabeled set ``U``.

    Each step the caller passes the per-class number of unlabeled samples whose aux-head weak
    prediction passed the threshold, summed over ranks, and the global unlabeled batch they came
    from. The estimator keeps the per-class *fraction* of the batch (``mode="mean"``: the running
    mean since the first update, i.e. the end of warm-up; ``mode="ema"``: an exponential moving
    average with ``momentum``), and :meth:`value` scales it to the unlabeled set:
    ``N̂_k = fraction_k * |U|``, floored at 1.

    Why this scale (docs/method.md, "Scale matters"): Eq. 6 counts over the whole unlabeled set.
    A mean of per-step counts lives on the scale of one batch (64 samples), where with 100 or
    1000 classes most entries are below 1; a floor of 1 there flattens ``w^U`` to ~1 and the
    bank's ``get`` prior to uniform, and makes both depend on the batch size and the number of
    ranks. On ``U``'s scale the floor means "fewer than one sample of this class in ``U``", the
    smallest count a class can meaningfully have. It matches the authors' floor of 1e-3 per
    batch (``0.001 * |U| / 64``: 0.2 samples on CIFAR-10-LT, 1.8 on ImageNet-LT) to within the
    same order, but it does not move with the batch. ``w`` and the ``get`` prior are
    scale-invariant apart from the floor. Because the counts are global and divided by the
    global batch, ``N̂`` is identical for any number of ranks and any per-rank batch at the same
    global batch (tests/test_nhat_scale.py).

    Before the first update the estimate is uniform (``|U| / C`` each).

    Args:
        num_classes: ``C``.
        unlabeled_size: ``|U|``, the number of samples in the unlabeled split.
        mode: ``"mean"`` (default, paper) or ``"ema"``.
        momentum: EMA momentum in [0, 1) for ``mode="ema"``.
        device: where the estimate lives (the training device: updates then never wait for it).
    """

    def __init__(self, num_classes: int, unlabeled_size: int, mode: str = "mean", momentum: float = 0.99,
                 device: torch.device | str = "cpu") -> None:
        if mode not in ("mean", "ema"):
            raise ValueError(f"UnlabeledCountEstimator: mode must be 'mean' or 'ema', got {mode!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"UnlabeledCountEstimator: momentum must be in [0, 1), got {momentum!r}")
        if isinstance(unlabeled_size, bool) or not isinstance(unlabeled_size, int) or unlabeled_size < 1:
            raise ValueError(f"UnlabeledCountEstimator: unlabeled_size must be an integer >= 1 (the "
                             f"number of unlabeled samples), got {unlabeled_size!r}")
        self.num_classes = num_classes
        self.unlabeled_size = unlabeled_size
        self.mode = mode
        self.momentum = momentum
        self.steps = 0  # updates so far, on the host
        self.device = torch.device(device)
        # Device state, only ever updated in place (a CUDA graph may hold it: bmb.graphs).
        self._t = torch.zeros((), dtype=torch.float64, device=self.device)  # updates so far
        self._sum = torch.zeros(num_classes, dtype=torch.float64, device=self.device)  # mean: running sum
        self._frac = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64, device=self.device)

    def update(self, step_counts: torch.Tensor, batch_size: int) -> None:
        """Fold in one step's per-class confident counts ``(C,)`` out of ``batch_size`` samples
        (both global: summed over ranks)."""
        c = torch.as_tensor(step_counts).detach().to(self.device, torch.float64)
        if c.shape != (self.num_classes,):
            raise ValueError(f"UnlabeledCountEstimator.update: counts must have shape ({self.num_classes},), "
                             f"got {tuple(c.shape)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"UnlabeledCountEstimator.update: batch_size must be an integer >= 1, got {batch_size!r}")
        self.steps += 1
        self.fold(c / batch_size)

    def fold(self, fractions: torch.Tensor) -> None:
        """The device half of :meth:`update` (the caller counts ``steps``): fixed-shape, in-place
        work a CUDA graph can capture. ``fractions``: float64 ``(C,)`` on ``device``, one step's
        confident counts divided by its global unlabeled batch.

        Mean mode keeps the exact running sum and divides once; EMA mode takes the first step's
        fractions as they are.
        """
        self._t.add_(1.0)
        if self.mode == "mean":
            self._sum.add_(fractions)
            torch.div(self._sum, self._t, out=self._frac)
        else:
            keep = torch.where(self._t > 1.0, self.momentum, 0.0)  # 0 at the first update
            self._frac.mul_(keep).add_(fractions * (1.0 - keep))

    def state_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The device tensors :meth:`fold` updates in place (updates, running sum, fractions): the
        same objects for the estimator's lifetime."""
        return self._t, self._sum, self._frac

    def value(self) -> torch.Tensor:
        """``N̂``: estimated samples per class in ``U``, floored at 1 (one sample), float64 ``(C,)``
        on ``device``."""
        return (self._frac * self.unlabeled_size).clamp_min(1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "momentum": self.momentum, "steps": self.steps, "unit": "fraction",
                "unlabeled_size": self.unlabeled_size,
                "fraction": self._frac.cpu().clone(), "sum": self._sum.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("unit") != "fraction":
            raise ValueError("UnlabeledCountEstimator.load_state_dict: this state keeps N-hat on the scale of "
                             "one batch (written before N-hat moved to the unlabeled set's scale); it cannot "
                             "be converted without the batch size: start the run again")
        if state["fraction"].shape != (self.num_classes,):
            raise ValueError("UnlabeledCountEstimator.load_state_dict: class count mismatch")
        if state["unlabeled_size"] != self.unlabeled_size:
            raise ValueError(f"UnlabeledCountEstimator.load_state_dict: the state is for an unlabeled set of "
                             f"{state['unlabeled_size']} samples, this estimator's has {self.unlabeled_size}")
        self.mode, self.momentum, self.steps = state["mode"], state["momentum"], int(state["steps"])
        self._frac.copy_(state["fraction"].to(self.device, torch.float64))  # in place: captured graphs keep working
        self._sum.copy_(state["sum"].to(self.device, torch.float64))
        self._t.fill_(self.steps)
