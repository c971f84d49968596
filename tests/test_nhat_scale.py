"""N̂ at 1000 classes: on the unlabeled set's scale, right against the true counts, and the same
for any number of ranks (docs/method.md, "Scale matters").

The class sizes are ImageNet-LT's (115,846 unlabeled images, 1280 ... 5 per class): the real list
from ``../shared/data`` when it is there, else a long tail of the same shape.
"""

from __future__ import annotations

import threading

import pytest
import torch

from benchmarks._data import B_U, CONFIDENT, SAMPLE_NUM, imagenet_lt_counts, step_counts
from bmb.algorithms import StepOutputs
from bmb.estimate import UnlabeledCountEstimator
from bmb.memory import BalancedMemoryBank
from bmb.models import ModelOutput
from bmb.weights import adaptive_weights
from tests.algos import make_bmb


def test_nhat_weights_and_get_shares_match_the_true_counts_at_1000_classes():
    n = imagenet_lt_counts()
    est = UnlabeledCountEstimator(len(n), unlabeled_size=int(n.sum()))
    # 100,000 steps on the real list; as many more as the stand-in's larger |U| needs for the same
    # expected draws of its 5-image classes (what sets the noise of min N-hat).
    steps = round(100_000 * max(n.sum().item() / 115_846, 1.0))
    for counts in step_counts(n, steps, torch.Generator().manual_seed(0)):
        est.update(counts, B_U)
    nhat = est.value()
    # N-hat estimates the confident share of U: CONFIDENT x the true counts, within 4 standard
    # errors of a Poisson count where a class is large enough to be measured (>= 100 images).
    big = n >= 100
    events = CONFIDENT * B_U * steps * n[big].min() / n.sum()  # expected draws of the smallest
    assert ((nhat[big] / (CONFIDENT * n[big])) - 1).abs().max() < 4 / events.sqrt()

    # w^U (ImageNet-LT's alpha 0.75): on the real list, median error <= 5%, none beyond 20%. The
    # error is mostly the noise of the smallest estimate, which sets min N-hat for every weight;
    # the stand-in has twice as many 5-image classes (a lower min), hence 10% / 25% there.
    w, w_ref = adaptive_weights(nhat, 0.75).double(), adaptive_weights(n, 0.75).double()
    err = (w / w_ref - 1).abs()
    median_tol, max_tol = (0.05, 0.20) if SAMPLE_NUM.is_file() else (0.10, 0.25)
    assert err.median() < median_tol and err.max() < max_tol, (err.median(), err.max())

    # get (gamma 0.5, the 20% preset), with replacement, from a bank holding every class once:
    # the share of draws per group of classes matches the reference n^-gamma within 5%.
    bank = BalancedMemoryBank(1024, 4, len(n), put_power=0.0, get_power=0.5,
                              generator=torch.Generator().manual_seed(1))
    bank.enqueue(torch.randn(len(n), 4), torch.arange(len(n)))
    assert len(bank) == len(n)
    hist = torch.zeros(len(n), dtype=torch.float64)
    for _ in range(100):
        _, labels, valid = bank.draw(1024, nhat, replacement=True)
        hist += torch.zeros_like(hist).scatter_add_(0, labels, valid.double())
    ref = n.pow(-0.5) / n.pow(-0.5).sum()
    for group in (n > 100, (n >= 20) & (n <= 100), n < 20):  # ImageNet-LT's many / medium / few
        share, expected = hist[group].sum() / hist.sum(), ref[group].sum()
        assert abs(share / expected - 1) < 0.05, (share.item(), expected.item())


class ThreadCollectives:
    """``bmb.dist.Collectives`` for ranks simulated as threads of one process."""

    def __init__(self, rank: int, world: int, shared: dict) -> None:
        self.rank, self.world_size, self._s = rank, world, shared

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        slots, barrier = self._s["slots"], self._s["barrier"]
        slots[self.rank] = tensor.clone()
        barrier.wait()
        out = list(slots)
        barrier.wait()  # nobody overwrites a slot before everyone has read it
        return out

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(tensor)
        total = parts[0].clone()
        for t in parts[1:]:
            total += t
        return total

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._exchange(tensor))


def _global_batch(step: int, n: torch.Tensor):
    """One step's global unlabeled weak/strong aux logits ``(B_U, C)``: confident one-hots for the
    samples that pass tau (a softmax of 30 x one-hot), flat logits (never confident) for the rest."""
    g = torch.Generator().manual_seed(1000 + step)
    labels = torch.multinomial(n / n.sum(), B_U, replacement=True, generator=g)
    ok = torch.rand(B_U, generator=g) < CONFIDENT
    logits = torch.zeros(B_U, len(n)).scatter_(1, labels[:, None], 30.0) * ok[:, None]
    return logits, (torch.zeros(len(n), dtype=torch.float64).scatter_add_(0, labels, ok.double()))


def _run_rank(rank: int, world: int, n: torch.Tensor, steps: int, shared: dict, out: dict) -> None:
    c, b = len(n), B_U // world
    alg = make_bmb(c, 8, n.clone(), unlabeled_size=int(n.sum()), threshold=0.95, alpha=0.75, use_bank=False,
                   collectives=ThreadCollectives(rank, world, shared))
    for step in range(steps):
        logits, _ = _global_batch(step, n)
        mine = logits[rank * b:(rank + 1) * b]  # this rank's slice of the global batch
        feats = torch.zeros(b, 8)
        lab = ModelOutput(torch.zeros(4, 8), torch.zeros(4, c), torch.zeros(4, c))
        weak = ModelOutput(feats, torch.zeros(b, c), mine)
        strong = ModelOutput(torch.cat([feats, feats]), torch.zeros(2 * b, c), torch.cat([mine, mine]))
        alg(StepOutputs(torch.zeros(4, dtype=torch.long), lab, weak, strong, unlabeled_on=True), torch.nn.Identity())
    out[rank] = (alg.estimator.value().clone(), adaptive_weights(alg.estimator.value(), 0.75))


@pytest.mark.parametrize("world", [1, 2, 8])
def test_nhat_is_the_same_for_1_2_and_8_ranks_at_the_same_global_batch(world: int):
    n = imagenet_lt_counts()
    steps = 150
    reference = UnlabeledCountEstimator(len(n), unlabeled_size=int(n.sum()))  # one process, global counts
    for step in range(steps):
        reference.update(_global_batch(step, n)[1], B_U)
    shared = {"slots": [None] * world, "barrier": threading.Barrier(world, timeout=60)}
    out: dict = {}
    threads = [threading.Thread(target=_run_rank, args=(r, world, n, steps, shared, out)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(out) == list(range(world)), "a simulated rank failed"
    for rank in range(world):
        nhat, w = out[rank]
        assert torch.equal(nhat, reference.value()), f"rank {rank} of {world}: N-hat differs"
        assert torch.equal(w, adaptive_weights(reference.value(), 0.75))
    # On U's scale: the mean of N-hat is the confident share of |U|, not a batch's 64 samples.
    assert reference.value().sum() > 0.5 * CONFIDENT * n.sum()
