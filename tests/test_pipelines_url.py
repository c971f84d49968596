"""``data.dataset`` as a URL (``webdataset`` backend, ``order="stream"``), over a real HTTP server.

A demo dataset built with ``bmb-shards demo`` is served by :class:`http.server.ThreadingHTTPServer`
on 127.0.0.1 (a free port, a background thread, shut down at the end of the module). Read from
``http://127.0.0.1:PORT/demo`` it must give exactly the batches the local files give.
"""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import threading

import numpy as np
import pytest
import torch

from launch import train
from pipelines import build_eval_source, build_train_stream
from shards.format import ManifestError, join_url, load_manifest
from tests.demo_data import CONFIG, TINY, build_small_demo

SHARD = 50  # labeled 131 -> 3 shards, unlabeled 405 -> 9, test 200 -> 4


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no request log on stderr
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(local dataset dir, its URL, the server's base URL)``; the server also has ``broken``
    (a shard missing) and ``cut`` (a shard cut short)."""
    top = tmp_path_factory.mktemp("served")
    # disjoint: the epoch arithmetic below counts 405 unlabeled samples
    build_small_demo(top / "demo", "wds", "--shard-size", str(SHARD), "--split-rule", "disjoint")
    shutil.copytree(top / "demo", top / "broken")
    manifest = json.loads((top / "broken" / "manifest.json").read_text())
    (top / "broken" / manifest["splits"]["unlabeled"]["shards"][1]["file"]).unlink()
    shutil.copytree(top / "demo", top / "cut")
    cut = top / "cut" / manifest["splits"]["labeled"]["shards"][0]["file"]
    cut.write_bytes(cut.read_bytes()[:3000])  # cut short inside a member
    handler = functools.partial(_Quiet, directory=str(top))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield top / "demo", f"{base}/demo", base
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def stream(root, **kw):
    opts = dict(labeled_batch=8, unlabeled_batch=15, seed=3, order="stream", shuffle_buffer=20,
                num_workers=0)  # fmt: skip
    opts.update(kw)
    return build_train_stream("webdataset", root, **opts)


def take(s, k: int) -> list:
    it = iter(s)
    return [next(it) for _ in range(k)]


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for field in ("labeled", "labels", "unlabeled", "unlabeled_index", "unlabeled_labels"):
            assert torch.equal(getattr(x, field), getattr(y, field)), field


def test_manifest_over_http_equals_the_local_one(served):
    local, url, _ = served
    assert load_manifest(url) == load_manifest(local)


@pytest.mark.parametrize("layout", [dict(), dict(num_workers=2), dict(rank=1, world_size=2)])
def test_http_gives_the_local_batches(served, layout):
    # Same seed, rank and worker layout: the same batches in the same order, over two epochs.
    local, url, _ = served
    steps = 54  # two unlabeled epochs (405 = 27 * 15) for one rank
    if layout.get("world_size") == 2:
        steps = 12
    got, want = take(stream(url, **layout), steps), take(stream(local, **layout), steps)
    assert_same_batches(got, want)
    if not layout:  # one global worker: each epoch is 27 steps holding every sample once
        idx = torch.cat([b.unlabeled_index for b in got]).numpy()
        for epoch in range(2):
            assert sorted(idx[epoch * 405 : (epoch + 1) * 405]) == list(range(405))


def test_http_resume_is_exact(served):
    # Resume re-reads the shards from their start over HTTP and skips what was delivered.
    _, url, _ = served
    for layout in (dict(), dict(num_workers=2)):
        whole = take(stream(url, **layout), 40)
        first = stream(url, **layout)
        take(first, 31)
        again = stream(url, **layout)
        again.load_state_dict(first.state_dict())
        assert_same_batches(take(again, 9), whole[31:])


def test_http_eval_covers_the_split(served):
    local, url, _ = served

    def rows(source):
        out = []
        for x, y, *valid in source:
            keep = valid[0] if valid else torch.ones(len(y), dtype=torch.bool)
            out += [(img.numpy().tobytes(), int(lab)) for img, lab in zip(x[keep], y[keep])]
        return sorted(out)

    want = rows(build_eval_source("webdataset", local, "test", batch_size=64, num_workers=0))
    assert len(want) == 200
    assert rows(build_eval_source("webdataset", url, "test", batch_size=64)) == want
    sources = [build_eval_source("webdataset", url, "test", batch_size=64, rank=r, world_size=3)
               for r in range(3)]  # fmt: skip
    assert {len(s) for s in sources} == {2}  # ceil(200 / 3) = 67 per rank, 2 batches of 64
    assert sorted(sum((rows(s) for s in sources), [])) == want


def test_wrong_manifest_url_names_it(served):
    _, url, _ = served
    with pytest.raises(ManifestError, match=r"/nowhere/manifest\.json: cannot read.*status 22"):
        stream(url.replace("/demo", "/nowhere"))


def test_missing_shard_names_its_url(served):
    local, _, base = served
    manifest = load_manifest(local)
    missing = join_url(f"{base}/broken", manifest["splits"]["unlabeled"]["shards"][1]["file"])
    s = stream(f"{base}/broken", unlabeled_batch=50)  # the first batch reads shards 0-1
    with pytest.raises(ValueError, match=f"{missing}: cannot read.*404"):
        take(s, 12)


def test_url_needs_webdataset_stream(served):
    _, url, _ = served
    with pytest.raises(ValueError, match="order='stream'"):
        stream(url, order="index")
    with pytest.raises(ValueError, match="order='stream'"):
        build_train_stream("tensor", url, labeled_batch=8, unlabeled_batch=8)


@pytest.mark.parametrize("overrides", [["data.backend=webdataset", "data.order=index"],
                                       ["data.backend=tensor"]])  # fmt: skip
def test_train_refuses_a_url_without_stream(served, tmp_path, capsys, overrides):
    _, url, _ = served
    code = train.main(["--config", CONFIG, *TINY, f"data.dataset={url}", f"train.out_dir={tmp_path}",
                       *overrides])  # fmt: skip
    assert code == 2
    assert "data.order=stream" in capsys.readouterr().err


def test_train_from_http(served, tmp_path):
    # A short end-to-end run from the URL: training stream and evaluation both over HTTP.
    _, url, _ = served
    code = train.main(["--config", CONFIG, *TINY, f"data.dataset={url}", f"train.out_dir={tmp_path}",
                       "name=url", "data.backend=webdataset", "data.order=stream", "data.workers=0",
                       "train.epochs=1"])  # fmt: skip
    assert code == 0
    final = json.loads((tmp_path / "url" / "final.json").read_text())
    assert final["steps"] == 10 and len(final["per_class_recall"]) == 10
    assert np.isfinite(final["per_class_recall"]).all()


def test_pipe_forms_give_the_local_batches(served):
    # webdataset's ``pipe:CMD``: the file name appended to the command's last word, or put
    # where the command says ``{}``.
    local, url, _ = served
    want = take(stream(local), 30)
    assert_same_batches(take(stream(f"pipe:curl -s -f {url}"), 30), want)
    assert_same_batches(take(stream(f"pipe:cat {local}/{{}}"), 30), want)


@pytest.mark.parametrize("form", ["{base}/cut", "pipe:cat {local}/../cut/{{}}"])
def test_truncated_shard_names_its_url(served, form):
    local, _, base = served
    root = form.format(base=base, local=local)
    shard = load_manifest(local)["splits"]["labeled"]["shards"][0]["file"]
    with pytest.raises(ValueError, match=f"{re.escape(join_url(root, shard))}: truncated shard"):
        take(stream(root, labeled_batch=50), 3)  # 150 > 131 samples: every labeled shard
