"""Issue 20, the data rows: bad images on every backend (row 3), ``verify`` and manifest counts
(row 8), what a build deletes and a full disk (row 9), and the low rows (huge tar members, paths
out of the dataset, 16-bit PNGs, deep manifests, mid-run data errors).

Only names that existed before these fixes are imported at module level, so that this file
runs (and fails row by row) against the code it fixes.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import struct
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launch import train
from pipelines import build_eval_source, build_train_stream
from shards import format as fmt
from shards import tario
from shards.cli import main as shards_main
from shards.format import ManifestError, iter_tar_samples, load_manifest, validate_manifest
from shards.verify import verify_dataset
from shards.writer import write_dataset
from tests.demo_data import CONFIG, TINY, build_small_demo
from tests.shard_files import DEMO, tiny_splits

try:
    import nvidia.dali  # noqa: F401

    HAS_DALI = True
except ImportError:
    HAS_DALI = False
try:
    import ffcv  # noqa: F401

    HAS_FFCV = True
except ImportError:
    HAS_FFCV = False


def tiny(root: Path, formats=("wds",)) -> Path:
    """8x8 images, 3 classes, shards of 10 (tests/test_shards_trust.py's splits)."""
    write_dataset(root, name="t", class_names=list("abc"), splits=tiny_splits(), shard_size=10,
                  formats=formats)  # fmt: skip
    return root


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def png_header(h: int, w: int) -> bytes:
    """A PNG declaring ``h x w`` RGB pixels, with data for only its first rows (a few KB)."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    rows = zlib.compress(b"".join(b"\0" + bytes(w * 3) for _ in range(4)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))  # fmt: skip


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def replace_image(root: Path, split: str, shard: int, j: int, image: bytes) -> str:
    """Rewrite shard ``shard`` of ``split`` with sample ``j``'s image replaced (its DALI index
    and the manifest's checksums too, so only the image is wrong); returns the sample's key."""
    m = json.loads((root / "manifest.json").read_text())
    entry = m["splits"][split]["shards"][shard]
    path = root / entry["file"]
    samples = list(iter_tar_samples(path))
    with open(path, "wb") as f:
        tw = tario.TarShardWriter(f)
        for i, (key, mem) in enumerate(samples):
            tw.add(key, [("png", image if i == j else mem["png"]), ("cls", mem["cls"]), ("idx", mem["idx"])])
        tw.close()
    entry["sha256"] = sha(path)
    if entry.get("dali_index"):
        index = root / entry["dali_index"]["file"]
        index.write_text(tw.dali_index())
        entry["dali_index"]["sha256"] = sha(index)
    entry.pop("size", None)
    (root / "manifest.json").write_text(json.dumps(m))
    return samples[j][0]


def drain(source) -> None:
    for _ in source:
        pass


# ------------------------------------------------------------------------------------ row 3


@pytest.mark.skipif(not HAS_DALI, reason="no DALI")
def test_dali_garbage_image_is_a_data_error_naming_shard_and_key(tmp_path, capsys):
    data = build_small_demo(tmp_path / "d", "wds", "--shard-size", "50")
    m = load_manifest(data)
    shard = data / m["splits"]["labeled"]["shards"][0]["file"]
    # not an image at all, in the labeled split (131 samples, every one drawn in 20 steps of 16)
    key = replace_image(data, "labeled", 0, 0, bytes(range(256)) * 8)
    code = train.main(["--config", CONFIG, *TINY, f"data.dataset={data}", "data.backend=dali",
                       f"train.out_dir={tmp_path}", "name=g"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "data error: dali could not decode an image" in err and f"{shard}: sample {key!r}" in err


@pytest.mark.skipif(not HAS_DALI, reason="no DALI")
def test_dali_refuses_wrong_size_and_huge_images_before_decoding(tmp_path):
    root = tiny(tmp_path / "t")
    shard = root / load_manifest(root)["splits"]["test"]["shards"][0]["file"]
    key = replace_image(root, "test", 0, 3, png(np.zeros((10, 8, 3), np.uint8)))
    with pytest.raises(ValueError, match=rf"{shard}: sample '{key}': image is 10x8, the dataset says 8x8"):
        drain(build_eval_source("dali", root, "test", batch_size=4, max_pixels=1 << 26))
    key = replace_image(root, "test", 0, 3, png_header(30000, 30000))
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=rf"{shard}: sample '{key}': image is 30000x30000, over the limit"):
        drain(build_eval_source("dali", root, "test", batch_size=4, max_pixels=1 << 26))
    assert time.monotonic() - t0 < 20  # refused from its header: 30000 x 30000 x 3 is never decoded


def every_backend() -> list:
    return ["tensor", "webdataset",
            pytest.param("ffcv", marks=pytest.mark.skipif(not HAS_FFCV, reason="no ffcv")),
            pytest.param("dali", marks=pytest.mark.skipif(not HAS_DALI, reason="no DALI"))]  # fmt: skip


@pytest.mark.parametrize("backend", every_backend())
def test_every_backend_has_the_pixel_limit(tmp_path, backend):
    # 8x8 images (64 pixels) under max_pixels=60: refused, by a data error naming the file.
    formats = ("wds", "arrays") + (("ffcv",) if backend == "ffcv" else ())
    root = tiny(tmp_path / "t", formats)
    kw = dict(labeled_batch=4, unlabeled_batch=4, seed=0, max_pixels=60)
    if backend == "webdataset":
        kw["num_workers"] = 0
    with pytest.raises(ValueError, match=r"8x8.*(over the limit of 60 pixels|60 \(data\.max_pixels\))"):
        next(iter(build_train_stream(backend, root, **kw)))
    assert next(iter(build_train_stream(backend, root, **{**kw, "max_pixels": 64}))).labeled.shape[-1] == 8


def test_decode_reads_the_header_first():
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="30000x30000 = 900000000 pixels, over the limit of 67108864"):
        fmt.decode_image(png_header(30000, 30000))
    with pytest.raises(ValueError, match="image is 10x8, dataset says 8x8"):
        fmt.decode_image(png(np.zeros((10, 8, 3), np.uint8)), (8, 8), True)
    assert time.monotonic() - t0 < 2


# ------------------------------------------------------------------------------------ row 8


def test_verify_reports_a_shard_with_more_samples_than_listed(tmp_path):
    root = tiny(tmp_path / "t")
    m = json.loads((root / "manifest.json").read_text())
    sp = m["splits"]["labeled"]
    last = sp["shards"][-1]
    path = root / last["file"]
    samples = list(iter_tar_samples(path))
    with open(path, "wb") as f:  # the last shard gets one sample more than the manifest lists
        tw = tario.TarShardWriter(f)
        for key, mem in [*samples, samples[0]]:
            tw.add(key, [(ext, mem[ext]) for ext in ("png", "cls", "idx")])
        tw.close()
    last["sha256"] = sha(path)
    (root / "manifest.json").write_text(json.dumps(m))
    problems = verify_dataset(root)
    n = last["count"]
    assert f"{path}: {n + 1} samples, manifest says {n}" in problems
    assert shards_main(["verify", str(root), "--no-progress"]) == 1


@pytest.mark.parametrize("bad", [-1, True, 2.0, "3"])
def test_class_counts_must_be_counts(tmp_path, bad):
    root = tiny(tmp_path / "t")
    m = json.loads((root / "manifest.json").read_text())
    cc = m["splits"]["labeled"]["class_counts"]
    if bad == -1:
        cc[0], cc[1] = -1, cc[1] + cc[0] + 1  # still sums to count
    else:
        cc[0] = bad
    with pytest.raises(ManifestError, match=r"'splits\.labeled\.class_counts\[0\]' is .*expected a count >= 0"):
        validate_manifest(m, root / "manifest.json")


# ------------------------------------------------------------------------------------ row 9


def test_a_build_deletes_only_its_own_temp_files(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    (out / "labeled").mkdir(parents=True)
    mine = [out / ".notes.tmp-1", out / "labeled" / ".draft.tmp-4242"]
    for p in mine:
        p.write_text("the user's")
    # an interrupted build (progress record, our pid in it), then a leftover temp of that pid
    calls = {"n": 0}
    real_add = tario.TarShardWriter.add

    def interrupt(self, *a):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real_add(self, *a)

    monkeypatch.setattr(tario.TarShardWriter, "add", interrupt)
    assert shards_main(["demo", "--out", str(out), *DEMO]) == 130
    monkeypatch.setattr(tario.TarShardWriter, "add", real_add)
    import os

    ours = out / "labeled" / f".labeled-000003.tar.tmp-{os.getpid()}"
    ours.write_bytes(b"half a shard")  # what a kill -9 leaves
    assert shards_main(["demo", "--out", str(out), *DEMO]) == 0
    assert not ours.exists()
    assert all(p.read_text() == "the user's" for p in mine)
    assert shards_main(["demo", "--out", str(out), *DEMO, "--overwrite"]) == 0
    assert all(p.read_text() == "the user's" for p in mine)


def test_disk_full_while_writing_a_shard_names_it(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ds"
    calls = {"n": 0}
    real_add = tario.TarShardWriter.add

    def full(self, *a):
        calls["n"] += 1
        if calls["n"] == 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(self, *a)

    monkeypatch.setattr(tario.TarShardWriter, "add", full)
    assert shards_main(["demo", "--out", str(out), *DEMO]) == 2
    err = capsys.readouterr().err
    assert "disk full" in err and "labeled/labeled-000001.tar" in err
    assert not (out / "manifest.json").exists()  # nothing presented as done
    assert not list(out.rglob("*.tmp-*"))
    progress = json.loads((out / ".shards-progress.json").read_text())
    assert "labeled/labeled-000001.tar" not in progress["done"]
    monkeypatch.setattr(tario.TarShardWriter, "add", real_add)
    assert shards_main(["demo", "--out", str(out), *DEMO]) == 0  # space again: it resumes
    assert verify_dataset(out, decode=True) == []


def test_disk_full_while_writing_the_arrays_names_the_file(tmp_path, monkeypatch, capsys):
    import os

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    out = tmp_path / "ds"
    assert shards_main(["demo", "--out", str(out), *DEMO, "--formats", "wds,arrays"]) == 2
    err = capsys.readouterr().err
    assert "disk full" in err and "images.npy" in err
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.tmp-*"))


# --------------------------------------------------------------------------------- low rows


def test_a_huge_declared_member_size_is_a_named_error(tmp_path):
    root = tiny(tmp_path / "t")
    entry = load_manifest(root)["splits"]["test"]["shards"][0]
    shard = root / entry["file"]
    info = tarfile.TarInfo("00000000.png")
    info.size = 0o77777777777  # 8 GiB declared, a few bytes present
    shard.write_bytes(info.tobuf(tarfile.USTAR_FORMAT) + b"x" * 100)
    with pytest.raises(ValueError, match=r"member '00000000\.png' at byte 0 declares 8589934591 bytes, over"):
        list(iter_tar_samples(shard))
    m = json.loads((root / "manifest.json").read_text())
    m["splits"]["test"]["shards"][0]["sha256"] = sha(shard)
    (root / "manifest.json").write_text(json.dumps(m))
    assert any("declares 8589934591 bytes" in p for p in verify_dataset(root))


def test_readers_and_verify_stay_inside_the_dataset(tmp_path):
    root = tiny(tmp_path / "t")
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:SECRET:/root:/bin/sh\n" * 30)
    entry = load_manifest(root)["splits"]["labeled"]["shards"][0]
    (root / entry["file"]).unlink()
    (root / entry["file"]).symlink_to(secret)
    for order in ("index", "stream"):
        with pytest.raises(ValueError, match="leads outside the dataset") as e:
            next(iter(build_train_stream("webdataset", root, labeled_batch=4, unlabeled_batch=4,
                                         order=order, num_workers=0)))  # fmt: skip
        assert "SECRET" not in str(e.value)
    problems = verify_dataset(root, decode=True)
    assert any("leads outside the dataset" in p for p in problems)
    assert not any("SECRET" in p for p in problems)
    m = json.loads((root / "manifest.json").read_text())
    m["splits"]["labeled"]["shards"][0]["file"] = "../passwd"
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"'splits\.labeled\.shards\[0\]\.file'.*'\.\./passwd'"):
        load_manifest(root, strict=False)


def test_16_bit_pngs_are_scaled_and_verify_agrees_with_the_readers(tmp_path):
    root = tiny(tmp_path / "t")
    grey = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1000 + 500).astype(np.uint16)  # 500 .. 63500
    want = ((grey.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    key = replace_image(root, "test", 0, 0, png(grey))
    assert np.array_equal(fmt.decode_image(png(grey)), np.repeat(want[..., None], 3, axis=2))
    x, y = next(iter(build_eval_source("webdataset", root, "test", batch_size=64, num_workers=0)))
    index = int(key)
    got = x[index].permute(1, 2, 0).numpy()
    assert np.array_equal(got[..., 0], want) and got.max() < 255  # scaled, not clipped at 255
    assert verify_dataset(root, decode=True) == []


def test_a_deeply_nested_manifest_is_a_manifest_error(tmp_path):
    (tmp_path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ManifestError, match="nested too deeply"):
        load_manifest(tmp_path)
    with pytest.raises(ManifestError, match="nested too deeply"):
        load_manifest(tmp_path, strict=False)


def test_a_corrupt_shard_found_mid_run_is_the_data_error_exit(tmp_path, capsys):
    data = build_small_demo(tmp_path / "d", "wds", "--shard-size", "50")
    shard = data / load_manifest(data)["splits"]["unlabeled"]["shards"][3]["file"]
    shard.write_bytes(shard.read_bytes()[:3000])  # cut short: order=stream finds it mid-run
    code = train.main(["--config", CONFIG, *TINY, f"data.dataset={data}", "data.backend=webdataset",
                       "data.order=stream", "data.workers=0", f"train.out_dir={tmp_path}", "name=m"])  # fmt: skip
    assert code == 2
    assert f"data error: {shard}: truncated shard" in capsys.readouterr().err


def test_max_pixels_has_one_default():
    from bmb.config import DataConfig

    assert DataConfig().max_pixels == fmt.MAX_PIXELS == 1 << 26
