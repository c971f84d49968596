"""The small demo dataset the trainer tests build: 10 classes, 40 -> 2 labeled and 120 -> 6
unlabeled per class (gamma 20), 20 test images per class, through the CLI as a user would; and
the tiny run settings (:data:`TINY` on :data:`CONFIG`) they train it with. The ``demo_data``
fixture (``tests/conftest.py``) builds it once per test module."""

from __future__ import annotations

import os
from pathlib import Path

from shards import cli as shards_cli

# A tiny model and schedule on top of launch/configs/demo.yaml: 20 steps, seconds on a CPU.
TINY = [
    "model.encoder=small", "model.width=8",
    "train.labeled_batch=16", "train.unlabeled_batch=16", "train.iters_per_epoch=10", "train.epochs=2",
    "train.eval_every=5", "train.checkpoint_every=100", "train.log_every=5", "train.progress=false",
    "train.ema_decay=0.9", "method.warmup_epochs=0", "method.threshold=0.15", "method.bank_size=32",
    "method.get_num=16", "data.eval_batch=64", "train.threads=1",
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "launch", "configs", "demo.yaml")


def build_small_demo(out: Path, formats: str = "wds,arrays", *extra: str) -> Path:
    """Build it into ``out`` (``extra``: more ``bmb-shards demo`` flags) and return ``out``."""
    code = shards_cli.main(["demo", "--out", str(out), "--n1", "40", "--m1", "120", "--gamma-l", "20",
                            "--gamma-u", "20", "--test-per-class", "20", "--formats", formats,
                            "--workers", "1", "--no-progress", *extra])  # fmt: skip
    assert code == 0, f"bmb-shards demo failed building {out}"
    return out
