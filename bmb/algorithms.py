"""The two algorithms, registered by name: ``fixmatch`` (the baseline) and ``bmb``.

An algorithm takes one step's model outputs (:class:`StepOutputs`) and returns its losses as a
dict of tensors (``"loss"`` is the total to back-propagate; the rest are detached statistics).
No I/O, no data loading, no Accelerate: the only contact with other ranks is through
:class:`bmb.dist.Collectives`, a no-op in one process.

Losses (docs/method.md, paper Eq. 11)::

    L = L_b^L + L_a^L + lambda_u (L_b^U + L_a^U) + lambda_mb L_mb

Unlabeled terms (and the bank, and the N̂ estimate) are off during warm-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bmb.dist import Collectives
from bmb.estimate import UnlabeledCountEstimator
from bmb.memory import BalancedMemoryBank
from bmb.models import ModelOutput
from bmb.weights import adaptive_weights, annealed_weights


@dataclass
class StepOutputs:
    """The model's outputs for one step.

    Attributes:
        labels: int64 ``(B_L,)`` labels of the labeled batch.
        labeled: outputs on the labeled weak view, each ``(B_L, ·)``.
        unlabeled_weak: outputs on the unlabeled weak view, each ``(B_U, ·)``.
        unlabeled_strong: outputs on the K strong views stacked view-major, each ``(K * B_U, ·)``
            (rows ``k * B_U + i`` belong to sample ``i``).
        unlabeled_on: False during warm-up (unlabeled terms off).
        progress: training progress ``t / T`` in [0, 1] (for the optional weight annealing).
    """

    labels: torch.Tensor
    labeled: ModelOutput
    unlabeled_weak: ModelOutput
    unlabeled_strong: ModelOutput
    unlabeled_on: bool = True
    progress: float = 0.0

    @property
    def num_strong(self) -> int:
        return self.unlabeled_strong.base_logits.shape[0] // self.unlabeled_weak.base_logits.shape[0]


ALGORITHMS: dict[str, Callable[..., Algorithm]] = {}


def register(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        ALGORITHMS[name] = cls
        cls.name = name
        return cls

    return deco


def build_algorithm(name: str, **kwargs: Any) -> Algorithm:
    """The algorithm registered as ``name`` (``fixmatch`` or ``bmb``)."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name](**kwargs)


