"""The step's speed options: channels_last, the fused optimizer, the compiled encoder, and the
FLOP counting behind ``benchmarks/bench_step.py --mfu``."""

from __future__ import annotations

import copy
import json
import shutil
from argparse import Namespace

import pytest
import torch
from torch import nn

from benchmarks.bench_step import (
    count_flops,
    count_step_flops,
    make_trainer,
    peak_tflops,
    step_precision,
)
from bmb.config import load_config
from bmb.models import BMBModel, resolve_memory_format
from bmb.trainer import build_optimizer
from tests.demo_data import CONFIG, TINY


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one process-wide state (device, precision) and refuses a second
    Accelerator that differs: each test here starts from, and leaves, a fresh one (so that the
    CPU-forced trainers here and a CUDA run elsewhere in the session do not collide)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _data(n: int = 16, size: int = 32, classes: int = 5):
    from pipelines.tensor import ArraySplit

    g = torch.Generator().manual_seed(0)
    return {s: ArraySplit(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                          torch.randint(0, classes, (n,), generator=g)) for s in ("labeled", "unlabeled")}


def _args(**kw) -> Namespace:
    return Namespace(**{"encoder": "small", "size": 32, "batch": 4, "classes": 5, "bank": 8, "width": 8, **kw})


# ------------------------------------------------------------------ memory format
def test_memory_format_auto_is_channels_last_on_cuda_only():
    assert resolve_memory_format("auto", "cpu") is torch.contiguous_format
    assert resolve_memory_format("auto", torch.device("cuda", 0)) is torch.channels_last
    assert resolve_memory_format("channels_last", "cpu") is torch.channels_last
    assert resolve_memory_format("contiguous", "cuda") is torch.contiguous_format
    assert load_config(None, ["data.dataset=x"]).model.memory_format == "auto"


@pytest.mark.parametrize("name, kw", [("small", {"width": 4}), ("wrn", {"width": 1, "depth": 10}),
                                      ("resnet50", {"stem": "small"})])
