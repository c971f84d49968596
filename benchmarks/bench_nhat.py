"""N̂ at ImageNet-LT's 1000 classes: the estimate after the rescale against the old batch-scale one.

    python benchmarks/bench_nhat.py [--steps 100000] [--smoke]

Feeds UnlabeledCountEstimator the per-step confident counts of global batches of 64 drawn from
ImageNet-LT's class sizes (the real list from ../shared/data when present; the same stream as
tests/test_nhat_scale.py, both from benchmarks/_data.py) and prints, for the estimate and for the
old one (the mean per-step count floored at 1), the entries on the floor, the error of w^U (alpha
0.75) against the weights of the true counts, and the share of the bank's draws (gamma 0.5, with
replacement, a bank holding each class once) per many / medium / few group next to the reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._data import B_U, imagenet_lt_counts, step_counts  # noqa: E402
from bmb.estimate import UnlabeledCountEstimator  # noqa: E402
from bmb.memory import BalancedMemoryBank  # noqa: E402
from bmb.weights import adaptive_weights  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100_000, help="steps of 64 samples fed to the estimator")
    ap.add_argument("--smoke", action="store_true", help="CI check: 200 steps (the numbers mean nothing)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps = 200
    n = imagenet_lt_counts()
    est = UnlabeledCountEstimator(len(n), unlabeled_size=int(n.sum()))
    for counts in step_counts(n, args.steps, torch.Generator().manual_seed(0)):
        est.update(counts, B_U)
    old = (est.state_tensors()[2] * B_U).clamp_min(1.0)  # the mean per-step count, floored at 1
    ref = n.pow(-0.5) / n.pow(-0.5).sum()
    groups = {"many": n > 100, "medium": (n >= 20) & (n <= 100), "few": n < 20}
    print("| N-hat | on the floor | w^U error median / max | get share many / medium / few |")
    print("|---|---:|---:|---|")
    for name, nhat in (("after (fraction x |U|)", est.value()), ("before (per-step mean)", old)):
        w, w_ref = adaptive_weights(nhat, 0.75).double(), adaptive_weights(n, 0.75).double()
        err = (w / w_ref - 1).abs()
        bank = BalancedMemoryBank(1024, 4, len(n), put_power=0.0, get_power=0.5,
                                  generator=torch.Generator().manual_seed(1))
        bank.enqueue(torch.randn(len(n), 4), torch.arange(len(n)))
        hist = torch.zeros(len(n), dtype=torch.float64)
        for _ in range(100):
            _, labels, valid = bank.draw(1024, nhat, replacement=True)
            hist += torch.zeros_like(hist).scatter_add_(0, labels, valid.double())
        shares = " / ".join(f"{hist[g].sum() / hist.sum():.3f}" for g in groups.values())
        errors = f"{100 * err.median():.1f} % / {100 * err.max():.1f} %"
        print(f"| {name} | {int((nhat <= 1).sum())} | {errors} | {shares} |")
    print("| reference (true counts) | | | " + " / ".join(f"{ref[g].sum():.3f}" for g in groups.values()) + " |")


if __name__ == "__main__":
    main()