def confident_targets(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax, hard pseudo labels and the confidence mask of (detached) logits ``(B, C)``."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    conf, hard = probs.max(dim=-1)
    return probs, hard, conf >= threshold


def fixmatch_unlabeled_loss(weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean over samples x views of 1[q >= tau] * CE(strong, argmax weak)`` and the mask ``(B_U,)``.

    Args:
        weak_logits: ``(B_U, C)``; strong_logits: ``(K * B_U, C)`` view-major.
    """
    _, hard, mask = confident_targets(weak_logits, threshold)
    k = strong_logits.shape[0] // weak_logits.shape[0]
    ce = F.cross_entropy(strong_logits.float(), hard.repeat(k), reduction="none")
    return (ce * mask.repeat(k)).mean(), mask


class Algorithm(nn.Module):
    """Base: per-step losses from :class:`StepOutputs`; ``eval_head`` names the head to evaluate."""

    name = "?"
    eval_head = "aux"

    def forward(self, out: StepOutputs, aux_head: nn.Module) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self) -> None:
        """Called once the optimizer step is queued: state updates that may wait for the device."""

    def extra_state(self) -> dict[str, Any]:
        """Non-parameter state (bank, N̂ ...) saved in checkpoints."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


@register("fixmatch")
class FixMatch(Algorithm):
    """The paper's baseline: the base head alone, trained with FixMatch.

    Args:
        threshold: confidence threshold tau.
        lambda_u: weight of the unlabeled loss.
    """

    eval_head = "base"

    def __init__(self, threshold: float = 0.95, lambda_u: float = 1.0, **_: Any) -> None:
        super().__init__()
        self.threshold = threshold
        self.lambda_u = lambda_u

    def forward(self, out: StepOutputs, aux_head: nn.Module | None = None) -> dict[str, torch.Tensor]:
        loss_l = F.cross_entropy(out.labeled.base_logits.float(), out.labels)
        loss_u, mask = fixmatch_unlabeled_loss(out.unlabeled_weak.base_logits, out.unlabeled_strong.base_logits,
                                               self.threshold)
        on = 1.0 if out.unlabeled_on else 0.0
        total = loss_l + on * self.lambda_u * loss_u
        return {"loss": total, "base_l": loss_l.detach(), "base_u": loss_u.detach(),
                "mask_base": mask.float().mean()}


@register("bmb")
class BMB(Algorithm):
    """BMB: base head (FixMatch) + aux head with adaptive weights and the balanced memory bank.

    Args:
        num_classes: ``C``.
        feat_dim: encoder feature dimension ``D``.
        labeled_counts: ``(C,)`` true labeled class counts ``N^L``.
        threshold: tau.
        alpha: adaptive-weight spread (0 or ``adaptive_weights=False`` gives plain CE).
        put_power: beta of the bank's enqueue.
        get_power: gamma of the bank's get.
        lambda_u: weight of the unlabeled losses.
        lambda_mb: weight of the memory-bank loss.
        bank_size: bank capacity.
        get_num: items drawn from the bank per step and per rank.
        use_bank: ablation switch (False: no bank, no bank loss).
        adaptive: ablation switch for the adaptive weights.
        bank_view: ``"strong"`` (default) or ``"weak"``: which view's features enter the bank.
        estimate_mode: ``"mean"`` or ``"ema"`` for N̂.
        anneal_weights: authors' optional ``w' = 1 - (t/T)(1 - w)``.
        bank_check_every: every this many bank updates, compare a checksum of the bank across
            ranks and raise if they differ (0: never). Costs one tiny all-gather.
        generator: generator of the bank (seed it identically on every rank).
        collectives: cross-rank operations (default: single process).
        device: where the bank lives.
    """

    eval_head = "aux"

    def __init__(self, num_classes: int, feat_dim: int, labeled_counts: torch.Tensor, *,
                 threshold: float = 0.95, alpha: float = 1.5, put_power: float = 3.0,
                 get_power: float = 0.75, lambda_u: float = 1.0, lambda_mb: float = 0.25,
                 bank_size: int = 128, get_num: int = 64, use_bank: bool = True,
                 adaptive: bool = True, bank_view: str = "strong", estimate_mode: str = "mean",
                 anneal_weights: bool = False, bank_check_every: int = 0,
                 generator: torch.Generator | None = None,
                 collectives: Collectives | None = None, device: torch.device | str = "cpu") -> None:
        super().__init__()
        if bank_view not in ("strong", "weak"):
            raise ValueError(f"BMB: bank_view must be 'strong' or 'weak', got {bank_view!r}")
        if get_num < 1:
            raise ValueError(f"BMB: get_num must be >= 1, got {get_num}")
        counts = torch.as_tensor(labeled_counts)
        if counts.shape != (num_classes,):
            raise ValueError(f"BMB: labeled_counts must have shape ({num_classes},), got {tuple(counts.shape)}")
        self.num_classes = num_classes
        self.threshold, self.alpha = threshold, alpha
        self.lambda_u, self.lambda_mb = lambda_u, lambda_mb
        self.get_num, self.use_bank, self.adaptive = get_num, use_bank, adaptive
        self.bank_view, self.anneal = bank_view, anneal_weights
        self.coll = collectives or Collectives()
        self.register_buffer("labeled_counts", counts.to(torch.float32), persistent=False)
        self.bank = BalancedMemoryBank(bank_size, feat_dim, num_classes, put_power=put_power,
                                       get_power=get_power, generator=generator, device=device)
        self.estimator = UnlabeledCountEstimator(num_classes, mode=estimate_mode, device=device)
        self._pending: torch.Tensor | None = None  # this step's bank candidates, enqueued in after_step
        self.bank_check_every = bank_check_every
        self.bank_updates = 0
        self.last_get: tuple[torch.Tensor, torch.Tensor] | None = None  # (labels, valid): get histogram

    def _weights(self, counts: torch.Tensor, progress: float) -> torch.Tensor:
        """Adaptive (optionally annealed) class weights, on ``counts``' device."""
        if not self.adaptive:
            return torch.ones(self.num_classes, device=counts.device)
        w = adaptive_weights(counts, self.alpha)
        return annealed_weights(w, progress) if self.anneal else w

    def _labeled_counts_on(self, device: torch.device) -> torch.Tensor:
        """``N^L`` on ``device``, copied once: a host-to-device copy every step would make the
        host wait for the GPU."""
        if self.labeled_counts.device != device:
            self.labeled_counts = self.labeled_counts.to(device)
        return self.labeled_counts

    def forward(self, out: StepOutputs, aux_head: nn.Module) -> dict[str, torch.Tensor]:
        dev = out.labels.device
        k = out.num_strong
        # --- base head: FixMatch, no rebalancing
        base_l = F.cross_entropy(out.labeled.base_logits.float(), out.labels)
        base_u, mask_b = fixmatch_unlabeled_loss(out.unlabeled_weak.base_logits,
                                                 out.unlabeled_strong.base_logits, self.threshold)
        # --- aux head, labeled: weights from the true labeled counts
        w_l = self._weights(self._labeled_counts_on(dev), out.progress)
        aux_l = (w_l[out.labels] * F.cross_entropy(out.labeled.aux_logits.float(), out.labels, reduction="none")).mean()
        # --- aux head, unlabeled: soft targets, mask and class from the aux head's weak view
        p_a, hard_a, mask_a = confident_targets(out.unlabeled_weak.aux_logits, self.threshold)
        zero = out.labels.new_zeros((), dtype=torch.float32)
        stats: dict[str, torch.Tensor] = {}
        aux_u, bank_loss = zero, zero
        if out.unlabeled_on:
            # Weighted bincount rather than hard_a[mask_a]: boolean indexing would wait for the GPU.
            # (scatter_add_, not bincount, which on CUDA reads the maximum label on the host.)
            step_counts = torch.zeros(self.num_classes, device=dev).scatter_add_(0, hard_a, mask_a.float())
            self.estimator.update(self.coll.all_reduce_sum(step_counts))
            w_u = self._weights(self.estimator.value().to(dev), out.progress)
            logp = F.log_softmax(out.unlabeled_strong.aux_logits.float(), dim=-1)  # (K*B_U, C)
            soft_ce = -(p_a.repeat(k, 1) * logp).sum(-1)
            aux_u = ((mask_a.float() * w_u[hard_a]).repeat(k) * soft_ce).mean()
            if self.use_bank:
                bank_loss = self._bank_step(out, aux_head, stats)
        total = (base_l + aux_l + self.lambda_u * (base_u + aux_u) * float(out.unlabeled_on)
                 + self.lambda_mb * bank_loss)
        stats.update({"loss": total, "base_l": base_l.detach(), "base_u": base_u.detach(),
                      "aux_l": aux_l.detach(), "aux_u": aux_u.detach(), "mb": bank_loss.detach(),
                      "mask_base": mask_b.float().mean(), "mask_aux": mask_a.float().mean(),
                      "bank_size": self.bank.size.float()})
        return stats

    def _bank_step(self, out: StepOutputs, aux_head: nn.Module, stats: dict) -> torch.Tensor:
        """Loss on items drawn from the bank as it was before this step; stash this step's
        candidates for :meth:`after_step`.

        Nothing here waits for the device (no boolean indexing, no host reads), so the backward
        pass can be queued while the GPU still runs the forward.
        """
        dev = out.labels.device
        feats, labels, valid = self.bank_slice()
        labels, valid = labels.to(dev), valid.to(dev)
        self.last_get = (labels, valid)
        # Fixed shape: invalid rows (while the bank holds fewer items) are masked out of the mean.
        ce = F.cross_entropy(aux_head(feats.to(dev).detach()).float(), labels, reduction="none")
        loss = (ce * valid).sum() / valid.sum().clamp_min(1)
        # Candidates: features with the aux head's own confident hard label on the same view,
        # packed as (features | label | valid) for one fixed-shape gather across ranks.
        src = out.unlabeled_strong if self.bank_view == "strong" else out.unlabeled_weak
        _, hard, valid = confident_targets(src.aux_logits, self.threshold)
        self._pending = torch.cat([src.features.detach().float(), hard[:, None].float(), valid[:, None].float()], 1)
        stats["bank_candidates"] = valid.float().sum() * self.coll.world_size
        return loss

    def after_step(self) -> None:
        """Gather every rank's candidates and enqueue them (identically on every rank)."""
        if self._pending is None:
            return
        packed = self.coll.all_gather_cat(self._pending).to(self.bank.device)
        self._pending = None
        self.bank.enqueue(packed[:, :-2], packed[:, -2].long(), valid=packed[:, -1] > 0.5)
        self.bank_updates += 1
        if self.bank_check_every and self.bank_updates % self.bank_check_every == 0:
            self.check_bank_in_sync()

    def bank_slice(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's share of one global draw of ``get_num x world`` items from the bank.

        Every rank draws the same global sample (identical bank and generator) and keeps every
        ``world``-th row starting at its rank, so the ranks together train on ``get_num x world``
        distinct items, and while the bank is short the valid rows (drawn first) spread evenly.

        Returns:
            features ``(get_num, D)``, labels ``(get_num,)`` and bool ``valid (get_num,)``
            (:meth:`BalancedMemoryBank.draw`): fixed shapes, no host sync.
        """
        world, rank = self.coll.world_size, self.coll.rank
        feats, labels, valid = self.bank.draw(self.get_num * world, self.estimator.value())
        return feats[rank::world], labels[rank::world], valid[rank::world]

    def check_bank_in_sync(self) -> None:
        """Raise if the bank (checksum), its generator or N-hat differ between ranks."""
        fingerprint = torch.cat([
            self.bank.checksum().cpu(),
            self.bank.generator.get_state().to(torch.float64),
            self.estimator.value().cpu(),
        ])
        if not self.coll.all_equal(fingerprint.to(self.labeled_counts.device)):
            raise RuntimeError(
                f"memory bank diverged across ranks after {self.bank_updates} updates (rank "
                f"{self.coll.rank}: {len(self.bank)} items, checksum {self.bank.checksum().tolist()}); "
                "every rank must see the same gathered candidates and the same bank generator seed")

    def extra_state(self) -> dict[str, Any]:
        return {"bank": self.bank.state_dict(), "estimator": self.estimator.state_dict(),
                "bank_updates": self.bank_updates}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.bank.load_state_dict(state["bank"])
        self.estimator.load_state_dict(state["estimator"])
        self.bank_updates = int(state.get("bank_updates", 0))
