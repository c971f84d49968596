"""BMB against FixMatch on the demo data, with the paper's ablation (Table 5) and a beta sweep.

    python benchmarks/demo_ablation.py [--seeds 0 1 2] [--parallel 2] [--out runs/ablation] [--smoke]

Builds the demo dataset with `bmb-shards demo` (if absent), trains every variant for every seed
through `launch/train.py --config launch/configs/demo.yaml` (one thread per run, `--parallel`
runs at a time), then prints, per variant, mean ± std over seeds of: mean recall, the recall of
the 3 rarest classes, and the bank's normalised class entropy at the end of training. Finished
runs are reused, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch.report import bank_entropy  # noqa: E402

VARIANTS = {  # name -> overrides on launch/configs/demo.yaml
    "fixmatch": ["method.algorithm=fixmatch"],
    "memory": ["method.adaptive_weights=false"],
    "memory+weights (BMB)": [],
    "BMB beta=0": ["method.put_power=0"],
    "BMB beta=1": ["method.put_power=1"],
}


# --smoke: a tiny demo set (10 classes, 2 / 6 images per class at the tail) and a tiny model trained
# for 4 steps: the same runs and summary in seconds (the numbers mean nothing).
SMOKE_DEMO = ["--n1", "20", "--m1", "60", "--gamma-l", "10", "--gamma-u", "10", "--test-per-class", "4",
              "--workers", "1"]
SMOKE_RUN = ["model.encoder=small", "model.width=8", "train.labeled_batch=8", "train.unlabeled_batch=8",
             "train.iters_per_epoch=2", "train.epochs=2", "train.eval_every=4", "train.checkpoint_every=4",
             "train.log_every=4", "method.warmup_epochs=0", "method.threshold=0.15", "method.bank_size=16",
             "method.get_num=8", "data.eval_batch=64"]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def run_one(variant: str, seed: int, out: Path, data: Path, extra: list[str]) -> Path:
    name = f"{slug(variant)}-s{seed}"
    run_dir = out / name
    if (run_dir / "final.json").exists():
        return run_dir
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "launch/configs/demo.yaml"),
           *VARIANTS[variant], f"train.seed={seed}", f"name={name}", f"train.out_dir={out}",
           f"data.dataset={data}", "train.threads=1", "train.progress=false", *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    print(f"  {name}: {time.time() - t0:.0f}s", flush=True)
    return run_dir


def summarize(run_dir: Path) -> dict[str, float]:
    final = json.loads((run_dir / "final.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    counts = final["labeled_counts"]
    rare = sorted(range(len(counts)), key=lambda k: counts[k])[:3]
    bank = rows[-1].get("bank_class_counts")
    return {"mean_recall": 100 * final["mean_recall"],
            "rare3": 100 * sum(final["per_class_recall"][k] for k in rare) / 3,
            "bank_entropy": bank_entropy(bank) if bank else float("nan"),
            "seconds": final["seconds"]}


def fmt(values: list[float], digits: int = 1) -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "—"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.{digits}f} ± {sd:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "ablation")
    ap.add_argument("--data", type=Path, default=REPO / "data" / "demo")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("extra", nargs="*", help="extra key=value overrides for every run")
    ap.add_argument("--smoke", action="store_true",
                    help="CI check: a tiny demo set and model in a temporary folder, seed 0, BMB, 4 steps "
                         "(seconds; the numbers mean nothing)")
    args = ap.parse_args(argv)
    if not args.smoke:
        return run_all(args, [])
    with tempfile.TemporaryDirectory() as tmp:
        args.seeds, args.variants = [0], ["memory+weights (BMB)"]
        args.out, args.data = Path(tmp) / "runs", Path(tmp) / "demo"
        return run_all(args, SMOKE_DEMO, SMOKE_RUN)


def run_all(args: argparse.Namespace, demo_flags: list[str], run_flags: tuple[str, ...] = ()) -> None:
    """Build the demo set if absent, train every variant for every seed, print the table."""
    if not (args.data / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "shards", "demo", "--out", str(args.data), "--formats", "wds,arrays",
                        "--no-progress", *demo_flags], check=True, cwd=REPO)
    jobs = [(v, s) for s in args.seeds for v in args.variants]
    print(f"{len(jobs)} runs, {args.parallel} at a time -> {args.out}", flush=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        dirs = list(pool.map(lambda j: run_one(j[0], j[1], args.out, args.data, [*run_flags, *args.extra]), jobs))
    results: dict[str, list[dict[str, float]]] = {}
    for (variant, _seed), d in zip(jobs, dirs):
        results.setdefault(variant, []).append(summarize(d))
    print(f"\nseeds {args.seeds}; values are mean ± std over seeds (%, entropy in [0, 1])\n")
    print("| variant | mean recall | rarest-3 recall | bank entropy | per-seed mean recall |")
    print("|---|---:|---:|---:|---|")
    for variant in args.variants:
        rs = results[variant]
        per_seed = ", ".join(f"{r['mean_recall']:.1f}" for r in rs)
        print(f"| {variant} | {fmt([r['mean_recall'] for r in rs])} | {fmt([r['rare3'] for r in rs])} | "
              f"{fmt([r['bank_entropy'] for r in rs], 3)} | {per_seed} |")


if __name__ == "__main__":
    main()
