"""On a GPU, a training step never makes the host wait for the device (marked ``gpu``).

A host-GPU synchronisation per step (a ``.item()``, boolean indexing, a blocking host-to-device
copy, CUDA's ``bincount``) stalls the host until all queued GPU work is done, so the next step's
kernels start late: on a launch-bound step that costs several percent. The audit runs the real
``Trainer.train_step`` under CUDA's sync debug mode and names each offending line.
"""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("size", [32, 224])
def test_train_steps_of_both_algorithms_never_wait_for_the_gpu(size):
    from accelerate import Accelerator

    from benchmarks.bench_step import audit_syncs, make_trainer
    from pipelines.tensor import ArraySplit

    args = Namespace(encoder="small", size=size, batch=8, classes=5, bank=16)
    acc = Accelerator(mixed_precision="bf16")
    g = torch.Generator().manual_seed(0)
    load = 256 if size >= 128 else size
    data = {s: ArraySplit(torch.randint(0, 256, (32, 3, load, load), dtype=torch.uint8, generator=g).cuda(),
                          torch.randint(0, args.classes, (32,), generator=g).cuda())
            for s in ("labeled", "unlabeled")}
    for algorithm in ("fixmatch", "bmb"):
        trainer = make_trainer(algorithm, args, acc, data)
        batches = iter(trainer.stream)
        for _ in range(4):  # first steps: lazy initialisation (cuDNN, allocators) may sync
            trainer.train_step(next(batches))
        if algorithm == "bmb":
            trainer.algorithm.bank.clear()  # empty again: audit the empty, filling, full bank
        sites = audit_syncs(trainer, batches, steps=6)
        # Each sync is charged to the innermost line of our code on the stack; what lands
        # outside bmb/ and pipelines/ happened in torch's own machinery (e.g. its pinned-memory
        # allocator growing), not in a line of ours.
        ours = {where: n for where, n in sites.items() if where.startswith(("bmb/", "pipelines/"))}
        assert not ours, f"{algorithm}: host-GPU syncs in 6 steps: {ours} (all: {dict(sites)})"
        if algorithm == "bmb":
            assert len(trainer.algorithm.bank) == args.bank  # the bank did fill and overflow
