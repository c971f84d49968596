"""Two CPU processes (gloo): ranks see disjoint samples covering the epoch, equal step counts."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.pipeline_data import FFCV, SIZES, write_fixture
from tests.ports import free_port

pytestmark = pytest.mark.dist

WORLD = 2




def _worker(rank: int, root: str, backend: str, opts: dict, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from pipelines import build_eval_source, build_train_stream

    bl, bu = 4, 5  # per-rank epochs: 12 labeled = 3 steps, 20 unlabeled = 4 steps
    s = build_train_stream(
        backend,
        root,
        labeled_batch=bl,
        unlabeled_batch=bu,
        seed=4,
        rank=rank,
        world_size=WORLD,
        **opts,
    )
    it = iter(s)
    batches = [next(it) for _ in range(4)]
    unl = torch.cat([b.unlabeled_index for b in batches]).tolist()
    lab = torch.cat([b.labels for b in batches[:3]]).tolist()
    ev = build_eval_source(backend, root, "test", batch_size=3, rank=rank, world_size=WORLD, **opts)
    ev_labels, ev_steps = [], 0
    for _x, y, valid in ev:
        ev_labels += y[valid].tolist()
        ev_steps += 1
    # The collective itself checks that both ranks reach it (equal step counts don't hang).
    mine = {"unl": unl, "lab": lab, "ev_labels": ev_labels, "ev_steps": ev_steps, "ev_len": len(ev)}
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def run_two_ranks(root: Path, backend: str, opts: dict, out: Path, timeout: float = 90) -> list:
    ctx = mp.start_processes(
        _worker,
        args=(str(root), backend, opts, free_port(), str(out)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{backend}: distributed run hung for {timeout}s")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_dist")
    formats = ("wds", "arrays") + (("ffcv",) if importlib.util.find_spec("ffcv") else ())
    arrays = write_fixture(root, formats)
    return root, arrays


@pytest.mark.parametrize(
    "backend,opts",
    [
        ("tensor", {}),
        ("webdataset", {"num_workers": 1}),
        pytest.param("ffcv", {"num_workers": 1}, marks=FFCV),
        pytest.param(
            "dali",
            {"num_threads": 1},
            marks=pytest.mark.skipif(importlib.util.find_spec("nvidia") is None, reason="no dali"),
        ),
    ],
)
def test_two_ranks_disjoint_cover_equal_steps(dataset, backend, opts, tmp_path):
    root, arrays = dataset
    r0, r1 = run_two_ranks(root, backend, opts, tmp_path / "out.json")
    # Unlabeled: each rank's 4 steps are exactly its half of epoch 0.
    assert len(r0["unl"]) == len(r1["unl"]) == SIZES["unlabeled"] // WORLD
    assert not set(r0["unl"]) & set(r1["unl"])
    assert sorted(r0["unl"] + r1["unl"]) == list(range(SIZES["unlabeled"]))
    # Labeled: the two halves of epoch 0 together have exactly the split's label multiset.
    assert sorted(r0["lab"] + r1["lab"]) == sorted(arrays["labeled"][1].tolist())
    # Eval: equal steps, valid entries cover the test split once.
    assert r0["ev_steps"] == r1["ev_steps"] == r0["ev_len"] == r1["ev_len"] == 3
    assert sorted(r0["ev_labels"] + r1["ev_labels"]) == sorted(arrays["test"][1].tolist())
