"""BMB's per-step no-grad work replayed as CUDA graphs.

With a small model on a fast GPU (WRN-28-2 at 32 px, the CIFAR setting) a training step is bound
by the host issuing kernels, not by the GPU: every extra kernel adds host time to the step. BMB's
own work -- targets, masks and class weights for the aux head, the N̂ update, the bank's draw
(~30 kernels) and enqueue (~100) -- is many small kernels of shapes that never change
(:mod:`bmb.memory` works on fixed shapes for exactly this reason), so each piece is captured once
as a CUDA graph and then replayed with one launch.

Results are bit-identical to running the same functions eagerly: the graphs run the same
kernels, and their uniforms are drawn from the bank's own generator straight into the graphs'
input buffers before each replay -- the numbers, and the generator state afterwards, that the
eager calls draw. So :class:`StepGraphs` runs eagerly where graphs are unavailable (CPU, or a
generator on another device) with the same code and the same results.

A graph is captured on first use for each key (shapes and flags), and again whenever the bank
reallocates its buffers (:attr:`BalancedMemoryBank.version`, e.g. after ``load_state_dict``).
Its outputs are static tensors, overwritten by the next replay of the same graph: use them within
the step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from bmb.memory import BalancedMemoryBank


class _Captured:
    """``fn(*inputs)`` captured as a CUDA graph over static copies of ``inputs``.

    Args:
        fn: fixed-shape device work on its tensor arguments; returns a tensor or a tuple of them.
        inputs: example inputs; their clones become the static inputs the graph reads.
        preserve: tensors ``fn`` writes that must not keep the warm-up run's writes (restored).
    """

    def __init__(self, fn: Callable, inputs: Sequence[torch.Tensor], preserve: Sequence[torch.Tensor] = ()) -> None:
        self.inputs = [t.clone() for t in inputs]
        saved = [t.clone() for t in preserve]
        # One eager run on a side stream first: lazy initialisation (library workspaces) may not
        # happen during capture. Autocast off: the bank's ops are float64/int and unaffected,
        # and its cast cache must not leak into the graph.
        side = torch.cuda.Stream(device=self.inputs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.autocast("cuda", enabled=False):
            fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(preserve, saved):
            t.copy_(s)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a DataLoader's pin-memory thread) during the
        # capture are theirs, not an error of this capture.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"), torch.autocast("cuda", enabled=False):
            self.outputs = fn(*self.inputs)

    def replay(self):
        self.graph.replay()
        return self.outputs


class StepGraphs:
    """Runs fixed-shape functions of device tensors eagerly, or as CUDA graph replays.

    Args:
        bank: the memory bank; its generator supplies every function's uniforms.
        enabled: use CUDA graphs where :meth:`supported` (otherwise run eagerly).
    """

    def __init__(self, bank: BalancedMemoryBank, enabled: bool = True) -> None:
        self.bank = bank
        self.enabled = enabled and self.supported(bank)
        self._graphs: dict[tuple, _Captured] = {}

    @staticmethod
    def supported(bank: BalancedMemoryBank) -> bool:
        """True when the bank and its generator share one CUDA device (graphs can then draw)."""
        dev, gen = bank.device, bank.generator.device
        if dev.type != "cuda" or gen.type != "cuda" or not torch.cuda.is_available():
            return False
        current = torch.cuda.current_device()
        return (dev.index if dev.index is not None else current) == (gen.index if gen.index is not None else current)

    def run(self, key: tuple, fn: Callable, inputs: Sequence[torch.Tensor], uniforms: Sequence[int] = (),
            preserve: Sequence[torch.Tensor] = ()):
        """``fn(*inputs, *u)`` under ``no_grad``, with ``u`` one float64 tensor of uniforms from the bank's generator
        per entry of ``uniforms`` (its length), drawn in order.

        Args:
            key: identifies ``fn`` with these shapes and flags (one graph per key).
            preserve: device state ``fn`` updates in place (restored after the capture's warm-up
                run, so that capturing has no effect).
        """
        with torch.no_grad():  # no-grad work: inputs are read, never differentiated through
            return self._run(key, fn, inputs, uniforms, preserve)

    def _run(self, key: tuple, fn: Callable, inputs: Sequence[torch.Tensor], uniforms: Sequence[int],
             preserve: Sequence[torch.Tensor]):
        if not self.enabled:
            return fn(*inputs, *(self.bank.uniforms(n) for n in uniforms))
        key = (*key, self.bank.version)
        graph = self._graphs.get(key)
        if graph is None:
            self._graphs = {k: g for k, g in self._graphs.items() if k[-1] == self.bank.version}  # drop stale
            us = [inputs[0].new_empty(n, dtype=torch.float64) for n in uniforms]
            graph = self._graphs[key] = _Captured(fn, [*inputs, *us], preserve)
        for static, t in zip(graph.inputs, inputs):
            static.copy_(t)
        for u in graph.inputs[len(inputs):]:  # the numbers `torch.rand(len(u), generator=...)` gives
            u.uniform_(0.0, 1.0, generator=self.bank.generator)
        return graph.replay()

    def enqueue_packed(self, packed: torch.Tensor) -> None:
        """:meth:`BalancedMemoryBank.enqueue` of rows ``features | label | valid``, float ``(B, D + 2)``
        (label as a float, valid as 0/1)."""
        bank = self.bank
        if packed.dim() != 2 or packed.shape[1] != bank.feat_dim + 2:
            raise ValueError(f"StepGraphs.enqueue_packed: expected rows of {bank.feat_dim + 2} values, "
                             f"got shape {tuple(packed.shape)}")
        packed = packed.to(bank.device)

        def enqueue(rows: torch.Tensor, u_accept: torch.Tensor, u_race: torch.Tensor) -> torch.Tensor:
            return bank.enqueue_core(rows[:, :-2].to(bank.dtype), rows[:, -2].long(), rows[:, -1] > 0.5,
                                     u_accept, u_race)

        self.run(("enqueue", tuple(packed.shape), packed.dtype), enqueue, [packed],
                 uniforms=bank.uniforms_per_enqueue(packed.shape[0]),
                 preserve=bank.state_tensors())
