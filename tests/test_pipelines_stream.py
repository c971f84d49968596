"""``webdataset`` backend, ``order="stream"``: sequential shards split by global worker.

The fixture has 4-sample shards (8 labeled, 16 unlabeled) so the shard counts divide by every
worker layout used here; then a rank's first ``per-rank epoch / B`` steps are exactly its
shards of epoch 0, which the tests check sample by sample.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines import build_train_stream
from pipelines.wds_stream import ShardOrder, shuffled
from shards.format import split_order as file_order
from tests.pipeline_data import corrupt_png as _corrupt_png
from tests.ports import free_port

SIZES = {"labeled": 32, "unlabeled": 64, "test": 8}
SHARD = 4
NUM_CLASSES = 3


def _arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    return {
        split: (
            rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
            rng.integers(0, NUM_CLASSES, n).astype(np.int64),
        )
        for split, n in SIZES.items()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from shards.writer import write_dataset

    root = tmp_path_factory.mktemp("stream")
    arrays = _arrays()
    write_dataset(
        root,
        name="stream",
        class_names=[f"c{i}" for i in range(NUM_CLASSES)],
        splits=arrays,
        shard_size=SHARD,
    )
    return root, arrays


def shard_of(root: Path, split: str, indices) -> np.ndarray:
    """Shard number of each stable index (training splits are written in shuffled order)."""
    at = file_order(json.loads((root / "manifest.json").read_text()), split)
    pos = np.empty_like(at)
    pos[at] = np.arange(len(at))
    return pos[np.asarray(indices, dtype=np.int64)] // SHARD


def stream(root: Path, **kw):
    opts = dict(labeled_batch=4, unlabeled_batch=8, seed=5, order="stream", shuffle_buffer=10)
    opts.update(kw)
    return build_train_stream("webdataset", root, **opts)


def take(s, k: int) -> list:
    it = iter(s)
    return [next(it) for _ in range(k)]


def labeled_rows(batches: list, x_l: np.ndarray) -> list[int]:
    """Labeled batches carry no index: find each image's source row by its pixels."""
    got = torch.cat([b.labeled for b in batches]).permute(0, 2, 3, 1).numpy()
    flat = x_l.reshape(len(x_l), -1)
    return [int(np.nonzero((flat == g.reshape(-1)).all(1))[0][0]) for g in got]


def check_labels_and_pixels(batches: list, arrays: dict) -> None:
    x_u, y_u = arrays["unlabeled"]
    x_l, y_l = arrays["labeled"]
    for b in batches:
        i = b.unlabeled_index.numpy()
        assert np.array_equal(b.unlabeled.permute(0, 2, 3, 1).numpy(), x_u[i])  # lossless PNG
        assert np.array_equal(b.unlabeled_labels.numpy(), y_u[i])
    rows = labeled_rows(batches, x_l)
    assert np.array_equal(torch.cat([b.labels for b in batches]).numpy(), y_l[rows])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_epoch_is_the_split_once(dataset, num_workers):
    root, arrays = dataset
    # Unlabeled: 64 / 8 = 8 steps per epoch; labeled: 32 / 4 = 8 steps per epoch.
    batches = take(stream(root, num_workers=num_workers), 16)
    check_labels_and_pixels(batches, arrays)
    orders = []
    for epoch in (batches[:8], batches[8:]):
        idx = torch.cat([b.unlabeled_index for b in epoch]).tolist()
        lab = torch.cat([b.unlabeled_labels for b in epoch]).tolist()
        assert sorted(zip(idx, lab)) == sorted(enumerate(arrays["unlabeled"][1].tolist()))
        assert sorted(labeled_rows(epoch, arrays["labeled"][0])) == list(range(SIZES["labeled"]))
        orders.append(idx)
    assert orders[0] != orders[1]  # a new shard order and buffer per epoch


def test_sequence_is_the_shard_order_without_buffer(dataset):
    root, arrays = dataset
    s = stream(root, num_workers=0, shuffle_buffer=0)
    idx = torch.cat([b.unlabeled_index for b in take(s, 16)]).tolist()
    order = ShardOrder("unlabeled", np.full(16, SHARD), 5, global_workers=1)
    at = file_order(json.loads((root / "manifest.json").read_text()), "unlabeled")
    want = [int(at[p]) for e in (0, 1) for sh in order.shards(e, 0) for p in range(sh * 4, sh * 4 + 4)]
    assert idx == want
    assert order.shards(0, 0)[:2] != [0, 1]  # the shard order is shuffled
    # A buffer as large as the epoch reorders samples but keeps each epoch's set.
    big = stream(root, num_workers=0, shuffle_buffer=64)
    got = torch.cat([b.unlabeled_index for b in take(big, 16)]).tolist()
    assert got != idx and sorted(got[:64]) == sorted(idx[:64]) == list(range(64))


