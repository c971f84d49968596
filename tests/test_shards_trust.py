"""What the builder may touch in --out, the build lock, "complete" means complete, and
``verify --decode`` (issue rows 8, 11, 12, 14)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shards import writer as W
from shards.cli import main
from shards.format import load_manifest
from shards.verify import verify_dataset
from tests.shard_files import DEMO, tiny_splits, tree_bytes

KW = dict(class_names=list("abc"), shard_size=10)


# ---------------------------------------------------------------------------------- row 8


def test_overwrite_never_deletes_a_foreign_manifest_or_user_files(tmp_path, capsys) -> None:
    d = tmp_path / "out"
    (d / "labeled").mkdir(parents=True)
    (d / "test").mkdir()
    (d / "manifest.json").write_text(json.dumps({"project": "mine", "files": ["labeled/a.txt"]}))
    (d / "labeled" / "a.txt").write_text("user data")
    (d / "test" / "b.txt").write_text("more user data")
    before = tree_bytes(d)

    assert main(["demo", "--out", str(d), "--overwrite", *DEMO]) == 2
    assert tree_bytes(d) == before  # nothing deleted, nothing added
    assert "not written by bmb-shards" in capsys.readouterr().err
    assert main(["demo", "--out", str(d), *DEMO]) == 2
    err = capsys.readouterr().err  # ... and the error no longer suggests --overwrite
    assert "not written by bmb-shards" in err and "--overwrite to replace" not in err
    assert tree_bytes(d) == before


def test_overwrite_refuses_when_our_dataset_dir_also_holds_user_files(tmp_path) -> None:
    d = tmp_path / "d"
    W.write_dataset(d, name="one", splits=tiny_splits(), **KW)
    (d / "labeled" / "notes.txt").write_text("mine")
    (d / "extra").mkdir()
    (d / "extra" / "x.bin").write_bytes(b"x")
    before = tree_bytes(d)
    with pytest.raises(ValueError, match=r"labeled/notes\.txt.*extra/x\.bin|extra/x\.bin.*notes"):
        W.write_dataset(d, name="two", splits=tiny_splits(1), overwrite=True, **KW)
    assert tree_bytes(d) == before


def test_overwrite_deletes_exactly_the_listed_files(tmp_path) -> None:
    d = tmp_path / "d"
    W.write_dataset(d, name="one", splits=tiny_splits(), formats=("wds", "arrays"), **KW)
    m = W.write_dataset(
        d, name="two", splits=tiny_splits(1), overwrite=True, class_names=list("abc"), shard_size=30
    )
    files = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}
    listed = {sh["file"] for sp in m["splits"].values() for sh in sp["shards"]}
    listed |= {sh["dali_index"]["file"] for sp in m["splits"].values() for sh in sp["shards"] if sh["dali_index"]}
    assert files == listed | {"manifest.json"}  # old shards and arrays gone, nothing else left
    assert m["tool"] == "bmb-shards" and verify_dataset(d) == []


# ---------------------------------------------------------------------------------- row 11


def test_concurrent_build_fails_at_once_and_the_first_completes(tmp_path, monkeypatch) -> None:
    d = tmp_path / "d"
    kw = dict(name="t", splits=tiny_splits(), **KW)
    started, release = threading.Event(), threading.Event()
    real = W.array_jobs

    def gated(builder, split, images, chunk=W.CHUNK):
        for job in real(builder, split, images, chunk=4):
            yield job
            if threading.current_thread().name == "first" and not release.is_set():
                started.set()  # a shard's temp file is open now
                release.wait(30)

    monkeypatch.setattr(W, "array_jobs", gated)
    errors: list[BaseException] = []

    def first() -> None:
        try:
            W.write_dataset(d, **kw)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=first, name="first")
    t.start()
    try:
        assert started.wait(30)
        with pytest.raises(RuntimeError, match="being built by another bmb-shards process"):
            W.write_dataset(d, **kw)
    finally:
        release.set()
        t.join(60)
    assert not errors, errors
    assert verify_dataset(d) == [] and not (d / ".bmb-shards.lock").exists()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_cli_build_with_a_live_lock_fails_and_a_stale_lock_is_taken_over(tmp_path, capsys) -> None:
    import socket

    d = tmp_path / "d"
    d.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {
            "tool": "bmb-shards",
            "pid": holder.pid,
            "host": socket.gethostname(),
            "started": "x",
            "token": "t",
        }
        (d / ".bmb-shards.lock").write_text(json.dumps(lock))
        assert main(["demo", "--out", str(d), *DEMO]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "being built by another" in err
        assert sorted(p.name for p in d.iterdir()) == [".bmb-shards.lock"]
    finally:
        holder.kill()
        holder.wait()
    (d / ".bmb-shards.lock").write_text(json.dumps({**lock, "pid": _dead_pid()}))
    assert main(["demo", "--out", str(d), *DEMO]) == 0
    assert "taking over the stale build lock" in capsys.readouterr().err
    assert not (d / ".bmb-shards.lock").exists() and verify_dataset(d) == []


# ---------------------------------------------------------------------------------- row 12


def test_rerun_rebuilds_missing_or_resized_files_instead_of_nothing_to_do(tmp_path, capsys) -> None:
    kw = dict(name="t", splits=tiny_splits(), formats=("wds", "arrays"), progress=True, **KW)
    W.write_dataset(tmp_path / "ref", **kw)
    d = tmp_path / "d"
    m = W.write_dataset(d, **kw)
    ref = tree_bytes(tmp_path / "ref")
    assert tree_bytes(d) == ref
    capsys.readouterr()

    (d / "labeled" / "images.npy").unlink()
    (d / m["splits"]["unlabeled"]["shards"][1]["file"]).unlink()
    shard = d / m["splits"]["test"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-512])  # a changed size
    assert W.write_dataset(d, **kw) == m
    err = capsys.readouterr().err
    assert "nothing to do" not in err and "3 file(s)" in err and "images.npy" in err
    assert tree_bytes(d) == ref

    W.write_dataset(d, **kw)  # now complete: nothing to do
    assert "nothing to do" in capsys.readouterr().err
    assert all(isinstance(sh["size"], int) for sp in m["splits"].values() for sh in sp["shards"])


# ---------------------------------------------------------------------------------- row 14


def _corrupt_png(d: Path, split: str, key: str) -> Path:
    from pipelines.shard_index import index_shard

    for sh in load_manifest(d)["splits"][split]["shards"]:
        path = d / sh["file"]
        for k, members, _ in index_shard(path):
            if k == key:
                off, size = members["png"]
                with open(path, "r+b") as f:
                    f.seek(off)
                    f.write(b"\0" * size)
                return path
    raise AssertionError(key)


def test_verify_decode_names_every_undecodable_sample(tmp_path, capsys) -> None:
    d = tmp_path / "d"
    W.write_dataset(d, name="t", splits=tiny_splits(), **KW)
    assert main(["verify", "--decode", "--workers", "2", "--no-progress", str(d)]) == 0
    assert "every image decodes" in capsys.readouterr().out
    bad1 = _corrupt_png(d, "unlabeled", "00000013")
    bad2 = _corrupt_png(d, "test", "00000002")
    assert main(["verify", "--decode", "--workers", "2", "--no-progress", str(d)]) == 1
    err = capsys.readouterr().err
    assert f"{bad1}: sample 00000013: cannot decode image" in err
    assert f"{bad2}: sample 00000002: cannot decode image" in err
    assert err.count("cannot decode") == 2
    probs = [p for p in verify_dataset(d, decode=True, workers=1) if "cannot decode" in p]
    assert len(probs) == 2 and "BytesIO" not in probs[0]
    assert probs[0].startswith(f"{bad2}: sample 00000002") and probs[1].startswith(f"{bad1}:")


def test_verify_help_documents_decode() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "shards", "verify", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        check=True,
    ).stdout
    assert "--decode" in out and "--workers" in out


def test_verify_checks_the_dali_index_files(tmp_path) -> None:
    d = tmp_path / "d"
    m = W.write_dataset(d, name="one", splits=tiny_splits(), **KW)
    index = next(sh["dali_index"]["file"] for sh in m["splits"]["labeled"]["shards"] if sh["dali_index"])
    assert verify_dataset(d) == []
    (d / index).write_text((d / index).read_text() + "0\n")
    assert verify_dataset(d) == [f"{d / index}: sha256 mismatch (DALI index file changed or corrupt)"]
    (d / index).unlink()
    assert verify_dataset(d) == [f"{d / index}: missing DALI index file"]
