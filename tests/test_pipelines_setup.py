"""The one options object of every backend: :class:`pipelines.base.ReaderSetup`.

Built from the run config by :func:`pipelines.reader_setup` (what ``launch/train.py`` hands to
both builders) or from the builders' keyword options; the batches are the same either way.
"""

from __future__ import annotations

import pytest
import torch

import pipelines
from bmb.config import load_config
from pipelines import ReaderSetup, build_eval_source, build_train_stream


def _setup(*overrides: str, device: str = "cpu", rank: int = 0, world: int = 1) -> ReaderSetup:
    cfg = load_config(None, ["data.dataset=x", *overrides])
    return pipelines.reader_setup(cfg, rank, world, torch.device(device))


def test_reader_setup_from_the_config() -> None:
    s = _setup("data.backend=webdataset", "data.workers=3", rank=1, world=2)
    assert (s.rank, s.world_size, s.device) == (1, 2, torch.device("cpu"))
    assert (s.num_workers, s.order, s.shuffle_buffer, s.on_corrupt) == (3, "index", None, "error")
    s = _setup("data.backend=webdataset", "data.order=stream", "data.shuffle_buffer=7",
               "data.on_corrupt=skip")
    assert (s.order, s.shuffle_buffer, s.on_corrupt) == ("stream", 7, "skip")
    s = _setup("data.backend=dali", "data.workers=0", "data.crop=rrc", "data.load_size=64")
    assert (s.num_threads, s.load_size, s.views) == (1, 64, None)
    assert _setup("data.backend=ffcv", "data.workers=5").num_workers == 5
    assert _setup("data.backend=tensor", "data.crop=rrc").load_size is None
    assert _setup("data.backend=tensor").on_device is False
    with pytest.raises(ValueError, match="^data.on_corrupt: on_corrupt=skip is not supported"):
        _setup("data.backend=ffcv", "data.on_corrupt=skip")


def test_fields_name_the_backends_that_read_them() -> None:
    assert ReaderSetup.accepted("webdataset", "train") == [
        "rank", "world_size", "device", "num_workers", "prefetch_factor", "pin_memory",
        "load_size", "on_corrupt", "order", "shuffle_buffer", "imagenet_views", "num_strong", "max_pixels",
    ]
    assert "order" not in ReaderSetup.accepted("webdataset", "eval")
    assert ReaderSetup.accepted("tensor", "eval") == [
        "rank", "world_size", "device", "mmap", "on_device", "max_pixels",
    ]
    assert "views" in ReaderSetup.accepted("dali", "train")
    assert "views" not in ReaderSetup.accepted("dali", "eval")
    # None: the backend's own default, left out of a backend's keyword options
    assert ReaderSetup(num_workers=0).options("webdataset", "train") == {
        "rank": 0, "world_size": 1, "device": "cpu", "num_workers": 0, "prefetch_factor": 4,
        "on_corrupt": "error", "max_pixels": 1 << 26,
    }


def test_unknown_options_list_the_backends_own() -> None:
    with pytest.raises(ValueError) as e:
        ReaderSetup.from_options("ffcv", "eval", {"order": "exact"})
    assert str(e.value) == (
        "unknown option(s) ['order'] for input backend 'ffcv'; allowed: "
        "['imagenet_views', 'load_size', 'max_pixels', 'num_workers', 'os_cache']"
    )


def test_setup_and_options_give_the_same_batches(dataset) -> None:  # noqa: F811
    root, _ = dataset
    kw = dict(labeled_batch=3, unlabeled_batch=5, seed=2)
    setup = ReaderSetup(num_workers=0, order="index")
    a = iter(build_train_stream("webdataset", root, **kw, setup=setup))
    b = iter(build_train_stream("webdataset", root, **kw, num_workers=0))
    for _ in range(3):
        x, y = next(a), next(b)
        assert torch.equal(x.unlabeled, y.unlabeled) and torch.equal(x.labels, y.labels)
    # a training setup serves evaluation too: its training-only fields are not read
    ev = list(build_eval_source("webdataset", root, "test", batch_size=4, setup=setup))
    ref = list(build_eval_source("webdataset", root, "test", batch_size=4, num_workers=0))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(ev, ref, strict=True))
    with pytest.raises(ValueError, match="either setup or options"):
        build_train_stream("webdataset", root, **kw, setup=setup, num_workers=0)
