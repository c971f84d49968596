"""BMB's CUDA graphs give exactly the eager results (marked ``gpu``).

:mod:`bmb.graphs` replays the step's no-grad work (N̂, targets, weights, the bank's draw and
enqueue) as CUDA graphs. The bank's items, every loss, N̂ and the generator's state must match the
eager run bit for bit, through the empty, filling and overflowing bank, and after the bank
reallocates (``load_state_dict``).
"""

from __future__ import annotations

import pytest
import torch

from bmb.algorithms import BMB, StepOutputs
from bmb.graphs import StepGraphs
from bmb.memory import BalancedMemoryBank
from bmb.models import ModelOutput
from tests.algos import make_bmb

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

C, D, CAP = 7, 12, 48


def _assert_same_bank(a: BalancedMemoryBank, b: BalancedMemoryBank) -> None:
    # The scratch row (index CAP) takes rejected candidates' writes in any order: not an item.
    assert torch.equal(a._buf_feats[:CAP], b._buf_feats[:CAP])
    assert torch.equal(a._buf_labels[:CAP], b._buf_labels[:CAP])
    assert int(a.size) == int(b.size)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


@pytest.mark.parametrize("put_power", [0.0, 3.0])
def test_graphed_enqueue_and_draw_match_the_eager_bank(put_power):
    def bank():
        return BalancedMemoryBank(CAP, D, C, put_power=put_power, get_power=0.75, device="cuda",
                                  generator=torch.Generator(device="cuda").manual_seed(5))

    eager, graphed = bank(), bank()
    graphs = StepGraphs(graphed)
    assert graphs.enabled
    g = torch.Generator(device="cuda").manual_seed(0)
    for step in range(25):
        feats = torch.randn(32, D, device="cuda", generator=g)
        labels = torch.randint(0, C, (32,), device="cuda", generator=g)
        valid = torch.rand(32, device="cuda", generator=g) < 0.6
        if step == 3:
            feats[0, 0] = float("nan")  # non-finite candidates are rejected on both paths
        packed = torch.cat([feats, labels[:, None].float(), valid[:, None].float()], 1)
        eager.enqueue(packed[:, :-2], packed[:, -2].long(), valid=packed[:, -1] > 0.5)
        graphs.enqueue_packed(packed)
        _assert_same_bank(eager, graphed)
        prior = torch.rand(C, device="cuda", generator=g, dtype=torch.float64) * 100
        for n in (16, CAP + 8):  # fewer and more rows than the bank holds
            want = eager.draw(n, prior, replacement=False)
            got = graphs.run(("draw", n), lambda p, u, n=n: graphed.draw_core(n, p, u, replacement=False), [prior],
                             uniforms=[graphed.uniforms_per_draw(n, replacement=False)])
            for w, h in zip(want, got):
                assert torch.equal(w, h), (step, n)
        if step == 12:  # reallocation: the graphs must be recaptured on the new buffers
            state = eager.state_dict()
            eager.load_state_dict(state)
            graphed.load_state_dict(state)
    assert len(eager) > 0


@pytest.mark.parametrize("options", [{}, {"use_bank": False}, {"anneal_weights": True, "bank_view": "weak"},
                                     {"estimate": "ema", "adaptive_weights": False}])
def test_bmb_trains_the_same_with_and_without_graphs(options):
    def make(cuda_graphs: bool) -> BMB:
        return make_bmb(C, D, torch.arange(1, C + 1) * 10, unlabeled_size=1000, threshold=0.3, bank_size=CAP,
                        get_num=16,
                   generator=torch.Generator(device="cuda").manual_seed(1), device="cuda",
                   cuda_graphs=cuda_graphs, **options)

    algs = {True: make(True), False: make(False)}
    assert algs[True].graphs.enabled and not algs[False].graphs.enabled
    head = torch.nn.Linear(D, C).cuda()
    g = torch.Generator(device="cuda").manual_seed(3)
    for step in range(12):
        def out(n):
            return ModelOutput(torch.randn(n, D, device="cuda", generator=g),
                               torch.randn(n, C, device="cuda", generator=g),
                               (torch.randn(n, C, device="cuda", generator=g) * 3).requires_grad_())

        batch = StepOutputs(labels=torch.randint(0, C, (8,), device="cuda", generator=g), labeled=out(8),
                            unlabeled_weak=out(8), unlabeled_strong=out(16), unlabeled_on=step >= 2,
                            progress=step / 12)
        losses = {k: a(batch, head) for k, a in algs.items()}
        wrt = [batch.labeled.aux_logits, batch.unlabeled_strong.aux_logits, head.weight]
        grads = {k: torch.autograd.grad(losses[k]["loss"], wrt, allow_unused=True, materialize_grads=True)
                 for k in algs}
        for a in algs.values():
            a.after_step()
        for want, got in zip(grads[False], grads[True]):
            assert torch.equal(want, got), step
        for key in losses[True]:
            assert torch.equal(losses[True][key], losses[False][key]), (step, key)
        if step == 6:  # resume from a checkpoint: graphs recaptured, estimator restored in place
            for a in algs.values():
                a.load_extra_state(a.extra_state())
    _assert_same_bank(algs[True].bank, algs[False].bank)
    assert torch.equal(algs[True].estimator.value(), algs[False].estimator.value())
