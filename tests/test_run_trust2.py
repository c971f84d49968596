"""Trusting a run directory, round 2 (issue 20, run side): a diverged run stops by name before
writing anything non-finite; one training per run directory (a lock); a rebuilt dataset is not
resumed silently; a log line cut by a kill does not block resume; planted links, orphaned temp
files and a full disk are handled by name. Each test goes through ``launch/train.py`` as a user
runs it (rows as numbered in the issue)."""

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from bmb.guards import EXIT_DIVERGED
from launch import train
from tests.demo_data import REPO, build_small_demo
from tests.run_dirs import args, ckpts, final, run_id_of, seal, snapshot


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return build_small_demo(tmp_path_factory.mktemp("data") / "demo", "arrays")


@pytest.fixture
def run(demo_data, tmp_path):
    def _run(*extra, name="r", data=demo_data):
        return train.main(args(data, tmp_path, name, *extra))

    return _run


def float_tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [t for v in items for t in float_tensors(v)]


def all_finite(path):
    """Every floating tensor in a checkpoint (or safetensors) file is finite."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = list(load_file(path).values())
    else:
        tensors = float_tensors(torch.load(path, weights_only=True))
    assert tensors, f"{path} holds no float tensors"
    return all(bool(t.isfinite().all()) for t in tensors)


def history(d):
    return [json.loads(line) for line in (d / "history.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- row 2 (and "must show" 3)
def test_2_diverged_run_stops_naming_the_step_and_writes_nothing_nonfinite(run, tmp_path, capsys):
    found = {}
    for name, cadence in (("params", ["train.checkpoint_every=2"]),  # weights checked before each save
                          ("loss-every-step", ["train.log_every=1", "train.checkpoint_every=10"]),
                          ("loss-every-10", ["train.log_every=10", "train.eval_every=10",
                                             "train.checkpoint_every=10"])):
        code = run("optim.lr=1e6", *cadence, name=name)
        err = capsys.readouterr().err
        assert code == EXIT_DIVERGED, err
        m = re.search(r"DivergedError: non-finite (loss|parameter \S+) at step (\d+)", err)
        assert m, err
        found[name] = m.group(1), int(m.group(2))
        d = tmp_path / name
        files = sorted(d.rglob("*.pt"))  # every checkpoint file anywhere in the run directory
        assert all(all_finite(f) for f in files)  # none with a NaN in it
        assert all(int(f.name[5:13]) < found[name][1] for f in files)
        assert not (d / "final.json").exists() and not (d / "export").exists() and not list(d.rglob("*.safetensors"))
        assert "NaN" not in (d / "metrics.jsonl").read_text()
        assert history(d)[-1]["event"] == "diverged" and f"at step {found[name][1]}" in history(d)[-1]["error"]
    kind, step = found["params"]  # a loss still finite, the weights after its update not: before the save
    assert kind.startswith("parameter model.") and step % 2 == 0 and step > 2
    assert ckpts(tmp_path / "params") == [f"ckpt-{s:08d}.pt" for s in range(2, step, 2)]
    # Read every 10 steps, the device flag still names the first non-finite step (the one that
    # reading it every step finds).
    assert found["loss-every-step"] == found["loss-every-10"] and found["loss-every-10"][1] < 10
    assert found["loss-every-10"][0] == "loss"


def test_2_resume_skips_a_checkpoint_with_nonfinite_weights(run, tmp_path, capsys):
    assert run() == 0
    d = tmp_path / "r"
    newest = d / "checkpoints" / "ckpt-00000020.pt"
    state = torch.load(newest, weights_only=True)
    key = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][key][0] = float("nan")
    torch.save(state, newest)
    seal(newest, run_id_of(d), 20)  # intact as a file: the values are the problem
    capsys.readouterr()
    assert run("train.epochs=3") == 0
    out = capsys.readouterr().out
    assert f"skipping ckpt-00000020.pt: ckpt-00000020.pt holds non-finite values (model.{key})" in out
    assert f"[resume] from {d / 'checkpoints' / 'ckpt-00000015.pt'} at step 15" in out
    assert final(d)["steps"] == 30 and all_finite(d / "export" / "model.safetensors")
    # named explicitly, it is refused
    bad = d / "checkpoints" / "set-aside" / "ckpt-00000020.pt"
    assert run(f"train.resume={bad}", "train.epochs=3", name="other") == 2
    assert "non-finite values" in capsys.readouterr().err


# ---------------------------------------------------------------------------- row 4
def test_4_one_training_per_run_directory(demo_data, tmp_path, capsys):
    d = tmp_path / "r"
    lock = tmp_path / ".r.lock"
    long = args(demo_data, tmp_path, "r", "train.max_steps=100000", "train.eval_every=1000")
    env = {**os.environ, "PYTHONPATH": REPO}
    a = subprocess.Popen([sys.executable, os.path.join(REPO, "launch", "train.py"), *long], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):  # the first training holds the lock, and is in its loop (signals handled)
            if lock.is_file() and (d / "train.jsonl").is_file():
                break
            assert a.poll() is None, a.communicate()
            time.sleep(0.1)
        assert json.loads(lock.read_text())["pid"] == a.pid
        capsys.readouterr()
        assert train.main(long) == 2  # the second one of the same run dir
        err = capsys.readouterr().err
        assert f"run dir {d} is in use by another training (pid {a.pid} on host {socket.gethostname()}" in err
        assert str(lock) in err
    finally:
        a.send_signal(signal.SIGTERM)  # the first one checkpoints and stops (preempted)
        out, err = a.communicate(timeout=120)
    assert a.returncode == 3, err
    assert not lock.exists()  # released
    events = history(d)
    assert [e["event"] for e in events] == ["start"] and events[0]["run_id"] == run_id_of(d)
    steps = [json.loads(line)["step"] for line in (d / "train.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # every row once: the second training wrote nothing
    # A lock left by a killed training (its pid is gone) is taken over, loudly.
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps({"tool": "bmb-train", "pid": dead.pid, "host": socket.gethostname(),
                                "started": "then", "token": "x"}))
    stopped = ckpts(d)[-1]
    capsys.readouterr()
    assert train.main(args(demo_data, tmp_path, "r", "train.max_steps=" + str(int(stopped[5:13]) + 5),
                           "train.eval_every=1000")) == 0
    assert f"taking over the stale lock {lock}" in capsys.readouterr().err
    assert not lock.exists() and [e["event"] for e in history(d)] == ["start", "resume", "finish"]


# ---------------------------------------------------------------------------- row 5
def test_5_rebuilt_dataset_is_refused_naming_both_build_ids(run, tmp_path, capsys):
    data = build_small_demo(tmp_path / "ds", "arrays")
    old_id = json.loads((data / "manifest.json").read_text())["build_id"]
    assert run(data=data) == 0
    d = tmp_path / "r"
    build_small_demo(data, "arrays", "--seed", "1", "--overwrite")  # same path, other data
    new_id = json.loads((data / "manifest.json").read_text())["build_id"]
    assert new_id != old_id
    assert torch.load(d / "checkpoints" / "ckpt-00000020.pt", weights_only=True)["dataset_build_id"] == old_id
    before = snapshot(d)
    capsys.readouterr()
    assert run("train.epochs=3", data=data) == 2
    err = capsys.readouterr().err
    assert f"build_id {old_id} (checkpoint) -> {new_id} (now)" in err and "train.allow_dataset_change=true" in err
    assert snapshot(d) == before
    assert run("train.epochs=3", "train.allow_dataset_change=true", data=data) == 0
    change = [e for e in history(d) if e["event"] == "dataset_change"]
    assert [(c["step"], c["from"], c["to"]) for c in change] == [(20, old_id, new_id)]
    assert torch.load(d / "checkpoints" / "ckpt-00000030.pt", weights_only=True)["dataset_build_id"] == new_id
    assert run("train.epochs=4", data=data) == 0  # now an ordinary resume on the new data
    assert final(d)["steps"] == 40


# ---------------------------------------------------------------------------- row 7
def test_7_truncated_last_log_lines_do_not_block_resume(run, tmp_path, capsys):
    assert run() == 0
    d = tmp_path / "r"
    for name in ("train.jsonl", "metrics.jsonl", "history.jsonl"):  # killed mid-append
        with open(d / name, "a") as f:
            f.write('{"step": 25, "loss": 0.3')
    capsys.readouterr()
    assert run("train.epochs=3") == 0
    err = capsys.readouterr().err
    assert f"{d / 'train.jsonl'}: dropped a truncated last line" in err
    assert f"{d / 'history.jsonl'}: dropped a truncated last line" in err
    rows = {n: [json.loads(line) for line in (d / n).read_text().splitlines()]
            for n in ("train.jsonl", "metrics.jsonl", "history.jsonl")}
    assert [r["step"] for r in rows["train.jsonl"]] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in rows["metrics.jsonl"]] == [5, 10, 15, 20, 25, 30]
    assert [e["event"] for e in rows["history.jsonl"]] == ["start", "finish", "resume", "finish"]


def test_7_corrupt_middle_line_is_a_named_error(run, tmp_path, capsys):
    assert run() == 0
    d = tmp_path / "r"
    lines = (d / "train.jsonl").read_text().splitlines(keepends=True)
    (d / "train.jsonl").write_text(lines[0] + '{"step": 7, "lo\n' + "".join(lines[1:]))
    before = snapshot(d)
    capsys.readouterr()
    assert run("train.epochs=3") == 2
    err = capsys.readouterr().err
    assert f"{d / 'train.jsonl'}:2: not a JSON object" in err
    assert snapshot(d) == before


# ---------------------------------------------------------------------------- low rows
def test_low_full_disk_during_a_checkpoint_is_named_and_leaves_no_half_file(demo_data, tmp_path):
    def small_files():  # every file this process writes may hold 64 KiB: a checkpoint does not fit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))

    p = subprocess.run([sys.executable, os.path.join(REPO, "launch", "train.py"),
                        *args(demo_data, tmp_path, "r", "train.trackers=[]")],
                       env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
                       preexec_fn=small_files, timeout=300)
    assert p.returncode == 1, p.stderr
    d = tmp_path / "r"
    assert f"cannot write checkpoint {d / 'checkpoints' / 'ckpt-00000005.pt'}: File too large" in p.stderr
    assert "unexpected pos" not in p.stderr and "Traceback" not in p.stderr
    assert sorted(os.listdir(d / "checkpoints")) == []  # no half file, no temp file, no seal
    assert not (tmp_path / ".r.lock").exists()


def test_low_orphaned_temp_files_of_our_writers_are_cleaned_only_them(run, tmp_path, capsys):
    assert run() == 0
    c = tmp_path / "r" / "checkpoints"
    ours = [".ckpt-00000025.pt.k2_x9qab.tmp", ".ckpt-00000025.pt.json.0a1b2c3d.tmp",
            ".ckpt-00000025.rank1.pt.zz99yy88.tmp"]
    theirs = [".ckpt-notes.tmp", "keep.tmp", ".ckpt-00000025.pt.TOOLONG12.tmp"]
    for n in ours + theirs:
        (c / n).write_text("x")
    capsys.readouterr()
    assert run("train.epochs=3") == 0
    assert "removed 3 unfinished temp file(s)" in capsys.readouterr().out
    assert not any((c / n).exists() for n in ours)
    assert all((c / n).read_text() == "x" for n in theirs)


@pytest.mark.parametrize("planted", ["final.json", "checkpoints", "checkpoints/ckpt-00000025.pt", "export"])
def test_low_planted_symlinks_are_refused(run, tmp_path, capsys, planted):
    assert run() == 0
    d = tmp_path / "r"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    link = d / planted
    if link.is_dir():
        os.rename(link, tmp_path / "moved")
    elif link.exists():
        link.unlink()
    link.symlink_to(victim if planted in ("checkpoints", "export") else victim / "precious.txt")
    before = snapshot(victim)
    capsys.readouterr()
    assert run("train.epochs=3") == 2
    err = capsys.readouterr().err
    assert f"run dir {d}: {link} is a symbolic link" in err
    assert snapshot(victim) == before and (victim / "precious.txt").read_text() == "keep me"


def test_2_the_loss_watch_reads_nothing_back_per_step(monkeypatch):
    """The per-step fold is device work only: nothing is read back to the host (on a GPU, a read
    would wait for the step); reading happens in ``check``, at the loop's boundaries."""
    from bmb.dist import Collectives
    from bmb.guards import DivergedError, LossWatch

    watch = LossWatch()
    names = ("loss", "base_l", "mb")
    steps = {1: [1.0, 0.5, 0.5], 2: [2.0, 1.0, 1.0], 3: [float("nan"), 1.0, float("inf")], 4: [1.0, 1.0, 1.0]}

    def no_read(*_):
        raise AssertionError("a host read in LossWatch.observe")

    with monkeypatch.context() as m:
        for attr in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
            m.setattr(torch.Tensor, attr, no_read)
        for step, values in steps.items():
            watch.observe(step, names, torch.tensor(values))
    with pytest.raises(DivergedError, match=r"non-finite loss at step 3 \(loss=nan; terms: base_l=1; mb=inf\)"):
        watch.check(Collectives())
    fresh = LossWatch()
    fresh.observe(1, names, torch.tensor(steps[1]))
    fresh.check(Collectives())  # all finite: nothing raised


