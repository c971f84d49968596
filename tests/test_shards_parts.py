"""The shard builder's parts stand alone: the sink and the out-dir state work from plain values
(no DatasetBuilder). That shards/ has no import cycle is tests/test_layout.py's check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shards.format import iter_tar_samples
from shards.hashing import sha256_file
from shards.resume import PROGRESS, OutDirState
from shards.sink import SplitSink


def test_sink_and_out_dir_state_from_values(tmp_path: Path) -> None:
    said: list[str] = []
    state = OutDirState(tmp_path / "d", build_id="x" * 64, name="t", overwrite=False, say=said.append)
    assert state.prepare() is None  # a new directory: nothing to resume
    try:
        labels, order = np.array([2, 0, 1]), np.array([1, 2, 0])
        sink = SplitSink(state, "test", labels, order, shard_size=2)
        assert sink.num_shards == 2 and sink.pending(0, 3)
        sink.add(0, "png", [b"p0", b"p1", b"p2"])  # file positions 0..2 hold samples 1, 2, 0
        assert sink.expect == 3 and not sink.pending(0, 3)
    finally:
        state.release()
    rec = json.loads((tmp_path / "d" / PROGRESS).read_text())
    assert sorted(rec["done"]) == ["test/test-000000.tar", "test/test-000001.tar"] == sorted(state.done)
    for rel, r in rec["done"].items():
        assert r["sha256"] == sha256_file(tmp_path / "d" / rel)
    got = [(m["idx"], m["cls"], m["png"]) for f in sorted(rec["done"]) for _, m in iter_tar_samples(tmp_path / "d" / f)]
    assert got == [(b"1", b"0", b"p0"), (b"2", b"1", b"p1"), (b"0", b"2", b"p2")]
