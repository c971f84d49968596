"""Class mixing of unlabeled batches for every backend and order, and the class-sorted warning.

A 100-class long-tailed demo set (the issue's command, scaled down): every reader must put as
many distinct classes in a batch of 64 as a uniform random permutation of the same labels does
(within 10 %). The streaming readers run with a buffer of 64 samples, 2 % of the split -- the
ratio a 1000-sample buffer has at ImageNet-LT scale -- so only shuffled shards can pass; the
same bound on a class-sorted build fails, which shows the test measures what it claims.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from pipelines import build_train_stream
from shards import order as shard_order
from shards.cli import main as shards_main

BATCH = 64
BATCHES = 40  # 2560 of the ~3200 unlabeled samples
BUFFER = 64
DEMO = [
    "demo", "--num-classes", "100", "--n1", "10", "--m1", "100", "--gamma-l", "20",
    "--gamma-u", "20", "--test-per-class", "1", "--shard-size", "100", "--workers", "1",
    "--no-progress",
]  # fmt: skip
HAS_FFCV = importlib.util.find_spec("ffcv") is not None


def build(out: Path, formats: str) -> Path:
    assert shards_main([*DEMO, "--formats", formats, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory) -> Path:
    formats = "wds,arrays" + (",ffcv" if HAS_FFCV else "")
    return build(tmp_path_factory.mktemp("mix") / "demo100", formats)


@pytest.fixture(scope="module")
def class_sorted(tmp_path_factory) -> Path:
    """The same set as an older build wrote it: class order, no order record, no DALI index."""
    mp = pytest.MonkeyPatch()
    mp.setattr(shard_order, "SHUFFLED_SPLITS", ())
    try:
        root = build(tmp_path_factory.mktemp("sorted") / "demo100", "wds,arrays")
    finally:
        mp.undo()
    m = json.loads((root / "manifest.json").read_text())
    for sp in m["splits"].values():
        del sp["order"]
        for sh in sp["shards"]:
            sh.pop("dali_index", None)
    for f in root.glob("*/*.idx"):
        f.unlink()
    (root / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    return root


def uniform_reference(labels: np.ndarray, epochs: int = 20) -> float:
    rng = np.random.default_rng(0)
    k = len(labels) // BATCH
    out = []
    for _ in range(epochs):
        y = labels[rng.permutation(len(labels))][: k * BATCH].reshape(k, BATCH)
        out.extend(len(np.unique(row)) for row in y)
    return float(np.mean(out))


def distinct_per_batch(backend: str, root: Path, **options) -> float:
    s = build_train_stream(backend, root, labeled_batch=8, unlabeled_batch=BATCH, **options)
    it = iter(s)
    return float(np.mean([len(set(next(it).unlabeled_labels.tolist())) for _ in range(BATCHES)]))


CASES = [
    ("tensor", {}),
    ("webdataset", {"num_workers": 0}),
    ("webdataset", {"num_workers": 0, "order": "stream", "shuffle_buffer": BUFFER}),
    ("ffcv", {"num_workers": 1}),
    ("ffcv", {"num_workers": 1, "order": "quasi_random"}),
    ("dali", {"num_threads": 1, "shuffle_buffer": BUFFER}),
]


@pytest.mark.parametrize(
    "backend,options", CASES, ids=[f"{b}-{o.get('order', 'default')}" for b, o in CASES]
)
def test_batches_mix_classes_like_a_uniform_permutation(shuffled, backend, options):
    if backend == "ffcv":
        pytest.importorskip("ffcv")
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    ref = uniform_reference(np.load(shuffled / "unlabeled" / "labels.npy"))
    got = distinct_per_batch(backend, shuffled, seed=1, **options)
    assert abs(got - ref) <= 0.1 * ref, f"{backend} {options}: {got:.1f} vs uniform {ref:.1f}"


def test_dali_loader_views_mix_classes_like_a_uniform_permutation(shuffled):
    """data.views=loader: the same reader, now emitting views -- the mixing must hold."""
    pytest.importorskip("nvidia.dali")
    from pipelines.dali_views import DaliViews

    ref = uniform_reference(np.load(shuffled / "unlabeled" / "labels.npy"))
    views = DaliViews(image_size=32, num_strong=1)
    s = build_train_stream("dali", shuffled, labeled_batch=8, unlabeled_batch=BATCH, seed=1,
                           num_threads=1, shuffle_buffer=BUFFER, views=views)  # fmt: skip
    it = iter(s)
    batches = [next(it) for _ in range(BATCHES)]
    assert all(b.views[2][0].shape == (BATCH, 3, 32, 32) for b in batches)
    got = float(np.mean([len(set(b.unlabeled_labels.tolist())) for b in batches]))
    assert abs(got - ref) <= 0.1 * ref, f"dali views: {got:.1f} vs uniform {ref:.1f}"


def test_class_sorted_shards_fail_the_bound_when_streamed(class_sorted):
    ref = uniform_reference(np.load(class_sorted / "unlabeled" / "labels.npy"))
    with pytest.warns(UserWarning):
        got = distinct_per_batch(
            "webdataset", class_sorted, num_workers=0, order="stream", shuffle_buffer=BUFFER
        )
    assert got < 0.5 * ref


def _rebuild_command(root: Path) -> str:
    return (
        "bmb-shards demo --num-classes 100 --n1 10 --m1 100 --gamma-l 20 --gamma-u 20 "
        f"--test-per-class 1 --size 32 --seed 0 --formats wds,arrays --shard-size 100 "
        f"--out {root} --overwrite"
    )


@pytest.mark.parametrize("backend", ["webdataset", "dali"])
def test_streaming_reader_warns_on_class_sorted_data_naming_the_rebuild(class_sorted, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
        opts = {"num_threads": 1}
    else:
        opts = {"num_workers": 0, "order": "stream"}
    with pytest.warns(UserWarning) as rec:
        s = build_train_stream(backend, class_sorted, labeled_batch=4, unlabeled_batch=8, **opts)
    msg = str(rec[0].message)
    assert "labeled, unlabeled" in msg and "class" in msg
    assert _rebuild_command(class_sorted) in msg
    if backend == "dali":  # no index files in an old build: DALI indexes the tars itself
        assert len(next(iter(s)).unlabeled_index) == 8


def test_index_readers_and_shuffled_data_do_not_warn(shuffled, class_sorted, recwarn):
    build_train_stream("webdataset", class_sorted, labeled_batch=4, unlabeled_batch=8)
    build_train_stream(
        "webdataset", shuffled, labeled_batch=4, unlabeled_batch=8, order="stream", num_workers=0
    )
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_the_named_command_rebuilds_the_same_samples_shuffled(class_sorted, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(class_sorted, old)
    with pytest.warns(UserWarning) as rec:
        build_train_stream("webdataset", old, labeled_batch=4, unlabeled_batch=8,
                           order="stream", num_workers=0)  # fmt: skip
    line = next(ln.strip() for ln in str(rec[0].message).splitlines() if "bmb-shards" in ln)
    argv = shlex.split(line)
    assert argv[0] == "bmb-shards" and shards_main(argv[1:] + ["--no-progress"]) == 0
    m = json.loads((old / "manifest.json").read_text())
    for split in ("labeled", "unlabeled"):
        assert m["splits"][split]["order"]["kind"] == "shuffled"
        for f in ("images.npy", "labels.npy"):  # the same sample behind every index
            assert np.array_equal(np.load(old / split / f), np.load(class_sorted / split / f))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt dataset streams without a warning
        build_train_stream("webdataset", old, labeled_batch=4, unlabeled_batch=8,
                           order="stream", num_workers=0)  # fmt: skip


@pytest.mark.parametrize(
    "rule,source",
    [
        ({"rule": "cifar-lt", "n1": 1500, "m1": 3000, "gamma_l": 100.0, "gamma_u": 100.0},
         {"kind": "cifar10", "path": "/data/cifar-10-python.tar.gz"}),
        ({"rule": "subset-lt", "n1": 300, "m1": 600, "gamma_l": 10.0, "gamma_u": 1.0,
          "classes": [0, 1, 2]}, {"kind": "imagenet32", "path": "/data/Imagenet32"}),
        ({"rule": "imagenet127", "labeled_ratio": 0.01, "rounding": "floor"},
         {"kind": "imagenet64", "path": "/data/Imagenet64"}),
        ({"rule": "imagenet-lt", "labeled_ratio": 0.2, "rounding": "ceil", "max_side": 320},
         {"kind": "imagenet-lt", "path": "/data/ILSVRC2012"}),
    ],
)  # fmt: skip
def test_rebuild_command_parses_for_every_builder(rule, source):
    from pipelines.shard_index import rebuild_command
    from shards.cli import build_parser

    shard = {"file": "x", "count": 1000, "sha256": ""}
    split = {"count": 2000, "shards": [shard, shard], "arrays": None, "ffcv": None}
    m = {"split_rule": rule, "source": source, "seed": 3, "splits": {"unlabeled": split}}
    cmd = rebuild_command(Path("/data/out"), m)
    argv = shlex.split(cmd.replace("<", "").replace(">", ""))
    a = build_parser().parse_args(argv[1:])
    assert a.command == rule["rule"] and a.seed == 3 and a.shard_size == 1000 and a.overwrite
    assert str(a.out) == "/data/out" and a.formats == ["wds"]
