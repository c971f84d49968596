"""Deterministic, resumable index sampling shared by the backends.

Every training stream is an infinite sequence of epochs. Epoch ``e`` of a stream is a
permutation of ``0..N-1`` drawn from a :class:`torch.Generator` seeded with
``(seed, stream, epoch)``; the epochs laid end to end are the stream's one **global order**.
Step ``t`` takes the global batch ``B = R b`` at positions ``[t B, (t + 1) B)`` of that order
(a batch may end one epoch and start the next, so no sample is ever skipped and a labeled set
smaller than a batch still works), and rank ``r`` of ``R`` takes its contiguous slice
``[t B + r b, t B + (r + 1) b)``. So the ranks' batches, concatenated in rank order, are the
batch one process would take at ``B``: what a step sees does not depend on the world size.

The position of a stream is the number of global batches consumed; restoring it (with the same
global batch, at any world size) reproduces exactly the batches that an uninterrupted run would
have produced.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def stream_seed(seed: int, stream: str, epoch: int) -> int:
    """A 63-bit seed for one (seed, stream, epoch) triple.

    Hashing (rather than e.g. ``seed + epoch``) keeps the labeled and unlabeled streams and
    neighbouring seeds uncorrelated.
    """
    digest = hashlib.sha256(f"{int(seed)}/{stream}/{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_permutation(n: int, seed: int, stream: str, epoch: int) -> torch.Tensor:
    """The global order of epoch ``epoch``: int64 ``(n,)`` permutation of ``0..n-1``."""
    g = torch.Generator()
    g.manual_seed(stream_seed(seed, stream, epoch))
    return torch.randperm(n, generator=g)


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


class IndexStream:
    """Infinite stream of index batches for one rank, resumable at batch granularity.

    Args:
        n: number of samples in the split.
        batch_size: indices per batch of this rank (the global batch is ``batch_size * world_size``).
        seed: base seed of the run.
        stream: name mixed into the seed (``"labeled"``/``"unlabeled"``) so streams differ.
        rank: this process's rank.
        world_size: number of ranks.
    """

    def __init__(
        self, n: int, batch_size: int, *, seed: int, stream: str, rank: int = 0, world_size: int = 1
    ) -> None:
        check_rank(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"{stream}: batch size must be >= 1, got {batch_size}")
        if n < 1:
            raise ValueError(f"{stream}: split is empty")
        self.n, self.batch_size, self.seed, self.stream = n, batch_size, seed, stream
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.batches = 0  # global batches consumed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = epoch_permutation(self.n, self.seed, self.stream, epoch)
        return self._perms[epoch]

    def _take(self, positions: torch.Tensor) -> torch.Tensor:
        """The samples at global ``positions`` (ascending, int64) of the stream's order."""
        epochs, within = positions // self.n, positions % self.n
        first, last = int(epochs[0]), int(epochs[-1])
        if first == last:
            return self._perm(first)[within]
        return torch.cat([self._perm(e)[within[epochs == e]] for e in range(first, last + 1)])

    def next_indices(self) -> torch.Tensor:
        """The next batch: int64 ``(batch_size,)`` indices into the split; advances the state."""
        start = self.batches * self.global_batch + self.rank * self.batch_size
        self.batches += 1
        return self._take(torch.arange(start, start + self.batch_size))

    def epoch_share(self, epoch: int) -> torch.Tensor:
        """This rank's samples of epoch ``epoch``, in the order it takes them: the positions of
        the epoch that fall in this rank's slice of their global batch."""
        pos = torch.arange(epoch * self.n, (epoch + 1) * self.n)
        lo = self.rank * self.batch_size
        slot = pos % self.global_batch
        return self._perm(epoch)[(slot >= lo) & (slot < lo + self.batch_size)]

    def location(self) -> tuple[int, int]:
        """``(epoch, position)`` of this rank's next sample: its epoch and how many samples of
        that epoch's :meth:`epoch_share` this rank has taken already."""
        b, lo = self.batch_size, self.rank * self.batch_size

        def taken(x: int) -> int:  # this rank's positions in [0, x)
            return (x // self.global_batch) * b + min(max(x % self.global_batch - lo, 0), b)

        nxt = self.batches * self.global_batch + lo
        epoch = nxt // self.n
        return epoch, taken(nxt) - taken(epoch * self.n)

    def state_dict(self) -> dict[str, Any]:
        return {
            "order": "global",
            "batches": self.batches,
            "global_batch": self.global_batch,
            "n": self.n,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position, at any world size with the same global batch: the position is in
        global batches. A state that means something else is refused (ValueError naming it)."""
        if state.get("order") != "global":
            state = self._from_per_rank(state)
        for key in ("n", "seed", "global_batch"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"{self.stream}: cannot restore reader state: {key}={state[key]} in the "
                    f"checkpoint but {getattr(self, key)} now"
                )
        batches = int(state["batches"])
        if batches < 0:
            raise ValueError(f"{self.stream}: bad reader state batches={batches}")
        self.batches = batches

    def _from_per_rank(self, state: dict[str, Any]) -> dict[str, Any]:
        """A state of the earlier per-rank order (``epoch``, ``position`` in the rank's share):
        one process's is a global position too; several processes' cannot be mapped."""
        consumed = int(state["epoch"]) * int(state["n"]) + int(state["position"])
        if state.get("world_size", 1) != 1 or consumed % int(state["batch_size"]):
            raise ValueError(
                f"{self.stream}: cannot restore a reader state of the earlier per-rank sample "
                f"order written by {state.get('world_size')} processes (each rank had its own "
                "share of every epoch); resume it with that version of bmb, or start afresh"
            )
        return {**state, "batches": consumed // int(state["batch_size"]),
                "global_batch": int(state["batch_size"])}


def eval_rank_indices(n: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and validity mask of one rank's part of an evaluation pass.

    Rank ``r`` takes ``r, r + R, r + 2R, ...``; ranks with one sample fewer are padded with a
    repeat of their first index marked invalid, so every rank has ``ceil(n / R)`` entries.

    Returns:
        ``(indices int64 (ceil(n/R),), valid bool (ceil(n/R),))``.
    """
    check_rank(rank, world_size)
    per_rank = -(-n // world_size)
    idx = torch.arange(rank, n, world_size, dtype=torch.int64)
    valid = torch.ones(per_rank, dtype=torch.bool)
    if idx.numel() < per_rank:
        pad = per_rank - idx.numel()
        fill = idx[:1] if idx.numel() else torch.zeros(1, dtype=torch.int64)
        idx = torch.cat([idx, fill.repeat(pad)])
        valid[per_rank - pad :] = False
    return idx, valid
