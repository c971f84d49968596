"""The tensor backend: epoch semantics, rank splitting, resume, array loading, eval."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
import torch

from pipelines.base import Batch
from pipelines.sampling import IndexStream, epoch_permutation, eval_rank_indices
from pipelines.tensor import ArraySplit, TensorEval, TensorStream, load_array_split


def make_split(n: int, size: int = 4, num_classes: int = 3, seed: int = 0) -> ArraySplit:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    # Make every image unique so pixels identify the sample.
    images[:, 0, 0, 0] = torch.arange(n) % 256
    images[:, 1, 0, 0] = torch.arange(n) // 256
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return ArraySplit(images, labels)


def take(stream: TensorStream, k: int) -> list[Batch]:
    it = iter(stream)
    return [next(it) for _ in range(k)]


def test_batches_match_source_and_cover_each_epoch():
    lab, unl = make_split(7, seed=1), make_split(12, seed=2)
    s = TensorStream(lab, unl, labeled_batch=3, unlabeled_batch=4, seed=5)
    batches = take(s, 6)  # unlabeled: 2 epochs of 12; labeled: 18 samples = 2 epochs + 4
    for b in batches:
        assert b.labeled.shape == (3, 3, 4, 4) and b.labeled.dtype == torch.uint8
        assert b.unlabeled.shape == (4, 3, 4, 4) and b.unlabeled_index.dtype == torch.int64
        assert b.labeled.is_contiguous() and b.unlabeled.is_contiguous()
        torch.testing.assert_close(b.unlabeled, unl.images[b.unlabeled_index])
        torch.testing.assert_close(b.unlabeled_labels, unl.labels[b.unlabeled_index])
    u = torch.cat([b.unlabeled_index for b in batches])
    assert sorted(u[:12].tolist()) == list(range(12))
    assert sorted(u[12:].tolist()) == list(range(12))
    assert u[:12].tolist() != u[12:].tolist(), "each epoch must be reshuffled"
    # Labeled images/labels stay paired: find each labeled image's source row by its pixels.
    x_l = torch.cat([b.labeled for b in batches])
    y_l = torch.cat([b.labels for b in batches])
    src = lab.images[:, 0, 0, 0].long() + 256 * lab.images[:, 1, 0, 0].long()
    row = x_l[:, 0, 0, 0].long() + 256 * x_l[:, 1, 0, 0].long()
    pos = [int((src == r).nonzero()) for r in row]
    assert y_l.tolist() == lab.labels[pos].tolist()
    assert sorted(pos[:7]) == list(range(7)) and sorted(pos[7:14]) == list(range(7))


def test_same_seed_same_stream_other_seed_differs():
    lab, unl = make_split(10), make_split(20)
    a = take(TensorStream(lab, unl, labeled_batch=2, unlabeled_batch=5, seed=0), 3)
    b = take(TensorStream(lab, unl, labeled_batch=2, unlabeled_batch=5, seed=0), 3)
    c = take(TensorStream(lab, unl, labeled_batch=2, unlabeled_batch=5, seed=1), 3)
    ia = torch.cat([x.unlabeled_index for x in a])
    assert torch.equal(ia, torch.cat([x.unlabeled_index for x in b]))
    assert not torch.equal(ia, torch.cat([x.unlabeled_index for x in c]))


@pytest.mark.parametrize("k", [0, 1, 4, 9])
def test_resume_yields_identical_next_batches(k):
    lab, unl = make_split(7, seed=3), make_split(11, seed=4)
    kw = dict(labeled_batch=3, unlabeled_batch=4, seed=7)
    ref = take(TensorStream(lab, unl, **kw), k + 5)
    s = TensorStream(lab, unl, **kw)
    take(s, k)
    buf = io.BytesIO()
    torch.save(copy.deepcopy(s.state_dict()), buf)  # must survive a checkpoint round trip
    buf.seek(0)
    restored = TensorStream(lab, unl, **kw)
    restored.load_state_dict(torch.load(buf))
    for want, got in zip(ref[k:], take(restored, 5)):
        assert torch.equal(want.labeled, got.labeled) and torch.equal(want.labels, got.labels)
        assert torch.equal(want.unlabeled, got.unlabeled)
        assert torch.equal(want.unlabeled_index, got.unlabeled_index)


def test_resume_at_another_world_size_continues_the_global_order():
    """The position is in global batches: a 2-rank state restores into 1 rank (same global
    batch) and the next batch is the two ranks' next batches, concatenated."""
    lab, unl = make_split(8), make_split(9)
    two = [TensorStream(lab, unl, labeled_batch=2, unlabeled_batch=3, world_size=2, rank=r) for r in (0, 1)]
    for s in two:
        take(s, 3)
    one = TensorStream(lab, unl, labeled_batch=4, unlabeled_batch=6)
    one.load_state_dict(two[0].state_dict())
    want = [take(s, 1)[0] for s in two]
    got = take(one, 1)[0]
    assert torch.equal(got.unlabeled_index, torch.cat([w.unlabeled_index for w in want]))
    assert torch.equal(got.labels, torch.cat([w.labels for w in want]))
    other = TensorStream(lab, unl, labeled_batch=2, unlabeled_batch=3)  # another global batch
    with pytest.raises(ValueError, match="global_batch"):
        other.load_state_dict(two[0].state_dict())


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_take_contiguous_slices_of_the_global_batch(world_size):
    n, batch = 23, 2
    one = IndexStream(n, batch * world_size, seed=3, stream="unlabeled")
    ranks = [IndexStream(n, batch, seed=3, stream="unlabeled", rank=r, world_size=world_size)
             for r in range(world_size)]
    for _ in range(30):  # past several epoch boundaries, none of which B divides
        assert torch.equal(one.next_indices(), torch.cat([s.next_indices() for s in ranks]))
    # Every epoch is covered once: a rank's share of each epoch, together, is the epoch.
    perm = epoch_permutation(n, 3, "unlabeled", 1)
    assert sorted(torch.cat([s.epoch_share(1) for s in ranks]).tolist()) == sorted(perm.tolist())
    # location(): where a rank stands in its share of the current epoch.
    s = IndexStream(n, batch, seed=3, stream="unlabeled", rank=1, world_size=world_size)
    s.batches = 9
    epoch, pos = s.location()
    assert torch.equal(s.next_indices(), s.epoch_share(epoch)[pos:pos + batch])


