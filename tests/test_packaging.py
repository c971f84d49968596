"""A non-editable install works outside the checkout: the wheel carries every preset, the
Accelerate configs and the SLURM scripts, and the console scripts are declared."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", "data", "runs", "build", "__pycache__", ".pytest_cache", ".ruff_cache", "reports"}

CHECK = r"""
import contextlib, io, sys
from pathlib import Path
import launch.train as t
site = Path(sys.argv[1])
assert Path(t.__file__).resolve().is_relative_to(site.resolve()), t.__file__  # the installed copy
presets = sorted(p for p in (site / "launch" / "configs").rglob("*.yaml") if p.parent.name != "base")
for p in presets:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = t.main(["--config", str(p), "--print-config"])
    assert code == 0, (p, code)
    assert "method:" in out.getvalue()
print(len(presets), "presets resolved")
"""


@pytest.mark.slow
def test_wheel_installs_and_resolves_every_preset_outside_the_checkout(tmp_path: Path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=lambda d, names: [n for n in names if n in SKIP or n.endswith(".egg-info")])
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(src)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("bmb-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(ROOT)) for d in ("launch/configs", "launch/accelerate", "launch/slurm")
               for p in (ROOT / d).rglob("*") if p.is_file() and p.suffix in (".yaml", ".sh")}
    assert shipped and shipped <= names, sorted(shipped - names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry).decode()
    for script in ("bmb-shards = shards.cli:main", "bmb-train = launch.train:main", "bmb-report = launch.report:main",
                   "bmb-eval = launch.eval:main"):
        assert script in scripts

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    presets = [s for s in shipped if s.startswith("launch/configs") and "/base/" not in s]
    assert f"{len(presets)} presets resolved" in run.stdout
