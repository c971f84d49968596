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

**No host synchronisation.** ``enqueue`` and :meth:`BalancedMemoryBank.draw` work on fixed
shapes: the number of items is a device tensor, empty slots carry the sentinel label ``C``,
candidates arrive with a validity mask instead of being filtered, and every call draws a fixed
number of random numbers (``B`` for the accept test and ``capacity + B`` for the dequeue race
per ``enqueue``; ``capacity`` per ``draw``, or ``n`` with replacement). So on a GPU the training step never waits for
the device, and the random stream does not depend on the data. Value checks that would read device
memory (label range, NaN) run only for CPU inputs; on other devices non-finite candidates are
rejected instead. ``len(bank)``, :attr:`features`, :meth:`get` and :meth:`state_dict` do read
the size from the device: they are for inspection, tests and checkpoints, not the hot path.
"""

from __future__ import annotations

from typing import Any

import torch

_REMOVE_EPS = 1e-6


def _positive(u: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) moved into (0, 1) (a 0 would give an infinite race key)."""
    return u.clamp_min(torch.finfo(torch.float64).tiny)


def _as_wide_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-D) viewed as rows of 16-byte words (the same bytes), or ``t`` itself where its
    layout does not allow that view."""
    words = t.shape[1] * t.element_size()
    if (t.stride(1) == 1 and words % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
            and (t.storage_offset() * t.element_size()) % 16 == 0):
        return t.view(torch.complex128)
    return t


def _copy_rows(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.index_copy_(0, index, src)``: rows ``src[i]`` written to ``dst[index[i]]``, in place.

    On the CPU, ``index_copy_`` loops element by element; copying each row as 16-byte words
    (a ``complex128`` view of the same bytes: a copy moves bytes, bit for bit) makes it ~3x
    faster at D = 2048 float32. Other devices copy in the rows' own dtype.
    """
    if dst.device.type == "cpu":
        wide_dst, wide_src = _as_wide_rows(dst), _as_wide_rows(src)
        if wide_dst.dtype == wide_src.dtype == torch.complex128:
            wide_dst.index_copy_(0, index, wide_src)
            return
    dst.index_copy_(0, index, src)


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
        *,
        put_power: float,
        get_power: float,
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
        self._allocate()

    def _allocate(self) -> None:
        """Empty buffers on ``self.device``.

        Slots ``[0, size)`` hold the items (the occupied slots are always a prefix); the others
        carry the sentinel label ``C``. One extra scratch row at the end receives the writes of
        rejected candidates, so that a step writes with one fixed-shape ``index_copy_``.
        """
        cap = self.capacity
        self._buf_feats = torch.zeros(cap + 1, self.feat_dim, device=self.device, dtype=self.dtype)
        self._buf_labels = torch.full((cap + 1,), self.num_classes, device=self.device, dtype=torch.long)
        self._size = torch.zeros((), device=self.device, dtype=torch.long)  # a device tensor: no sync
        self._slots = torch.arange(cap, device=self.device)
        self.version = getattr(self, "version", -1) + 1  # new buffers: captured CUDA graphs are stale

    def clear(self) -> None:
        """Empty the bank in place (same buffers: captured CUDA graphs stay valid)."""
        self._buf_feats.zero_()
        self._buf_labels.fill_(self.num_classes)
        self._size.zero_()

    def state_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The device tensors :meth:`enqueue_core` updates in place (features, labels, size):
        the same objects until the bank reallocates (:attr:`version`)."""
        return self._buf_feats, self._buf_labels, self._size

    # ------------------------------------------------------------------ inspection
    def __len__(self) -> int:
        """Number of stored items (reads the size from the device: not for the hot path)."""
        return 0 if self.device.type == "meta" else int(self._size)

    @property
    def size(self) -> torch.Tensor:
        """Number of stored items as an int64 scalar tensor on the bank's device (no sync)."""
        return self._size

    @property
    def _labels_all(self) -> torch.Tensor:
        """Labels of all ``capacity`` slots, the sentinel ``C`` where empty, ``(capacity,)``."""
        return self._buf_labels[: self.capacity]

    def _counts_with_empty(self, labels: torch.Tensor) -> torch.Tensor:
        """Per-class counts of ``labels`` with the sentinel class ``C`` last, int64 ``(C + 1,)``.

        ``scatter_add_`` instead of ``bincount``: CUDA's bincount reads the maximum on the host
        (on the CPU, where that costs nothing, ``bincount`` is one op instead of three).
        """
        if labels.device.type == "cpu":
            return torch.bincount(labels, minlength=self.num_classes + 1)
        counts = torch.zeros(self.num_classes + 1, device=labels.device, dtype=torch.long)
        return counts.scatter_add_(0, labels, torch.ones_like(labels))

    def class_counts(self) -> torch.Tensor:
        """Number of stored items per class, int64 ``(C,)`` on the bank's device."""
        return self._counts_with_empty(self._labels_all)[: self.num_classes]

    @property
    def features(self) -> torch.Tensor:
        """Stored features ``(n, D)`` (read only)."""
        return self._buf_feats[: len(self)]

    @property
    def labels(self) -> torch.Tensor:
        """Stored pseudo labels ``(n,)`` (read only)."""
        return self._buf_labels[: len(self)]

    def put_probability(self, counts: torch.Tensor | None = None) -> torch.Tensor:
        """``P_put(k)`` for every class given class counts (default: the bank's), float ``(C,)``."""
        n = (self.class_counts() if counts is None else counts).to(torch.float64)
        return ((n.min() + 1.0) / (n + 1.0)).pow(self.put_power)

    def checksum(self) -> torch.Tensor:
        """A cheap fingerprint of the contents, float64 ``(3,)``: equal banks give equal values.

        Used to compare banks across ranks without moving the bank itself.
        """
        n = len(self)  # one read of the size (the properties would each read it again)
        pos = torch.arange(1, n + 1, device=self.device, dtype=torch.float64)
        f = self._buf_feats[:n].to(torch.float64)
        return torch.stack(
            [torch.tensor(float(n), device=self.device, dtype=torch.float64),
             (f.sum(dim=1) * pos).sum(),
             (self._buf_labels[:n].to(torch.float64) * pos).sum()]
        )

    # ------------------------------------------------------------------ randomness
    def uniforms(self, n: int) -> torch.Tensor:
        """``n`` uniforms in [0, 1) from the bank's generator, on the bank's device, float64.

        The core functions clamp them away from 0 (:func:`_positive`). ``torch.rand(n, generator=g)`` and
        ``empty(n).uniform_(generator=g)`` give the same numbers, so a caller may instead fill
        a preallocated buffer (:mod:`bmb.graphs` does).
        """
        u = torch.rand(n, generator=self.generator, device=self.generator.device, dtype=torch.float64)
        return u.to(self.device, non_blocking=True)

    def uniforms_per_enqueue(self, b: int) -> tuple[int, int]:
        """How many uniforms one ``enqueue`` of ``b`` candidates draws: the accept test's, then the
        dequeue race's (drawn in this order)."""
        return b, self.capacity + b

    def uniforms_per_draw(self, n: int, replacement: bool) -> int:
        """How many uniforms one ``draw`` of ``n`` rows draws."""
        return n if replacement else self.capacity

    @staticmethod
    def _race_keys(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Exponential-race keys ``Exp(1) / w`` from uniforms ``u`` in (0, 1): the ``k`` smallest are a
        draw of ``k`` items without replacement with P ∝ ``w``. Zero weights give ``inf`` (never drawn)."""
        return -torch.log(u) / weights

    # ------------------------------------------------------------------ validation
    def _check_real_device(self, op: str) -> None:
        if self.device.type == "meta":
            raise ValueError(f"BalancedMemoryBank.{op}: the bank is on the meta device (shapes only); "
                             "move it to a real device first with .to(device)")

    def _check_items(self, features: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None) -> None:
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
        if valid is not None and (not isinstance(valid, torch.Tensor) or valid.shape != labels.shape
                                  or valid.dtype != torch.bool):
            what = f"{valid.dtype} {tuple(valid.shape)}" if isinstance(valid, torch.Tensor) else type(valid).__name__
            raise ValueError(f"BalancedMemoryBank.enqueue: valid must be a bool tensor of shape "
                             f"({labels.shape[0]},), got {what}")
        if labels.device.type != "cpu" or features.device.type != "cpu":
            return  # value checks would wait for the device; see the module docstring
        if labels.numel():
            lo, hi = (int(v) for v in torch.aminmax(labels))
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"BalancedMemoryBank.enqueue: labels must be in [0, {self.num_classes}), "
                                 f"got values in [{lo}, {hi}]")
        # One reduction instead of an element-wise isfinite: NaN/Inf anywhere makes the sum non-finite.
        if features.numel() and not bool(torch.isfinite(features.sum())):
            raise ValueError("BalancedMemoryBank.enqueue: features contain NaN or Inf")

    # ------------------------------------------------------------------ the method
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Offer candidates to the bank; dequeue exactly the excess on overflow.

        Fixed shapes throughout, so nothing here waits for the device (module docstring).

        Args:
            features: float ``(B, D)`` candidate features (stored detached).
            labels: int64 ``(B,)`` their hard pseudo labels.
            valid: optional bool ``(B,)``: only these are candidates; the others never enter
                and do not count towards the ranks of later candidates.

        Returns:
            bool ``(B,)``: which candidates were accepted (before any dequeue).
        """
        self._check_real_device("enqueue")
        self._check_items(features, labels, valid)
        features = features.detach().to(self.device, self.dtype)
        labels = labels.to(self.device)
        b = labels.shape[0]
        if b == 0:
            return torch.zeros(0, dtype=torch.bool, device=self.device)
        ok = torch.ones(b, dtype=torch.bool, device=self.device) if valid is None else valid.to(self.device)
        n_accept, n_race = self.uniforms_per_enqueue(b)
        u_accept = self.uniforms(n_accept)
        return self.enqueue_core(features, labels, ok, u_accept, self.uniforms(n_race))

    def enqueue_core(self, features: torch.Tensor, labels: torch.Tensor, ok: torch.Tensor,
                     u_accept: torch.Tensor, u_race: torch.Tensor) -> torch.Tensor:
        """:meth:`enqueue` on checked device tensors, with its uniforms passed in.

        Only fixed-shape device work that updates the bank in place, so a CUDA graph can
        capture it (:mod:`bmb.graphs`). Its cost is ``O(capacity + B log B)`` on labels and
        keys plus ``O(B D)`` for the features: only the ``B`` candidate rows are written (each to
        its slot or to the scratch row), the other stored rows are never touched.

        Args:
            features: ``(B, D)`` in the bank's dtype; labels: int64 ``(B,)``; ok: bool ``(B,)``
                candidate mask; all on the bank's device.
            u_accept, u_race: float64 uniforms on the bank's device, sized by
                :meth:`uniforms_per_enqueue`.

        Returns:
            bool ``(B,)``: which candidates were accepted (before any dequeue).
        """
        c, cap = self.num_classes, self.capacity
        b = labels.shape[0]
        u_accept, u_race = _positive(u_accept), _positive(u_race)
        if self.device.type != "cpu":
            ok = ok & torch.isfinite(features).all(dim=1)
        lab = torch.where(ok, labels, c)  # non-candidates take the sentinel class
        labels_all = self._labels_all
        counts = self._counts_with_empty(labels_all)  # (C + 1,)

        # Rank of each candidate among the same-class candidates before it in this batch: its
        # position in the batch stably sorted by class, minus where its class starts there.
        # O(B log B), no (B, C + 1) one-hot.
        sorted_lab, perm = torch.sort(lab, stable=True)
        run_start = torch.searchsorted(sorted_lab, sorted_lab)  # first position of each class
        rank = torch.empty_like(lab).scatter_(0, perm, torch.arange(b, device=self.device) - run_start)
        eff = (counts[lab] + rank).to(torch.float64)
        p_put = ((counts[:c].min().to(torch.float64) + 1.0) / (eff + 1.0)).pow(self.put_power)
        accept = ok & (u_accept < p_put)
        n_accept = accept.sum()

        # Overflow: remove exactly `excess` items of (stored + accepted), majority classes first,
        # by an exponential race over all capacity + B slots (empty/rejected ones weigh 0).
        union = torch.cat([labels_all, torch.where(accept, labels, c)])  # (cap + B,)
        union_counts = self._counts_with_empty(union)
        # Removal weight per class, 1 - P_put + eps, and 0 for the sentinel (empty/rejected).
        remove_w = torch.cat([1.0 - self.put_probability(union_counts[:c]) + _REMOVE_EPS,
                              torch.zeros(1, device=self.device, dtype=torch.float64)])
        total = self._size + n_accept  # stored + accepted
        excess = (total - cap).clamp_min(0)
        # The keys are > 0 or +inf (u < 1, weights >= 0, never NaN), and positive doubles order
        # as their bit patterns do as int64: the same stable order, ~1.5x faster on the CPU.
        keys = self._race_keys(remove_w[union], u_race)
        order = torch.argsort(keys.view(torch.int64), stable=True)
        removed = torch.empty(cap + b, dtype=torch.bool, device=self.device)
        removed.scatter_(0, order, torch.arange(cap + b, device=self.device) < excess)
        # Freed slots (removed stored items, then the empty tail) take the surviving new items in
        # order: the k-th survivor goes to the k-th free slot. When the bank overflows they match
        # one to one; otherwise nothing is removed and the free slots are the empty tail.
        # Rejected candidates are written to the scratch row. Only these B rows are written.
        free = (self._slots >= self._size) | removed[:cap]
        survive = accept & ~removed[cap:]
        slot = torch.searchsorted(free.cumsum(0), survive.cumsum(0))
        target = torch.where(survive, slot, cap)
        _copy_rows(self._buf_feats, target, features)
        self._buf_labels.index_copy_(0, target, labels)
        self._buf_labels[cap:].fill_(c)  # the scratch row is never an item (`[cap] = c` would sync)
        self._size.copy_(total.clamp_max(cap))  # in place: graphs hold it
        return accept

    def draw(self, n: int, class_prior: torch.Tensor, replacement: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw ``n`` items with a validity mask: the fixed-shape, sync-free form of :meth:`get`.

        Args:
            n: rows wanted (>= 1).
            class_prior: float ``(C,)`` estimated unlabeled class counts ``N̂`` (clamped to >= 1).
            replacement: draw with replacement.

        Returns:
            features ``(n, D)``, labels ``(n,)`` (0 in invalid rows) and bool ``valid (n,)``.
            Without replacement the valid rows come first, ``min(n, len(self))`` of them, in the
            order drawn; with replacement all rows are valid unless the bank is empty.
        """
        self._check_real_device("get")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"BalancedMemoryBank.get: n must be an integer >= 1, got {n!r}")
        prior = torch.as_tensor(class_prior)
        if prior.shape != (self.num_classes,):
            raise ValueError(f"BalancedMemoryBank.get: class_prior must have shape ({self.num_classes},), "
                             f"got {tuple(prior.shape)}")
        # Value checks read the tensor on the host: done for host tensors only, so that a prior
        # living on the GPU (the trainer's N-hat) never makes the step wait for the device.
        if prior.device.type == "cpu":  # one reduction: NaN propagates into both, +-inf shows in one
            lo, hi = torch.aminmax(prior if prior.dtype != torch.bool else prior.double())
            if not (float(lo) >= 0.0 and float(hi) < float("inf")):
                raise ValueError("BalancedMemoryBank.get: class_prior must be finite and >= 0")
        return self.draw_core(n, prior.to(self.device), self.uniforms(self.uniforms_per_draw(n, replacement)),
                              replacement)

    def draw_core(self, n: int, class_prior: torch.Tensor, u: torch.Tensor, replacement: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`draw` on a checked prior on the bank's device, with its uniforms ``u`` (float64,
        sized by :meth:`uniforms_per_draw`) passed in. Fixed-shape device work only, reading the
        bank without changing it: a CUDA graph can capture it (:mod:`bmb.graphs`)."""
        prior = class_prior.to(torch.float64)
        u = _positive(u)
        labels_all = self._labels_all
        # Per-slot weight; empty slots (sentinel label) weigh 0.
        class_w = torch.cat([prior.clamp_min(1.0).pow(-self.get_power), prior.new_zeros(1)])
        weights = class_w[labels_all]  # (cap,)
        if replacement:
            cdf = weights.cumsum(0)
            idx = torch.searchsorted(cdf, u * cdf[-1])
            idx = torch.minimum(idx, (self._size - 1).clamp_min(0))
            valid = (self._size > 0).expand(n)
        else:
            keys = self._race_keys(weights, u)
            k = min(n, self.capacity)
            idx = torch.topk(keys, k, largest=False, sorted=True).indices
            valid = torch.isfinite(keys[idx])
            if k < n:  # more wanted than slots exist: pad with invalid rows
                idx = torch.cat([idx, idx.new_zeros(n - k)])
                valid = torch.cat([valid, valid.new_zeros(n - k)])
        labels = torch.where(valid, labels_all[idx], 0)
        # index_select, not `[idx]`: on the CPU it copies whole rows (advanced indexing goes
        # element by element, ~5x slower at D = 2048).
        return self._buf_feats.index_select(0, idx), labels, valid

    def get(self, n: int, class_prior: torch.Tensor, replacement: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw items, over-drawing classes that ``class_prior`` says are rare.

        :meth:`draw` without its invalid rows (which reads the mask on the host).

        Args:
            n: number of items wanted. Without replacement at most ``len(self)`` are returned.
            class_prior: float ``(C,)`` estimated unlabeled class counts ``N̂`` (clamped to >= 1).
            replacement: draw with replacement (exactly ``n`` items).

        Returns:
            features ``(m, D)`` and labels ``(m,)``, ``m = n`` or ``min(n, len(self))``.
        """
        if self.device.type != "meta" and len(self) == 0:
            raise ValueError("BalancedMemoryBank.get: the bank is empty (enqueue items first)")
        feats, labels, valid = self.draw(n, class_prior, replacement)
        # The valid rows are a prefix (see draw): slice them instead of a boolean-mask copy.
        # With replacement from a non-empty bank every row is valid.
        m = n if replacement else int(valid.sum())
        return feats[:m], labels[:m]

    # ------------------------------------------------------------------ persistence
    def to(self, device: torch.device | str) -> BalancedMemoryBank:
        """Move the stored tensors (not the generator) to ``device``; returns self."""
        was_meta = self._buf_feats.device.type == "meta"
        self.device = torch.device(device)
        if was_meta:
            self._allocate()
        else:
            self._buf_feats = self._buf_feats.to(self.device)
            self._buf_labels = self._buf_labels.to(self.device)
            self._size = self._size.to(self.device)
            self._slots = self._slots.to(self.device)
            self.version += 1  # new tensors: captured CUDA graphs are stale
        return self

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically, the generator's state included."""
        n = len(self)
        return {
            "capacity": self.capacity,
            "feat_dim": self.feat_dim,
            "num_classes": self.num_classes,
            "put_power": self.put_power,
            "get_power": self.get_power,
            "features": self._buf_feats[:n].detach().cpu().clone(),
            "labels": self._buf_labels[:n].cpu().clone(),
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
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"BalancedMemoryBank.load_state_dict: labels must be in [0, {self.num_classes})")
        self.put_power = float(state["put_power"])
        self.get_power = float(state["get_power"])
        n = int(feats.shape[0])
        self._allocate()
        self._buf_feats[:n] = feats.to(self.device, self.dtype)
        self._buf_labels[:n] = labels.to(self.device, torch.long)
        self._size.fill_(n)
        self.generator.set_state(state["generator"])
