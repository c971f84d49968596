"""method.refresh_after_warmup: the bank filled during warm-up and kept (the authors' scripts
without --tcp_refresh_after_warm), or empty when warm-up ends (the default)."""

import pytest
import torch

from bmb.algorithms import StepOutputs
from bmb.models import ModelOutput
from tests.algos import make_bmb


def _step(alg, on: bool):
    labels = torch.tensor([0, 1])
    lab = ModelOutput(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # aux head confident on both weak views (class 0, class 1) and on both strong views (1, 0)
    weak = ModelOutput(torch.full((2, 2), 2.0), torch.zeros(2, 2), torch.tensor([[5.0, 0.0], [0.0, 5.0]]))
    strong = ModelOutput(torch.full((2, 2), 3.0), torch.zeros(2, 2), torch.tensor([[0.0, 5.0], [5.0, 0.0]]))
    out = alg(StepOutputs(labels, lab, weak, strong, unlabeled_on=on), torch.nn.Identity())
    alg.after_step()
    return out


@pytest.mark.parametrize("view, feat, labels", [("weak", 2.0, [0, 1]), ("strong", 3.0, [1, 0])])
def test_bank_filled_during_warmup_and_kept(view, feat, labels):
    alg = make_bmb(2, 2, torch.tensor([4, 1]), 2, threshold=0.9, put_power=0.0, bank_size=8, get_num=2,
                   bank_view=view, refresh_after_warmup=False, generator=torch.Generator().manual_seed(0))
    off = _step(alg, on=False)
    assert off["mb"].item() == 0.0 and alg.estimator.steps == 0  # no bank loss, no N-hat in warm-up
    assert len(alg.bank) == 2
    state = alg.bank.state_dict()
    assert torch.all(state["features"] == feat) and sorted(state["labels"].tolist()) == sorted(labels)
    _step(alg, on=True)  # after warm-up: kept, and the step's candidates added
    assert len(alg.bank) == 4


def test_default_bank_starts_empty_after_warmup():
    alg = make_bmb(2, 2, torch.tensor([4, 1]), 2, threshold=0.9, put_power=0.0, bank_size=8, get_num=2,
                   generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        _step(alg, on=False)
    assert len(alg.bank) == 0
    _step(alg, on=True)
    assert len(alg.bank) == 2
