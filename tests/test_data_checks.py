"""Start-of-run data checks (issue row 9) and ``data.on_corrupt`` (row 14's training side)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import pipelines
from pipelines.shard_index import index_shard
from shards.writer import write_dataset

NUM_CLASSES = 3


def _arrays(seed: int = 0, size: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("labeled", 30), ("unlabeled", 60), ("test", 15)):
        x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        y = np.arange(n) % NUM_CLASSES  # every class present
        out[split] = (x, y.astype(np.int64))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checks") / "d"
    write_dataset(
        root,
        name="tiny",
        class_names=list("abc"),
        splits=_arrays(),
        formats=("wds", "arrays"),
        shard_size=8,
    )
    return root


@pytest.fixture
def data(built, tmp_path) -> Path:
    import shutil

    d = tmp_path / "d"
    shutil.copytree(built, d)
    return d


def _relabel_cls(root: Path, split: str, old: int, new: int, limit: int) -> int:
    """Rewrite up to ``limit`` ``.cls`` members ``old`` -> ``new`` in place (same length)."""
    n = 0
    for sh in json.loads((root / "manifest.json").read_text())["splits"][split]["shards"]:
        path = root / sh["file"]
        with open(path, "r+b") as f:
            for _, members, small in index_shard(path):
                if n < limit and small["cls"] == str(old).encode():
                    f.seek(members["cls"][0])
                    f.write(str(new).encode())
                    n += 1
    return n


def test_tensor_labels_changed_stop_the_run_naming_split_file_and_classes(data) -> None:
    path = data / "labeled" / "labels.npy"
    y = np.load(path)
    y[np.nonzero(y == 0)[0][:4]] = 2  # 4 labels 0 -> 2
    np.save(path, y)
    with pytest.raises(ValueError) as e:
        pipelines.build_train_stream("tensor", data, labeled_batch=4, unlabeled_batch=4)
    msg = str(e.value)
    assert "split 'labeled'" in msg and str(path) in msg
    assert "class 0: manifest 10, data 6; class 2: manifest 10, data 14" in msg
    pipelines.build_eval_source("tensor", data, "test", batch_size=4)  # other splits are fine


def test_webdataset_cls_changed_stop_the_run(data) -> None:
    assert _relabel_cls(data, "unlabeled", 0, 2, limit=5) == 5
    with pytest.raises(
        ValueError,
        match=r"split 'unlabeled'.*\.cls members.*unlabeled.*"
        r"class 0: manifest 20, data 15; class 2: manifest 20, data 25",
    ):
        pipelines.build_train_stream(
            "webdataset", data, labeled_batch=4, unlabeled_batch=4, num_workers=0
        )
    assert _relabel_cls(data, "test", 1, 0, limit=1) == 1
    with pytest.raises(ValueError, match=r"split 'test'.*class 0: manifest 5, data 6"):
        pipelines.build_eval_source("webdataset", data, "test", batch_size=4, num_workers=0)


def test_untouched_dataset_passes_the_check(data) -> None:
    for backend, opts in (("tensor", {}), ("webdataset", {"num_workers": 0})):
        s = pipelines.build_train_stream(backend, data, labeled_batch=4, unlabeled_batch=4, **opts)
        assert next(iter(s)).labeled.shape[0] == 4


def test_on_corrupt_maps_to_the_backends() -> None:
    # one vocabulary: the config's words reach the reader unchanged
    assert pipelines.corrupt_options("webdataset", "error") == {"on_corrupt": "error"}
    assert pipelines.corrupt_options("wds", "skip") == {"on_corrupt": "skip"}
    assert pipelines.corrupt_options("tensor", "skip") == {}
    assert pipelines.corrupt_options("dali", "error") == {}
    for backend in ("ffcv", "dali"):
        with pytest.raises(ValueError, match="not supported"):
            pipelines.corrupt_options(backend, "skip")
    with pytest.raises(ValueError, match=r"^on_corrupt must be one of \('error', 'skip'\), got 'raise'$"):
        pipelines.corrupt_options("webdataset", "raise")
    from bmb.config import ConfigError, load_config

    assert load_config(None, ["data.dataset=x"]).data.on_corrupt == "error"
    with pytest.raises(ConfigError, match="data.on_corrupt"):
        load_config(None, ["data.dataset=x", "data.on_corrupt=ignore"])


TINY = [
    "model.encoder=small",
    "model.width=8",
    "train.labeled_batch=8",
    "train.unlabeled_batch=8",
    "train.iters_per_epoch=5",
    "train.epochs=2",
    "train.eval_every=5",
    "train.checkpoint_every=100",
    "train.log_every=5",
    "train.progress=false",
    "method.warmup_epochs=0",
    "method.bank_size=16",
    "method.get_num=8",
    "data.eval_batch=16",
    "train.threads=1",
    "data.workers=0",
    "data.image_size=8",
]
CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "configs", "demo.yaml"
)


def test_train_stops_before_training_on_changed_labels(data, tmp_path, capsys) -> None:
    from launch import train

    _relabel_cls(data, "labeled", 1, 0, limit=2)
    code = train.main(
        [
            "--config",
            CONFIG,
            *TINY,
            f"data.dataset={data}",
            "data.backend=webdataset",
            f"train.out_dir={tmp_path}",
            "name=r",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert (
        "data error" in err and "split 'labeled'" in err and "class 0: manifest 10, data 12" in err
    )
    assert not (tmp_path / "r" / "train.jsonl").exists()


def test_train_on_corrupt_skip_counts_skips_in_the_logs(data, tmp_path, capsys) -> None:
    from launch import train

    splits = json.loads((data / "manifest.json").read_text())["splits"]
    keys = {}
    for split in ("labeled", "test"):
        path = data / splits[split]["shards"][0]["file"]
        keys[split], members, _ = index_shard(path)[3]
        off, size = members["png"]
        with open(path, "r+b") as f:
            f.seek(off)
            f.write(b"\0" * size)
    key = keys["labeled"]  # the labeled split is drawn first
    args = [
        "--config",
        CONFIG,
        *TINY,
        f"data.dataset={data}",
        "data.backend=webdataset",
        f"train.out_dir={tmp_path}",
    ]
    # default data.on_corrupt=error: stops mid-run with the documented data error, naming it
    assert train.main([*args, "name=err"]) == 2
    assert re.search(f"data error: .*sample {key!r}: cannot decode image", capsys.readouterr().err)
    assert train.main([*args, "name=skip", "data.on_corrupt=skip"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "skip" / "train.jsonl").read_text().splitlines()]
    # 10 steps x 8 labeled samples over a 30-sample split: the bad one is drawn at least twice
    assert rows[-1]["corrupt_skipped"] >= 2
    metrics = [
        json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()
    ]
    assert metrics[-1]["corrupt_skipped"] == rows[-1]["corrupt_skipped"]
    assert [m["test_corrupt_skipped"] for m in metrics] == [1, 1]  # one per evaluation pass
    assert train.main([*args, "name=ffcv", "data.backend=ffcv", "data.on_corrupt=skip"]) == 2
    assert "data.on_corrupt" in capsys.readouterr().err


def test_dali_reads_the_same_cls_members_and_is_checked_before_it_is_built(data) -> None:
    _relabel_cls(data, "labeled", 2, 1, limit=3)
    # the check runs before the backend module is imported: no GPU or DALI needed for this
    with pytest.raises(ValueError, match=r"split 'labeled'.*class 1: manifest 10, data 13"):
        pipelines.build_train_stream("dali", data, labeled_batch=4, unlabeled_batch=4)
