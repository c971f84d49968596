"""Loss tests on hand-computed small cases: FixMatch, aux head, bank loss, warm-up."""

import math

import pytest
import torch
import torch.nn.functional as F

from bmb.algorithms import (
    AlgorithmContext,
    FixMatch,
    StepOutputs,
    build_algorithm,
    fixmatch_unlabeled_loss,
)
from bmb.config import MethodConfig
from bmb.models import BMBModel, ModelOutput
from bmb.weights import adaptive_weights
from tests.algos import make_bmb


def out_of(logits_base, logits_aux, feats=None):
    b = logits_base.shape[0]
    feats = feats if feats is not None else torch.zeros(b, 2)
    return ModelOutput(feats, logits_base, logits_aux)


def test_fixmatch_mask_and_hard_targets_by_hand():
    weak = torch.tensor([[4.0, 0.0], [0.0, 0.0]])  # sample 0 confident (p=0.982), sample 1 not
    strong = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0], [2.0, 2.0]])  # 2 views, view-major
    loss, mask = fixmatch_unlabeled_loss(weak, strong, threshold=0.95)
    assert mask.tolist() == [True, False]
    ce = lambda row, t: -math.log(math.exp(row[t]) / sum(math.exp(v) for v in row))  # noqa: E731
    expected = (ce([1.0, 2.0], 0) + ce([0.0, 1.0], 0)) / 4  # mean over 2 samples x 2 views
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_adaptive_weights():
    w = adaptive_weights(torch.tensor([100, 10, 1, 0]), 1.0)
    assert w.tolist() == pytest.approx([0.01, 0.1, 1.0, 1.0])  # 0 is clamped to 1
    assert adaptive_weights(torch.tensor([100, 10, 1]), 0.0).tolist() == [1.0, 1.0, 1.0]
    assert adaptive_weights(torch.tensor([16, 4]), 0.5).tolist() == pytest.approx([0.5, 1.0])
    with pytest.raises(ValueError, match="alpha"):
        adaptive_weights(torch.tensor([1, 2]), -1.0)


