"""The optimiser recipe against the authors' code (docs/fidelity.md): AdamW is their WeightEMA
decay, the per-epoch cosine is their CosineAnnealingLR, EMA decay 0 is --disable_ema_model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bmb.config import load_config
from bmb.ema import ModelEMA
from bmb.trainer import build_optimizer, lr_lambda


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def _loss(m: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    return nn.functional.cross_entropy(m(x), y)


def test_adamw_is_the_authors_decay_after_each_adam_step():
    """Their recipe: Adam (no weight decay), then every parameter *= 1 - 0.02 lr. AdamW decays
    first, then adds the update: the two differ by lr * wd * lr * update per step (second order).

    On a smooth problem whose gradients stay large (Adam rescales tiny gradients to steps of
    size lr, which would amplify any difference), 20 steps agree within that bound (Adam's
    update is at most ~1 per coordinate: 20 x lr^2 x wd = 1.6e-6), while dropping the decay
    moves the weights 1000x further."""
    cfg = load_config(None, ["data.dataset=x"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", 0.002, 0.02)
    start = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = start + 10.0

    def run(decay: str) -> torch.Tensor:
        p = nn.Parameter(start.clone())
        opt = build_optimizer(cfg, [p]) if decay == "ours" else torch.optim.Adam([p], lr=0.002)
        for _ in range(20):
            opt.zero_grad()
            ((p - target) ** 2).sum().backward()
            opt.step()
            if decay == "theirs":
                with torch.no_grad():
                    p.mul_(1 - 0.02 * 0.002)
        return p.detach()

    ours, theirs, none = run("ours"), run("theirs"), run("none")
    assert isinstance(build_optimizer(cfg, [nn.Parameter(start.clone())]), torch.optim.AdamW)
    bound = 20 * 0.002**2 * 0.02 * 1.01
    assert (ours - theirs).abs().max() <= bound
    assert (ours - none).abs().max() > 1000 * bound


def test_per_epoch_cosine_is_the_authors_cosine_annealing():
    cfg = load_config(None, ["data.dataset=x", "optim.name=sgd", "optim.schedule=cosine",
                             "optim.schedule_unit=epoch", "train.epochs=20", "train.iters_per_epoch=46"])
    f = lr_lambda(cfg)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)  # stepped once per epoch
    for epoch in range(20):
        expected = opt.param_groups[0]["lr"]
        for i in range(46):
            assert 0.2 * f(epoch * 46 + i) == pytest.approx(expected, abs=1e-12)
        opt.step()
        sched.step()
    per_step = lr_lambda(load_config(None, ["data.dataset=x", "optim.schedule=cosine", "train.epochs=20",
                                            "train.iters_per_epoch=46"]))
    assert per_step(45) < per_step(0)  # the default moves every step


def test_ema_decay_zero_evaluates_the_trained_model_itself():
    m = _model()
    ema = ModelEMA(m, decay=0.0)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for step in range(3):
        opt.zero_grad()
        _loss(m, step).backward()
        opt.step()
        ema.update(m)
    for a, b in zip(ema.module.state_dict().values(), m.state_dict().values()):
        assert torch.equal(a, b)
    slow = ModelEMA(copy.deepcopy(m), decay=0.9)
    opt.zero_grad()
    _loss(m, 9).backward()
    opt.step()
    slow.update(m)
    assert not torch.equal(next(slow.module.parameters()), next(m.parameters()))
