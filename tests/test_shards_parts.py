"""The shard builder's parts stand alone: no import cycle in shards/, and the sink and the
out-dir state work from plain values (no DatasetBuilder)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np

from shards.format import iter_tar_samples
from shards.hashing import sha256_file
from shards.resume import PROGRESS, OutDirState
from shards.sink import SplitSink

SHARDS = Path(__file__).resolve().parents[1] / "shards"


def _shards_imports() -> dict[str, set[str]]:
    """module -> shards modules it imports (TYPE_CHECKING and function-level imports included)."""
    mods = {".".join(p.relative_to(SHARDS.parent).with_suffix("").parts) for p in SHARDS.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for m in mods:
        deps: set[str] = set()
        for n in ast.walk(ast.parse((SHARDS.parent / (m.replace(".", "/") + ".py")).read_text())):
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else []
            if isinstance(n, ast.ImportFrom) and n.module and not n.level:
                names = [f"{n.module}.{a.name}" for a in n.names] + [n.module]
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != m:
                    deps.add(name)
        graph[m] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return [*path[path.index(d):], d] if d in path else [*path, d]
            if d not in state and (found := visit(d, [*path, d])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_shards_has_no_import_cycle() -> None:
    graph = _shards_imports()
    assert "shards.writer" in graph and "shards.sink" in graph["shards.writer"]  # the walk sees imports
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]  # and the check sees a cycle
    assert _cycle(graph) is None, _cycle(graph)


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
