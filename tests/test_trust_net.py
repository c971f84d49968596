"""Issue 20, rows 1, 6 and 9 (quoting): a manifest is data. Its file names never reach a shell
unquoted and never run; network reads stall into a named error and are capped.

A hostile dataset is served by a real HTTP server on 127.0.0.1 (as in
``tests/test_pipelines_url.py``) and read through both documented ``pipe:`` forms and plain
``http://``, by ``launch/train.py`` as a user would run it.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import threading
import time

import pytest

from launch import train
from pipelines import build_train_stream
from pipelines.shard_index import rebuild_command
from shards import format as fmt
from shards.format import ManifestError, join_url, load_manifest
from tests.demo_data import CONFIG, TINY, build_small_demo

SHARD = "labeled/labeled-000000.tar"


def hostile_names(marker) -> dict[str, str]:
    """Shard names that run ``touch marker`` wherever they reach a shell, and one that curl
    would expand into three requests (``x1.tar`` .. ``x3.tar``)."""
    return {
        "semicolon": f"{SHARD}; touch {marker}; echo ",
        "dollar": f"{SHARD}$(touch {marker})",
        "backtick": f"{SHARD}`touch {marker}`",
        "glob": "labeled/x[1-3].tar",
    }


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []  # every path asked for (the curl-globbing check)
    stall_s = 15.0

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        _Handler.requests.append(self.path)
        if self.path.startswith("/stall/") or (self.path.startswith("/stalltar/") and self.path.endswith(".tar")):
            return self._stall()
        if self.path.startswith("/stalltar/"):
            self.path = self.path.replace("/stalltar/", "/", 1)
        return super().do_GET()

    def _stall(self) -> None:
        """``/stall/<ds>/<file>`` (and the tar files under ``/stalltar/``): the first 600 bytes
        of ``<ds>/<file>``, then nothing for :attr:`stall_s` seconds, then the rest."""
        path = self.translate_path("/" + self.path.split("/", 2)[2])
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:600])
        self.wfile.flush()
        time.sleep(self.stall_s)
        try:
            self.wfile.write(data[600:])
        except OSError:
            pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(top folder, base URL)``; ``top/demo`` is a small demo dataset, ``top/<case>`` a copy
    whose manifest names labeled shard 0 by a hostile name (:func:`hostile_names`)."""
    top = tmp_path_factory.mktemp("hostile")
    build_small_demo(top / "demo", "wds", "--shard-size", "50")
    for case, name in hostile_names(top / "PWNED").items():
        shutil.copytree(top / "demo", top / case)
        m = json.loads((top / case / "manifest.json").read_text())
        m["splits"]["labeled"]["shards"][0]["file"] = name
        (top / case / "manifest.json").write_text(json.dumps(m))
    handler = functools.partial(_Handler, directory=str(top))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield top, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize("case", list(hostile_names("m")))
@pytest.mark.parametrize("form", ["pipe:curl -s -f {base}/{case}", "pipe:cat {top}/{case}/{{}}"])
def test_a_hostile_manifest_runs_nothing(served, tmp_path, capsys, form, case):
    # Row 1 (critical): the run stops at the manifest with a data error naming the shard name;
    # no command of it ran, curl expanded nothing.
    top, base = served
    marker = top / "PWNED"
    name = hostile_names(marker)[case]
    _Handler.requests.clear()
    url = form.format(base=base, top=top, case=case)
    code = train.main(["--config", CONFIG, *TINY, f"data.dataset={url}", f"train.out_dir={tmp_path}",
                       "name=h", "data.backend=webdataset", "data.order=stream", "data.workers=0",
                       "train.epochs=1"])  # fmt: skip
    err = capsys.readouterr().err
    assert not marker.exists(), f"a manifest's shard name ran a command ({case}, {form})"
    assert not any("x1.tar" in p or "x2.tar" in p for p in _Handler.requests), _Handler.requests
    assert code == 2
    assert "data error" in err and name in err and "splits.labeled.shards[0].file" in err


def test_names_are_checked_where_they_are_joined():
    # The second guard: join_url itself refuses what the manifest check refuses, and a pipe:
    # command receives a checked name shell-quoted (a no-op for a safe name).
    for bad in ("../x.tar", "/etc/passwd", "a b.tar", "x.tar;id", "$(id)", "a/*.tar", "-rf",
                "http://h/x", "a\nb", ".hidden", "a/../b", "{a,b}.tar", ""):  # fmt: skip
        with pytest.raises(ValueError, match="not a relative path inside the dataset"):
            join_url("pipe:cat /d/{}", bad)
    assert join_url("pipe:cat /d/{}", SHARD) == f"pipe:cat /d/{SHARD}"
    assert join_url("http://h/ds/", SHARD) == f"http://h/ds/{SHARD}"


def test_rebuild_command_quotes_every_manifest_word(tmp_path):
    # Row 9: the class-order warning's command, pasted into a shell, runs nothing of the
    # manifest (here: every word of it run with `true` in place of bmb-shards).
    marker = tmp_path / "PWNED"
    m = {"split_rule": {"rule": "imagenet-lt", "labeled_ratio": 0.1, "max_side": f"$(touch {marker})"},
         "source": {"kind": f"`touch {marker}`", "path": f"<$(touch {marker})>"}, "seed": 0,
         "splits": {"unlabeled": {"shards": [{"count": 5}, {"count": 5}]}}}  # fmt: skip
    cmd = rebuild_command(tmp_path / "ds", m)
    assert cmd.startswith("bmb-shards ")
    subprocess.run(["sh", "-c", "true " + cmd[len("bmb-shards ") :]], cwd=tmp_path, check=False)
    assert not marker.exists(), cmd
    assert f"'<$(touch {marker})>'" in cmd and "<split-list-folder>" in cmd


def test_a_stalled_transfer_is_a_named_error(served, monkeypatch):
    # Row 6: a server that stops sending mid-file: an error naming the URL after the timeout,
    # for the manifest and for a shard read by the stream reader.
    top, base = served
    monkeypatch.setenv("BMB_READ_TIMEOUT", "2")
    t0 = time.monotonic()
    with pytest.raises(ManifestError, match=r"/stall/demo/manifest\.json: no data for 2 s"):
        load_manifest(f"{base}/stall/demo")
    assert time.monotonic() - t0 < 10
    # the manifest served whole, the shards stalled (the pipe form: the URL last)
    s = build_train_stream("webdataset", f"pipe:curl -s -f {base}/stalltar/demo", labeled_batch=8,
                           unlabeled_batch=8, seed=0, order="stream", num_workers=0)  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"/stalltar/demo/(un)?labeled/.*\.tar: no data for 2 s"):
        next(iter(s))
    assert time.monotonic() - t0 < 10


def test_manifest_reads_are_capped(served, monkeypatch, tmp_path):
    # Row 6: manifest.json over the cap is refused unread, over a URL and on disk, naming the
    # file and the cap.
    top, base = served
    monkeypatch.setattr(fmt, "MANIFEST_MAX_BYTES", 1000)
    with pytest.raises(ManifestError, match=rf"{base}/demo/manifest\.json: larger than 1000 bytes"):
        load_manifest(f"{base}/demo")
    with pytest.raises(ManifestError, match=r"demo/manifest\.json: larger than 1000 bytes"):
        load_manifest(top / "demo")
