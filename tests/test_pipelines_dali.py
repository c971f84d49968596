"""DALI batches reach torch in one bulk copy (CPU) or without leaving the GPU (mixed decode),
equal to the per-sample ``np.stack`` path they replaced; and the build's index files are used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from pipelines.dali_backend import _index_paths, _paths, _pipe, _to_torch  # noqa: E402
from shards.format import load_manifest  # noqa: E402
from tests.pipeline_data import write_fixture  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dali")
    write_fixture(root, ("wds",))
    return root


def pipe(root: Path, *, fixed: bool, gpu: bool = False):
    m = load_manifest(root)
    return _pipe(
        _paths(root, m, "unlabeled"),
        index_paths=_index_paths(root, m, "unlabeled"),
        batch_size=8,
        seed=0,
        shard_id=0,
        num_shards=1,
        shuffle=True,
        gpu=gpu,
        fixed=fixed,
        out_hw=(8, 8) if fixed else (6, 6),  # not fixed: DALI resizes and center-crops
        num_threads=1,
        prefetch=2,
        buffer=16,
        checkpoint=None,
        pad=False,
    )


def per_sample(images) -> torch.Tensor:
    """The path ``_to_torch`` replaced: a host copy per sample, ``np.stack``, then NCHW."""
    if hasattr(images, "as_cpu"):
        images = images.as_cpu()
    arr = np.stack([np.asarray(images[i]) for i in range(len(images))])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def test_the_builds_index_files_are_passed(root):
    paths = _index_paths(root, load_manifest(root), "unlabeled")
    assert len(paths) == len(_paths(root, load_manifest(root), "unlabeled"))
    assert all(p.endswith(".idx") and Path(p).read_text().startswith("v1.2 ") for p in paths)


@pytest.mark.parametrize("fixed", [True, False])
def test_cpu_bulk_copy_equals_the_per_sample_path(root, fixed):
    p = pipe(root, fixed=fixed)
    for _ in range(3):
        x, *_ = p.run()
        got = _to_torch(x)
        assert got.dtype == torch.uint8 and got.is_contiguous()
        assert got.shape == (8, 3, *((8, 8) if fixed else (6, 6)))
        assert torch.equal(got, per_sample(x))
    kept = got.clone()
    for _ in range(3):  # DALI reuses its output buffers: the tensor must not alias them
        p.run()
    assert torch.equal(got, kept)


@pytest.mark.gpu
def test_gpu_batches_stay_on_the_gpu_and_equal_the_host_path(root):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    p = pipe(root, fixed=True, gpu=True)
    for _ in range(3):
        x, *_ = p.run()
        got = _to_torch(x)
        assert got.is_cuda and got.is_contiguous() and got.shape == (8, 3, 8, 8)
        assert torch.equal(got.cpu(), per_sample(x))