def test_shuffled_keeps_every_item_once():
    import random

    out = list(shuffled(iter(range(100)), 7, random.Random(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert list(shuffled(iter(range(5)), 1, random.Random(0))) == list(range(5))


def test_tar_reader_matches_tarfile(tmp_path):
    import tarfile

    from shards.format import tar_members

    path = tmp_path / "a.tar"
    long_dir = "d" * 120  # a name over 100 bytes: ustar splits it into prefix + name
    want = [(f"{long_dir}/00000000.png", b"x" * 700), ("00000000.cls", b"2"), ("e.idx", b"")]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        tf.addfile(_dir_info("adir"))
        for name, data in want:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        got = list(tar_members(f, path))
    assert [(name, data) for name, _, _, data in got] == want  # directories skipped, joined
    with tarfile.open(path) as tf:  # data offsets and sizes as tarfile finds them
        spans = [(i.offset_data, i.size) for i in tf.getmembers() if i.isfile()]
    assert [(offset, size) for _, offset, size, _ in got] == spans
    with open(path, "rb") as f:  # the index builder's mode: skipped members located, not read
        skipped = list(tar_members(f, path, skip=lambda name: name.endswith(".png")))
    assert [(offset, size) for _, offset, size, _ in skipped] == spans
    assert [data for *_, data in skipped] == [None, b"2", b""]


def _dir_info(name: str):
    import tarfile

    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_same_seed_same_sequence(dataset):
    root, _ = dataset
    a = take(stream(root, num_workers=2, seed=9), 10)
    b = take(stream(root, num_workers=2, seed=9), 10)
    c = take(stream(root, num_workers=2, seed=10), 10)
    for x, y in zip(a, b):
        assert torch.equal(x.unlabeled_index, y.unlabeled_index)
        assert torch.equal(x.unlabeled, y.unlabeled) and torch.equal(x.labeled, y.labeled)
        assert torch.equal(x.labels, y.labels)
    ia = torch.cat([x.unlabeled_index for x in a])
    assert not torch.equal(ia, torch.cat([x.unlabeled_index for x in c]))
    # num_workers=0 reads like one worker: same sequence as num_workers=1.
    z = take(stream(root, num_workers=0, seed=9), 6)
    o = take(stream(root, num_workers=1, seed=9), 6)
    assert all(torch.equal(x.unlabeled_index, y.unlabeled_index) for x, y in zip(z, o))


def test_labeled_and_unlabeled_shard_orders_are_independent():
    counts = np.full(16, SHARD)
    lab = ShardOrder("labeled", counts, 5, global_workers=2)
    unl = ShardOrder("unlabeled", counts, 5, global_workers=2)
    assert lab.shards(0, 0) != unl.shards(0, 0)
    assert sorted(lab.shards(0, 0) + lab.shards(0, 1)) == list(range(16))
    assert lab.shards(0, 0) != lab.shards(1, 0)


def test_too_few_shards_is_a_value_error(dataset):
    root, _ = dataset
    with pytest.raises(ValueError, match=r"'labeled' has 8 shard.*2 \* 5 = 10.*--shard-size"):
        stream(root, num_workers=5, rank=0, world_size=2)
    with pytest.raises(ValueError, match="order='index'"):
        stream(root, num_workers=9)
    stream(root, num_workers=4, rank=1, world_size=2)  # 8 labeled shards: exactly enough


def test_bad_options(dataset):
    root, _ = dataset
    with pytest.raises(ValueError, match="'random'"):
        stream(root, order="random")
    with pytest.raises(ValueError, match="shuffle_buffer=5 only applies"):
        build_train_stream("webdataset", root, labeled_batch=2, unlabeled_batch=2, shuffle_buffer=5)
    with pytest.raises(ValueError, match="shuffle_buffer must be >= 0"):
        stream(root, shuffle_buffer=-1)


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("k", [3, 11])  # 11: odd (worker rotation) and past an epoch boundary
def test_resume_same_layout_is_exact(dataset, k):
    root, _ = dataset
    ref = take(stream(root, num_workers=2), k + 5)
    s = stream(root, num_workers=2)
    it = iter(s)
    for _ in range(k):
        next(it)
    state = _roundtrip(s.state_dict())
    assert state["unlabeled"]["batches"] == k
    r = stream(root, num_workers=2)
    r.load_state_dict(state)
    rit = iter(r)
    for want in ref[k:]:
        got = next(rit)
        assert torch.equal(want.unlabeled_index, got.unlabeled_index)
        assert torch.equal(want.unlabeled, got.unlabeled)
        assert torch.equal(want.labeled, got.labeled) and torch.equal(want.labels, got.labels)
    for _ in range(5):
        next(it)
    assert r.state_dict() == s.state_dict()


def test_resume_other_layout_restarts_the_epoch(dataset, caplog):
    root, arrays = dataset
    s = stream(root, num_workers=2)
    take(s, 11)  # unlabeled: both workers are into epoch 1 (8 steps per epoch)
    state = _roundtrip(s.state_dict())
    assert state["unlabeled"]["epoch"] == state["labeled"]["epoch"] == 1
    r = stream(root, num_workers=1)
    with caplog.at_level("WARNING"):
        r.load_state_dict(state)
    assert "approximate" in caplog.text and "num_workers 2 -> 1" in caplog.text
    epoch1 = take(r, 8)
    idx = torch.cat([b.unlabeled_index for b in epoch1]).tolist()
    assert sorted(idx) == list(range(SIZES["unlabeled"]))
    assert sorted(labeled_rows(epoch1, arrays["labeled"][0])) == list(range(SIZES["labeled"]))
    # It is epoch 1's shard order (not epoch 0's): without a buffer, shard runs show it.
    r0 = stream(root, num_workers=1, shuffle_buffer=0)
    st = r0.state_dict()
    st["unlabeled"].update(epoch=1, num_workers=2, shuffle_buffer=10)
    st["labeled"].update(epoch=1, num_workers=2, shuffle_buffer=10)
    r0.load_state_dict(st)
    got = shard_of(root, "unlabeled", torch.cat([b.unlabeled_index for b in take(r0, 2)])[::SHARD])
    order = ShardOrder("unlabeled", np.full(16, SHARD), 5, global_workers=1)
    assert got.tolist() == order.shards(1, 0)[:4]


def test_state_of_the_other_order_or_data_is_refused(dataset):
    root, _ = dataset
    st = stream(root, num_workers=0).state_dict()
    idx = build_train_stream("webdataset", root, labeled_batch=4, unlabeled_batch=8)
    with pytest.raises(ValueError, match="order 'stream', not 'index'"):
        idx.load_state_dict(st)
    with pytest.raises(ValueError, match="not webdataset order 'stream'"):
        stream(root, num_workers=0).load_state_dict(idx.state_dict())
    st["unlabeled"]["seed"] = 1
    with pytest.raises(ValueError, match="unlabeled.*seed=1"):
        stream(root, num_workers=0).load_state_dict(st)


def _copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def _consume(s, steps: int = 16) -> None:
    it = iter(s)
    for _ in range(steps):
        next(it)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_truncated_shard_names_the_shard_and_member(dataset, tmp_path, num_workers):
    from pipelines.shard_index import build_index

    root = _copy(dataset[0], tmp_path)
    index = build_index(root, "unlabeled")
    i = index.keys.index("00000021")
    shard = index.shards[index.shard[i]]
    cut = int(index.offset[i]) + int(index.size[i]) // 2  # inside its PNG's data
    shard.write_bytes(shard.read_bytes()[:cut])
    s = stream(root, num_workers=num_workers)  # no index: found while streaming
    with pytest.raises(ValueError, match=rf"{shard.name}.*truncated.*00000021.png"):
        _consume(s)


def test_shard_cut_at_a_header_names_the_shard(dataset, tmp_path):
    from pipelines.shard_index import build_index

    root = _copy(dataset[0], tmp_path)
    index = build_index(root, "unlabeled")
    last = int(file_order(json.loads((root / "manifest.json").read_text()), "unlabeled")[23])
    i = index.keys.index(f"{last:08d}")  # last sample of shard 5
    shard = index.shards[index.shard[i]]
    header = int(index.offset[i]) - 512  # its image member's header: tar ends cleanly there
    shard.write_bytes(shard.read_bytes()[:header])
    with pytest.raises(
        ValueError, match=rf"unlabeled-000005.tar.*({last:08d}.*lacks|manifest says 4)"
    ):
        _consume(stream(root, num_workers=0))


def test_corrupt_image_raises_naming_shard_and_key(dataset, tmp_path):
    root = _copy(dataset[0], tmp_path)
    shard = _corrupt_png(root, "unlabeled", "00000013")
    with pytest.raises(ValueError, match=rf"{shard.name}.*00000013.*cannot decode"):
        _consume(stream(root, num_workers=0))


def test_corrupt_image_skip_is_counted_and_labels_stay_right(dataset, tmp_path, caplog):
    root = _copy(dataset[0], tmp_path)
    _corrupt_png(root, "unlabeled", "00000013")
    s = stream(root, num_workers=0, on_corrupt="skip")
    with caplog.at_level("WARNING"):
        batches = take(s, 8)  # one epoch: sample 13 comes up exactly once
    assert s.skipped == 1 and "00000013" in caplog.text
    idx = torch.cat([b.unlabeled_index for b in batches]).tolist()
    assert 13 not in idx and len(idx) == SIZES["unlabeled"]
    assert len(set(idx)) == SIZES["unlabeled"] - 1  # replaced by a copy of a batch-mate
    check_labels_and_pixels(batches, dataset[1])
    assert s.state_dict()["skipped"] == 1


def test_manifest_with_fewer_samples_than_the_shard(dataset, tmp_path):
    root = _copy(dataset[0], tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["unlabeled"]["shards"][15]["count"] -= 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="'unlabeled' has 64 samples.*sum to 63"):
        stream(root, num_workers=0)  # the split's count no longer adds up
    manifest["splits"]["unlabeled"]["count"] -= 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    # The recorded order is a permutation of the split's count, so the first shard read no
    # longer matches it (were the order the identity, shard 15 would hold a sample too many).
    with pytest.raises(ValueError, match=r"unlabeled-0000\d\d.tar: .*not the manifest's"):
        _consume(stream(root, num_workers=0))


# ---------------------------------------------------------------------------------------------
# Two processes (gloo): disjoint shards per rank, each sample once per epoch, equal steps.

WORLD = 2




def _rank_main(rank: int, root: str, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    # G = 2 ranks * 2 workers = 4; per worker and epoch: 4 unlabeled shards (16 samples, 4
    # batches of 4), 2 labeled shards (8 samples, 4 batches of 2): 8 steps per rank and epoch.
    s = build_train_stream(
        "webdataset",
        root,
        labeled_batch=2,
        unlabeled_batch=4,
        seed=3,
        rank=rank,
        world_size=WORLD,
        num_workers=2,
        order="stream",
        shuffle_buffer=6,
    )
    steps = 0
    unl, unl_labels, lab = [], [], []
    for b in s:
        unl += b.unlabeled_index.tolist()
        unl_labels += b.unlabeled_labels.tolist()
        lab += b.labels.tolist()
        steps += 1
        if steps == 8:
            break
    mine = {"unl": unl, "unl_labels": unl_labels, "lab": lab, "steps": steps}
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, mine)  # both ranks must get here: no one starved
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_disjoint_shards_cover_the_epoch(dataset, tmp_path):
    root, arrays = dataset
    out = tmp_path / "out.json"
    ctx = mp.start_processes(
        _rank_main,
        args=(str(root), free_port(), str(out)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 90
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed stream hung")
    r0, r1 = json.loads(out.read_text())
    assert r0["steps"] == r1["steps"] == 8
    assert len(r0["unl"]) == len(r1["unl"]) == SIZES["unlabeled"] // WORLD
    shards0 = set(shard_of(root, "unlabeled", r0["unl"]).tolist())
    shards1 = set(shard_of(root, "unlabeled", r1["unl"]).tolist())
    assert not shards0 & shards1 and len(shards0) == len(shards1) == 8
    y_u = arrays["unlabeled"][1]
    pairs = list(zip(r0["unl"] + r1["unl"], r0["unl_labels"] + r1["unl_labels"]))
    assert sorted(pairs) == sorted(enumerate(y_u.tolist()))
    assert sorted(r0["lab"] + r1["lab"]) == sorted(arrays["labeled"][1].tolist())
