"""All backends over one small dataset: equivalence, resume, corrupt input, the factory.

The fixture (``dataset``, tests/conftest.py and tests/pipeline_data.py) is written by
``shards.writer.write_dataset`` (lossless PNG shards, arrays and, when FFCV is installed,
``.beton`` files), so these tests also pin the shards/pipelines format contract.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import pipelines
from pipelines import build_eval_source, build_train_stream
from tests.pipeline_data import FFCV, HAS_FFCV, NUM_CLASSES, SIZES
from tests.pipeline_data import corrupt_png as _corrupt_png

HAS_DALI = (
    importlib.util.find_spec("nvidia.dali") is not None
    if importlib.util.find_spec("nvidia")
    else False
)

def installed_backends() -> list:
    out = ["tensor", "webdataset"]
    out.append(pytest.param("ffcv", marks=pytest.mark.skipif(not HAS_FFCV, reason="no ffcv")))
    out.append(pytest.param("dali", marks=pytest.mark.skipif(not HAS_DALI, reason="no dali")))
    return out


def fast_options(backend: str) -> dict:
    return {
        "webdataset": {"num_workers": 0},
        "ffcv": {"num_workers": 1},
        "dali": {"num_threads": 1},
    }.get(backend, {})


@pytest.mark.parametrize("backend", installed_backends())
def test_one_epoch_same_samples_and_pixels(dataset, backend):
    root, arrays = dataset
    bl, bu = 4, 8  # divide 24 and 40: the first 6 / 5 steps are exactly one epoch
    stream = build_train_stream(
        backend, root, labeled_batch=bl, unlabeled_batch=bu, seed=3, **fast_options(backend)
    )
    it = iter(stream)
    batches = [next(it) for _ in range(6)]
    x_l, y_l = arrays["labeled"]
    x_u, y_u = arrays["unlabeled"]
    u_idx = torch.cat([b.unlabeled_index for b in batches[:5]])
    assert sorted(u_idx.tolist()) == list(range(SIZES["unlabeled"]))
    for b in batches:
        assert b.labeled.dtype == torch.uint8 and b.labeled.shape == (bl, 3, 8, 8)
        assert b.unlabeled.shape == (bu, 3, 8, 8)
        i = b.unlabeled_index.numpy()
        assert np.array_equal(b.unlabeled.permute(0, 2, 3, 1).numpy(), x_u[i])  # lossless
        assert np.array_equal(b.unlabeled_labels.numpy(), y_u[i])
    # Labeled batches carry no index: match each image to its source row by its pixels.
    got = torch.cat([b.labeled for b in batches]).permute(0, 2, 3, 1).numpy()
    labels = torch.cat([b.labels for b in batches]).numpy()
    flat = x_l.reshape(len(x_l), -1)
    rows = [int(np.nonzero((flat == g.reshape(-1)).all(1))[0][0]) for g in got]
    assert sorted(rows) == list(range(SIZES["labeled"]))
    assert np.array_equal(labels, y_l[rows])


@pytest.mark.parametrize("backend", installed_backends())
def test_eval_pass_is_the_split(dataset, backend):
    root, arrays = dataset
    ev = build_eval_source(backend, root, "test", batch_size=5, **fast_options(backend))
    out = list(ev)
    assert len(out) == len(ev) == 3
    x = torch.cat([b[0] for b in out]).permute(0, 2, 3, 1).numpy()
    y = torch.cat([b[1] for b in out]).numpy()
    assert np.array_equal(x, arrays["test"][0]) and np.array_equal(y, arrays["test"][1])


@pytest.mark.parametrize(
    "backend,opts",
    [("webdataset", {"num_workers": 2}), pytest.param("ffcv", {"num_workers": 1}, marks=FFCV)],
)
def test_same_batches_as_tensor_backend(dataset, backend, opts):
    root, _ = dataset
    kw = dict(labeled_batch=5, unlabeled_batch=7, seed=11)
    a = iter(build_train_stream("tensor", root, **kw))
    b = iter(build_train_stream(backend, root, **opts, **kw))
    for _ in range(9):  # crosses epoch boundaries of both streams
        x, y = next(a), next(b)
        assert torch.equal(x.labeled, y.labeled) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.unlabeled, y.unlabeled)
        assert torch.equal(x.unlabeled_index, y.unlabeled_index)


RESUMABLE = [
    ("tensor", {}),
    ("webdataset", {"num_workers": 0}),
    ("webdataset", {"num_workers": 2}),
    pytest.param("ffcv", {"num_workers": 1}, marks=FFCV),
    pytest.param(
        "ffcv", {"num_workers": 1, "order": "quasi_random", "os_cache": False}, marks=FFCV
    ),
    pytest.param(
        "dali", {"num_threads": 1}, marks=pytest.mark.skipif(not HAS_DALI, reason="no dali")
    ),
]


@pytest.mark.parametrize("backend,opts", RESUMABLE)
@pytest.mark.parametrize("k", [3, 8])
def test_resume_mid_epoch(dataset, backend, opts, k):
    root, _ = dataset
    kw = dict(labeled_batch=5, unlabeled_batch=6, seed=2)
    ref_it = iter(build_train_stream(backend, root, **kw, **opts))
    ref = [next(ref_it) for _ in range(k + 4)]
    s = build_train_stream(backend, root, **kw, **opts)
    it = iter(s)
    for _ in range(k):
        next(it)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    r = build_train_stream(backend, root, **kw, **opts)
    r.load_state_dict(torch.load(buf))
    rit = iter(r)
    for want in ref[k:]:
        got = next(rit)
        assert torch.equal(want.unlabeled_index, got.unlabeled_index)
        assert torch.equal(want.unlabeled, got.unlabeled)
        assert torch.equal(want.labeled, got.labeled) and torch.equal(want.labels, got.labels)
    # Both have now delivered k + 4 batches: their positions agree.
    if backend != "dali":  # DALI's checkpoint strings need not compare equal
        for _ in range(4):
            next(it)
        assert r.state_dict()["unlabeled"] == s.state_dict()["unlabeled"]


def _copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def test_truncated_shard_names_the_shard(dataset, tmp_path):
    root = _copy(dataset[0], tmp_path)
    shard = root / "unlabeled" / "unlabeled-000002.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unlabeled-000002.tar"):
        build_train_stream("webdataset", root, labeled_batch=2, unlabeled_batch=2, num_workers=0)


def test_corrupt_image_raises_naming_shard_and_key(dataset, tmp_path):
    root = _copy(dataset[0], tmp_path)
    shard = _corrupt_png(root, "unlabeled", "00000013")
    s = build_train_stream("webdataset", root, labeled_batch=4, unlabeled_batch=40, num_workers=0)
    with pytest.raises(ValueError, match=rf"{shard.name}.*00000013"):
        next(iter(s))


@pytest.mark.parametrize("order", ["index", "stream"])
def test_unknown_on_corrupt_is_refused_before_reading_naming_it(dataset, order):
    """The readers speak the config's words (``error``/``skip``); another value, the readers' old
    ``raise`` included, stops every webdataset reader before it reads a shard."""
    want = r"^on_corrupt must be one of \('error', 'skip'\), got 'raise'$"
    with pytest.raises(ValueError, match=want):
        build_train_stream("webdataset", dataset[0], labeled_batch=4, unlabeled_batch=4, num_workers=0,
                           order=order, on_corrupt="raise")
    with pytest.raises(ValueError, match=want):
        build_eval_source("webdataset", dataset[0], "test", batch_size=4, num_workers=0, on_corrupt="raise")
    from pipelines.decode import Decoder

    with pytest.raises(ValueError, match=r"got 'ignore'$"):
        Decoder((8, 8), True, "ignore")


def test_corrupt_image_skip_is_counted_and_labels_stay_right(dataset, tmp_path, caplog):
    root = _copy(dataset[0], tmp_path)
    _corrupt_png(root, "unlabeled", "00000013")
    _, arrays = dataset
    x_u, y_u = arrays["unlabeled"]
    s = build_train_stream(
        "webdataset", root, labeled_batch=4, unlabeled_batch=40, num_workers=0, on_corrupt="skip"
    )
    with caplog.at_level("WARNING"):
        b = next(iter(s))
    assert s.skipped == 1 and "00000013" in caplog.text
    i = b.unlabeled_index.numpy()
    assert 13 not in i.tolist() and b.unlabeled.shape[0] == 40
    assert np.array_equal(b.unlabeled.permute(0, 2, 3, 1).numpy(), x_u[i])
    assert np.array_equal(b.unlabeled_labels.numpy(), y_u[i])
    assert s.state_dict()["skipped"] == 1


def test_missing_shard_and_manifest_mismatch(dataset, tmp_path):
    root = _copy(dataset[0], tmp_path)
    (root / "test" / "test-000001.tar").unlink()
    with pytest.raises(ValueError, match="test-000001.tar"):
        build_eval_source("webdataset", root, "test", batch_size=4, num_workers=0)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["labeled"]["shards"][0]["count"] += 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="labeled-000000.tar.*manifest says 9"):
        build_train_stream("webdataset", root, labeled_batch=2, unlabeled_batch=2)


@pytest.mark.skipif(not HAS_FFCV, reason="no ffcv")
def test_missing_beton_names_the_file(dataset, tmp_path):
    root = _copy(dataset[0], tmp_path)
    (root / "labeled" / "labeled.beton").unlink()
    with pytest.raises(ValueError, match="labeled.beton"):
        build_train_stream("ffcv", root, labeled_batch=2, unlabeled_batch=2)


@pytest.mark.skipif(not HAS_FFCV, reason="no ffcv")
def test_changed_beton_labels_stop_the_ffcv_backend_at_start(dataset, tmp_path):
    from ffcv.reader import Reader
    from ffcv.types import HeaderType

    root = _copy(dataset[0], tmp_path)
    path = root / "labeled" / "labeled.beton"
    r = Reader(str(path))
    row, field = 0, f"f{r.field_names.index('label')}"
    old = int(r.metadata[field][row])
    new = (old + 1) % NUM_CLASSES
    at = HeaderType.itemsize + r.field_descriptors.nbytes + r.metadata.dtype.fields[field][1]
    with open(path, "r+b") as f:  # the label of row 0, in the beton's metadata table
        f.seek(at + row * r.metadata.dtype.itemsize)
        f.write(np.int64(new).tobytes())
    with pytest.raises(
        ValueError, match=rf"split 'labeled'.*labeled\.beton.*class {min(old, new)}"
    ):
        build_train_stream("ffcv", root, labeled_batch=2, unlabeled_batch=2)


def test_factory_rejects_unknown_backend_and_option(dataset):
    root, _ = dataset
    with pytest.raises(ValueError, match="'nope'"):
        build_train_stream("nope", root, labeled_batch=2, unlabeled_batch=2)
    with pytest.raises(ValueError, match="num_wrkers"):
        build_train_stream("webdataset", root, labeled_batch=2, unlabeled_batch=2, num_wrkers=2)
    with pytest.raises(ValueError, match="on_device_x"):
        build_eval_source("tensor", root, "test", batch_size=2, on_device_x=True)
    with pytest.raises(ValueError, match="in-memory"):
        build_train_stream("webdataset", {}, labeled_batch=2, unlabeled_batch=2)


def test_missing_package_names_the_pip_extra(dataset, monkeypatch):
    monkeypatch.setitem(pipelines._MODULES, "dali", ("pipelines._no_such_module_", "dali"))
    with pytest.raises(ImportError, match=r"pip install bmb\[dali\]"):
        build_train_stream("dali", dataset[0], labeled_batch=2, unlabeled_batch=2)


def test_factory_in_memory_splits(dataset):
    from pipelines.tensor import ArraySplit

    _, arrays = dataset
    splits = {
        k: ArraySplit(torch.from_numpy(v[0]).permute(0, 3, 1, 2), torch.from_numpy(v[1]))
        for k, v in arrays.items()
    }
    b = next(iter(build_train_stream("tensor", splits, labeled_batch=3, unlabeled_batch=5)))
    assert np.array_equal(
        b.unlabeled.permute(0, 2, 3, 1).numpy(), arrays["unlabeled"][0][b.unlabeled_index.numpy()]
    )
    ev = build_eval_source("tensor", splits, "test", batch_size=13)
    assert np.array_equal(next(iter(ev))[1].numpy(), arrays["test"][1])


def _write_jpeg_dataset(root: Path) -> list[tuple[int, int, int]]:
    """A variable-size JPEG dataset in the v1 layout, one flat colour per image."""
    from PIL import Image

    colours, sizes = [], [(40, 30), (31, 50), (64, 64), (20, 90), (33, 33)]
    splits = {}
    for split in ("labeled", "unlabeled", "test"):
        (root / split).mkdir(parents=True)
        tar_path = root / split / f"{split}-000000.tar"
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i, (w, h) in enumerate(sizes):
                colour = (40 * i + 20, 200 - 30 * i, 90)
                colours.append(colour)
                buf = io.BytesIO()
                Image.new("RGB", (w, h), colour).save(buf, "JPEG", quality=95)
                for ext, data in (
                    ("jpg", buf.getvalue()),
                    ("cls", str(i % 2).encode()),
                    ("idx", str(i).encode()),
                ):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        splits[split] = {
            "count": len(sizes),
            "shards": [{"file": f"{split}/{split}-000000.tar", "count": len(sizes), "sha256": ""}],
            "arrays": None,
            "ffcv": None,
        }
    manifest = {
        "format_version": 1,
        "num_classes": 2,
        "image_size": None,
        "encoding": "jpg",
        "splits": splits,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return colours[: len(sizes)]


def test_full_res_jpeg_gives_load_size_squares(tmp_path):
    colours = _write_jpeg_dataset(tmp_path)
    ev = build_eval_source(
        "webdataset", tmp_path, "test", batch_size=5, num_workers=0, load_size=24
    )
    x, y = next(iter(ev))
    assert x.shape == (5, 3, 24, 24) and y.tolist() == [0, 1, 0, 1, 0]
    mean = x.float().mean(dim=(2, 3))
    assert torch.allclose(mean, torch.tensor(colours, dtype=torch.float32), atol=4)
    s = build_train_stream(
        "webdataset", tmp_path, labeled_batch=2, unlabeled_batch=5, num_workers=0
    )
    b = next(iter(s))
    assert b.unlabeled.shape == (5, 3, 256, 256)  # default load_size
    m = b.unlabeled.float().mean(dim=(2, 3))
    want = torch.tensor(colours, dtype=torch.float32)[b.unlabeled_index]
    assert torch.allclose(m, want, atol=4)


GPU_OPTIONS = {
    "tensor": {"on_device": True},
    "webdataset": {"num_workers": 0},
    "ffcv": {"num_workers": 1},
    "dali": {"num_threads": 1, "decode_device": "mixed"},  # nvJPEG/GPU decode path
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", installed_backends())
def test_gpu_batches_are_on_the_device_and_lossless(dataset, backend):
    root, arrays = dataset
    stream = build_train_stream(backend, root, labeled_batch=4, unlabeled_batch=8, seed=3, device="cuda",
                                **GPU_OPTIONS[backend])
    it = iter(stream)
    x_u, y_u = arrays["unlabeled"]
    for _ in range(5):
        b = next(it)
        assert b.labeled.is_cuda and b.unlabeled.is_cuda and b.labels.is_cuda
        i = b.unlabeled_index.cpu().numpy()
        assert np.array_equal(b.unlabeled.permute(0, 2, 3, 1).cpu().numpy(), x_u[i])
        assert np.array_equal(b.unlabeled_labels.cpu().numpy(), y_u[i])
