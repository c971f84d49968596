"""Micro-benchmark: balanced memory bank enqueue + get per step.

    python benchmarks/bench_bank.py [--device cpu|cuda] [--steps 300]

Streams long-tailed candidates (10 classes, gamma=100, feature dim 128) through a full bank and
prints the mean time of one enqueue + one get (get_num = capacity / 2) per step.
"""

from __future__ import annotations

import argparse
import time

import torch

from bmb.memory import BalancedMemoryBank


def bench(capacity: int, batch: int, device: str, steps: int, dim: int = 128, classes: int = 10) -> float:
    g = torch.Generator().manual_seed(0)
    bank = BalancedMemoryBank(capacity, dim, classes, put_power=3.0, get_power=0.75,
                              generator=torch.Generator().manual_seed(1), device=device)
    mu = 0.01 ** (1 / (classes - 1))
    p = torch.tensor([mu**k for k in range(classes)])
    prior = (p * 1000).to(device)
    feats = [torch.randn(batch, dim, generator=g).to(device) for _ in range(16)]
    labels = [torch.multinomial(p, batch, True, generator=g).to(device) for _ in range(16)]
    for i in range(50):  # fill + warm up
        bank.enqueue(feats[i % 16], labels[i % 16])
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        bank.enqueue(feats[i % 16], labels[i % 16])
        bank.get(capacity // 2, prior)
    sync()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print("| capacity | batch | enqueue+get (ms/step) |")
    print("|---:|---:|---:|")
    for capacity in (128, 1024):
        for batch in (64, 512):
            print(f"| {capacity} | {batch} | {bench(capacity, batch, args.device, args.steps):.3f} |")


if __name__ == "__main__":
    main()