def test_channels_last_model_computes_the_same(name, kw):
    torch.manual_seed(0)
    ref = BMBModel.build(name, 5, **kw)
    cl = copy.deepcopy(ref).configure(torch.channels_last)
    convs = [m.weight for m in cl.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert list(cl.state_dict()) == list(ref.state_dict())  # checkpoints load either way
    x = torch.randn(4, 3, 32, 32)
    for mode in (True, False):
        a, b = ref.train(mode)(x), cl.train(mode)(x)
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
    # and a channels_last state dict loads into a contiguous model
    ref.load_state_dict(cl.state_dict())


def test_compiled_encoder_is_not_a_submodule_and_copies_are_eager():
    m = BMBModel.build("small", 3, width=4)
    keys = list(m.state_dict())
    m.configure(compile=True)  # lazy: nothing is compiled until the first training-mode call
    assert m.encoder_compiled is not None
    assert list(m.state_dict()) == keys and "encoder_compiled" not in dict(m.named_modules())
    ema_copy = copy.deepcopy(m)  # what ModelEMA does
    assert ema_copy.encoder_compiled is None and m.encoder_compiled is not None
    # eval mode never uses the compiled encoder (no compilation happens here)
    out = m.eval()(torch.randn(2, 3, 16, 16))
    assert out.features.shape == (2, 16)


# ------------------------------------------------------------------ fused optimizer
@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_fused_optimizer_on_cuda_torch_default_elsewhere(name):
    cfg = load_config(None, ["data.dataset=x", f"optim.name={name}"])
    for device, fused in (("cuda", True), (torch.device("cuda", 1), True), ("cpu", None), (None, None)):
        opt = build_optimizer(cfg, [nn.Parameter(torch.zeros(3))], device)
        assert opt.param_groups[0]["fused"] is fused, (device, opt.param_groups[0]["fused"])
        assert opt.param_groups[0]["foreach"] is None


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_a_resumed_optimizer_keeps_its_own_implementation(name):
    """A checkpoint from an unfused optimizer resumes fused (and the reverse), and continues the
    same update. The fused kernels run on the CPU too, which is how this runs without a GPU."""
    cfg = load_config(None, ["data.dataset=x", f"optim.name={name}", "optim.weight_decay=0.1"])
    torch.manual_seed(0)
    start, grads = torch.randn(64), [torch.randn(64) for _ in range(4)]

    def run(writer_device, reader_device):
        p = nn.Parameter(start.clone())
        opt = build_optimizer(cfg, [p], writer_device)
        for g in grads[:2]:
            p.grad = g.clone()
            opt.step()
        q = nn.Parameter(p.detach().clone())
        opt2 = build_optimizer(cfg, [q], reader_device)
        own = opt2.param_groups[0]["fused"]
        opt2.load_state_dict(opt.state_dict())
        assert opt2.param_groups[0]["fused"] is own  # the reader's, not the checkpoint's
        for g in grads[2:]:
            q.grad = g.clone()
            opt2.step()
        return q.detach()

    plain = run(None, None)
    torch.testing.assert_close(run(None, "cuda"), plain, rtol=1e-5, atol=1e-6)  # old checkpoint, fused reader
    torch.testing.assert_close(run("cuda", None), plain, rtol=1e-5, atol=1e-6)  # fused checkpoint, CPU reader


# ------------------------------------------------------------------ FLOP counting (bench_step --mfu)
def test_flops_of_a_linear_layer_forward_and_backward():
    lin = nn.Linear(16, 8)
    fwd = 2 * 4 * 16 * 8  # (4 x 16) @ (16 x 8), a multiply and an add each; the bias is not counted
    x = torch.randn(4, 16)
    assert count_flops(lambda: lin(x))[0] == fwd
    # input needs a gradient: backward = weight gradient + input gradient = 2 x forward
    xg = x.clone().requires_grad_(True)
    total, per_module = count_flops(lambda: lin(xg).sum().backward())
    assert total == 3 * fwd and per_module["Global"] == 3 * fwd
    # a first layer (input without gradient): backward = weight gradient only
    assert count_flops(lambda: lin(x).sum().backward())[0] == 2 * fwd


def test_flops_of_a_conv_layer_forward_and_backward():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    fwd = 2 * (2 * 8 * 8 * 8) * (3 * 3 * 3)  # 2 x outputs (N C_out H W) x MACs per output (C_in k k)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    assert count_flops(lambda: conv(x.detach()))[0] == fwd
    assert count_flops(lambda: conv(x).sum().backward())[0] == 3 * fwd


@pytest.mark.parametrize("algorithm", ["fixmatch", "bmb"])
def test_step_flops_cover_every_view_forward_and_backward(algorithm):
    """One real step's count against the model's forward on the step's whole batch (labeled +
    unlabeled weak + 2 strong): backward is 2x forward except the first conv's input gradient,
    so the step lies between 2x and 3x the forward (and the encoder is nearly all of it)."""
    from accelerate import Accelerator

    args = _args()
    trainer = make_trainer(algorithm, args, Accelerator(cpu=True), _data())
    batches = iter(trainer.stream)
    trainer.train_step(next(batches))
    total, per_module = count_step_flops(trainer, next(batches))
    x = torch.randn(4 * args.batch, 3, args.size, args.size)
    with torch.no_grad():
        fwd, _ = count_flops(lambda: trainer.raw_model.train()(x))
    assert 2 * fwd < total < 3 * fwd
    assert per_module["BMBModel.encoder"] > 0.95 * total
    assert trainer.step == 2  # it was a real step


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.5  # the SXM part
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert peak_tflops("NVIDIA H200", "tf32") == 494.5
    assert peak_tflops("NVIDIA H200 NVL", "bf16") == 835.5
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert peak_tflops("NVIDIA GeForce RTX 4090", "bf16") is None
    assert step_precision("bf16") == "bf16" and step_precision("no") in ("tf32", "fp32")


# ------------------------------------------------------------------ torch.compile
def _cxx() -> str | None:
    import os

    return next((c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c)), None)


