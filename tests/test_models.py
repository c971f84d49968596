"""Encoders and heads: shapes, parameter counts, EMA."""

import pytest
import torch

from bmb.ema import ModelEMA
from bmb.models import BMBModel, build_encoder


@pytest.mark.parametrize("name, kw, size, dim", [
    ("wrn", {}, 32, 128), ("wrn", {"width": 1}, 32, 64), ("small", {}, 32, 128),
    ("resnet50", {"stem": "small"}, 32, 2048), ("resnet50", {"stem": "imagenet"}, 64, 2048),
    ("resnet50", {"stem": "imagenet"}, 112, 2048),  # the authors' ImageNet127 SGD scripts: --model resnet, 112 px
])
def test_outputs(name, kw, size, dim):
    m = BMBModel.build(name, 7, **kw).eval()
    out = m(torch.randn(2, 3, size, size))
    assert out.features.shape == (2, dim) and out.base_logits.shape == (2, 7) and out.aux_logits.shape == (2, 7)
    assert torch.equal(out.aux_logits, m.aux_head(out.features))


def test_wrn28_2_has_the_usual_size():
    n = sum(p.numel() for p in build_encoder("wrn", width=2).parameters())
    assert 1.40e6 < n < 1.50e6  # WRN-28-2 is ~1.47M parameters


def test_resnet50_size():
    n = sum(p.numel() for p in build_encoder("resnet50", stem="imagenet").parameters())
    assert 23.4e6 < n < 23.6e6  # ResNet-50 trunk without fc: 23.5M


def test_unknown_encoder():
    with pytest.raises(ValueError, match="unknown encoder 'vit'"):
        build_encoder("vit")


def test_ema_tracks_by_decay():
    torch.manual_seed(0)
    m = BMBModel.build("small", 3, width=4)
    ema = ModelEMA(m, decay=0.9)
    before = ema.module.aux_head.weight.clone()
    with torch.no_grad():
        m.aux_head.weight.add_(1.0)
    ema.update(m)
    assert torch.allclose(ema.module.aux_head.weight, 0.9 * before + 0.1 * m.aux_head.weight)
    m.train()(torch.randn(4, 3, 8, 8))  # BN running stats move
    ema.update(m)
    for eb, mb in zip(ema.module.buffers(), m.buffers()):
        assert torch.equal(eb, mb)
    sd = ema.state_dict()
    ema2 = ModelEMA(BMBModel.build("small", 3, width=4), decay=0.5)
    ema2.load_state_dict(sd)
    assert ema2.decay == 0.9 and torch.equal(ema2.module.aux_head.weight, ema.module.aux_head.weight)


@pytest.mark.parametrize("name, kw, size", [("wrn", {}, 32), ("small", {}, 32), ("resnet50", {"stem": "small"}, 32)])
def test_every_parameter_gets_a_gradient(name, kw, size):
    # DDP (without find_unused_parameters) fails on parameters that get no gradient.
    m = BMBModel.build(name, 5, **kw).train()
    out = m(torch.randn(2, 3, size, size))
    (out.base_logits.sum() + out.aux_logits.sum()).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert missing == []


@pytest.mark.parametrize("name, kw", [("wrn", {}), ("resnet50", {"stem": "imagenet"})])
def test_authors_init_heads_and_batch_norms(name, kw):
    torch.manual_seed(0)
    ours = BMBModel.build(name, 10, **kw)
    torch.manual_seed(0)
    theirs = BMBModel.build(name, 10, init="authors", **kw)
    for head in ("base_head", "aux_head"):
        w, b = getattr(theirs, head).weight, getattr(theirs, head).bias
        assert torch.equal(b, torch.zeros_like(b))
        # xavier_normal_: std sqrt(2 / (fan_in + fan_out)); PyTorch's default is uniform with a smaller spread.
        std = (2 / (w.shape[0] + w.shape[1])) ** 0.5
        assert abs(w.std().item() / std - 1) < 0.1
        assert getattr(ours, head).bias.abs().max() > 0
    gammas = [m.weight for m in theirs.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(g, torch.ones_like(g)) for g in gammas)
    zeroed = [m.weight for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d) if not m.weight.any()]
    assert (len(zeroed) == 16) if name == "resnet50" else (zeroed == [])  # one per bottleneck block
    convs = zip((m for m in ours.modules() if isinstance(m, torch.nn.Conv2d)),
                (m for m in theirs.modules() if isinstance(m, torch.nn.Conv2d)))
    assert all(torch.equal(a.weight, b.weight) for a, b in convs)  # the same He-normal draws


def test_unknown_init():
    with pytest.raises(ValueError, match="init must be one of"):
        BMBModel.build("small", 3, init="xavier")
