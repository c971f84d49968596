"""A run's mathematics does not depend on the number of processes (issue 18).

One 1-process and one 2-process run of the same config (cosine lr with warm-up, BMB with its
bank, N̂, w^U and draws; the demo preset's options at toy size), then each resumed from the
other's step-14 checkpoint at the other world size:

- the lr schedule steps once per step at any world size, and the lr is in ``train.jsonl``;
- the two runs log the same statistics at every step and end with the same weights, EMA, bank,
  N̂ and get histogram, to float tolerance (20+ steps with the bank on);
- 2 -> 1 and 1 -> 2 resumes continue at the same global batch and equal the uninterrupted run
  of the new world size.

Batch norm normalises each rank's slice by design, so these runs build the encoder with a
per-sample norm (``tests/norm_free_train.py``); everything else is the trainer as it runs.
The tolerances: DDP averages two half-batch gradients where one process takes one mean, so
the runs differ by float32 rounding (measured: losses <= 5e-7, weights <= 4e-7 after 28 steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bmb.checkpointer import global_reader_position
from bmb.config import ConfigError, load_config
from bmb.optim import lr_lambda
from launch.train import build_data
from pipelines.augment.views import ViewMaker
from tests.demo_data import build_small_demo
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[1]
ENTRY = str(REPO / "tests" / "norm_free_train.py")
STEPS, CUT = 28, 14
CONFIG = ["--config", str(REPO / "launch" / "configs" / "demo.yaml"), "model.width=8", "train.labeled_batch=16",
          "train.unlabeled_batch=16", "train.iters_per_epoch=4", "train.epochs=7", "method.warmup_epochs=1",
          "optim.schedule=cosine", "optim.warmup_steps=4", f"train.eval_every={STEPS}", "train.log_every=1",
          f"train.checkpoint_every={CUT}", "train.keep_checkpoints=3", "train.progress=false", "train.threads=1",
          "method.threshold=0.2", "method.bank_size=32", "method.get_num=8", "method.bank_check_every=5",
          "train.ema_decay=0.9", "train.trackers=[]"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_small_demo(tmp_path_factory.mktemp("ws") / "demo")  # 131 labeled: no world size divides it


def test_per_step_counts_must_divide_by_the_world_size(data):
    """get_num is global like the batches: a count the ranks cannot split is refused, naming
    the key, the value and the number of processes."""
    cfg = load_config(None, [*CONFIG[2:], f"data.dataset={data}"])
    build_data(cfg, 0, 2, torch.device("cpu"))  # 16 / 16 / 8 split over 2
    with pytest.raises(ConfigError, match=r"method.get_num=8 is not divisible by the 3 processes"):
        build_data(load_config(None, [*CONFIG[2:], f"data.dataset={data}", "train.labeled_batch=12",
                                      "train.unlabeled_batch=12"]), 0, 3, torch.device("cpu"))


def test_which_reader_states_resume_at_another_world_size():
    """A position in the global order (tensor, webdataset index, ffcv exact) carries over; a
    per-rank position (webdataset stream, ffcv quasi_random, DALI) does not."""
    pos = {"order": "global", "batches": 3, "global_batch": 16, "n": 131, "seed": 0, "rank": 0, "world_size": 2}
    assert global_reader_position({"backend": "tensor", "labeled": pos, "unlabeled": pos})
    assert global_reader_position({"backend": "webdataset", "skipped": 0, "labeled": pos, "unlabeled": pos})
    assert global_reader_position({"backend": "ffcv", "order": "exact", "labeled": pos, "unlabeled": pos})
    assert not global_reader_position({"backend": "ffcv", "order": "quasi_random", "labeled": pos, "unlabeled": pos})
    assert not global_reader_position({"backend": "webdataset", "order": "stream", "labeled": {"epoch": 1},
                                 "unlabeled": {"epoch": 1}})
    assert not global_reader_position({"backend": "dali", "labeled": None, "unlabeled": None})


def test_webdataset_reader_resumes_at_another_world_size(data):
    """Two ranks' webdataset (index order) position restores into one process at the same global
    batch: its next batch is the ranks' next batches, concatenated (so is the tensor backend's,
    tests/test_pipelines_tensor.py)."""
    from pipelines import build_train_stream

    def stream(rank: int, world: int):
        return build_train_stream("webdataset", data, labeled_batch=16 // world, unlabeled_batch=16 // world, seed=0,
                                  rank=rank, world_size=world, num_workers=0)

    ranks = [stream(r, 2) for r in (0, 1)]
    its = [iter(s) for s in ranks]
    for _ in range(9):  # past the labeled split's first epoch (131 samples = 8.2 steps)
        for it in its:
            next(it)
    one = stream(0, 1)
    one.load_state_dict(ranks[0].state_dict())
    got, want = next(iter(one)), [next(it) for it in its]
    assert torch.equal(got.unlabeled_index, torch.cat([w.unlabeled_index for w in want]))
    assert torch.equal(got.labeled, torch.cat([w.labeled for w in want]))


def test_views_do_not_depend_on_the_world_size():
    """R ranks, each making its slice's views from the same generator state (part=(r, R)),
    make exactly the views one process makes of the whole batch, for both crops."""
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    unl = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=g)
    for crop, size in (("translate", 32), ("rrc", 24)):
        vm = ViewMaker(image_size=size, crop=crop, num_strong=2)
        whole = vm.uint8_views(lab, unl, torch.Generator().manual_seed(5))
        for world in (2, 4):
            parts = [vm.uint8_views(lab.chunk(world)[r], unl.chunk(world)[r], torch.Generator().manual_seed(5),
                                    part=(r, world)) for r in range(world)]
            assert torch.equal(whole[0], torch.cat([p[0] for p in parts])), (crop, world)
            assert torch.equal(whole[1], torch.cat([p[1] for p in parts])), (crop, world)
            for k in range(2):
                assert torch.equal(whole[2][k], torch.cat([p[2][k] for p in parts])), (crop, world, k)
        # The slices' draws are not the slice's own: a lone rank-1 call without `part` differs.
        alone = vm.uint8_views(lab.chunk(2)[1], unl.chunk(2)[1], torch.Generator().manual_seed(5))
        assert not torch.equal(alone[2][0], whole[2][0][6:])


def train(nproc: int, data: Path, out: Path, name: str, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "true"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
        "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(free_port())]
    cmd = [*launcher, ENTRY, *CONFIG, f"data.dataset={data}", f"train.out_dir={out}", f"name={name}", *extra]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def logged(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "train.jsonl").read_text().splitlines())}


def state(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"ckpt-{step:08d}.pt", weights_only=False)


def assert_same_run(a: Path, b: Path, steps: range) -> None:
    """Equal statistics at every step of ``steps`` and equal final state, to float tolerance."""
    la, lb = logged(a), logged(b)
    for s in steps:
        assert la[s].keys() == lb[s].keys(), s
        for k, v in la[s].items():
            assert lb[s][k] == pytest.approx(v, rel=1e-5, abs=2e-6), (s, k)
    sa, sb = state(a, STEPS), state(b, STEPS)
    for key in ("model", "ema"):
        wa, wb = (sa[key], sb[key]) if key == "model" else (sa[key]["module"], sb[key]["module"])
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=2e-6, msg=f"{key}.{k}")
    bank_a, bank_b = sa["algorithm"]["bank"], sb["algorithm"]["bank"]
    assert torch.equal(bank_a["labels"], bank_b["labels"]) and torch.equal(bank_a["generator"], bank_b["generator"])
    torch.testing.assert_close(bank_a["features"], bank_b["features"], rtol=0, atol=2e-6)
    est_a, est_b = sa["algorithm"]["estimator"], sb["algorithm"]["estimator"]
    assert est_a.keys() == est_b.keys()
    for k, v in est_a.items():  # N̂ sums integer counts: exact
        assert torch.equal(v, est_b[k]) if isinstance(v, torch.Tensor) else v == est_b[k], k
    assert torch.equal(sa["get_hist"], sb["get_hist"])
    assert sa["scheduler"]["last_epoch"] == sb["scheduler"]["last_epoch"] == STEPS


def test_one_and_two_processes_train_alike_and_resume_across(data, tmp_path):
    out = tmp_path / "runs"
    train(1, data, out, "one")
    train(2, data, out, "two")
    one, two = out / "one", out / "two"
    # The lr: once per step at both world sizes (the warm-up, then the cosine), logged.
    cfg = load_config(None, [*CONFIG[2:], f"data.dataset={data}"])
    f = lr_lambda(cfg)
    for run in (one, two):
        lrs = [logged(run)[s]["lr"] for s in range(1, STEPS + 1)]
        assert lrs == pytest.approx([cfg.optim.lr * f(s) for s in range(STEPS)], rel=1e-12)
        assert state(run, CUT)["scheduler"]["last_epoch"] == CUT
    # Both runs exercised the method: the bank filled and was drawn from, partial masks.
    rows = logged(one)
    assert sum(rows[s]["mb"] > 0 for s in rows) >= 20 and max(r["bank_size"] for r in rows.values()) > 0
    assert any(0 < r["mask_aux"] < 1 for r in rows.values()) and any(0 < r["mask_base"] < 1 for r in rows.values())
    assert state(two, STEPS)["world_size"] == 2
    assert_same_run(one, two, range(1, STEPS + 1))

    # Resume at the other world size from the step-14 checkpoints (into fresh directories).
    train(1, data, out, "two_then_one", f"train.resume={two / 'checkpoints' / f'ckpt-{CUT:08d}.pt'}")
    train(2, data, out, "one_then_two", f"train.resume={one / 'checkpoints' / f'ckpt-{CUT:08d}.pt'}")
    assert min(logged(out / "two_then_one")) == CUT + 1 and state(out / "two_then_one", STEPS)["world_size"] == 1
    assert_same_run(one, out / "two_then_one", range(CUT + 1, STEPS + 1))
    assert_same_run(two, out / "one_then_two", range(CUT + 1, STEPS + 1))
