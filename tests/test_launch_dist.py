"""The real entry point under `accelerate launch` with 2 CPU processes: DeepSpeed ZeRO-2 trains
and resumes, and refuses to resume with another number of processes; a DDP run stopped by SIGTERM
and resumed ends bitwise equal to an uninterrupted run, and its reported result is its export's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from bmb.config import load_config
from bmb.optim import lr_lambda
from tests.demo_data import build_small_demo
from tests.ports import free_port

pytestmark = [pytest.mark.dist, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
TINY = ["model.width=8", "train.labeled_batch=16", "train.unlabeled_batch=16", "train.iters_per_epoch=10",
        "train.eval_every=5", "train.log_every=1", "train.progress=false", "train.threads=1",
        "method.warmup_epochs=0", "method.threshold=0.15", "method.bank_size=32", "method.get_num=8",
        "method.bank_check_every=5", "train.ema_decay=0.9"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_small_demo(tmp_path_factory.mktemp("d") / "demo")


def launch_cmd(launcher_args: list[str], data: Path, out: Path, name: str, *extra: str, nproc: int = 2) -> list[str]:
    return [*ACCELERATE, *launcher_args, "--num_processes", str(nproc), "--num_machines", "1",
            "--mixed_precision", "no", "--main_process_port", str(free_port()), str(REPO / "launch" / "train.py"),
            "--config", str(REPO / "launch" / "configs" / "demo.yaml"), *TINY,
            f"data.dataset={data}", f"train.out_dir={out}", f"name={name}", *extra]




def run(cmd: list[str], env: dict[str, str], timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def cpu_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def test_deepspeed_zero2_trains_and_resumes(data, tmp_path):
    pytest.importorskip("deepspeed")
    cfg = ["--config_file", str(REPO / "launch" / "accelerate" / "deepspeed_zero2.yaml")]
    env = cpu_env()  # DeepSpeed picks its CPU accelerator itself; the script asks Accelerate for gloo
    warm = "optim.warmup_steps=4"  # the lr moves: it must step once per step under DeepSpeed too
    first = run(launch_cmd(cfg, data, tmp_path, "ds", "train.epochs=1", warm), env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = run(launch_cmd(cfg, data, tmp_path, "ds", "train.epochs=2", warm), env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "[resume] from" in second.stdout and "at step 10" in second.stdout
    final = json.loads((tmp_path / "ds" / "final.json").read_text())
    assert final["steps"] == 20
    ck = torch.load(tmp_path / "ds" / "checkpoints" / "ckpt-00000020.pt", weights_only=False)
    r1 = torch.load(tmp_path / "ds" / "checkpoints" / "ckpt-00000020.rank1.pt", weights_only=False)
    # ZeRO-2: each rank saved its own optimizer partition
    assert "single_partition_of_fp32_groups" in ck["rank0"]["optimizer"]
    assert "single_partition_of_fp32_groups" in r1["optimizer"]
    rows = [json.loads(line) for line in (tmp_path / "ds" / "train.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 20 and all(l == l and l < 100 for l in losses)  # noqa: E741
    assert [r["lr"] for r in rows[:6]] == pytest.approx([0.0005, 0.001, 0.0015, 0.002, 0.002, 0.002])
    assert ck["scheduler"]["last_epoch"] == 20  # once per step, not once per process

    # One process cannot take over the two ZeRO partitions: refused, naming the cause, before any write.
    before = {p: p.read_bytes() for p in (tmp_path / "ds").rglob("*") if p.is_file()}
    third = run(launch_cmd(cfg, data, tmp_path, "ds", "train.epochs=3", warm, nproc=1), env)
    assert third.returncode != 0, third.stdout  # the worker exits 2; the launcher reports a failure
    assert "run dir error" in third.stderr, third.stdout[-3000:] + third.stderr[-3000:]
    assert "written by 2 processes, this run has 1" in third.stderr and "ZeRO" in third.stderr, third.stderr[-3000:]
    assert {p: p.read_bytes() for p in (tmp_path / "ds").rglob("*") if p.is_file()} == before


def _workers_of(launcher: subprocess.Popen) -> list[psutil.Process]:
    procs = psutil.Process(launcher.pid).children(recursive=True)
    return [p for p in procs if any("launch/train.py" in a for a in p.cmdline())]


def test_ddp_sigterm_resume_is_bitwise_exact(data, tmp_path):
    env = cpu_env(ACCELERATE_USE_CPU="true")
    multi = ["--multi_gpu"]  # with ACCELERATE_USE_CPU this is MULTI_CPU over gloo
    recipe = ["train.epochs=3", "optim.schedule=cosine", "optim.schedule_unit=epoch", "optim.warmup_steps=5"]
    full = run(launch_cmd(multi, data, tmp_path, "full", *recipe), env)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    # The reported result is the exported model's: the 2-process run's last evaluation equals
    # bmb-eval of its export in one process (batch norm buffers: rank 0's, evaluated and saved).
    from launch.eval import main as bmb_eval

    assert bmb_eval([str(tmp_path / "full" / "export"), "--dataset", str(data), "--device", "cpu",
                     "--json", str(tmp_path / "eval.json")]) == 0
    alone = json.loads((tmp_path / "eval.json").read_text())
    last = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 30 and alone["samples"] == 200
    for key in ("top1", "mean_recall", "many", "medium", "few", "per_class_recall"):
        assert alone[key] == pytest.approx(last[key], abs=1e-12), key
    # The per-epoch cosine with warm-up moved once per step on 2 processes, as on one.
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "full" / "train.jsonl").read_text().splitlines()]
    f = lr_lambda(load_config(None, [*TINY, *recipe, f"data.dataset={data}"]))
    assert lrs == pytest.approx([0.002 * f(step) for step in range(30)], rel=1e-12)
    assert len(set(lrs[10:20])) == 1 and lrs[20] < lrs[19]  # held through an epoch, moved at its end

    cut = subprocess.Popen(launch_cmd(multi, data, tmp_path, "cut", *recipe), env=env, cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "cut" / "train.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and cut.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    assert cut.poll() is None, "the run ended before it could be interrupted"
    for p in _workers_of(cut):  # what SLURM does: signal every task
        p.send_signal(signal.SIGTERM)
    output, _ = cut.communicate(timeout=300)
    assert cut.returncode != 0
    assert "stopped at step" in output, output[-3000:]
    mains = sorted(p for p in (tmp_path / "cut" / "checkpoints").glob("ckpt-*.pt") if ".rank" not in p.name)
    step = int(mains[-1].stem.split("-")[1])
    assert 0 < step < 30

    resumed = run(launch_cmd(multi, data, tmp_path, "cut", *recipe), env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stdout

    a = torch.load(tmp_path / "full" / "checkpoints" / "ckpt-00000030.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "ckpt-00000030.pt", weights_only=False)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]["module"]:
        assert torch.equal(a["ema"]["module"][k], b["ema"]["module"][k]), k
    for k in ("features", "labels", "generator"):
        assert torch.equal(a["algorithm"]["bank"][k], b["algorithm"]["bank"][k]), k
    assert torch.equal(a["algorithm"]["estimator"]["fraction"], b["algorithm"]["estimator"]["fraction"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    shutil.rmtree(tmp_path / "full")
