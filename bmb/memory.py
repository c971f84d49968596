"""The balanced memory bank (paper Eq. 3-5).

A fixed-capacity store of ``(feature, hard pseudo label)`` pairs that is kept close to
class-balanced, and from which the aux head is fed items that over-represent the classes that are
rare in the unlabeled data.

- **enqueue** (Eq. 3): a candidate of class ``k`` enters with probability
  ``P_put(k) = ((min_j n_j + 1) / (n_k + 1)) ** put_power`` where ``n`` are the bank's class counts.
  The ``+1`` replaces the authors' ``min(n_j, eps)`` which freezes the bank while any class is
  absent (see docs/method.md).
- **dequeue** (Eq. 4): only on overflow, exactly the excess is removed, drawn *without*
  replacement with probability proportional to ``1 - P_put(y_i) + eps`` (majority classes first).
- **get** (Eq. 5): ``n`` items drawn with per-item probability proportional to
  ``class_prior[y_i] ** -get_power`` ("reversed sampling").

Everything is vectorised. Within one ``enqueue`` call the candidates are decided together: each
candidate sees the bank's counts before the call plus the number of same-class candidates ahead of
it in the batch (as if those had all entered). This is the batched stand-in for inserting one item
at a time, and it errs towards balance.

All randomness comes from the ``generator`` passed in; it may live on another device than the
bank (e.g. a CPU generator for a CUDA bank): random numbers are drawn on the generator's device
and moved.
"""

from __future__ import annotations

from typing import Any

import torch

_REMOVE_EPS = 1e-6