def _watch_two_ranks(rank, world, port, out):
    from bmb.dist import Collectives
    from bmb.guards import DivergedError, LossWatch
    from tests.process_groups import finish, init_gloo

    init_gloo(rank, world, port)
    watch = LossWatch()
    for step in range(1, 6):  # rank 1 alone sees a NaN, at step 3 (its own batch)
        bad = rank == 1 and step >= 3
        watch.observe(step, ("loss", "aux_l"), torch.tensor([float("nan") if bad else 1.0, 0.5]))
    try:
        watch.check(Collectives())
        msg = "no error"
    except DivergedError as e:
        msg = str(e)
    torch.save(msg, os.path.join(out, f"rank{rank}.pt"))
    finish()


@pytest.mark.dist
def test_2_every_rank_stops_together_naming_the_rank_that_diverged(tmp_path):
    from tests.process_groups import spawn

    spawn(_watch_two_ranks, 2, str(tmp_path))
    msgs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert msgs[0] == msgs[1]  # rank 0, whose own loss was finite, stops too, with rank 1's numbers
    assert msgs[0].startswith("non-finite loss at step 3 on rank 1 (loss=nan; terms: aux_l=0.5)")


def test_4_a_requeued_slurm_job_takes_over_its_own_lock_only(tmp_path, monkeypatch, capsys):
    """A SLURM job killed hard and requeued (same job id, next restart count) may start on another
    node: its earlier run's lock is taken over; a lock of another job on another host is not."""
    from bmb.rundir import RunDirLocked, RunLock

    run_dir = tmp_path / "r"
    lock = tmp_path / ".r.lock"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for job, count, taken in (("4242", "0", True), ("777", "0", False), ("4242", "1", False)):
        lock.write_text(json.dumps({"tool": "bmb-train", "pid": 1, "host": "node-a", "started": "then",
                                    "token": "x", "slurm_job_id": job, "slurm_restart_count": count}))
        mine = RunLock(run_dir)
        if taken:
            mine.acquire()
            assert "taking over the stale lock" in capsys.readouterr().err
            assert json.loads(lock.read_text())["slurm_restart_count"] == "1"
            mine.release()
            assert not lock.exists()
        else:
            with pytest.raises(RunDirLocked, match="in use by another training \\(pid 1 on host node-a"):
                mine.acquire()
            assert json.loads(lock.read_text())["slurm_job_id"] == job  # left as it was
