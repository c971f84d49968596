"""The sbatch scripts in launch/slurm/, as written, against a real one-node SLURM on this machine.

The module fixture installs Debian's `slurm-wlm` and `munge` when they are missing (root only),
starts munged + slurmctld + slurmd with scripts/slurm_local.sh, and stops them at the end. Tests:
a demo-preset job runs to `final.json`; a job sent its preemption signal (SIGUSR1 to the batch
shell, as `#SBATCH --signal=B:USR1@...` does) checkpoints, requeues itself and finishes from that
checkpoint; the same for the multi-node script on one node with two CPU processes (srun, torchrun
rendezvous, the signal passed to the job step).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from shards import cli as shards_cli

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "scripts" / "slurm_local.sh"
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "srun")
APT_PACKAGES = ("slurm-wlm", "munge")
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}

# Seconds-long jobs on 2 cores (see tests/test_train.py TINY).
TINY = [
    "model.encoder=small",
    "model.width=8",
    "train.labeled_batch=16",
    "train.unlabeled_batch=16",
    "train.log_every=5",
    "train.progress=false",
    "train.ema_decay=0.9",
    "method.warmup_epochs=0",
    "method.threshold=0.15",
    "method.bank_size=32",
    "method.get_num=16",
    "data.eval_batch=64",
    "train.threads=1",
]
SHORT = [
    "train.epochs=2",
    "train.iters_per_epoch=20",
    "train.eval_every=10",
    "train.checkpoint_every=100",
]
# Long enough (400 steps, ~20 s here) that the signal lands mid-run after the first checkpoint.
LONG = [
    "train.epochs=2",
    "train.iters_per_epoch=200",
    "train.eval_every=100",
    "train.checkpoint_every=20",
]


def _missing_binaries() -> list[str]:
    return [b for b in SLURM_BINARIES if shutil.which(b) is None]


def _install_slurm() -> str | None:
    """Installs the Debian packages if a binary is missing; returns why not, or None."""
    if not _missing_binaries():
        return None
    if os.geteuid() != 0:
        return f"{', '.join(_missing_binaries())} missing and not root: apt-get install -y {' '.join(APT_PACKAGES)}"
    if shutil.which("apt-get") is None:
        return f"{', '.join(_missing_binaries())} missing and no apt-get to install {' '.join(APT_PACKAGES)}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *APT_PACKAGES]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {r.stderr.strip()[-500:]}"
    missing = _missing_binaries()
    return f"still missing after apt-get: {missing}" if missing else None


@dataclass
class Cluster:
    dir: Path
    env: dict[str, str]

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=60, **kw
        )

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = _install_slurm()
    if why:
        pytest.skip(f"no SLURM here: {why}")
    d = tmp_path_factory.mktemp("slurm")
    env = {
        **os.environ,
        "SLURM_CONF": str(d / "slurm.conf"),
        # the jobs inherit this environment (sbatch --export=ALL): the venv's python and accelerate
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("SLURM_JOB_ID", None)  # in case pytest itself runs inside a SLURM job
    r = subprocess.run(
        ["bash", str(LOCAL), "start", str(d)], env=env, capture_output=True, text=True, timeout=180
    )
    if r.returncode != 0:
        subprocess.run(
            ["bash", str(LOCAL), "stop", str(d)], env=env, capture_output=True, timeout=120
        )
        pytest.skip(
            f"the one-node SLURM cluster could not start in this environment:\n{r.stderr[-3000:]}"
        )
    c = Cluster(d, env)
    try:
        yield c
    finally:
        c.run("scancel", f"--user={os.getuid()}", check=False)
        r = subprocess.run(
            ["bash", str(LOCAL), "stop", str(d)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slurm-data") / "demo"
    code = shards_cli.main(
        [
            "demo",
            "--out",
            str(out),
            "--n1",
            "40",
            "--m1",
            "120",
            "--gamma-l",
            "20",
            "--gamma-u",
            "20",
            "--test-per-class",
            "20",
            "--formats",
            "wds,arrays",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0
    return out


def submit(
    c: Cluster,
    workdir: Path,
    script: str,
    *args: str,
    env: dict[str, str] | None = None,
    flags: tuple[str, ...] = (),
) -> str:
    """sbatch from the repo root (as a user would), the job working in `workdir` (its log goes there)."""
    r = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={workdir}", *flags, f"launch/slurm/{script}", *args],
        cwd=REPO,
        env={**c.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def wait_until(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def finish(c: Cluster, job_id: str, log: Path, timeout: float = 150) -> dict[str, str]:
    """Waits for the job to end; on a timeout cancels it and shows its log."""
    try:
        wait_until(lambda: c.job(job_id).get("JobState") in TERMINAL, timeout, f"job {job_id}")
    except AssertionError as e:
        c.run("scancel", job_id, check=False)
        raise AssertionError(f"{e}\n{log.read_text() if log.exists() else '(no log)'}") from None
    return c.job(job_id)


def overrides(demo_data: Path, out_dir: Path, name: str, schedule: list[str]) -> list[str]:
    return [
        "--config",
        "launch/configs/demo.yaml",
        *TINY,
        *schedule,
        f"data.dataset={demo_data}",
        f"train.out_dir={out_dir}",
        f"name={name}",
    ]


def test_single_node_demo_preset_runs_to_final_json(cluster, demo_data, tmp_path):
    job = submit(
        cluster,
        tmp_path,
        "single_node.sh",
        *overrides(demo_data, tmp_path / "runs", "demo", SHORT),
        flags=("--cpus-per-task=2",),
    )
    log = tmp_path / f"bmb-{job}.out"  # the script's own --output=%x-%j.out
    info = finish(cluster, job, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    run = tmp_path / "runs" / "demo"
    final = json.loads((run / "final.json").read_text())
    assert (
        final["steps"] == 40
        and len(final["per_class_recall"]) == 10
        and 0.0 <= final["top1"] <= 1.0
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert "1 node(s) x 1 process(es), 0 GPU(s) per node" in text
    assert f"training finished: {run}/final.json" in text
    assert "requeue" not in text and info["Restarts"] == "0"


def _preempt_and_check(c: Cluster, job: str, log: Path, run: Path, shards: int) -> str:
    """Signals the batch shell once a checkpoint exists; checks the requeue and the resumed finish."""
    wait_until(
        lambda: (
            any((run / "checkpoints").glob("ckpt-*.pt")) or c.job(job).get("JobState") in TERMINAL
        ),
        150,
        f"a first checkpoint of job {job}",
    )
    assert c.job(job)["JobState"] == "RUNNING", log.read_text()
    # What `#SBATCH --signal=B:USR1@300` does 300 s before the time limit.
    c.run("scancel", "--signal=USR1", "--batch", job)
    info = finish(c, job, log, timeout=240)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert info["Restarts"] == "1", text
    assert "got SIGUSR1" in text and f"requeueing job {job}" in text and "(restart 1)" in text, text
    stopped = re.findall(r"\[signal\] stopped at step (\d+) after writing a checkpoint", text)
    assert len(stopped) == 1, text
    step = int(stopped[0])
    assert 0 < step < 400
    # The second leg resumed from the checkpoint written on the signal, not from scratch.
    assert f"[resume] from {run}/checkpoints/ckpt-{step:08d}.pt at step {step}" in text, text
    assert text.index("requeueing job") < text.index("[resume] from")
    final = json.loads((run / "final.json").read_text())
    assert final["steps"] == 400
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [100, 200, 300, 400]  # no evaluation lost or repeated
    # Per-rank checkpoint files: one main file, plus one per extra rank.
    assert len(list((run / "checkpoints").glob("ckpt-00000400*.pt"))) == shards
    return text


def test_single_node_preemption_requeues_and_resumes(cluster, demo_data, tmp_path):
    job = submit(
        cluster,
        tmp_path,
        "single_node.sh",
        *overrides(demo_data, tmp_path / "runs", "pre", LONG),
        flags=("--cpus-per-task=2",),
    )
    text = _preempt_and_check(
        cluster, job, tmp_path / f"bmb-{job}.out", tmp_path / "runs" / "pre", shards=1
    )
    assert text.count("got SIGUSR1") == 1


@pytest.mark.dist
def test_multi_node_script_two_processes_preemption(cluster, demo_data, tmp_path):
    """multi_node.sh on one node: srun task -> accelerate (torchrun) -> 2 gloo ranks; signal via the step."""
    job = submit(
        cluster,
        tmp_path,
        "multi_node.sh",
        *overrides(demo_data, tmp_path / "runs", "mn", LONG),
        env={"BMB_CPU_PROCS": "2"},
        flags=("--nodes=1", "--cpus-per-task=2"),
    )
    text = _preempt_and_check(
        cluster, job, tmp_path / f"bmb-mn-{job}.out", tmp_path / "runs" / "mn", shards=2
    )
    assert "1 node(s) x 2 process(es), 0 GPU(s) per node" in text
    assert re.search(r"rendezvous at \S+:\d+", text)
    # `scancel --signal` targets the job steps only: the batch shell saw the signal once, no loop.
    assert text.count("got SIGUSR1") == 1