class BalancedMemoryBank:
    """Class-balanced memory of features and pseudo labels.

    Args:
        capacity: maximum number of stored items (>= 1).
        feat_dim: feature dimension ``D``.
        num_classes: number of classes ``C``.
        put_power: beta >= 0, how strongly enqueue favours classes the bank lacks (0: accept all).
        get_power: gamma >= 0, how strongly ``get`` over-draws classes rare in ``class_prior``.
        generator: source of all randomness of the bank; its state is part of ``state_dict``.
        device: where the stored tensors live.
        dtype: dtype of the stored features.
    """

    def __init__(
        self,
        capacity: int,
        feat_dim: int,
        num_classes: int,
        put_power: float = 1.0,
        get_power: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        for name, value in (("capacity", capacity), ("feat_dim", feat_dim), ("num_classes", num_classes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BalancedMemoryBank: {name} must be an integer >= 1, got {value!r}")
        for name, value in (("put_power", put_power), ("get_power", get_power)):
            if not (float(value) >= 0.0) or value != value or value == float("inf"):
                raise ValueError(f"BalancedMemoryBank: {name} must be a finite number >= 0, got {value!r}")
        self.capacity = capacity
        self.feat_dim = feat_dim
        self.num_classes = num_classes
        self.put_power = float(put_power)
        self.get_power = float(get_power)
        self.device = torch.device(device)
        self.dtype = dtype
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        # Preallocated slots; the first ``_size`` hold items. Overflow refills freed slots in place,
        # so a step writes only the accepted rows instead of re-concatenating the whole bank.
        self._buf_feats = torch.zeros(capacity, feat_dim, device=self.device, dtype=dtype)  # (cap, D)
        self._buf_labels = torch.zeros(capacity, device=self.device, dtype=torch.long)  # (cap,)
        self._size = 0

    # ------------------------------------------------------------------ inspection
    def __len__(self) -> int:
        return self._size

    @property
    def _feats(self) -> torch.Tensor:
        return self._buf_feats[: self._size]

    @property
    def _labels(self) -> torch.Tensor:
        return self._buf_labels[: self._size]

    def class_counts(self) -> torch.Tensor:
        """Number of stored items per class, int64 ``(C,)``."""
        return torch.bincount(self._labels, minlength=self.num_classes)

    @property
    def features(self) -> torch.Tensor:
        """Stored features ``(n, D)`` (read only)."""
        return self._feats

    @property
    def labels(self) -> torch.Tensor:
        """Stored pseudo labels ``(n,)`` (read only)."""
        return self._labels

    def put_probability(self, counts: torch.Tensor | None = None) -> torch.Tensor:
        """``P_put(k)`` for every class given class counts (default: the bank's), float ``(C,)``."""
        n = (self.class_counts() if counts is None else counts).to(torch.float64)
        return ((n.min() + 1.0) / (n + 1.0)).pow(self.put_power)

    def checksum(self) -> torch.Tensor:
        """A cheap fingerprint of the contents, float64 ``(3,)``: equal banks give equal values.

        Used to compare banks across ranks without moving the bank itself.
        """
        n = len(self)
        pos = torch.arange(1, n + 1, device=self.device, dtype=torch.float64)
        f = self._feats.to(torch.float64)
        return torch.stack(
            [torch.tensor(float(n), device=self.device, dtype=torch.float64),
             (f.sum(dim=1) * pos).sum(),
             (self._labels.to(torch.float64) * pos).sum()]
        )

    # ------------------------------------------------------------------ randomness
    def _rand(self, n: int) -> torch.Tensor:
        """``n`` uniforms in (0, 1) from the bank's generator, on the bank's device, float64."""
        u = torch.rand(n, generator=self.generator, device=self.generator.device, dtype=torch.float64)
        return u.clamp_min_(torch.finfo(torch.float64).tiny).to(self.device)

    def _weighted_without_replacement(self, weights: torch.Tensor, k: int) -> torch.Tensor:
        """Indices of ``k`` items drawn without replacement, P ∝ ``weights`` (exponential race)."""
        keys = -torch.log(self._rand(weights.shape[0])) / weights  # Exp(1)/w: smallest k win
        return torch.topk(keys, k, largest=False, sorted=True).indices

    # ------------------------------------------------------------------ validation
    def _check_real_device(self, op: str) -> None:
        if self.device.type == "meta":
            raise ValueError(f"BalancedMemoryBank.{op}: the bank is on the meta device (shapes only); "
                             "move it to a real device first with .to(device)")

    def _check_items(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[1] != self.feat_dim:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"BalancedMemoryBank.enqueue: features must have shape (B, {self.feat_dim}), got {shape}")
        if not features.is_floating_point():
            raise ValueError(f"BalancedMemoryBank.enqueue: features must be floating point, got {features.dtype}")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != features.shape[0]:
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"BalancedMemoryBank.enqueue: labels must have shape ({features.shape[0]},), got {shape}")
        if labels.dtype != torch.long:
            raise ValueError(f"BalancedMemoryBank.enqueue: labels must be int64 (torch.long), got {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"BalancedMemoryBank.enqueue: labels must be in [0, {self.num_classes}), got values in "
                f"[{int(labels.min())}, {int(labels.max())}]")
        # One reduction instead of an element-wise isfinite: NaN/Inf anywhere makes the sum non-finite.
        if features.numel() and not bool(torch.isfinite(features.sum())):
            raise ValueError("BalancedMemoryBank.enqueue: features contain NaN or Inf")

    # ------------------------------------------------------------------ the method
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Offer candidates to the bank; dequeue exactly the excess on overflow.

        Args:
            features: float ``(B, D)`` candidate features (stored detached).
            labels: int64 ``(B,)`` their hard pseudo labels.

        Returns:
            bool ``(B,)``: which candidates were accepted (before any dequeue).
        """
        self._check_real_device("enqueue")
        self._check_items(features, labels)
        features = features.detach().to(self.device, self.dtype)
        labels = labels.to(self.device)
        b = labels.shape[0]
        if b == 0:
            return torch.zeros(0, dtype=torch.bool, device=self.device)

        counts = self.class_counts()
        # Rank of each candidate among the same-class candidates before it in this batch.
        onehot = torch.nn.functional.one_hot(labels, self.num_classes)  # (B, C)
        rank = (onehot.cumsum(0) - onehot).gather(1, labels[:, None]).squeeze(1)  # (B,)
        eff = (counts[labels] + rank).to(torch.float64)
        p_put = ((counts.min().to(torch.float64) + 1.0) / (eff + 1.0)).pow(self.put_power)
        accept = self._rand(b) < p_put

        new_idx = accept.nonzero().squeeze(1)
        a, n = new_idx.numel(), self._size
        excess = n + a - self.capacity
        if excess <= 0:
            self._buf_feats[n:n + a] = features[new_idx]
            self._buf_labels[n:n + a] = labels[new_idx]
            self._size = n + a
            return accept
        # Overflow: remove exactly `excess` items from (stored + accepted), majority classes first.
        union_labels = torch.cat([self._labels, labels[new_idx]])  # (n + a,)
        union_counts = torch.bincount(union_labels, minlength=self.num_classes)
        weights = 1.0 - self.put_probability(union_counts)[union_labels] + _REMOVE_EPS
        dropped = torch.zeros(n + a, dtype=torch.bool, device=self.device)
        dropped[self._weighted_without_replacement(weights, excess)] = True
        # Freed slots (dropped stored items, then the empty tail) take the surviving new items.
        free = torch.cat([dropped[:n].nonzero().squeeze(1),
                          torch.arange(n, self.capacity, device=self.device)])
        survivors = new_idx[~dropped[n:]]
        self._buf_feats[free] = features[survivors]
        self._buf_labels[free] = labels[survivors]
        self._size = self.capacity
        return accept

    def get(self, n: int, class_prior: torch.Tensor, replacement: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw items, over-drawing classes that ``class_prior`` says are rare.

        Args:
            n: number of items wanted. Without replacement at most ``len(self)`` are returned.
            class_prior: float ``(C,)`` estimated unlabeled class counts ``N̂`` (clamped to >= 1).
            replacement: draw with replacement (exactly ``n`` items).

        Returns:
            features ``(m, D)`` and labels ``(m,)``, ``m = n`` or ``min(n, len(self))``.
        """
        self._check_real_device("get")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"BalancedMemoryBank.get: n must be an integer >= 1, got {n!r}")
        if len(self) == 0:
            raise ValueError("BalancedMemoryBank.get: the bank is empty (enqueue items first)")
        prior = torch.as_tensor(class_prior)
        if prior.shape != (self.num_classes,):
            raise ValueError(f"BalancedMemoryBank.get: class_prior must have shape ({self.num_classes},), "
                             f"got {tuple(prior.shape)}")
        # Value checks read the tensor on the host: done for host tensors only, so that a prior
        # living on the GPU (the trainer's N-hat) never makes the step wait for the device.
        if prior.device.type == "cpu" and (not bool(torch.isfinite(prior).all()) or bool((prior < 0).any())):
            raise ValueError("BalancedMemoryBank.get: class_prior must be finite and >= 0")
        prior = prior.to(self.device, torch.float64)
        weights = prior.clamp_min(1.0).pow(-self.get_power)[self._labels]  # (len,)
        if replacement:
            cdf = weights.cumsum(0)
            idx = torch.searchsorted(cdf, self._rand(n) * cdf[-1]).clamp_max_(len(self) - 1)
        else:
            idx = self._weighted_without_replacement(weights, min(n, len(self)))
        return self._feats[idx], self._labels[idx]

    # ------------------------------------------------------------------ persistence
    def to(self, device: torch.device | str) -> BalancedMemoryBank:
        """Move the stored tensors (not the generator) to ``device``; returns self."""
        self.device = torch.device(device)
        if self._buf_feats.device.type == "meta":
            self._buf_feats = torch.zeros(self.capacity, self.feat_dim, device=self.device, dtype=self.dtype)
            self._buf_labels = torch.zeros(self.capacity, device=self.device, dtype=torch.long)
            self._size = 0
        else:
            self._buf_feats = self._buf_feats.to(self.device)
            self._buf_labels = self._buf_labels.to(self.device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically, the generator's state included."""
        return {
            "capacity": self.capacity,
            "feat_dim": self.feat_dim,
            "num_classes": self.num_classes,
            "put_power": self.put_power,
            "get_power": self.get_power,
            "features": self._feats.detach().cpu().clone(),
            "labels": self._labels.cpu().clone(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the shape/parameters must match this bank."""
        for key in ("capacity", "feat_dim", "num_classes"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"BalancedMemoryBank.load_state_dict: {key} is {state.get(key)!r} in the "
                                 f"state but {getattr(self, key)!r} in this bank")
        feats, labels = state["features"], state["labels"]
        if feats.shape[0] > self.capacity or feats.shape[0] != labels.shape[0]:
            raise ValueError("BalancedMemoryBank.load_state_dict: stored items exceed capacity or "
                             "features/labels lengths differ")
        self.put_power = float(state["put_power"])
        self.get_power = float(state["get_power"])
        self._size = int(feats.shape[0])
        self._buf_feats.zero_()
        self._buf_labels.zero_()
        self._buf_feats[: self._size] = feats.to(self.device, self.dtype)
        self._buf_labels[: self._size] = labels.to(self.device, torch.long)
        self.generator.set_state(state["generator"])
