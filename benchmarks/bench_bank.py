"""Micro-benchmark: balanced memory bank enqueue + get per step.

    python benchmarks/bench_bank.py [--device cpu|cuda] [--steps 300] [--repeats 5] [--threads 1]
                                    [--clock wall|cpu] [--row CAP,BATCH,DIM,CLASSES ...] [--smoke]

Streams long-tailed candidates (gamma=100) through a full bank and prints the time of one
enqueue + one get (get_num = capacity / 2) per step, for both draws (without and with
replacement), and of the enqueue alone. Rows: feature dim 128 / 10 classes (CIFAR-10-LT) at
capacity {128, 1024} x batch {64, 512}, and the ImageNet-LT shape (capacity 1024, batch 512,
dim 2048, 1000 classes). Each number is the median over ``--repeats`` runs of ``--steps`` steps.
glibc's malloc keeps freed memory, as ``launch/train.py`` sets it (``pipelines/host_memory.py``;
``BMB_KEEP_FREED_MEMORY=0`` turns it off): the step's fresh (B, D) outputs are then reused memory,
not new page-faulted mappings.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bmb.memory import BalancedMemoryBank
from pipelines.host_memory import keep_freed_memory

# (capacity, batch, feature dim, classes)
ROWS = [(128, 64, 128, 10), (128, 512, 128, 10), (1024, 64, 128, 10), (1024, 512, 128, 10),
        (1024, 512, 2048, 1000)]


def bench(capacity: int, batch: int, device: str, steps: int, dim: int = 128, classes: int = 10,
          repeats: int = 1, clock=time.perf_counter) -> dict[str, float]:
    """Median ms per step over ``repeats`` runs: ``get`` (enqueue + get without replacement),
    ``get_repl`` (enqueue + get with replacement) and ``enqueue`` (enqueue alone), timed by
    ``clock`` (wall clock by default)."""
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
        bank.get(capacity // 2, prior, replacement=False)
        bank.get(capacity // 2, prior, replacement=True)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step(i: int, replacement: bool | None) -> None:
        bank.enqueue(feats[i % 16], labels[i % 16])
        if replacement is not None:
            bank.get(capacity // 2, prior, replacement=replacement)

    times: dict[str, list[float]] = {"get": [], "get_repl": [], "enqueue": []}
    for _ in range(repeats):  # interleaved, so that load from other jobs hits all three alike
        for name, replacement in (("get", False), ("get_repl", True), ("enqueue", None)):
            sync()
            t0 = clock()
            for i in range(steps):
                step(i, replacement)
            sync()
            times[name].append((clock() - t0) / steps * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall clock, or this thread's CPU time (CPU only: on a shared machine it leaves "
                         "out the time other jobs hold the core)")
    ap.add_argument("--row", action="append", default=None, metavar="CAP,BATCH,DIM,CLASSES",
                    help="benchmark only these rows (repeatable); default: all of ROWS")
    ap.add_argument("--smoke", action="store_true",
                    help="CI check: two small rows (10 and 1000 classes), 3 steps, 1 repeat (the numbers mean nothing)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.repeats, args.row = 3, 1, ["128,64,16,10", "256,64,16,1000"]
    kept = keep_freed_memory()  # as launch/train.py does
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"steps={args.steps} repeats={args.repeats} (median) clock={args.clock} "
          f"malloc keeps freed memory: {kept}")
    print("| capacity | batch | dim | classes | enqueue+get (ms/step) | enqueue+get, replacement (ms/step) "
          "| enqueue alone (ms/step) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    rows = [tuple(int(v) for v in r.split(",")) for r in args.row] if args.row else ROWS
    for capacity, batch, dim, classes in rows:
        r = bench(capacity, batch, args.device, args.steps, dim, classes, args.repeats, clock)
        print(f"| {capacity} | {batch} | {dim} | {classes} | {r['get']:.3f} | {r['get_repl']:.3f} "
              f"| {r['enqueue']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
