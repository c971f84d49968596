"""The small demo dataset the trainer tests build: 10 classes, 40 -> 2 labeled and 120 -> 6
unlabeled per class (gamma 20), 20 test images per class, through the CLI as a user would."""

from __future__ import annotations

from pathlib import Path

from shards import cli as shards_cli


def build_small_demo(out: Path, formats: str = "wds,arrays", *extra: str) -> Path:
    """Build it into ``out`` (``extra``: more ``bmb-shards demo`` flags) and return ``out``."""
    code = shards_cli.main(["demo", "--out", str(out), "--n1", "40", "--m1", "120", "--gamma-l", "20",
                            "--gamma-u", "20", "--test-per-class", "20", "--formats", formats,
                            "--workers", "1", "--no-progress", *extra])  # fmt: skip
    assert code == 0, f"bmb-shards demo failed building {out}"
    return out
