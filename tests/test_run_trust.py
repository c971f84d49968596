"""Trusting a run directory: sealed, code-free checkpoint loads; run identity; config changes on resume.

One test per row of the issue (numbered), each through ``launch/train.py`` as a user runs it.
Every refusal must leave the run directory byte-for-byte (and mtime-for-mtime) as it was.
"""

import hashlib
import json
import shutil
import zipfile

import pytest
import torch
import yaml

from launch import train
from tests.demo_data import build_small_demo
from tests.run_dirs import args, ckpts, final, run_id_of, seal, snapshot


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return build_small_demo(tmp_path_factory.mktemp("data") / "demo", "arrays")


@pytest.fixture
def run(demo_data, tmp_path):
    def _run(*extra, name="r"):
        return train.main(args(demo_data, tmp_path, name, *extra))

    return _run


class Payload:
    """Unpickling this calls exec(...), which creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


# ---------------------------------------------------------------------------- row 1 (and "must show" 2)
@pytest.mark.parametrize("sealed", [False, True], ids=["unsealed", "sealed-with-our-run-id"])
def test_1_malicious_checkpoint_never_runs(run, tmp_path, capsys, sealed):
    assert run() == 0
    d = tmp_path / "r"
    marker = tmp_path / "PWNED"
    evil = d / "checkpoints" / "ckpt-00000099.pt"
    torch.save({"step": 99, "world_size": 1, "model": Payload(marker)}, evil)
    if sealed:  # a correct seal does not make it loadable: weights_only refuses the global
        seal(evil, run_id_of(d), 99)
    capsys.readouterr()
    try:
        code = run("train.epochs=3")  # a plain re-run that extends the run
    finally:
        assert not marker.exists(), "the checkpoint's payload ran"
    assert code == 0
    out = capsys.readouterr().out
    assert "ckpt-00000099.pt" in out  # said loudly: ignored (unsealed) or skipped (sealed)
    assert f"[resume] from {d / 'checkpoints' / 'ckpt-00000020.pt'} at step 20" in out
    assert final(d)["steps"] == 30
    if sealed:  # it claims to be ours and lies past the step resumed from: set aside, kept
        evil = d / "checkpoints" / "set-aside" / evil.name
    assert evil.is_file()  # a stranger's file is never pruned nor deleted
    # Named explicitly, it is refused, not run.
    assert run(f"train.resume={evil}", "train.epochs=3") == 2
    assert not marker.exists()
    assert "ckpt-00000099.pt" in capsys.readouterr().err


# ---------------------------------------------------------------------------- row 2 (and "must show" 3)
def test_2_changed_hyperparameters_refused_then_opt_in_recorded(run, tmp_path, capsys):
    assert run() == 0  # stops at step 20
    d = tmp_path / "r"
    before = snapshot(d)
    capsys.readouterr()
    assert run("train.epochs=4", "optim.lr=0.1", "method.put_power=0") == 2
    err = capsys.readouterr().err
    assert str(d) in err
    assert "optim.lr: 0.002 (checkpoint) -> 0.1 (requested)" in err
    assert "method.put_power: 3.0 (checkpoint) -> 0.0 (requested)" in err
    assert "train.allow_config_change=true" in err
    assert snapshot(d) == before, "a refused resume changed the run directory"

    assert run("train.epochs=4", "optim.lr=0.1", "method.put_power=0", "train.allow_config_change=true") == 0
    out = capsys.readouterr().out
    assert "[config]" in out and "optim.lr" in out
    assert final(d)["steps"] == 40
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    assert cfg["optim"]["lr"] == 0.1 and cfg["method"]["put_power"] == 0.0
    # The new values are what the run used after the resume (not the checkpoint's).
    state = torch.load(d / "checkpoints" / "ckpt-00000040.pt", weights_only=True)
    group = state["optimizer"]["param_groups"][0]
    assert group["lr"] == pytest.approx(0.1) and group["initial_lr"] == 0.1
    assert state["scheduler"]["base_lrs"] == [0.1]
    assert state["algorithm"]["bank"]["put_power"] == 0.0
    events = [json.loads(line) for line in (d / "history.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "finish", "resume", "config_change", "finish"]
    change = events[3]
    assert change["step"] == 20 and change["run_id"] == run_id_of(d)
    assert {c["key"]: (c["from"], c["to"]) for c in change["changes"]} == {
        "optim.lr": (0.002, 0.1), "method.put_power": (3.0, 0.0)}
    assert events[2]["changed"] == [{"key": "train.epochs", "from": 2, "to": 4},
                                    {"key": "train.allow_config_change", "from": False, "to": True}]
    # A plain re-run with the new values is now an ordinary resume (no opt-in needed).
    assert run("train.epochs=4", "optim.lr=0.1", "method.put_power=0") == 0


# ---------------------------------------------------------------------------- row 3
def test_3_finished_run_rerun_with_other_hyperparameters_is_refused(run, tmp_path, capsys):
    assert run() == 0
    d = tmp_path / "r"
    before = snapshot(d)
    capsys.readouterr()
    assert run("method.threshold=0.5") == 2
    err = capsys.readouterr().err
    assert "method.threshold: 0.15 (checkpoint) -> 0.5 (requested)" in err and str(d) in err
    assert snapshot(d) == before  # config.yaml still says 0.15; final.json untouched
    assert run() == 0  # the same command again: nothing to do, same result
    assert final(d)["steps"] == 20


# ---------------------------------------------------------------------------- row 4
def test_4_other_algorithm_is_refused_even_opted_in(run, tmp_path, capsys):
    assert run() == 0
    d = tmp_path / "r"
    before = snapshot(d)
    capsys.readouterr()
    for extra in ([], ["train.allow_config_change=true"]):
        assert run("train.epochs=4", "method.algorithm=fixmatch", *extra) == 2
        err = capsys.readouterr().err
        assert "method.algorithm: 'bmb' (checkpoint) -> 'fixmatch' (requested)" in err and str(d) in err
        assert snapshot(d) == before
    assert final(d)["algorithm"] == "bmb" and final(d)["steps"] == 20


# ---------------------------------------------------------------------------- row 5
def test_5_resume_none_over_a_finished_run_is_refused(run, tmp_path, capsys):
    assert run("train.epochs=3", "train.keep_checkpoints=2") == 0
    d = tmp_path / "r"
    assert ckpts(d) == ["ckpt-00000025.pt", "ckpt-00000030.pt"]
    before = snapshot(d)
    capsys.readouterr()
    assert run("train.epochs=3", "train.keep_checkpoints=2", "train.resume=none", "train.max_steps=15") == 2
    err = capsys.readouterr().err
    assert "train.resume=none" in err and "ckpt-00000030.pt" in err and "final.json" in err and str(d) in err
    assert snapshot(d) == before
    assert run("train.epochs=3", "train.keep_checkpoints=2") == 0 and final(d)["steps"] == 30


def test_5_pruning_and_auto_resume_only_touch_this_runs_checkpoints(run, tmp_path, capsys):
    assert run("train.epochs=3", name="a") == 0
    assert run("train.epochs=1", "train.keep_checkpoints=2", name="b") == 0
    a, b = tmp_path / "a", tmp_path / "b"
    for f in (a / "checkpoints").glob("ckpt-00000030.pt*"):  # another run's (valid, sealed) checkpoint
        shutil.copy2(f, b / "checkpoints" / f.name)
    foreign = (b / "checkpoints" / "ckpt-00000030.pt").read_bytes()
    capsys.readouterr()
    assert run("train.epochs=2", "train.keep_checkpoints=2", name="b") == 0
    out = capsys.readouterr().out
    assert "ignoring 1 file(s)" in out and "ckpt-00000030.pt" in out
    assert f"[resume] from {b / 'checkpoints' / 'ckpt-00000010.pt'} at step 10" in out
    assert final(b)["steps"] == 20
    assert ckpts(b) == ["ckpt-00000015.pt", "ckpt-00000020.pt", "ckpt-00000030.pt"]  # the foreign one kept
    assert (b / "checkpoints" / "ckpt-00000030.pt").read_bytes() == foreign


# ---------------------------------------------------------------------------- row 6
def test_6_results_without_checkpoints_are_not_wiped(run, tmp_path, capsys):
    assert run() == 0
    d = tmp_path / "r"
    shutil.rmtree(d / "checkpoints")
    before = snapshot(d)
    capsys.readouterr()
    assert run() == 2
    err = capsys.readouterr().err
    assert str(d) in err and "final.json" in err and "metrics.jsonl" in err and "no usable checkpoint" in err
    assert snapshot(d) == before  # metrics.jsonl and train.jsonl not emptied


# ---------------------------------------------------------------------------- row 7
def _largest_record(path):
    """(offset, size) of the largest stored record's data in a torch zip file (a tensor's bytes)."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_7_flipped_byte_is_caught_and_resume_falls_back(run, tmp_path, capsys):
    assert run() == 0
    d = tmp_path / "r"
    newest = d / "checkpoints" / "ckpt-00000020.pt"
    offset, size = _largest_record(newest)
    data = bytearray(newest.read_bytes())
    data[offset + size // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    capsys.readouterr()
    assert run("train.epochs=3") == 0
    out = capsys.readouterr().out
    assert "skipping ckpt-00000020.pt" in out and "does not match its seal" in out
    assert f"[resume] from {d / 'checkpoints' / 'ckpt-00000015.pt'} at step 15" in out
    assert final(d)["steps"] == 30


def test_7_missing_key_is_a_clear_error_and_resume_falls_back(run, tmp_path, capsys):
    assert run() == 0
    d = tmp_path / "r"
    newest = d / "checkpoints" / "ckpt-00000020.pt"
    state = torch.load(newest, weights_only=False)
    del state["ema"], state["algorithm"]["bank"]["labels"]
    torch.save(state, newest)
    seal(newest, run_id_of(d), 20)  # intact as a file: only the content is short
    capsys.readouterr()
    assert run("train.epochs=3") == 0
    out = capsys.readouterr().out
    assert "skipping ckpt-00000020.pt" in out and "lacks key(s) ema, algorithm.bank.labels" in out
    assert f"[resume] from {d / 'checkpoints' / 'ckpt-00000015.pt'} at step 15" in out
    assert final(d)["steps"] == 30


# ---------------------------------------------------------------------------- details
def test_total_steps_may_change_unless_the_schedule_depends_on_it(run, tmp_path, capsys):
    assert run("optim.schedule=cosine") == 0
    d = tmp_path / "r"
    before = snapshot(d)
    capsys.readouterr()
    assert run("optim.schedule=cosine", "train.epochs=3") == 2
    err = capsys.readouterr().err
    assert "train.epochs: 2 (checkpoint) -> 3 (requested)" in err and "cosine" in err
    assert snapshot(d) == before
    # cadence keys change freely
    assert run("optim.schedule=cosine", "train.eval_every=10", "train.log_every=10", "train.threads=1") == 0


def test_explicit_older_checkpoint_sets_the_later_ones_aside(run, tmp_path, capsys):
    assert run("train.keep_checkpoints=2", "train.epochs=3") == 0
    d = tmp_path / "r"
    assert ckpts(d) == ["ckpt-00000025.pt", "ckpt-00000030.pt"]
    older = d / "checkpoints" / "ckpt-00000025.pt"
    assert run("train.keep_checkpoints=1", "train.epochs=3", "train.max_steps=28", f"train.resume={older}") == 0
    # the step-30 checkpoint belongs to the abandoned continuation: out of the way of resume=auto
    assert ckpts(d) == ["ckpt-00000028.pt"]
    assert (d / "checkpoints" / "set-aside" / "ckpt-00000030.pt").is_file()
    capsys.readouterr()
    assert run("train.keep_checkpoints=1", "train.epochs=3", "train.max_steps=28") == 0
    assert "at step 28" in capsys.readouterr().out and final(d)["steps"] == 28


def test_checkpoint_files_are_sealed_and_plain(run, tmp_path):
    assert run() == 0
    d = tmp_path / "r"
    path = d / "checkpoints" / "ckpt-00000020.pt"
    s = json.loads((d / "checkpoints" / "ckpt-00000020.pt.json").read_text())
    assert s["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and s["bytes"] == path.stat().st_size
    assert s["run_id"] == run_id_of(d) and s["step"] == 20
    state = torch.load(path, weights_only=True)  # nothing but tensors and plain containers
    assert state["run_id"] == s["run_id"] and state["format"] == 2
    ident = json.loads((d / "run.json").read_text())
    assert ident["config"]["method"]["threshold"] == 0.15 and final(d)["run_id"] == ident["run_id"]


def test_deepspeed_optimizer_state_loads_with_its_allow_list(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from bmb import checkpoint as ckpt

    obj = {"loss_scaler": LossScaler(1.0), "dyn": DynamicLossScaler(2.0**16, 1000, 1, 1, False),
           "zero_stage": ZeroStageEnum.gradients,
           "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}], "t": torch.arange(3)}
    path = tmp_path / "ds.pt"
    ckpt.atomic_save(obj, path, {"run_id": "x", "step": 0})
    got, _ = ckpt.load_verified(path, ckpt.deepspeed_safe_globals())
    assert got["zero_stage"] == ZeroStageEnum.gradients and got["loss_scaler"].cur_scale == 1.0
    assert got["dyn"].cur_scale == 2.0**16 and got["param_slice_mappings"][0]["w"].numel == 4
    with pytest.raises(ckpt.CheckpointError, match="not a plain-data checkpoint"):
        ckpt.load_verified(path)  # not allowed outside DeepSpeed runs


def test_classify_config_changes():
    from bmb.config import config_to_dict, load_config
    from bmb.rundir import classify

    def kinds(saved_overrides, requested_overrides, edit=None):
        saved = config_to_dict(load_config(None, ["data.dataset=x", *saved_overrides]))
        if edit:
            edit(saved)
        return {c.key: c.kind for c in classify(saved, load_config(None, ["data.dataset=x", *requested_overrides]))}

    def older_schema(saved):  # keys the checkpoint predates count as their defaults; retired keys are ignored
        del saved["train"]["allow_config_change"], saved["method"]["use_bank"]
        saved["method"]["retired_key"] = 1

    assert kinds([], [], older_schema) == {}
    assert kinds([], ["method.use_bank=false"], older_schema) == {"method.use_bank": "guarded"}
    changes = ["train.epochs=9", "train.eval_every=7", "optim.lr=0.1", "model.width=4", "method.estimate=ema"]
    assert kinds([], changes) == {
        "train.epochs": "free", "train.eval_every": "free", "optim.lr": "guarded", "model.width": "fixed",
        "method.estimate": "fixed"}
    cosine = ["optim.schedule=cosine"]
    assert kinds(cosine, [*cosine, "train.epochs=9"]) == {"train.epochs": "guarded"}
    assert kinds(cosine, [*cosine, "train.max_steps=250000"]) == {"train.max_steps": "free"}  # same total (500 x 500)
    assert kinds(["method.anneal_weights=true"], ["method.anneal_weights=true", "train.max_steps=10"]) == {
        "train.max_steps": "guarded"}