def bmb_alg(**kw):
    args = dict(num_classes=2, feat_dim=2, labeled_counts=torch.tensor([4, 1]), unlabeled_size=2, threshold=0.9,
                alpha=1.0, put_power=0.0, get_power=0.0, lambda_u=1.0, lambda_mb=1.0,
                bank_size=8, get_num=2, generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return make_bmb(**args)


def test_aux_head_soft_targets_masks_and_weights_by_hand():
    alg = bmb_alg(use_bank=False)
    labels = torch.tensor([0, 1])
    lab = out_of(torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # aux weak: sample 0 confident class 0 (p = sigmoid(3) = 0.953), sample 1 not
    weak = out_of(torch.zeros(2, 2), torch.tensor([[3.0, 0.0], [0.0, 0.5]]))
    strong_aux = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # K = 1
    strong = out_of(torch.zeros(2, 2), strong_aux)
    losses = alg(StepOutputs(labels, lab, weak, strong, unlabeled_on=True), torch.nn.Identity())
    # labeled: w^L = (1/4, 1) from N^L = (4, 1)
    ce_l = F.cross_entropy(lab.aux_logits, labels, reduction="none")
    assert losses["aux_l"].item() == pytest.approx(((torch.tensor([0.25, 1.0]) * ce_l).mean()).item(), rel=1e-6)
    # unlabeled: N-hat after this step's update = confident fraction (1/2, 0) x |U| = 2 -> (1, 0)
    # -> floored (1, 1) -> w^U = (1, 1); soft CE against p_a of sample 0, masked sample 1, mean over 2
    p0 = torch.softmax(torch.tensor([3.0, 0.0]), 0)
    soft = -(p0 * torch.log_softmax(strong_aux[0], 0)).sum()
    assert losses["aux_u"].item() == pytest.approx(soft.item() / 2, rel=1e-6)
    assert losses["mask_aux"].item() == 0.5
    assert alg.estimator.value().tolist() == [1.0, 1.0]


def test_unlabeled_weights_follow_the_estimate():
    alg = bmb_alg(use_bank=False, unlabeled_size=30)
    alg.estimator.update(torch.tensor([8.0, 2.0]), 10)  # confident fractions (0.8, 0.2)
    alg.estimator.update(torch.tensor([0.0, 0.0]), 10)  # ... then this step adds (1, 0) of 1 sample
    labels = torch.tensor([0])
    lab = out_of(torch.zeros(1, 2), torch.zeros(1, 2))
    weak = out_of(torch.zeros(1, 2), torch.tensor([[5.0, 0.0]]))
    strong = out_of(torch.zeros(1, 2), torch.tensor([[0.0, 0.0]]))
    losses = alg(StepOutputs(labels, lab, weak, strong), torch.nn.Identity())
    nhat = torch.tensor([(0.8 + 0 + 1) / 3, 0.2 / 3]) * 30  # mean fraction x |U| = (18, 2)
    w0 = (nhat.min() / nhat[0]).item()
    p = torch.softmax(torch.tensor([5.0, 0.0]), 0)
    expected = w0 * -(p * torch.log_softmax(torch.zeros(2), 0)).sum().item()
    assert losses["aux_u"].item() == pytest.approx(expected, rel=1e-6)


def test_bank_loss_trains_only_the_aux_head():
    torch.manual_seed(0)
    model = BMBModel.build("small", 3, width=4)
    alg = make_bmb(3, model.feat_dim, torch.tensor([5, 3, 1]), unlabeled_size=12, threshold=0.0, put_power=0.0,
              bank_size=16, get_num=4, lambda_u=0.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 3, 16, 16)
    o = model(x)
    step = StepOutputs(torch.tensor([0, 1, 2, 0]), o, o, o)
    alg(step, model.aux_head)
    alg.after_step()  # the step's candidates enter the bank (threshold 0: all are confident)
    assert len(alg.bank) == 4
    model.zero_grad()
    o = model(x)
    losses = alg(StepOutputs(torch.tensor([0, 1, 2, 0]), o, o, o), model.aux_head)
    # Only the bank loss: recompute it with grad and back-propagate it alone.
    feats, labels = alg.bank.get(4, alg.estimator.value(), replacement=False)
    F.cross_entropy(model.aux_head(feats), labels).backward()
    assert model.aux_head.weight.grad.abs().sum() > 0
    assert model.base_head.weight.grad is None
    assert all(p.grad is None for p in model.encoder.parameters())
    assert losses["mb"].item() > 0


def test_bank_features_are_detached_inside_the_step():
    torch.manual_seed(0)
    model = BMBModel.build("small", 3, width=4)
    alg = make_bmb(3, model.feat_dim, torch.tensor([5, 3, 1]), unlabeled_size=12, threshold=0.0, put_power=0.0,
                   bank_size=16,
              get_num=4, lambda_u=0.0, lambda_mb=1.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        o = model(x)
    alg(StepOutputs(torch.tensor([0, 1, 2, 0]), o, o, o), model.aux_head)
    alg.after_step()
    # With the step's inputs detached, the only path to any parameter is the bank loss.
    o = ModelOutput(*(t.detach() for t in model(x)))
    losses = alg(StepOutputs(torch.tensor([0, 1, 2, 0]), o, o, o), model.aux_head)
    losses["loss"].backward()
    assert model.aux_head.weight.grad.abs().sum() > 0
    assert model.base_head.weight.grad is None
    assert all(p.grad is None for p in model.encoder.parameters())


def test_warmup_turns_unlabeled_terms_off():
    alg = bmb_alg(put_power=0.0)
    fm = FixMatch(MethodConfig(threshold=0.9))
    labels = torch.tensor([0, 1])
    lab = out_of(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    weak = out_of(torch.tensor([[5.0, 0.0], [5.0, 0.0]]), torch.tensor([[5.0, 0.0], [0.0, 5.0]]),
                  torch.ones(2, 2))
    strong = out_of(torch.tensor([[0.0, 5.0], [0.0, 5.0]]), torch.tensor([[0.0, 5.0], [5.0, 0.0]]),
                    torch.ones(2, 2))
    for a in (alg, fm):
        off = a(StepOutputs(labels, lab, weak, strong, unlabeled_on=False), torch.nn.Identity())
        a.after_step()
        supervised = off["base_l"] + off.get("aux_l", 0.0)
        assert off["loss"].item() == pytest.approx(float(supervised), rel=1e-6)
        on = a(StepOutputs(labels, lab, weak, strong, unlabeled_on=True), torch.nn.Identity())
        a.after_step()
        assert on["loss"].item() > off["loss"].item() + 1.0
    assert alg.estimator.steps == 1  # N-hat only updated after warm-up
    assert len(alg.bank) == 2  # bank only filled after warm-up


def test_registry():
    ctx = AlgorithmContext(2, 4, torch.tensor([3, 1]), unlabeled_size=8)
    assert isinstance(build_algorithm(MethodConfig(algorithm="fixmatch"), ctx), FixMatch)
    bmb = build_algorithm(MethodConfig(put_power=2.5, get_power=0.5, bank_size=16, get_num=4), ctx)
    assert (bmb.bank.put_power, bmb.bank.get_power, bmb.bank.capacity, bmb.get_num) == (2.5, 0.5, 16, 4)
    with pytest.raises(ValueError, match="unknown algorithm 'nope'"):
        build_algorithm(MethodConfig(algorithm="nope"), ctx)
