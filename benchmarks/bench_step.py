"""Training-step cost of BMB against FixMatch, measured in the same process.

    python benchmarks/bench_step.py [--encoder wrn] [--size 32] [--steps 20] [--blocks 4] [--smoke]

With ``--audit-syncs`` (CUDA only) it instead lists every place where a training step makes the
host wait for the GPU (CUDA's sync debug mode, attributed to the project's own source lines).

With ``--mfu`` it also counts the model FLOPs of one real training step of each algorithm
(``torch.utils.flop_counter.FlopCounterMode`` over ``Trainer.train_step`` on the step's actual
batch: forward and backward of the encoder and both heads on labeled + unlabeled weak + 2 strong
views, and the aux head on the bank's draw) and prints them beside images/s, the achieved FLOP/s
and the fraction of the device's dense peak (:data:`PEAK_TFLOPS`, or ``--peak-tflops``).
``--memory-format``, ``--compile`` and ``--no-fused`` set the step's speed options
(``model.memory_format``, ``model.compile``, the fused optimizer) for comparisons.

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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

from bmb.algorithms import AlgorithmContext, build_algorithm
from bmb.config import MethodConfig, load_config
from bmb.models import BMBModel, resolve_memory_format
from bmb.trainer import Trainer
from pipelines.augment import ViewMaker
from pipelines.tensor import ArraySplit, TensorStream


def make_trainer(algorithm: str, args, acc: Accelerator, data: dict, cuda_graphs: bool = True) -> Trainer:
    """A trainer as ``launch/train.py`` builds one, on ``data``. ``args``: ``encoder, size, batch,
    classes, bank`` and optionally ``width``, ``memory_format`` (default auto), ``compile``
    (default off), ``no_fused`` (default off: the fused optimizer on CUDA)."""
    memory_format = getattr(args, "memory_format", "auto")
    compile_encoder = bool(getattr(args, "compile", False))
    cfg = load_config(None, [
        "data.dataset=unused", f"model.encoder={args.encoder}", f"method.algorithm={algorithm}",
        "method.warmup_epochs=0", "method.threshold=0.01", f"train.labeled_batch={args.batch}",
        f"train.unlabeled_batch={args.batch}", f"data.image_size={args.size}",
        f"method.bank_size={args.bank}", f"method.get_num={args.bank // 2}", "train.progress=false",
        f"model.memory_format={memory_format}", f"model.compile={str(compile_encoder).lower()}"])
    torch.manual_seed(0)
    full_res = args.size >= 128  # the 224 px recipe: ImageNet stem, random-resized-crop from 256
    model = BMBModel.build(args.encoder, args.classes, width=getattr(args, "width", None),
                           stem="imagenet" if full_res else "small")
    model.configure(resolve_memory_format(cfg.model.memory_format, acc.device), compile=cfg.model.compile)
    counts = torch.bincount(data["labeled"].labels, minlength=args.classes)
    method = MethodConfig(algorithm=algorithm, threshold=0.01, put_power=0.0, bank_size=args.bank,
                          get_num=args.bank // 2, cuda_graphs=cuda_graphs)
    alg = build_algorithm(method, AlgorithmContext(
        args.classes, model.feat_dim, counts, unlabeled_size=len(data["unlabeled"].labels),
        generator=torch.Generator(device=acc.device).manual_seed(1), device=acc.device))
    stream = TensorStream(data["labeled"], data["unlabeled"], labeled_batch=args.batch, unlabeled_batch=args.batch,
                          device=acc.device)
    views = ViewMaker(image_size=args.size, num_strong=2, crop="rrc" if full_res else "translate")
    trainer = Trainer(cfg, acc, model, alg, stream, views, {}, counts, [str(i) for i in range(args.classes)],
                      "/tmp/bench_step_unused")
    if getattr(args, "no_fused", False):  # before the first step, which creates the state for the flags
        for group in trainer.optimizer.param_groups:
            group["fused"], group["foreach"] = None, None  # torch's default: foreach on CUDA
    return trainer


# Dense (no 2:4 sparsity) peak tensor-core TFLOP/s, and plain FP32 (CUDA cores), from NVIDIA's
# datasheets, whose tensor-core figures are quoted *with* sparsity: halved here. Matched in this
# order against torch.cuda.get_device_name() (e.g. "NVIDIA H100 80GB HBM3" is the SXM part).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),  # datasheet: BF16 1,671*, TF32 835*
    ("H200", {"bf16": 989.5, "tf32": 494.5, "fp32": 67.0}),  # H200 SXM: BF16 1,979*, TF32 989*
    ("H100 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),  # BF16 1,671*, TF32 835*
    ("H100 PCIe", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.0}),  # BF16 1,513*, TF32 756*
    ("H100", {"bf16": 989.5, "tf32": 494.5, "fp32": 67.0}),  # H100 SXM: BF16 1,979*, TF32 989*
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),  # A100 40/80 GB, SXM and PCIe (dense as quoted)
]


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of ``precision`` (bf16, tf32, fp32) on the named device; None if unknown."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks[precision]
    return None


def step_precision(mixed_precision: str) -> str:
    """The peak that bounds a step's convolutions: bf16 under bf16 autocast; in fp32, cuDNN's
    convolutions use TF32 tensor cores unless torch.backends.cudnn.allow_tf32 is off."""
    if mixed_precision == "bf16":
        return "bf16"
    return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """FLOPs of what ``fn()`` runs, forward and backward, as ``FlopCounterMode`` counts them.

    Counted: matrix multiplications, convolutions (and their backward), attention; elementwise
    ops, norms, reductions and optimizer updates count 0 -- the "model FLOPs" of an MFU figure. A
    layer whose input needs no gradient (a network's first layer) has a backward of 1x its forward
    (the weight gradient), the others 2x (weight and input gradients).

    Returns:
        ``(total, {module path: FLOPs})`` with module paths as the counter names them
        (``"BMBModel.encoder"``, ...; ``"Global"`` is the total).
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    per_module = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return int(counter.get_total_flops()), per_module


def count_step_flops(trainer: Trainer, batch: Any) -> tuple[int, dict[str, int]]:
    """:func:`count_flops` of one ``trainer.train_step(batch)`` (it is a real step: the trainer
    moves on). A compiled encoder runs eagerly meanwhile: the counter sees torch's ops, and the
    FLOPs are the model's, however it is compiled."""
    model = trainer.raw_model
    compiled = getattr(model, "encoder_compiled", None)
    model.__dict__["encoder_compiled"] = None
    try:
        return count_flops(lambda: trainer.train_step(batch))
    finally:
        model.__dict__["encoder_compiled"] = compiled


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


def build_parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--algorithms", default="fixmatch,bmb",
                    help="comma-separated, of fixmatch and bmb (the overhead needs both; default both)")
    ap.add_argument("--width", type=int, default=None, help="model.width (wrn: k, default 2; small: default 32)")
    ap.add_argument("--memory-format", default="auto", choices=["auto", "channels_last", "contiguous"],
                    help="model.memory_format (auto: channels_last on CUDA, contiguous on the CPU)")
    ap.add_argument("--compile", action="store_true", help="model.compile: torch.compile the encoder")
    ap.add_argument("--no-fused", action="store_true",
                    help="the optimizer without fused=True (torch's default: foreach on CUDA), for comparison")
    ap.add_argument("--mfu", action="store_true",
                    help="also count each step's model FLOPs (FlopCounterMode over one real step) and print "
                         "images/s, achieved FLOP/s and the fraction of the device's dense peak")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak TFLOP/s for --mfu (default: the table for known GPUs; none on CPU)")
    ap.add_argument("--smoke", action="store_true",
                    help="CI check: the small encoder, batch 4, bank 16, 1 block of 1 step, with --mfu "
                         "(seconds; the numbers mean nothing)")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.smoke:
        args.encoder, args.size, args.batch, args.bank, args.steps, args.blocks = "small", 32, 4, 16, 1, 1
        args.width, args.mfu = 8, True
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    if not algorithms or set(algorithms) - {"fixmatch", "bmb"}:
        ap.error(f"--algorithms: fixmatch and/or bmb, got {args.algorithms!r}")
    if args.audit_syncs and not torch.cuda.is_available():
        ap.error("--audit-syncs needs CUDA (it runs the step under torch.cuda.set_sync_debug_mode)")
    acc = Accelerator(mixed_precision=args.mixed_precision)
    g = torch.Generator().manual_seed(0)
    n = 4 * args.batch
    load = 256 if args.size >= 128 else args.size  # readers deliver 256 px squares for the 224 px recipe
    data = {s: ArraySplit(torch.randint(0, 256, (n, 3, load, load), dtype=torch.uint8, generator=g),
                          torch.randint(0, args.classes, (n,), generator=g)) for s in ("labeled", "unlabeled")}
    trainers = {a: make_trainer(a, args, acc, data) for a in algorithms}
    if args.eager_bank:
        trainers["bmb-eager"] = make_trainer("bmb", args, acc, data, cuda_graphs=False)
    iters = {a: iter(t.stream) for a, t in trainers.items()}
    sync = torch.cuda.synchronize if acc.device.type == "cuda" else (lambda: None)
    first_ms = {}
    for a, t in trainers.items():  # warm-up (and fill the bank; compile, with --compile)
        for i in range(3):
            sync()
            t0 = time.perf_counter()
            t.train_step(next(iters[a]))
            sync()
            if i == 0:
                first_ms[a] = 1e3 * (time.perf_counter() - t0)
    if args.audit_syncs:
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
    fused = trainers[algorithms[0]].optimizer.param_groups[0].get("fused")
    print(f"device={acc.device} ({torch.cuda.get_device_name() if acc.device.type == 'cuda' else 'cpu'}) "
          f"encoder={args.encoder} size={args.size} batch={args.batch}+{args.batch}x3 "
          f"threads={torch.get_num_threads()} precision={args.mixed_precision} memory_format={args.memory_format} "
          f"compile={args.compile} fused_optimizer={bool(fused)} torch={torch.__version__}")
    print("first step (ms, incl. any compilation): " + ", ".join(f"{a} {v:.0f}" for a, v in first_ms.items()))
    if args.mfu:
        print_mfu(args, acc, trainers, iters, ms)
    if not {"fixmatch", "bmb"} <= set(trainers):
        for a in trainers:
            print(f"{a}: {ms[a]:.1f} ms/step")
        return

    def overhead(a: str) -> str:
        """Mean over all steps, and the median of the per-block ratios (robust to drift)."""
        ratios = [x / f - 1 for x, f in zip(blocks[a], blocks["fixmatch"])]
        return f"{100 * (ms[a] / ms['fixmatch'] - 1):+.1f}% (median of blocks {100 * statistics.median(ratios):+.1f}%)"

    print(f"bank={len(trainers['bmb'].algorithm.bank)}/{args.bank}")
    print("| encoder | px | FixMatch ms/step | BMB ms/step | BMB overhead |")
    print("|---|---:|---:|---:|---:|")
    print(f"| {args.encoder} | {args.size} | {ms['fixmatch']:.1f} | {ms['bmb']:.1f} | {overhead('bmb')} |")
    if "bmb-eager" in ms:
        print(f"bmb with CUDA graphs off: {ms['bmb-eager']:.1f} ms/step, {overhead('bmb-eager')} over FixMatch")


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def print_mfu(args, acc: Accelerator, trainers: dict[str, Trainer], iters: dict[str, Iterator],
              ms: dict[str, float]) -> None:
    """Model FLOPs per step (counted over one more real step of each trainer), images/s,
    achieved FLOP/s and, with a known or given peak, the fraction of it."""
    precision = step_precision(args.mixed_precision)
    peak, source = args.peak_tflops, "--peak-tflops"
    if peak is None and acc.device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak, source = peak_tflops(name, precision), f"{name}, dense {precision}, NVIDIA datasheet"
    images = args.batch * 4  # labeled weak + unlabeled weak + 2 strong views
    print("model FLOPs counted by FlopCounterMode over one real step; peak: "
          + (f"{peak:g} TFLOP/s ({source})" if peak else "none (unknown device: give --peak-tflops)"))
    print("| algorithm | ms/step | images/s | GFLOP/step | of which encoder | achieved TFLOP/s | of peak |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for a, t in trainers.items():
        total, per_module = count_step_flops(t, next(iters[a]))
        achieved = total / (ms[a] / 1e3)  # FLOP/s
        share = per_module.get("BMBModel.encoder", 0) / max(total, 1)
        frac = f"{100 * achieved / (peak * 1e12):.1f}%" if peak else "—"
        print(f"| {a} | {ms[a]:.1f} | {_fmt_rate(images / (ms[a] / 1e3))} | {total / 1e9:,.2f} | {100 * share:.2f}% | "
              f"{achieved / 1e12:.3g} | {frac} |")


if __name__ == "__main__":
    main()