@pytest.mark.slow
@pytest.mark.skipif(_cxx() is None, reason="torch.compile on the CPU needs a C++ compiler (inductor's CPU backend "
                                           "compiles C++): none of $CXX, g++, c++, clang++ is on PATH")
def test_compiled_encoder_trains_like_the_eager_one():
    """Three real BMB steps (the bank fills on the first) with model.compile=true against eager:
    the same losses and weights up to float rounding; the EMA copy stays eager."""
    from accelerate import Accelerator

    torch._dynamo.reset()
    acc, data = Accelerator(cpu=True), _data()
    runs = {}
    try:
        for compiled in (False, True):
            trainer = make_trainer("bmb", _args(compile=compiled), acc, data)
            assert (trainer.raw_model.encoder_compiled is not None) is compiled
            assert trainer.ema.module.encoder_compiled is None
            batches = iter(trainer.stream)
            losses = [{k: v.detach().clone() for k, v in trainer.train_step(next(batches)).items()} for _ in range(3)]
            runs[compiled] = losses, [p.detach().clone() for p in trainer.raw_model.parameters()]
    finally:
        torch._dynamo.reset()
    (eager_losses, eager_params), (comp_losses, comp_params) = runs[False], runs[True]
    for le, lc in zip(eager_losses, comp_losses):
        assert le.keys() == lc.keys()
        for k in le:
            torch.testing.assert_close(lc[k], le[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    for pe, pc in zip(eager_params, comp_params):
        torch.testing.assert_close(pc, pe, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("algorithm", ["fixmatch", "bmb"])
def test_compiled_channels_last_fused_step_on_cuda(algorithm):
    """On a GPU, with every speed option on (channels_last by default, the fused optimizer by
    default, the compiled encoder) and BMB's CUDA graphs: the step's losses match the eager
    contiguous unfused step's (fp32, so TF32 and fusion rounding only), and no line of ours makes
    the host wait for the GPU."""
    from accelerate import Accelerator

    from benchmarks.bench_step import audit_syncs

    torch._dynamo.reset()
    acc = Accelerator(mixed_precision="no")
    data = {k: type(v)(v.images.cuda(), v.labels.cuda()) for k, v in _data(32).items()}
    runs = {}
    try:
        for fast in (False, True):
            args = _args(batch=8, compile=fast, memory_format="auto" if fast else "contiguous", no_fused=not fast)
            trainer = make_trainer(algorithm, args, acc, data)
            assert bool(trainer.optimizer.param_groups[0]["fused"]) is fast
            batches = iter(trainer.stream)
            runs[fast] = [{k: float(v) for k, v in trainer.train_step(next(batches)).items()} for _ in range(4)]
            if fast:
                sites = audit_syncs(trainer, batches, steps=6)
                ours = {w: n for w, n in sites.items() if w.startswith(("bmb/", "pipelines/"))}
                assert not ours, f"{algorithm}: host-GPU syncs in 6 steps: {ours} (all: {dict(sites)})"
    finally:
        torch._dynamo.reset()
    (first_slow, second_slow), (first_fast, second_fast) = runs[False][:2], runs[True][:2]
    for k in first_slow:  # the same weights: rounding only
        assert first_fast[k] == pytest.approx(first_slow[k], rel=5e-3, abs=5e-4), k
    assert second_fast["loss"] == pytest.approx(second_slow["loss"], rel=1e-2)  # after one update of each


# ------------------------------------------------------------------ end to end
def test_a_channels_last_run_through_launch(demo_data, tmp_path):  # noqa: F811
    from launch import train

    assert train.main(["--config", CONFIG, *TINY, f"data.dataset={demo_data}", f"train.out_dir={tmp_path}",
                       "name=cl", "model.memory_format=channels_last"]) == 0
    final = json.loads((tmp_path / "cl" / "final.json").read_text())
    assert final["steps"] == 20 and 0.0 <= final["top1"] <= 1.0
    assert load_config(tmp_path / "cl" / "config.yaml").model.memory_format == "channels_last"
