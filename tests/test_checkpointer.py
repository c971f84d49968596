"""The checkpointer of parts (bmb/checkpointer.py) through a real tiny run: a new piece of state
is checkpointed and restored by adding one entry to the parts dict, and a checkpoint written by
the bmb before the parts (format 2, tests/fixtures/ckpt_format2, see make.py there) still resumes,
continuing exactly as that bmb's own run did."""

import json
import shutil
from pathlib import Path

import torch

from bmb.trainer import Trainer
from launch import train
from tests.demo_data import CONFIG, TINY

FIXTURE = Path(__file__).parent / "fixtures" / "ckpt_format2"


class Toy:
    """A piece of state a future run might add: a tensor and a number."""

    def __init__(self, value: float) -> None:
        self.values, self.count = torch.full((3,), value), int(value)
        self.loaded: list = []

    def state_dict(self) -> dict:
        return {"values": self.values.clone(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.values, self.count = state["values"].clone(), state["count"]
        self.loaded.append(state)


def test_a_new_part_is_saved_and_restored_by_one_entry(demo_data, tmp_path, monkeypatch):
    toys: dict[str, Toy] = {}
    original = Trainer.checkpoint_parts

    def with_toys(self):
        shared, per_rank = original(self)
        return {**shared, "toy": toys["shared"]}, {**per_rank, "toy_rank": toys["rank"]}  # the one entry each

    monkeypatch.setattr(Trainer, "checkpoint_parts", with_toys)
    args = ["--config", CONFIG, *TINY, f"data.dataset={demo_data}", f"train.out_dir={tmp_path}", "name=r"]
    toys.update(shared=Toy(42.0), rank=Toy(7.0))
    assert train.main([*args, "train.epochs=1"]) == 0  # 10 steps, checkpointed at step 10
    saved = torch.load(tmp_path / "r" / "checkpoints" / "ckpt-00000010.pt", weights_only=True)
    assert torch.equal(saved["toy"]["values"], torch.full((3,), 42.0)) and saved["toy"]["count"] == 42
    assert saved["rank0"]["toy_rank"]["count"] == 7

    toys.update(shared=Toy(0.0), rank=Toy(0.0))  # a new process: fresh state, restored by the resume
    assert train.main([*args, "train.epochs=2"]) == 0
    assert [s["count"] for s in toys["shared"].loaded] == [42] and [s["count"] for s in toys["rank"].loaded] == [7]
    assert torch.equal(toys["shared"].values, torch.full((3,), 42.0)) and toys["rank"].count == 7
    final = torch.load(tmp_path / "r" / "checkpoints" / "ckpt-00000020.pt", weights_only=True)
    assert final["step"] == 20 and final["toy"]["count"] == 42


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]


def test_a_checkpoint_of_the_previous_layout_resumes_exactly(demo_data, tmp_path, monkeypatch, capsys):
    # make.py ran the bmb of commit c610300 (before the parts) for 20 steps, checkpointing at 10
    # and 20; the fixture keeps its step-10 checkpoint, run.json and start event, and that run's
    # metrics and final result. Resumed here, the rest of the run must be the same, bit for bit.
    run = tmp_path / "runs" / "old"
    shutil.copytree(FIXTURE / "old", run)
    (tmp_path / "data").symlink_to(demo_data)  # the config's data.dataset=data (relative)
    monkeypatch.chdir(tmp_path)
    assert train.main(["--config", CONFIG, *TINY, "data.dataset=data", "train.out_dir=runs", "name=old",
                       "train.checkpoint_every=10", "train.keep_checkpoints=2"]) == 0
    assert "[resume] from runs/old/checkpoints/ckpt-00000010.pt at step 10" in capsys.readouterr().out
    expected = _rows(FIXTURE / "expected_metrics.jsonl")
    got = _rows(run / "metrics.jsonl")
    assert [r["step"] for r in got] == [15, 20] or [r["step"] for r in got] == [5, 10, 15, 20]
    assert got[-2:] == expected[-2:], "the resumed steps differ from the old bmb's own run"
    ident = json.loads((run / "run.json").read_text())
    final = json.loads((run / "final.json").read_text())
    old_final = json.loads((FIXTURE / "expected_final.json").read_text())
    assert final["run_id"] == old_final["run_id"] == ident["run_id"]
    assert {k: v for k, v in final.items() if k != "seconds"} == {k: v for k, v in old_final.items() if k != "seconds"}
