"""Divergence guard: the first non-finite loss, or a non-finite weight, stops the run by name.

A run that diverges (``optim.lr`` far too high, a bad batch) must not go on to checkpoint,
evaluate and export NaN weights as if they were a result. The trainer:

- folds each step's statistics into a device flag (:meth:`LossWatch.observe`: a handful of tiny
  kernels, no host-GPU synchronisation), which remembers the first step whose loss or loss terms
  were not finite, and their values;
- reads the flag (:meth:`LossWatch.check`, one synchronisation, agreed over the ranks) where the
  loop synchronises anyway: every ``log_every`` steps, before an evaluation and before a checkpoint;
- before every checkpoint and before the export, checks every floating tensor it is about to
  write (:func:`check_state`: weights, buffers, EMA, optimizer moments, the algorithm's state).

Either raises :class:`DivergedError` (``non-finite loss at step N (loss=nan; terms: ...)`` or
``non-finite parameter model.fc.weight at step N``) on every rank, before anything non-finite is
written; ``launch/train.py`` exits with :data:`EXIT_DIVERGED`. A checkpoint holding non-finite
values (written by an older bmb, or edited) is refused on resume like a corrupt one
(:func:`refuse_nonfinite_checkpoint`): resume falls back, loudly, to the previous checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from bmb.checkpoint import CheckpointError

if TYPE_CHECKING:
    from bmb.dist import Collectives

EXIT_DIVERGED = 4  # launch/train.py's exit status after a DivergedError (nothing non-finite written)


class DivergedError(RuntimeError):
    """The loss or a weight is not finite; the message names the step and the loss terms or the
    tensor. Nothing non-finite was checkpointed or exported."""


class LossWatch:
    """Remembers, on the device, the first step whose statistics held a NaN or an infinity.

    One slot per set of statistic names (they change once, when the warm-up ends): ``first``, a
    0-d long tensor (-1: none yet), and ``values``, the statistics of that step.
    """

    def __init__(self) -> None:
        self.slots: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(self, step: int, names: tuple[str, ...], stats: torch.Tensor) -> None:
        """Fold one step's ``stats`` ``(len(names),)`` into the flag (device ops only: no sync)."""
        slot = self.slots.get(names)
        if slot is None:
            slot = (torch.full((), -1, dtype=torch.long, device=stats.device), torch.zeros_like(stats))
        first, values = slot
        new = stats.isfinite().all().logical_not() & (first < 0)  # () bool
        self.slots[names] = (torch.where(new, step, first), torch.where(new, stats, values))

    def _local(self) -> tuple[int, tuple[str, ...], list[float]] | None:
        """``(step, names, values)`` of this rank's first non-finite step, or None (one sync)."""
        if not self.slots:
            return None
        firsts = torch.stack([s[0] for s in self.slots.values()]).tolist()
        bad = [(step, names) for step, names in zip(firsts, self.slots) if step >= 0]
        if not bad:
            return None
        step, names = min(bad)
        return step, names, self.slots[names][1].tolist()

    def check(self, coll: Collectives) -> None:
        """Every rank at the same point: raise :class:`DivergedError` on every rank if any rank
        saw a non-finite step, naming the earliest (its step, rank and loss terms)."""
        local = self._local()
        if not coll.any_true(local is not None):
            return
        found: list[Any] = [(local, coll.rank)]
        if coll.active:  # every rank learns the earliest, with its terms (a host-side gather)
            import torch.distributed as dist

            found = [None] * coll.world_size
            dist.all_gather_object(found, (local, coll.rank), group=coll._host())
        (step, names, values), rank = min((f for f in found if f[0] is not None), key=lambda f: (f[0][0], f[1]))
        terms = {k: _fmt(v) for k, v in zip(names, values)}
        rest = "; ".join(f"{k}={v}" for k, v in terms.items() if k != "loss")
        where = f" on rank {rank}" if coll.world_size > 1 else ""
        raise DivergedError(f"non-finite loss at step {step}{where} (loss={terms.get('loss', '?')}; terms: {rest}). "
                            "Training stopped before writing any non-finite checkpoint or export. Resume from the "
                            "last checkpoint with a lower optim.lr (and train.allow_config_change=true), look at "
                            "the data, or start again")


def _fmt(v: float) -> str:
    return repr(v) if not math.isfinite(v) else f"{v:.4g}"


def named_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every floating-point tensor in nested dicts/lists/tuples, with its dotted path."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield prefix.rstrip("."), obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from named_tensors(v, f"{prefix}{k}.")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from named_tensors(v, f"{prefix}{i}.")


def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, or None (one sync per device)."""
    items = list(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(items):
        by_device.setdefault(t.device, []).append(i)
    bad: list[int] = []
    for idx in by_device.values():
        ok = torch.stack([items[i][1].isfinite().all() for i in idx]).tolist()
        bad += [i for i, good in zip(idx, ok) if not good]
    return items[min(bad)][0] if bad else None


def check_state(tensors: Iterable[tuple[str, torch.Tensor]], step: int, coll: Collectives,
                watch: LossWatch | None = None, agree: bool = True) -> None:
    """Before a checkpoint (every rank, ``agree``) or the export (rank 0 alone): raise
    :class:`DivergedError` if the loss went non-finite (``watch``) or one of the named ``tensors``
    to be written (weights, EMA, optimizer moments, the algorithm's state) is not finite."""
    if agree and watch is not None:
        watch.check(coll)
    bad = first_nonfinite(tensors)
    if coll.any_true(bad is not None) if agree else bad is not None:
        raise DivergedError(f"non-finite parameter {bad or '(on another rank)'} at step {step}. Training stopped "
                            "before writing it to a checkpoint or the export. Resume from the last checkpoint "
                            "with a lower optim.lr (and train.allow_config_change=true), or start again")


def refuse_nonfinite_checkpoint(name: str, state: dict[str, Any]) -> None:
    """Resume: a checkpoint whose shared ``state`` (weights, EMA, optimizer moments, the algorithm's
    state ...: every stored float) is not finite is unusable
    (:class:`bmb.checkpoint.CheckpointError`, so that resume falls back to the previous one)."""
    bad = first_nonfinite(named_tensors(state))
    if bad is not None:
        raise CheckpointError(f"{name} holds non-finite values ({bad}): a diverged run's state, not resumable")
