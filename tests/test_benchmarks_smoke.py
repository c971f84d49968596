"""Benchmarks that cannot rot: every script in ``benchmarks/`` runs its ``--smoke`` mode (tiny sizes,
the same code paths, seconds) here, in this process (so DALI's and FFCV's start-up is paid once);
``gpu_suite.sh`` is syntax-checked and its dry run's commands parsed by the scripts' own parsers."""

from __future__ import annotations

import importlib
import importlib.util
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.import_graph import imports_under

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


DALI, FFCV = _has("nvidia.dali"), _has("ffcv")

# script -> (package it needs, lines its output must hold)
CASES: dict[str, tuple[str | None, list[str]]] = {
    "bench_augment": (None, ["| 32 | 8 |"]),
    "bench_bank": (None, ["| 128 | 64 | 16 | 10 |", "| 256 | 64 | 16 | 1000 |"]),
    "bench_bank_sync": (None, ["| 2 |"]),
    "bench_class_mixing": (None, ["| tensor |", "| webdataset order=index |"]
                           + (["| ffcv order=exact |"] if FFCV else []) + (["| dali |"] if DALI else [])),
    "bench_dali_convert": ("nvidia.dali", ["| 32 px |", "| 224 px (resized from 64 px) |"]),
    "bench_dali_views": ("nvidia.dali", ["| 224 | dali views=loader |", "| 224 | dali + ViewMaker |"]),
    "bench_nhat": (None, ["| after (fraction x |U|) |", "| reference (true counts) |"]),
    # The 224 px rows of every installed backend: DALI and FFCV once failed there (a hand-written
    # manifest); the datasets now come from the shard builders.
    "bench_pipelines": (None, ["| 32 | tensor |", "| 224 | webdataset (1 workers) |"]
                        + (["| 224 | ffcv (1 threads) |"] if FFCV else [])
                        + (["| 224 | dali cpu (1 threads) |"] if DALI else [])),
    "bench_shards": (None, ["| CIFAR-10-LT 32px (N1=15,M1=30,g=100) | 1 | 235 |",
                            "| ImageNet127-like 64px | 1 | 64 |"]),
    "bench_step": (None, ["| small | 32 |", "| fixmatch |", "| bmb |"]),
    "demo_ablation": (None, ["| memory+weights (BMB) |"]),
}


def test_every_benchmark_has_a_smoke_case():
    assert SCRIPTS == sorted(CASES)


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_smoke(name, capfd):  # capfd: bench_bank_sync's table comes from a spawned process
    need, lines = CASES[name]
    if need is not None and not _has(need):
        pytest.skip(f"{name} needs {need}")
    module = importlib.import_module(f"benchmarks.{name}")
    threads = torch.get_num_threads()
    try:
        code = module.main(["--smoke"])
    finally:
        torch.set_num_threads(threads)
    out, err = capfd.readouterr()
    assert code in (None, 0), err[-2000:]
    for line in lines:
        assert line in out, f"{name} --smoke: no {line!r} in\n{out[-3000:]}\n{err[-2000:]}"


def test_no_benchmark_imports_a_test_module():
    found = [hit for path in sorted(BENCH.glob("*.py")) for hit in imports_under(path, REPO, "tests")]
    assert not found, "\n".join(found)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_suite_parses_and_its_commands_fit_the_scripts(tmp_path):
    from bmb.config import load_config
    from shards.cli import build_parser as shards_parser

    suite = BENCH / "gpu_suite.sh"
    subprocess.run(["bash", "-n", str(suite)], check=True)
    subprocess.run(["bash", str(suite), str(tmp_path)], cwd=REPO, check=True, capture_output=True,
                   env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "IN127": "1"}, timeout=60)
    commands = [shlex.split(line) for line in (tmp_path / "dry_run.txt").read_text().splitlines()]
    scripts = set()
    for cmd in commands:
        assert cmd[0] == "python", cmd
        if cmd[1] == "-c":
            compile(cmd[2], "<gpu_suite.sh>", "exec")
        elif cmd[1:3] == ["-m", "shards"]:
            shards_parser().parse_args(cmd[3:])
        elif cmd[1:3] == ["-m", "pytest"]:
            assert (REPO / cmd[-1]).is_dir()
        elif cmd[1] == "launch/train.py":
            assert cmd[2] == "--config"
            load_config(str(REPO / cmd[3]), cmd[4:])  # every key and value valid
        else:
            script = Path(cmd[1])
            assert script.parent.name == "benchmarks" and (REPO / script).is_file(), cmd
            importlib.import_module(f"benchmarks.{script.stem}").build_parser().parse_args(cmd[2:])
            scripts.add(script.stem)
    assert scripts == {"bench_step", "bench_augment", "bench_pipelines"}
    assert sum(c[1] == "launch/train.py" for c in commands) == 2
