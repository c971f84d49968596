"""Training-step cost of BMB against FixMatch, measured in the same process.

    python benchmarks/bench_step.py [--encoder wrn] [--size 32] [--steps 20] [--blocks 4]

With ``--audit-syncs`` (CUDA only) it instead lists every place where a training step makes the
host wait for the GPU (CUDA's sync debug mode, attributed to the project's own source lines).

Both algorithms run the real `Trainer.train_step` (augmentation on the device, one forward of
labeled weak + unlabeled weak + 2 strong views, losses, backward, optimizer, EMA) on the same
random uint8 data; BMB additionally fills/queries its memory bank every step (threshold 0.01 and
beta 0, so every candidate is offered and the bank stays full: the bank's worst case). Steps
alternate in blocks between the trainers to cancel drift. Prints ms/step for each and BMB's
overhead in percent: over all steps, and the median of the per-block ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator

from bmb.algorithms import AlgorithmContext, build_algorithm
from bmb.config import MethodConfig, load_config
from bmb.engine import Trainer
from bmb.models import BMBModel
from pipelines.augment import ViewMaker
from pipelines.tensor import ArraySplit, TensorStream


def make_trainer(algorithm: str, args, acc: Accelerator, data: dict, cuda_graphs: bool = True) -> Trainer:
    cfg = load_config(None, [
        "data.dataset=unused", f"model.encoder={args.encoder}", f"method.algorithm={algorithm}",
        "method.warmup_epochs=0", "method.threshold=0.01", f"train.labeled_batch={args.batch}",
        f"train.unlabeled_batch={args.batch}", f"data.image_size={args.size}",
        f"method.bank_size={args.bank}", f"method.get_num={args.bank // 2}", "train.progress=false"])
    torch.manual_seed(0)
    full_res = args.size >= 128  # the 224 px recipe: ImageNet stem, random-resized-crop from 256
    model = BMBModel.build(args.encoder, args.classes, stem="imagenet" if full_res else "small")
    counts = torch.bincount(data["labeled"].labels, minlength=args.classes)
    method = MethodConfig(algorithm=algorithm, threshold=0.01, put_power=0.0, bank_size=args.bank,
                          get_num=args.bank // 2, cuda_graphs=cuda_graphs)
    alg = build_algorithm(method, AlgorithmContext(
        args.classes, model.feat_dim, counts, unlabeled_size=len(data["unlabeled"].labels),
        generator=torch.Generator(device=acc.device).manual_seed(1), device=acc.device))
    stream = TensorStream(data["labeled"], data["unlabeled"], labeled_batch=args.batch, unlabeled_batch=args.batch,
                          device=acc.device)
    views = ViewMaker(image_size=args.size, num_strong=2, crop="rrc" if full_res else "translate")
    return Trainer(cfg, acc, model, alg, stream, views, {}, counts, [str(i) for i in range(args.classes)],
                   "/tmp/bench_step_unused")


_ROOT = Path(__file__).resolve().parents[1]


def audit_syncs(trainer: Trainer, batches: Iterator, steps: int) -> Counter:
    """Where ``steps`` training steps make the host wait for the GPU.

    Runs under ``torch.cuda.set_sync_debug_mode("warn")`` and attributes each synchronising CUDA
    call to the innermost line of this project's code on the Python stack.

    Returns:
        ``Counter`` of ``"path:line in function"`` -> number of synchronisations.
    """
    sites: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return
        ours = [f for f in traceback.extract_stack()[:-1]
                if f.filename.startswith(str(_ROOT)) and "/.venv/" not in f.filename
                and not f.filename.endswith("bench_step.py")]
        if not ours:  # e.g. a thread of torch's own (autograd engine) or the audit loop itself
            sites["(no line of this project on the stack)"] += 1
            return
        where = ours[-1]
        sites[f"{Path(where.filename).relative_to(_ROOT)}:{where.lineno} in {where.name}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                trainer.train_step(next(batches))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sites


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="wrn", choices=["wrn", "resnet50", "small"])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--bank", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="steps per block")
    ap.add_argument("--blocks", type=int, default=4, help="alternating blocks per algorithm")
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    ap.add_argument("--eager-bank", action="store_true",
                    help="also time BMB with its CUDA graphs off (bmb-eager; see bmb/graphs.py)")
    ap.add_argument("--audit-syncs", action="store_true",
                    help="list the host-GPU synchronisations of a step instead of timing (CUDA only)")
    args = ap.parse_args()
    acc = Accelerator(mixed_precision=args.mixed_precision)
    g = torch.Generator().manual_seed(0)
    n = 4 * args.batch
    load = 256 if args.size >= 128 else args.size  # readers deliver 256 px squares for the 224 px recipe
    data = {s: ArraySplit(torch.randint(0, 256, (n, 3, load, load), dtype=torch.uint8, generator=g),
                          torch.randint(0, args.classes, (n,), generator=g)) for s in ("labeled", "unlabeled")}
    trainers = {a: make_trainer(a, args, acc, data) for a in ("fixmatch", "bmb")}
    if args.eager_bank:
        trainers["bmb-eager"] = make_trainer("bmb", args, acc, data, cuda_graphs=False)
    iters = {a: iter(t.stream) for a, t in trainers.items()}
    sync = torch.cuda.synchronize if acc.device.type == "cuda" else (lambda: None)
    for a, t in trainers.items():  # warm-up (and fill the bank)
        for _ in range(3):
            t.train_step(next(iters[a]))
    if args.audit_syncs:
        if acc.device.type != "cuda":
            ap.error("--audit-syncs needs CUDA")
        for a, t in trainers.items():
            sites = audit_syncs(t, iters[a], args.steps)
            print(f"{a}: {sum(sites.values()) / args.steps:.1f} host-GPU syncs per step")
            for where, n in sites.most_common():
                print(f"  {n / args.steps:5.1f}/step  {where}")
        return
    blocks = {a: [] for a in trainers}  # ms/step of each block
    for _ in range(args.blocks):
        for a, t in trainers.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                t.train_step(next(iters[a]))
            sync()
            blocks[a].append(1e3 * (time.perf_counter() - t0) / args.steps)
    ms = {a: statistics.fmean(v) for a, v in blocks.items()}

    def overhead(a: str) -> str:
        """Mean over all steps, and the median of the per-block ratios (robust to drift)."""
        ratios = [x / f - 1 for x, f in zip(blocks[a], blocks["fixmatch"])]
        return f"{100 * (ms[a] / ms['fixmatch'] - 1):+.1f}% (median of blocks {100 * statistics.median(ratios):+.1f}%)"

    print(f"device={acc.device} encoder={args.encoder} size={args.size} batch={args.batch}+{args.batch}x3 "
          f"threads={torch.get_num_threads()} bank={len(trainers['bmb'].algorithm.bank)}/{args.bank}")
    print("| encoder | px | FixMatch ms/step | BMB ms/step | BMB overhead |")
    print("|---|---:|---:|---:|---:|")
    print(f"| {args.encoder} | {args.size} | {ms['fixmatch']:.1f} | {ms['bmb']:.1f} | {overhead('bmb')} |")
    if "bmb-eager" in ms:
        print(f"bmb with CUDA graphs off: {ms['bmb-eager']:.1f} ms/step, {overhead('bmb-eager')} over FixMatch")


if __name__ == "__main__":
    main()
