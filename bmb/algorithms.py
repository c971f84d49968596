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

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bmb.config import MethodConfig
from bmb.dist import Collectives
from bmb.estimate import UnlabeledCountEstimator
from bmb.graphs import StepGraphs
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


@dataclass
class AlgorithmContext:
    """What an algorithm needs from the run besides its hyperparameters (:class:`MethodConfig`).

    Attributes:
        num_classes: ``C``.
        feat_dim: the encoder's feature dimension ``D``.
        labeled_counts: ``(C,)`` true labeled class counts ``N^L``.
        unlabeled_size: ``|U|``, the unlabeled split's size (N̂ estimates each class's count in U).
        generator: source of the bank's randomness; seed it identically on every rank.
        collectives: cross-rank operations (default: one process).
        device: where the algorithm's state (bank, N̂) lives: the training device.
    """

    num_classes: int
    feat_dim: int
    labeled_counts: torch.Tensor
    unlabeled_size: int
    generator: torch.Generator | None = None
    collectives: Collectives | None = None
    device: torch.device | str = "cpu"


ALGORITHMS: dict[str, Callable[..., Algorithm]] = {}


def register(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        ALGORITHMS[name] = cls
        cls.name = name
        return cls

    return deco


def build_algorithm(method: MethodConfig, ctx: AlgorithmContext) -> Algorithm:
    """The algorithm ``method.algorithm`` (``fixmatch`` or ``bmb``), built from its config section."""
    if method.algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {method.algorithm!r}; choose one of {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[method.algorithm](method, ctx)


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

    def retune(self, method: MethodConfig) -> None:
        """Re-apply hyperparameters that restored state carries (after an opted-in config change)."""

    def take_drawn(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The ``(labels, valid)`` of the items drawn from a memory bank since the last call (the
        trainer's ``get`` histogram), or None."""
        return None

    def eval_stats(self) -> dict[str, Any]:
        """State worth a row of ``metrics.jsonl`` at each evaluation (bank histogram, N̂ ...)."""
        return {}


@register("fixmatch")
class FixMatch(Algorithm):
    """The paper's baseline: the base head alone, trained with FixMatch.

    Reads ``method.threshold`` (tau) and ``method.lambda_u``; needs nothing from ``ctx``.
    """

    eval_head = "base"

    def __init__(self, method: MethodConfig, ctx: AlgorithmContext | None = None) -> None:
        super().__init__()
        self.threshold = method.threshold
        self.lambda_u = method.lambda_u

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

    Every hyperparameter comes from ``method`` (:class:`bmb.config.MethodConfig`: one default
    each, documented there): tau ``threshold``, ``alpha`` and ``adaptive_weights`` (the weights),
    beta ``put_power`` and gamma ``get_power`` (the bank), ``lambda_u``, ``lambda_mb``,
    ``bank_size``, ``get_num`` (per step, global: split over the ranks) and ``get_replacement``, ``use_bank``,
    ``bank_view`` (which view's features enter the bank), ``estimate`` (N̂: mean or ema),
    ``anneal_weights``, ``bank_check_every`` (compare a bank checksum across ranks every N updates)
    and ``cuda_graphs`` (replay the step's no-grad work -- targets, weights, N̂, the bank's draw
    and enqueue -- as CUDA graphs, :mod:`bmb.graphs`, when the bank is on a CUDA device). The run
    supplies the rest through ``ctx`` (:class:`AlgorithmContext`).
    """

    eval_head = "aux"

    def __init__(self, method: MethodConfig, ctx: AlgorithmContext) -> None:
        super().__init__()
        m, c = method, ctx.num_classes
        if m.bank_view not in ("strong", "weak"):
            raise ValueError(f"BMB: bank_view must be 'strong' or 'weak', got {m.bank_view!r}")
        world = (ctx.collectives or Collectives()).world_size
        if m.get_num < 1 or (m.use_bank and m.get_num % world):
            raise ValueError(f"BMB: get_num must be a multiple (>= 1) of the {world} processes, got {m.get_num}")
        counts = torch.as_tensor(ctx.labeled_counts)
        if counts.shape != (c,):
            raise ValueError(f"BMB: labeled_counts must have shape ({c},), got {tuple(counts.shape)}")
        self.num_classes = c
        self.threshold, self.alpha = m.threshold, m.alpha
        self.lambda_u, self.lambda_mb = m.lambda_u, m.lambda_mb
        self.get_num, self.get_replacement = m.get_num, m.get_replacement
        self.use_bank, self.adaptive = m.use_bank, m.adaptive_weights
        self.bank_view, self.anneal = m.bank_view, m.anneal_weights
        self.fill_in_warmup = m.use_bank and not m.refresh_after_warmup  # the authors' default
        self.coll = ctx.collectives or Collectives()
        self.register_buffer("labeled_counts", counts.to(torch.float32), persistent=False)
        self.bank = BalancedMemoryBank(m.bank_size, ctx.feat_dim, c, put_power=m.put_power, get_power=m.get_power,
                                       generator=ctx.generator, device=ctx.device)
        self.estimator = UnlabeledCountEstimator(c, ctx.unlabeled_size, mode=m.estimate, device=ctx.device)
        self._pending: torch.Tensor | None = None  # this step's bank candidates, enqueued in after_step
        self._pending_views = 1  # views (row blocks) in _pending
        self.bank_check_every = m.bank_check_every
        self.bank_updates = 0
        self.last_get: tuple[torch.Tensor, torch.Tensor] | None = None  # the step's global draw: get histogram
        self.graphs = StepGraphs(self.bank, enabled=m.cuda_graphs)
        self._w_labeled: torch.Tensor | None = None  # constant unless annealed: computed once

    def _weights(self, counts: torch.Tensor, progress: float | torch.Tensor) -> torch.Tensor:
        """Adaptive (optionally annealed) class weights, on ``counts``' device."""
        if not self.adaptive:
            return torch.ones(self.num_classes, device=counts.device)
        w = adaptive_weights(counts, self.alpha)
        return annealed_weights(w, progress) if self.anneal else w

    def _labeled_weights(self, device: torch.device, progress: float | torch.Tensor) -> torch.Tensor:
        """Class weights from ``N^L``: fixed for the run unless annealed, so computed once."""
        if self.labeled_counts.device != device:  # copied once: a copy per step would wait for the GPU
            self.labeled_counts = self.labeled_counts.to(device)
        if self.anneal:
            return self._weights(self.labeled_counts, progress)
        if self._w_labeled is None or self._w_labeled.device != device:
            self._w_labeled = self._weights(self.labeled_counts, progress)
        return self._w_labeled

    def forward(self, out: StepOutputs, aux_head: nn.Module) -> dict[str, torch.Tensor]:
        """Losses of one step.

        The aux head's three terms are one soft-target cross-entropy over the rows
        ``labeled | strong views | bank items``, each row with its own target and coefficient
        (:meth:`_plan`): the same sums as the paper's three means, in a handful of kernels.
        """
        base_l = F.cross_entropy(out.labeled.base_logits.float(), out.labels)
        base_u, mask_b = fixmatch_unlabeled_loss(out.unlabeled_weak.base_logits,
                                                 out.unlabeled_strong.base_logits, self.threshold)
        if not out.unlabeled_on:
            return self._warmup_losses(out, base_l, base_u, mask_b)
        plan = self._planned(out)
        logits = [out.labeled.aux_logits, out.unlabeled_strong.aux_logits]
        if self.use_bank:
            logits.append(aux_head(plan["bank_feats"]))
            self.last_get = (plan["drawn_labels"], plan["drawn_valid"])
            self._pending = plan["pending"]
            self._pending_views = out.num_strong if self.bank_view == "strong" else 1
        ce = F.cross_entropy(torch.cat(logits).float(), plan["targets"], reduction="none")
        total = base_l + self.lambda_u * base_u + (ce * plan["coef"]).sum()
        with torch.no_grad():
            aux_l, aux_u, bank_loss = plan["term_weights"] @ ce
        return {"loss": total, "base_l": base_l.detach(), "base_u": base_u.detach(), "aux_l": aux_l,
                "aux_u": aux_u, "mb": bank_loss, "mask_base": mask_b.float().mean(),
                "mask_aux": plan["mask_aux"], "bank_size": plan["bank_size"],
                **({"bank_candidates": plan["bank_candidates"]} if self.use_bank else {})}

    def _warmup_losses(self, out: StepOutputs, base_l: torch.Tensor, base_u: torch.Tensor,
                       mask_b: torch.Tensor) -> dict[str, torch.Tensor]:
        """Warm-up: the labeled terms only (no N̂ update, no bank draw); the bank's candidates are
        enqueued only with ``method.refresh_after_warmup=false``."""
        w_l = self._labeled_weights(out.labels.device, out.progress)
        aux_l = (w_l[out.labels] * F.cross_entropy(out.labeled.aux_logits.float(), out.labels, reduction="none")).mean()
        _, _, mask_a = confident_targets(out.unlabeled_weak.aux_logits, self.threshold)
        if self.fill_in_warmup:  # enqueue this step's candidates (after_step), as after warm-up
            src = out.unlabeled_strong if self.bank_view == "strong" else out.unlabeled_weak
            with torch.no_grad():
                _, hard, ok = confident_targets(src.aux_logits.detach(), self.threshold)
                self._pending = torch.cat([src.features.detach().float(), hard[:, None].float(),
                                           ok[:, None].float()], 1)
        zero = torch.zeros_like(aux_l)
        return {"loss": base_l + aux_l, "base_l": base_l.detach(), "base_u": base_u.detach(),
                "aux_l": aux_l.detach(), "aux_u": zero, "mb": zero, "mask_base": mask_b.float().mean(),
                "mask_aux": mask_a.float().mean(), "bank_size": self.bank.size.float()}

    _PLAN_KEYS = ("targets", "coef", "term_weights", "mask_aux", "bank_size", "bank_feats", "drawn_labels",
                  "drawn_valid", "pending", "bank_candidates")

    def _planned(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        """:meth:`_plan` for this step, through :attr:`graphs` (a CUDA graph replay on the GPU)."""
        src = out.unlabeled_strong if self.bank_view == "strong" else out.unlabeled_weak
        inputs = [out.unlabeled_weak.aux_logits, src.aux_logits, src.features, out.labels]
        if self.anneal:
            inputs.append(torch.full((), out.progress, device=out.labels.device, dtype=torch.float64))
        else:
            self._labeled_weights(out.labels.device, 0.0)  # cached now, not inside a capture
        k = out.num_strong
        key = ("plan", k, *(tuple(t.shape) + (t.dtype,) for t in inputs))
        preserve = self.estimator.state_tensors()
        if self.coll.active:  # N̂ needs every rank's counts: count, sum over ranks, then plan
            counts = self.graphs.run(("counts", key[2]), self._step_counts, inputs[:1])
            inputs.append(self.coll.all_reduce_sum(counts))
        self.estimator.steps += 1  # the device half of the update happens inside the plan
        n_draw = ([self.bank.uniforms_per_draw(self.get_num, self.get_replacement)]
                  if self.use_bank else [])
        plan = self.graphs.run(key, functools.partial(self._plan, k), inputs, uniforms=n_draw, preserve=preserve)
        return dict(zip(self._PLAN_KEYS, plan))

    def _step_counts(self, aux_weak: torch.Tensor) -> torch.Tensor:
        """Per-class number of confident aux-head predictions on the weak view, float64 ``(C,)``."""
        _, hard, mask = confident_targets(aux_weak, self.threshold)
        return self._class_counts(hard, mask)

    def _class_counts(self, hard: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # scatter_add_, not bincount (CUDA's reads the maximum on the host) or hard[mask] (a sync).
        return torch.zeros(self.num_classes, device=hard.device, dtype=torch.float64).scatter_add_(
            0, hard, mask.to(torch.float64))

    def _plan(self, k: int, aux_weak: torch.Tensor, src_logits: torch.Tensor, src_feats: torch.Tensor,
              labels: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Everything of a step that needs no gradient, as fixed-shape device work.

        Updates N̂, draws this rank's bank items, and returns (:attr:`_PLAN_KEYS`): per-row
        soft targets ``(R, C)`` and loss coefficients ``(R,)`` for the rows
        ``labeled | strong views | bank items`` (``R = B_L + K B_U + get_num / world``), the
        ``(3, R)`` matrix that turns per-row cross-entropies into the three terms ``aux_l, aux_u,
        mb`` for logging, statistics, this rank's drawn features, the whole step's draw (labels,
        valid: the same on every rank) and the packed bank candidates (``features | label | valid``).

        Args: ``k``, the strong views per sample; the four tensors; then the annealing progress
            (float64 scalar) if annealing, the all-reduced step counts if distributed, and the
            draw's uniforms if the bank is on.
        """
        rest = list(rest)
        progress = rest.pop(0) if self.anneal else 0.0
        c, dev = self.num_classes, labels.device
        p_a, hard_a, mask_a = confident_targets(aux_weak, self.threshold)
        counts = rest.pop(0) if self.coll.active else self._class_counts(hard_a, mask_a)  # global (C,)
        self.estimator.fold(counts / (aux_weak.shape[0] * self.coll.world_size))  # / the global B_U
        w_u = self._weights(self.estimator.value(), progress)
        w_l = self._labeled_weights(dev, progress)
        b_l, b_u = labels.shape[0], aux_weak.shape[0]
        # labeled rows: mean over B_L of w^L[y] CE(y); strong rows: mean over K B_U of mask w^U[hat y] CE(p_a)
        targets = [torch.zeros(b_l, c, device=dev).scatter_(1, labels[:, None], 1.0), p_a.repeat(k, 1)]
        coefs = [w_l[labels] / b_l, (mask_a.float() * w_u[hard_a]).repeat(k) / (k * b_u)]
        lam = [1.0, self.lambda_u]
        stats = [mask_a.float().mean(), self.bank.size.float()]
        if self.use_bank:
            world = self.coll.world_size
            drawn = self._draw(rest.pop(0))
            feats, bank_labels, valid = (t[self.coll.rank::world] for t in drawn)
            targets.append(torch.zeros(valid.shape[0], c, device=dev).scatter_(1, bank_labels[:, None], 1.0))
            # The masked mean over the step's valid items, whichever rank holds them (DDP averages
            # the ranks' gradients: hence x world), so it does not depend on the world size.
            coefs.append(valid.float() * world / drawn[2].sum().clamp_min(1))
            lam.append(self.lambda_mb)
            # Candidates: features with the aux head's own confident hard label on the same view.
            _, hard, ok = confident_targets(src_logits, self.threshold)
            pending = torch.cat([src_feats.float(), hard[:, None].float(), ok[:, None].float()], 1)
            stats += [feats, drawn[1], drawn[2], pending, ok.float().sum() * world]
        term_weights = torch.block_diag(*(w[None] for w in coefs))  # (terms, R): row t = term t's coefficients
        if not self.use_bank:  # a zero row for `mb`
            term_weights = torch.cat([term_weights, term_weights.new_zeros(1, term_weights.shape[1])])
        coef = torch.cat([w * f for w, f in zip(coefs, lam)])
        return (torch.cat(targets), coef, term_weights, *stats)

    def after_step(self) -> None:
        """Gather every rank's candidates and enqueue them (identically on every rank), in the
        order of one process's step: view-major over the global batch (each rank's rows are
        view-major over its slice, the ranks' slices contiguous in rank order)."""
        if self._pending is None:
            return
        packed = self.coll.all_gather_cat(self._pending).to(self.bank.device)  # (world * K * b, D + 2)
        if self.coll.active:
            world, k = self.coll.world_size, self._pending_views
            packed = packed.view(world, k, -1, packed.shape[1]).transpose(0, 1).reshape(packed.shape)
        self._pending = None
        self.graphs.enqueue_packed(packed)
        self.bank_updates += 1
        if self.bank_check_every and self.bank_updates % self.bank_check_every == 0:
            self.check_bank_in_sync()

    def _draw(self, u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's global draw of ``get_num`` items (features, labels, valid), with the current
        N̂ as the class prior; ``u``: its uniforms (default: from the bank's generator)."""
        if u is None:
            return self.bank.draw(self.get_num, self.estimator.value(), self.get_replacement)
        return self.bank.draw_core(self.get_num, self.estimator.value(), u, self.get_replacement)

    def bank_slice(self, u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's share of the step's global draw of ``get_num`` items (:meth:`_draw`).

        Every rank draws the same global sample (identical bank and generator) and keeps every
        ``world``-th row starting at its rank, so the ranks together train on the ``get_num``
        items one process would, and while the bank is short the valid rows (drawn first) spread
        evenly.

        Returns:
            features ``(get_num / world, D)``, labels and bool ``valid`` ``(get_num / world,)``
            (:meth:`BalancedMemoryBank.draw`): fixed shapes, no host sync.
        """
        world, rank = self.coll.world_size, self.coll.rank
        return tuple(t[rank::world] for t in self._draw(u))

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

    def retune(self, method: MethodConfig) -> None:
        self.bank.put_power, self.bank.get_power = float(method.put_power), float(method.get_power)

    def take_drawn(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The whole step's draw (every rank's rows: the same on every rank)."""
        drawn, self.last_get = self.last_get, None
        return drawn

    def eval_stats(self) -> dict[str, Any]:
        return {"bank_class_counts": self.bank.class_counts().cpu().tolist(),
                "nhat": self.estimator.value().tolist()}

    def extra_state(self) -> dict[str, Any]:
        return {"bank": self.bank.state_dict(), "estimator": self.estimator.state_dict(),
                "bank_updates": self.bank_updates}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.bank.load_state_dict(state["bank"])
        self.estimator.load_state_dict(state["estimator"])
        self.bank_updates = int(state.get("bank_updates", 0))
