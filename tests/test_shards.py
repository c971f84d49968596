"""Core of shards/: split rules, the writer (round trip, determinism, resume), manifest, verify."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from shards import writer as W
from shards.cli import main
from shards.format import load_manifest
from shards.order import file_order
from shards.splits import DISJOINT, first_per_class, lt_counts, lt_split, prefix_counts
from shards.verify import verify_dataset
from tests.shard_files import read_split, tree_bytes

REPO = Path(__file__).resolve().parents[1]


def tiny_splits(seed: int = 0, side: int = 8) -> dict:
    rng = np.random.default_rng(seed)

    def mk(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8), rng.integers(0, 3, n)

    return {"labeled": mk(23), "unlabeled": mk(57), "test": mk(11)}


# ----------------------------------------------------------------------------------------------
# split rules


def test_lt_counts_match_paper_numbers() -> None:
    assert lt_counts(1500, 100, 10) == [1500, 899, 539, 323, 193, 116, 69, 41, 25, 15]
    m = lt_counts(3000, 100, 10)
    assert m[0] == 3000 and m[-1] == 30 and sum(lt_counts(1500, 100, 10)) == 3720
    c100 = lt_counts(150, 10, 100)
    assert len(c100) == 100 and c100[0] == 150 and c100[-1] == 15
    assert all(a >= b for a, b in zip(c100, c100[1:]))
    # the rule in float64, as written in docs/datasets.md, for every class
    mu = (1 / 150) ** (1 / 9)
    assert lt_counts(1500, 150, 10) == [int(1500 * mu**k) for k in range(9)] + [10]


def test_cifar_lt_split_disjoint_counts_and_seeded() -> None:
    labels = np.repeat(np.arange(10), 60)
    np.random.default_rng(1).shuffle(labels)
    lab, unl = lt_split(labels, 10, 20, 30, 10, 5, seed=3, overlap=DISJOINT)
    assert np.bincount(labels[lab], minlength=10).tolist() == lt_counts(20, 10, 10)
    assert np.bincount(labels[unl], minlength=10).tolist() == lt_counts(30, 5, 10)
    assert not set(lab.tolist()) & set(unl.tolist())
    lab2, unl2 = lt_split(labels, 10, 20, 30, 10, 5, seed=3, overlap=DISJOINT)
    assert (lab == lab2).all() and (unl == unl2).all()
    lab3, _ = lt_split(labels, 10, 20, 30, 10, 5, seed=4, overlap=DISJOINT)
    assert not np.array_equal(lab, lab3)
    with pytest.raises(ValueError, match="class 0 has 60"):
        lt_split(labels, 10, 50, 30, 10, 5, seed=0, overlap=DISJOINT)


def test_prefix_rules_floor_and_ceil() -> None:
    assert prefix_counts([1300, 969, 5], 0.01, "floor") == [13, 9, 0]
    assert prefix_counts([1300, 969, 5], 0.2, "ceil") == [260, 194, 1]
    y = np.array([1, 0, 1, 1, 0, 2, 0, 1])
    assert first_per_class(y, [2, 1, 1]).tolist() == [0, 1, 4, 5]


# ----------------------------------------------------------------------------------------------
# writer


@pytest.mark.parametrize("workers", [1, 2])
def test_write_dataset_roundtrip_and_manifest(tmp_path: Path, workers: int) -> None:
    sp = tiny_splits()
    m = W.write_dataset(
        tmp_path / "d",
        name="tiny",
        class_names=["a", "b", "c"],
        splits=sp,
        shard_size=10,
        workers=workers,
        formats=("wds", "arrays"),
        seed=7,
    )
    d = tmp_path / "d"
    assert load_manifest(d) == json.loads((d / "manifest.json").read_text()) == m
    assert (d / "manifest.json").read_text().endswith("}\n")
    for s, (x, y) in sp.items():
        got_x, got_y, idx = read_split(d, m, s)
        assert np.array_equal(got_x, x) and np.array_equal(got_y, y)
        # training splits are written in a seeded shuffled order, eval splits in index order
        assert idx == file_order(m["splits"][s]["order"], len(y)).tolist()
        assert (idx == list(range(len(y)))) == (s == "test")
        e = m["splits"][s]
        assert e["count"] == len(y) and e["class_counts"] == np.bincount(y, minlength=3).tolist()
        assert [sh["count"] for sh in e["shards"]] == [10] * (len(y) // 10) + (
            [len(y) % 10] if len(y) % 10 else []
        )
        assert np.array_equal(np.load(d / e["arrays"]["images"]), x)
        assert np.load(d / e["arrays"]["labels"]).dtype == np.int64
    assert m["image_size"] == [8, 8] and m["encoding"] == "png" and m["seed"] == 7
    assert not (d / W.PROGRESS).exists()
    assert verify_dataset(d) == []


def test_tar_members_have_fixed_metadata_and_webdataset_reads_them(tmp_path: Path) -> None:
    import tarfile

    sp = tiny_splits()
    m = W.write_dataset(tmp_path, name="t", class_names=list("abc"), splits=sp, shard_size=100)
    f = tmp_path / m["splits"]["labeled"]["shards"][0]["file"]
    with tarfile.open(f) as t:
        ms = t.getmembers()
    order = file_order(m["splits"]["labeled"]["order"], 23)
    first = f"{order[0]:08d}"
    assert [x.name for x in ms[:3]] == [f"{first}.png", f"{first}.cls", f"{first}.idx"]
    assert {(x.mtime, x.uid, x.gid, x.mode, x.uname, x.gname) for x in ms} == {
        (0, 0, 0, 0o644, "", "")
    }
    wds = pytest.importorskip("webdataset")
    got = list(wds.WebDataset(str(f), shardshuffle=False))
    assert [int(s["cls"]) for s in got] == sp["labeled"][1][order].tolist()
    assert [s["__key__"] for s in got] == [f"{i:08d}" for i in order]


def test_deterministic_across_runs_and_workers(tmp_path: Path) -> None:
    kw = dict(name="t", class_names=list("abc"), splits=tiny_splits(), shard_size=9)
    W.write_dataset(tmp_path / "a", workers=1, **kw)
    W.write_dataset(tmp_path / "b", workers=2, **kw)
    a, b = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def test_out_dir_rules(tmp_path: Path) -> None:
    kw = dict(class_names=list("abc"), splits=tiny_splits(), shard_size=50)
    d = tmp_path / "d"
    m1 = W.write_dataset(d, name="one", **kw)
    assert W.write_dataset(d, name="one", **kw) == m1  # same dataset: up to date, no error
    with pytest.raises(ValueError, match="already holds a different dataset"):
        W.write_dataset(d, name="two", **kw)
    assert load_manifest(d)["name"] == "one"  # untouched
    assert W.write_dataset(d, name="two", overwrite=True, **kw)["name"] == "two"
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a shards dataset"):
        W.write_dataset(foreign, name="one", overwrite=True, **kw)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_bad_arrays_are_rejected_with_split_named(tmp_path: Path) -> None:
    sp = tiny_splits()
    sp["unlabeled"] = (sp["unlabeled"][0].astype(np.float32), sp["unlabeled"][1])
    with pytest.raises(ValueError, match="split 'unlabeled': images must be uint8"):
        W.write_dataset(tmp_path / "x", name="t", class_names=list("abc"), splits=sp)
    sp = tiny_splits()
    sp["test"] = (sp["test"][0], sp["test"][1] + 5)
    with pytest.raises(ValueError, match="split 'test': labels must be"):
        W.write_dataset(tmp_path / "y", name="t", class_names=list("abc"), splits=sp)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_verify_catches_one_flipped_byte_and_missing_file(tmp_path: Path, capsys) -> None:
    m = W.write_dataset(
        tmp_path, name="t", class_names=list("abc"), splits=tiny_splits(), shard_size=20
    )
    assert main(["verify", str(tmp_path)]) == 0
    f = tmp_path / m["splits"]["unlabeled"]["shards"][1]["file"]
    data = bytearray(f.read_bytes())
    data[700] ^= 0x01
    f.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert str(f) in err and "sha256 mismatch" in err
    g = tmp_path / m["splits"]["test"]["shards"][0]["file"]
    g.unlink()
    assert any(str(g) in p and "missing" in p for p in verify_dataset(tmp_path))


def test_load_manifest_names_bad_key(tmp_path: Path) -> None:
    W.write_dataset(tmp_path, name="t", class_names=list("abc"), splits=tiny_splits())
    p = tmp_path / "manifest.json"
    m = json.loads(p.read_text())
    del m["splits"]["labeled"]["class_counts"]
    p.write_text(json.dumps(m))
    with pytest.raises(
        ValueError, match=r"manifest.json: missing key splits\.labeled\.'class_counts'"
    ):
        load_manifest(tmp_path)
    p.unlink()
    with pytest.raises(FileNotFoundError, match="build did not finish"):
        load_manifest(tmp_path)


def test_info_prints_counts_and_imbalance(tmp_path: Path, capsys) -> None:
    x = np.zeros((13, 4, 4, 3), np.uint8)
    y = np.array([0] * 10 + [1] * 3)
    W.write_dataset(
        tmp_path,
        name="t",
        class_names=["a", "b"],
        splits={s: (x, y) for s in ("labeled", "unlabeled", "test")},
    )
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "labeled" in out and "3.3" in out and "formats:     wds" in out


def test_resume_after_interrupt_in_process(tmp_path: Path, monkeypatch) -> None:
    kw = dict(name="t", class_names=list("abc"), splits=tiny_splits(), shard_size=8)
    W.write_dataset(tmp_path / "ref", **kw)
    real = W.array_jobs
    calls = {"n": 0}

    def flaky(builder, split, images, chunk=W.CHUNK):
        for job in real(builder, split, images, chunk=4):
            calls["n"] += 1
            if calls["n"] == 12:
                raise KeyboardInterrupt
            yield job

    monkeypatch.setattr(W, "array_jobs", flaky)
    with pytest.raises(KeyboardInterrupt):
        W.write_dataset(tmp_path / "d", **kw)
    d = tmp_path / "d"
    assert not (d / "manifest.json").exists() and (d / W.PROGRESS).exists()
    done = json.loads((d / W.PROGRESS).read_text())["done"]
    assert len(done) >= 3
    assert not list(d.rglob(".*.tmp-*"))
    # corrupt one finished shard: the re-run must notice and rewrite it
    first = d / sorted(done)[0]
    first.write_bytes(b"garbage")
    monkeypatch.setattr(W, "array_jobs", real)
    W.write_dataset(d, **kw)
    assert tree_bytes(d) == tree_bytes(tmp_path / "ref")


@pytest.mark.slow
def test_resume_after_real_sigint(tmp_path: Path) -> None:
    """A real SIGINT to a building process; the re-run completes byte-identically."""
    script = textwrap.dedent(
        """
        import signal, sys, time, numpy as np
        from shards import writer as W
        # Python keeps SIGINT ignored if the launcher ignored it (a background job of a
        # non-interactive shell): restore Ctrl-C's usual behaviour for this test.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        enc = W._encode
        def slow_encode(*a):  # module-level in __main__, so the pool can pickle it
            time.sleep(0.05)
            return enc(*a)
        if sys.argv[2] == "slow":
            W._encode = slow_encode
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (400, 8, 8, 3), dtype=np.uint8)
        y = rng.integers(0, 3, 400)
        sp = {s: (x, y) for s in ("labeled", "unlabeled", "test")}
        W.CHUNK = 4
        W.write_dataset(sys.argv[1], name="t", class_names=list("abc"), splits=sp,
                        shard_size=16, workers=2)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-c", script]
    d = tmp_path / "d"
    p = subprocess.Popen([*run, str(d), "slow"], env=env, stderr=subprocess.PIPE)
    prog = d / W.PROGRESS
    t0 = time.time()
    ndone = 0
    while time.time() - t0 < 60 and p.poll() is None and ndone < 3:
        if prog.exists():
            ndone = len(json.loads(prog.read_text()).get("done", {}))
        time.sleep(0.05)
    assert ndone >= 3 and p.poll() is None, "build should be running with shards done"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and b"KeyboardInterrupt" in err, err.decode()
    assert not (d / "manifest.json").exists()
    subprocess.run([*run, str(d), "fast"], env=env, check=True)
    subprocess.run([*run, str(tmp_path / "ref"), "fast"], env=env, check=True)
    assert tree_bytes(d) == tree_bytes(tmp_path / "ref")
