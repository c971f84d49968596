"""The trainer end to end through launch/train.py: outputs, bad config, signals, exact resume."""

import json
import os
import signal

import pytest
import torch

from bmb.config import load_config
from bmb.trainer import EXIT_PREEMPTED, Trainer
from launch import train
from tests.demo_data import CONFIG, TINY


@pytest.fixture
def run(demo_data):
    def _run(tmp_path, *extra, name="r"):
        return train.main(["--config", CONFIG, *TINY, f"data.dataset={demo_data}", f"train.out_dir={tmp_path}",
                           f"name={name}", *extra])

    _run.dataset = demo_data
    return _run


@pytest.mark.parametrize("algorithm", ["bmb", "fixmatch"])
def test_run_writes_every_output(run, tmp_path, algorithm, capsys):
    assert run(tmp_path, f"method.algorithm={algorithm}") == 0
    d = tmp_path / "r"
    final = json.loads((d / "final.json").read_text())
    for key in ("top1", "mean_recall", "per_class_recall", "many", "medium", "few", "steps", "seconds"):
        assert key in final, key
    assert final["steps"] == 20 and len(final["per_class_recall"]) == 10 and 0.0 <= final["top1"] <= 1.0
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    # last-20 protocol over 4 evaluations: the mean of all of them
    assert final["top1"] == pytest.approx(sum(r["top1"] for r in rows) / 4)
    assert load_config(d / "config.yaml") == load_config(CONFIG, TINY + [
        f"data.dataset={run.dataset}", f"train.out_dir={tmp_path}", "name=r", f"method.algorithm={algorithm}"])
    assert any((d / "tb").iterdir())
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["ckpt-00000020.pt", "ckpt-00000020.pt.json"]
    out = capsys.readouterr().out
    assert "| ring-a | 40 |" in out and "mean recall" in out
    if algorithm == "bmb":
        assert sum(rows[-1]["bank_class_counts"]) > 0 and sum(rows[-1]["get_class_counts"]) > 0


@pytest.mark.parametrize("override, key", [
    ("method.alpah=1", "method.alpah"), ("train.epochs=-3", "train.epochs"),
    ("data.dataset=/nonexistent/dir", "data.dataset"), ("data.eval_split=val", "data.eval_split"),
    # the translate crop does not resize: 16 px on 32 px data would train on quarter crops
    ("data.image_size=16", "data.image_size=16 does not match the dataset's 32x32"),
])
def test_bad_config_fails_before_training(run, tmp_path, override, key, capsys):
    assert run(tmp_path, override) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()


def state_of(run_dir):
    sd = torch.load(sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=False)
    return sd


def test_sigterm_checkpoints_and_resume_is_exact(run, tmp_path, monkeypatch):
    assert run(tmp_path, name="full") == 0
    original = Trainer.train_step

    def step_then_signal(self, batch):
        out = original(self, batch)
        if self.step == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-run; the step in flight finishes
        return out

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    assert run(tmp_path, name="cut") == EXIT_PREEMPTED  # the exit status, after an orderly shutdown
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").glob("*.pt")] == ["ckpt-00000007.pt"]
    monkeypatch.setattr(Trainer, "train_step", original)
    assert run(tmp_path, name="cut") == 0  # resume=auto

    a, b = state_of(tmp_path / "full"), state_of(tmp_path / "cut")
    assert a["step"] == b["step"] == 20
    for part in ("model",):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k
    for k in a["ema"]["module"]:
        assert torch.equal(a["ema"]["module"][k], b["ema"]["module"][k]), k
    assert torch.equal(a["algorithm"]["bank"]["features"], b["algorithm"]["bank"]["features"])
    assert torch.equal(a["algorithm"]["bank"]["labels"], b["algorithm"]["bank"]["labels"])
    assert torch.equal(a["algorithm"]["estimator"]["fraction"], b["algorithm"]["estimator"]["fraction"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    fa = json.loads((tmp_path / "full" / "final.json").read_text())
    fb = json.loads((tmp_path / "cut" / "final.json").read_text())
    assert fa["top1"] == fb["top1"] and fa["per_class_recall"] == fb["per_class_recall"]


def test_truncated_checkpoint_is_skipped(run, tmp_path, capsys):
    assert run(tmp_path, "train.checkpoint_every=5", "train.keep_checkpoints=5") == 0
    ckpts = sorted((tmp_path / "r" / "checkpoints").glob("ckpt-*.pt"))
    assert [p.name for p in ckpts][-2:] == ["ckpt-00000015.pt", "ckpt-00000020.pt"]
    data = ckpts[-1].read_bytes()
    ckpts[-1].write_bytes(data[: len(data) // 2])
    assert run(tmp_path, "train.checkpoint_every=5", "train.keep_checkpoints=5", "train.epochs=3") == 0
    out = capsys.readouterr().out
    assert "skipping ckpt-00000020.pt" in out and "from" in out and "step 15" in out
    final = json.loads((tmp_path / "r" / "final.json").read_text())
    assert final["steps"] == 30


def test_keys_listing(capsys):
    assert train.main(["--keys"]) == 0
    out = capsys.readouterr().out
    assert "method.put_power" in out and "beta" in out


@pytest.mark.parametrize("order", ["index", "stream"])
def test_trains_from_the_tar_shards(run, tmp_path, order):
    # The same run through the webdataset backend (both reading orders) instead of the arrays.
    assert run(tmp_path, "data.backend=webdataset", f"data.order={order}", "data.workers=0",
               "train.epochs=1", name=order) == 0
    final = json.loads((tmp_path / order / "final.json").read_text())
    assert final["steps"] == 10 and len(final["per_class_recall"]) == 10


def test_resume_from_an_explicit_checkpoint(run, tmp_path, capsys):
    assert run(tmp_path, "train.checkpoint_every=5", "train.keep_checkpoints=5") == 0
    older = tmp_path / "r" / "checkpoints" / "ckpt-00000010.pt"
    assert run(tmp_path, "train.checkpoint_every=5", "train.keep_checkpoints=5", f"train.resume={older}",
               name="r") == 0
    assert f"[resume] from {older} at step 10" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]  # logs cut back to step 10, then redone
