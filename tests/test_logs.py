"""Experiment trackers (train.trackers) through launch/train.py: TensorBoard scalars in tb/, and a
tracker that is unknown or not installed refused before training."""

import importlib.util
import json

import pytest

from launch import train
from tests.demo_data import CONFIG, TINY


@pytest.fixture
def run(demo_data, tmp_path):  # noqa: F811
    def _run(*extra, name="r"):
        return train.main(["--config", CONFIG, *TINY, f"data.dataset={demo_data}", f"train.out_dir={tmp_path}",
                           f"name={name}", *extra])

    return _run


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tensorboard_gets_the_train_and_eval_scalars(run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run() == 0  # train.trackers defaults to [tensorboard]
    d = tmp_path / "r"
    events = EventAccumulator(str(d / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    train_rows, eval_rows = rows(d / "train.jsonl"), rows(d / "metrics.jsonl")
    assert {"train/loss", "eval/top1", "eval/mean_recall", "eval/few"} <= set(tags)
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in train_rows] == [5, 10, 15, 20]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train_rows], rel=1e-6)
    top1 = events.Scalars("eval/top1")
    assert [e.step for e in top1] == [r["step"] for r in eval_rows]
    assert [e.value for e in top1] == pytest.approx([r["top1"] for r in eval_rows], rel=1e-6)
    assert not any(t.startswith("eval/per_class") or t == "eval/step" for t in tags)  # lists and the step: no
    assert list((d / "tb").glob("*/hparams.yml"))  # the config, stored by Accelerate's tracker


def test_no_trackers_and_a_resume_may_change_them(run, tmp_path):
    assert run("train.trackers=[]") == 0
    d = tmp_path / "r"
    assert not (d / "tb").exists() and len(rows(d / "metrics.jsonl")) == 4
    assert run("train.epochs=3") == 0  # extended with the default tracker: no opt-in needed
    assert len(rows(d / "metrics.jsonl")) == 6 and any((d / "tb").glob("events.out.tfevents.*"))


def test_unknown_tracker_is_refused_before_training(run, tmp_path, capsys):
    assert run("train.trackers=[tensorboard,comet]") == 2
    err = capsys.readouterr().err
    assert "train.trackers" in err and "comet" in err and "wandb" in err
    assert not (tmp_path / "r").exists()


def test_missing_tracker_package_is_refused_before_training(run, tmp_path, capsys):
    missing = [n for n in ("wandb", "mlflow", "aim") if importlib.util.find_spec(n) is None]
    if not missing:
        pytest.skip("wandb, mlflow and aim are all installed")
    assert run(f"train.trackers=[tensorboard,{missing[0]}]") == 2
    err = capsys.readouterr().err
    assert "train.trackers" in err and f"pip install {missing[0]}" in err
    assert not (tmp_path / "r").exists()  # nothing written
