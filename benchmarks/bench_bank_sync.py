"""Cost of keeping the memory bank identical across ranks, against the training step.

    python benchmarks/bench_bank_sync.py [--world 2] [--encoder small] [--steps 30] [--smoke]

Spawns `--world` CPU processes (gloo). Each runs DDP training steps of BMB (per-rank batch
64 labeled + 64 unlabeled x (weak + 2 strong) views, 32 px) and times, per step:
- the whole step (forward, losses, backward with DDP's gradient all-reduce, Adam, bank update);
- the bank synchronisation: the fused all-gather of every rank's candidates plus the identical
  enqueue/dequeue decisions (`BMB.after_step`), and the global `get` + slice (`bank_slice`).
Every candidate is offered and accepted (beta 0), so the bank is full and overflows every step:
the synchronisation's worst case. Prints rank 0's means and its share of the step. Target: <= 2 %.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bmb.algorithms import BMB, AlgorithmContext, StepOutputs
from bmb.config import MethodConfig
from bmb.dist import Collectives
from bmb.models import BMBModel, ModelOutput


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(BMBModel.build(args.encoder, 10))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    method = MethodConfig(threshold=0.05, put_power=0.0, bank_size=args.bank, get_num=args.bank // 2)
    alg = BMB(method, AlgorithmContext(10, model.module.feat_dim, torch.tensor([100, 60, 36, 22, 13, 8, 5, 3, 2, 1]),
                                       unlabeled_size=500, generator=torch.Generator().manual_seed(1),
                                       collectives=Collectives()))
    g = torch.Generator().manual_seed(10 + rank)
    b = args.batch
    step_t, sync_t = [], []
    for step in range(args.warmup + args.steps):
        x = torch.randn(4 * b, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (b,), generator=g)
        dist.barrier()
        t0 = time.perf_counter()
        out = model(x)
        parts = [torch.split(t, [b, b, 2 * b]) for t in out]
        so = StepOutputs(y, ModelOutput(*(p[0] for p in parts)), ModelOutput(*(p[1] for p in parts)),
                         ModelOutput(*(p[2] for p in parts)), unlabeled_on=True)
        losses = alg(so, model.module.aux_head)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        t1 = time.perf_counter()
        alg.after_step()  # fused all-gather + identical enqueue/dequeue decisions
        t2 = time.perf_counter()
        alg.bank_slice()  # the global get + this rank's slice (normally inside the step)
        t3 = time.perf_counter()
        if step >= args.warmup:
            step_t.append(t3 - t0 - (t3 - t2))  # a real step does one get, counted below
            sync_t.append((t2 - t1) + (t3 - t2))
    if rank == 0:
        st, sy = 1e3 * sum(step_t) / len(step_t), 1e3 * sum(sync_t) / len(sync_t)
        print(f"world={world} encoder={args.encoder} per-rank batch {b}+{b}x3 bank={len(alg.bank)}/{args.bank} "
              f"threads/rank={args.threads}")
        print("| processes | step (ms) | bank sync: all-gather + decisions + get (ms) | share of step |")
        print("|---:|---:|---:|---:|")
        print(f"| {world} | {st:.1f} | {sy:.2f} | {100 * sy / st:.2f}% |")
    del model, opt, losses  # DDP before the group, as in launch/train.py
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--encoder", default="small", choices=["small", "wrn"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--bank", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true",
                    help="CI check: 2 processes, batch 8, bank 16, 2 steps after 1 warm-up (the numbers mean nothing)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.world, args.batch, args.bank, args.steps, args.warmup = 2, 8, 16, 2, 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(args.world, port, args), nprocs=args.world, join=True, start_method="spawn")


if __name__ == "__main__":
    main()