def test_eval_pass_covers_split_in_order():
    split = make_split(10)
    ev = TensorEval(split, batch_size=4)
    out = list(ev)
    assert len(ev) == len(out) == 3 and all(len(b) == 2 for b in out)
    torch.testing.assert_close(torch.cat([b[0] for b in out]), split.images)
    torch.testing.assert_close(torch.cat([b[1] for b in out]), split.labels)


def test_eval_distributed_padding():
    split = make_split(7)
    got, steps = [], []
    for rank in range(3):
        ev = TensorEval(split, batch_size=2, rank=rank, world_size=3)
        batches = list(ev)
        steps.append(len(batches))
        assert len(ev) == len(batches)
        for x, y, valid in batches:
            torch.testing.assert_close(y, split.labels[_rows(split, x)])
            got += _rows(split, x)[valid].tolist()
    assert steps == [2, 2, 2]
    assert sorted(got) == list(range(7))
    idx, valid = eval_rank_indices(7, 2, 3)
    assert idx.tolist() == [2, 5, 2] and valid.tolist() == [True, True, False]


def _rows(split: ArraySplit, x: torch.Tensor) -> torch.Tensor:
    return x[:, 0, 0, 0].long() + 256 * x[:, 1, 0, 0].long()


def test_load_array_split_nhwc_to_nchw(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 6, 4, 3), dtype=np.uint8)  # (N, H, W, 3)
    labels = np.array([0, 2, 1, 1, 0], dtype=np.int64)
    (tmp_path / "labeled").mkdir()
    np.save(tmp_path / "labeled" / "images.npy", images)
    np.save(tmp_path / "labeled" / "labels.npy", labels)
    for mmap in (True, False):
        s = load_array_split(tmp_path, "labeled", mmap=mmap)
        assert s.images.shape == (5, 3, 6, 4) and s.labels.dtype == torch.int64
        assert np.array_equal(s.images.permute(0, 2, 3, 1).numpy(), images)
        assert s.labels.tolist() == labels.tolist()
        x, y = s.take(torch.tensor([4, 1]), "cpu")
        assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), images[[4, 1]])
        assert y.tolist() == [0, 2]
    with pytest.raises(ValueError, match="unlabeled"):
        load_array_split(tmp_path, "unlabeled")


def test_load_array_split_uses_manifest_and_names_bad_file(tmp_path):
    (tmp_path / "test").mkdir()
    np.save(tmp_path / "test" / "images.npy", np.zeros((2, 4, 4, 3), np.uint8))
    np.save(tmp_path / "test" / "labels.npy", np.zeros((3,), np.int64))
    manifest = {
        "splits": {
            "test": {"arrays": {"images": "test/images.npy", "labels": "test/labels.npy"}},
            "val": {"arrays": None},
        }
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="labels.npy"):
        load_array_split(tmp_path, "test")
    with pytest.raises(ValueError, match="--formats arrays"):
        load_array_split(tmp_path, "val")


def test_array_split_validates():
    with pytest.raises(ValueError, match="uint8"):
        ArraySplit(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        ArraySplit(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_resident_split_delivers_on_device():
    lab, unl = make_split(9), make_split(13)
    ref = take(TensorStream(lab, unl, labeled_batch=4, unlabeled_batch=5, seed=2), 4)
    gl = ArraySplit(lab.images.cuda(), lab.labels.cuda())
    gu = ArraySplit(unl.images.cuda(), unl.labels.cuda())
    for from_host in (False, True):
        a, b = (lab, unl) if from_host else (gl, gu)
        got = take(TensorStream(a, b, labeled_batch=4, unlabeled_batch=5, seed=2, device="cuda"), 4)
        for w, g in zip(ref, got):
            assert g.labeled.is_cuda and g.unlabeled_index.is_cuda
            assert torch.equal(w.labeled, g.labeled.cpu())
            assert torch.equal(w.unlabeled_index, g.unlabeled_index.cpu())
