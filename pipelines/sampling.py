"""Deterministic, resumable index sampling shared by the backends.

Every training stream is an infinite sequence of epochs. Epoch ``e`` of a stream is a
permutation of ``0..N-1`` drawn from a :class:`torch.Generator` seeded with
``(seed, stream, epoch)``; rank ``r`` of ``R`` takes the slice ``perm[r::R]`` truncated to
``N // R`` samples, so ranks are disjoint, cover ``R * (N // R)`` samples of every epoch and all
have the same length. Batches run across epoch boundaries (a batch may end one epoch and start
the next), so no sample is ever skipped and a labeled set smaller than a batch still works.

The position of a stream is the pair ``(epoch, position within this rank's share)``; restoring
it reproduces exactly the batches that an uninterrupted run would have produced.
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


def rank_share(perm: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's part of an epoch: ``perm[rank::world_size][: n // world_size]``."""
    per_rank = perm.numel() // world_size
    return perm[rank::world_size][:per_rank]


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


class IndexStream:
    """Infinite stream of index batches for one rank, resumable at batch granularity.

    Args:
        n: number of samples in the split.
        batch_size: indices per batch.
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
        if n < world_size:
            raise ValueError(f"{stream}: split has {n} samples, fewer than world_size={world_size}")
        self.n, self.batch_size, self.seed, self.stream = n, batch_size, seed, stream
        self.rank, self.world_size = rank, world_size
        self.per_rank = n // world_size
        self.epoch, self.position = 0, 0
        self._share: torch.Tensor | None = None
        self._share_epoch = -1

    def _epoch_share(self, epoch: int) -> torch.Tensor:
        if self._share_epoch != epoch:
            perm = epoch_permutation(self.n, self.seed, self.stream, epoch)
            self._share = rank_share(perm, self.rank, self.world_size)
            self._share_epoch = epoch
        assert self._share is not None
        return self._share

    def next_indices(self) -> torch.Tensor:
        """The next batch: int64 ``(batch_size,)`` indices into the split; advances the state."""
        parts, need = [], self.batch_size
        while need > 0:
            share = self._epoch_share(self.epoch)
            take = min(need, self.per_rank - self.position)
            parts.append(share[self.position : self.position + take])
            self.position += take
            need -= take
            if self.position == self.per_rank:
                self.epoch, self.position = self.epoch + 1, 0
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "n": self.n,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A position only means something for the same split, seed and rank layout: refuse
        # silently-wrong resumes (e.g. a different world size) instead of replaying other data.
        for key in ("n", "seed", "world_size", "rank"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"{self.stream}: cannot restore reader state: {key}={state[key]} in the "
                    f"checkpoint but {getattr(self, key)} now"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.per_rank:
            raise ValueError(
                f"{self.stream}: bad reader state epoch={epoch} position={position} "
                f"(per-rank epoch length {self.per_rank})"
            )
        self.epoch, self.position = epoch, position


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
