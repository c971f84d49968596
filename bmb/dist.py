"""Collectives that are no-ops in a single process.

The algorithm code talks to other ranks only through :class:`Collectives`, so the same code runs
in one process (tests, CPU demo) and under DDP/DeepSpeed. It uses ``torch.distributed`` directly
(whatever backend Accelerate initialised: NCCL on GPUs, gloo on CPUs) and never imports Accelerate.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Collectives:
    """Rank/world info plus the few collectives BMB needs.

    In a process group of size 1 (or none) every call returns its input unchanged.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        on = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if on else 1
        self.rank = dist.get_rank(group) if on else 0
        self._host_group: dist.ProcessGroup | None = None

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate equally-shaped tensors of all ranks along dim 0, in rank order."""
        if not self.active:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (returns a new tensor)."""
        if not self.active:
            return tensor
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def broadcast_(self, tensors: list[torch.Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` in place with rank ``src``'s values."""
        if not self.active:
            return
        for t in tensors:
            dist.broadcast(t, src=src, group=self.group)

    def all_equal(self, tensor: torch.Tensor) -> bool:
        """True when ``tensor`` is identical on all ranks (compares a gathered copy)."""
        if not self.active:
            return True
        gathered = self.all_gather_cat(tensor.reshape(1, -1))
        return bool((gathered == gathered[:1]).all())

    def any_true(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (a host-side collective: it never
        waits for the GPU)."""
        if not self.active:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self._host())
        return bool(t.item() > 0)

    def _host(self) -> dist.ProcessGroup | None:
        """A gloo group over this group's ranks, for host-side flags.

        A flag on a NCCL group would be a GPU tensor, and reading it back would make the host
        wait for all queued GPU work. Built on the first call, which every rank makes at the
        same point (``new_group`` needs every process of the job).
        """
        if self._host_group is None:
            if "gloo" in str(dist.get_backend(self.group)).lower():
                self._host_group = self.group or dist.group.WORLD
            else:
                ranks = None if self.group is None else dist.get_process_group_ranks(self.group)
                self._host_group = dist.new_group(ranks=ranks, backend="gloo")
        return self._host_group
