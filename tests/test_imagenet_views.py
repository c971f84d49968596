"""data.view_rule=authors_imagenet: the authors' ImageNet views (shorter side resized with the
aspect ratio kept, an independent random crop per view, the centre crop for evaluation) on
non-square images: the reader's crops are exact windows of the resized image, and the trainer
flips, RandAugments (no Cutout) and splits them."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bmb.config import ConfigError, load_config
from pipelines import build_eval_source, build_train_stream
from pipelines.augment import ViewMaker
from pipelines.augment import authors as AU
from pipelines.imagenet_views import ImageNetViews, crop_corners, decode_views, resized_size
from shards.format import load_manifest

RESIZE, CROP = 48, 40
SIZES = [(60, 100), (90, 50), (64, 64), (49, 130), (75, 61)]  # (h, w): landscape, portrait, square


def _picture(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth colours + noise: every window of the resized image is distinct."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1)
    return np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def _reference_resize(arr: np.ndarray) -> np.ndarray:
    """torchvision Resize(RESIZE) on PIL: shorter side RESIZE, longer int(RESIZE * long / short)."""
    h, w = arr.shape[:2]
    size = (int(RESIZE * w / h), RESIZE) if h <= w else (RESIZE, int(RESIZE * h / w))
    return np.asarray(Image.fromarray(arr).resize(size, Image.BILINEAR))


def _locate(window: np.ndarray, image: np.ndarray) -> tuple[int, int]:
    """The one (top, left) where ``window`` equals a window of ``image`` exactly."""
    c = window.shape[0]
    hits = [(t, s) for t in range(image.shape[0] - c + 1) for s in range(image.shape[1] - c + 1)
            if np.array_equal(image[t : t + c, s : s + c], window)]
    assert len(hits) == 1, f"{len(hits)} matching windows"
    return hits[0]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_resized_size_keeps_the_aspect_ratio_as_torchvision():
    assert resized_size(375, 500, 256) == (256, 341)  # int(256 * 500 / 375) = 341
    assert resized_size(500, 375, 256) == (341, 256)
    assert resized_size(300, 300, 256) == (256, 256)


@pytest.mark.parametrize("h,w", SIZES)
def test_decoded_views_are_exact_windows_of_the_resized_image(h, w):
    arr = _picture(h, w, seed=h * w)
    ref = _reference_resize(arr)
    assert min(ref.shape[:2]) == RESIZE
    views = ImageNetViews(resize=RESIZE, crop=CROP, crops=3, stream="unlabeled")
    strip = decode_views(_png(arr), views, np.random.default_rng(0))
    assert strip.shape == (CROP, 3 * CROP, 3)
    corners = [_locate(strip[:, j * CROP : (j + 1) * CROP], ref) for j in range(3)]
    for t, s in corners:
        assert 0 <= t <= ref.shape[0] - CROP and 0 <= s <= ref.shape[1] - CROP
    centre = decode_views(_png(arr), ImageNetViews(resize=RESIZE, crop=CROP), None)
    assert centre.shape == (CROP, CROP, 3)
    # torchvision CenterCrop: round((size - crop) / 2)
    assert _locate(centre, ref) == (round((ref.shape[0] - CROP) / 2), round((ref.shape[1] - CROP) / 2))


def test_crop_corners_are_uniform_over_the_whole_resized_image():
    rng = np.random.default_rng(0)
    c = crop_corners(48, 106, CROP, 20000, rng)
    assert c[:, 0].min() == 0 and c[:, 0].max() == 8 and c[:, 1].min() == 0 and c[:, 1].max() == 66
    counts = np.bincount(c[:, 1], minlength=67)
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()  # flat, not a trapezoid


def _write_png_dataset(root: Path) -> dict[str, list[np.ndarray]]:
    pictures, splits = {}, {}
    for split in ("labeled", "unlabeled", "test"):
        (root / split).mkdir(parents=True)
        pictures[split] = [_picture(h, w, seed=i + 10 * len(split)) for i, (h, w) in enumerate(SIZES)]
        with tarfile.open(root / split / f"{split}-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for i, arr in enumerate(pictures[split]):
                for ext, data in (("png", _png(arr)), ("cls", str(i % 2).encode()), ("idx", str(i).encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        labels = [i % 2 for i in range(len(SIZES))]
        splits[split] = {"count": len(SIZES), "arrays": None, "ffcv": None,
                         "class_counts": [labels.count(0), labels.count(1)],
                         "shards": [{"file": f"{split}/{split}-000000.tar", "count": len(SIZES), "sha256": ""}]}
    manifest = {"format_version": 1, "tool_version": "test", "name": "views", "seed": 0, "num_classes": 2,
                "class_names": ["a", "b"], "image_size": None, "encoding": "png", "splits": splits,
                "source": None, "split_rule": None}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return pictures


def test_webdataset_reader_cuts_every_view_and_the_trainer_flips_them(tmp_path):
    pictures = _write_png_dataset(tmp_path)
    iv = ImageNetViews(resize=RESIZE, crop=CROP, seed=3)
    opts = dict(num_workers=0, imagenet_views=iv, num_strong=2)
    stream = build_train_stream("webdataset", tmp_path, labeled_batch=2, unlabeled_batch=5, **opts)
    batches = [b for _, b in zip(range(3), stream)]
    b = batches[0]
    assert b.labeled.shape == (2, 3, CROP, CROP) and b.unlabeled.shape == (5, 3, CROP, 3 * CROP)
    corners = set()
    for i, u in zip(b.unlabeled_index.tolist(), b.unlabeled):
        ref = _reference_resize(pictures["unlabeled"][i])
        strip = u.permute(1, 2, 0).numpy()
        placed = [_locate(strip[:, j * CROP : (j + 1) * CROP], ref) for j in range(3)]
        corners |= {(i, p) for p in placed}
        if ref.shape[1] - CROP > 20:  # room to move: the three views are cropped independently
            assert len(set(placed)) > 1
    assert len(corners) > 5
    # Same seed, same batch number: the same crops (a resumed run, another worker).
    again = next(iter(build_train_stream("webdataset", tmp_path, labeled_batch=2, unlabeled_batch=5, **opts)))
    assert torch.equal(again.unlabeled, b.unlabeled) and not torch.equal(batches[1].unlabeled, b.unlabeled)
    x, _ = next(iter(build_eval_source("webdataset", tmp_path, "test", batch_size=5, num_workers=0,
                                       imagenet_views=iv)))
    for i, img in enumerate(x):
        ref = _reference_resize(pictures["test"][i])
        assert _locate(img.permute(1, 2, 0).numpy(), ref) == (round((ref.shape[0] - CROP) / 2),
                                                               round((ref.shape[1] - CROP) / 2))

    # The trainer: weak = the first crop, flipped or not; strong = the others, RandAugment then flip.
    vm = ViewMaker(image_size=CROP, view_rule="authors_imagenet", policy="authors", num_ops=3, cutout_mode="none")
    wl, wu, strong = vm.uint8_views(b.labeled, b.unlabeled, torch.Generator().manual_seed(0))
    for got, want in ((wl, b.labeled), (wu, b.unlabeled[..., :CROP])):
        for g, w in zip(got, want):
            assert torch.equal(g, w) or torch.equal(g, w.flip(-1))
    assert any(not torch.equal(g, w) for g, w in zip(wu, b.unlabeled[..., :CROP]))  # some flipped
    segments = torch.cat([b.unlabeled[..., CROP : 2 * CROP], b.unlabeled[..., 2 * CROP :]])
    g = torch.Generator().manual_seed(0)
    vm_weak_draws = ViewMaker(image_size=CROP, view_rule="authors_imagenet", policy="authors", num_ops=3,
                              cutout_mode="none", num_strong=0)
    vm_weak_draws.uint8_views(b.labeled, b.unlabeled[..., :CROP], g)
    augmented = AU.apply_authors_rand_augment(segments, AU.sample_authors_rand_augment(10, g, num_ops=3))
    for s, a in zip(torch.cat(strong), augmented):
        assert torch.equal(s, a) or torch.equal(s, a.flip(-1))


def test_view_rule_needs_a_reader_that_cuts():
    with pytest.raises(ConfigError, match="data.backend=tensor"):
        load_config(None, ["data.dataset=x", "data.view_rule=authors_imagenet", "data.backend=tensor"])
    with pytest.raises(ConfigError, match="data.crop=rrc"):
        load_config(None, ["data.dataset=x", "data.view_rule=authors_imagenet", "data.backend=webdataset",
                           "data.crop=rrc"])
    cfg = load_config(None, ["data.dataset=x", "data.view_rule=authors_imagenet", "data.backend=webdataset"])
    assert ViewMaker.config_kwargs(cfg)["view_rule"] == "authors_imagenet"
    with pytest.raises(ValueError, match="reader-cut crops"):
        ViewMaker(image_size=CROP, view_rule="authors_imagenet").uint8_views(
            torch.zeros(2, 3, CROP, CROP, dtype=torch.uint8), torch.zeros(2, 3, CROP, CROP, dtype=torch.uint8),
            torch.Generator())


@pytest.mark.filterwarnings("ignore:.*stored in index .class. order")
def test_dali_reader_cuts_the_same_geometry(tmp_path):
    pytest.importorskip("nvidia.dali")
    pictures = _write_png_dataset(tmp_path)
    iv = ImageNetViews(resize=RESIZE, crop=CROP, seed=3)
    opts = dict(num_threads=1, decode_device="cpu", imagenet_views=iv, num_strong=2)
    b = next(iter(build_train_stream("dali", tmp_path, labeled_batch=2, unlabeled_batch=5, **opts)))
    assert b.labeled.shape == (2, 3, CROP, CROP) and b.unlabeled.shape == (5, 3, CROP, 3 * CROP)

    def nearest_window(window: np.ndarray, image: np.ndarray) -> tuple[tuple[int, int], float, float]:
        """Best and second-best mean |difference| over all windows: DALI's resampling is not PIL's,
        so the window is the one that is close while every other is far."""
        scores = sorted((np.abs(image[t : t + CROP, s : s + CROP].astype(int) - window).mean(), (t, s))
                        for t in range(image.shape[0] - CROP + 1) for s in range(image.shape[1] - CROP + 1))
        return scores[0][1], scores[0][0], scores[1][0]

    placed = []
    for i, u in zip(b.unlabeled_index.tolist(), b.unlabeled):
        ref = _reference_resize(pictures["unlabeled"][i])
        strip = u.permute(1, 2, 0).numpy().astype(int)
        for j in range(3):
            where, best, second = nearest_window(strip[:, j * CROP : (j + 1) * CROP], ref)
            assert best < 3 < second, (i, j, best, second)  # a window of the aspect-kept resize
            placed.append(where)
    assert len(set(placed)) > 5
    x, _ = next(iter(build_eval_source("dali", tmp_path, "test", batch_size=5, num_threads=1,
                                       decode_device="cpu", imagenet_views=iv)))
    for i, img in enumerate(x):
        ref = _reference_resize(pictures["test"][i])
        where, best, _ = nearest_window(img.permute(1, 2, 0).numpy().astype(int), ref)
        assert best < 3 and where == (round((ref.shape[0] - CROP) / 2), round((ref.shape[1] - CROP) / 2))


def test_training_runs_end_to_end_with_reader_cut_views_and_the_authors_policy(tmp_path):
    """A few steps of launch/train.py on the variable-size PNG dataset: the strips reach the trainer,
    ViewMaker splits them, evaluation gets the centre crops, the warm-up bank fill runs."""
    data = tmp_path / "data"
    _write_png_dataset(data)
    _train_a_few_steps(tmp_path, data, "data.backend=webdataset", "data.workers=0")


def _train_a_few_steps(tmp_path: Path, data: Path, *backend: str) -> None:
    from launch import train

    args = ["model.encoder=small", "model.width=8", "model.init=authors", *backend,
            f"data.dataset={data}", f"data.image_size={CROP}", f"data.load_size={RESIZE}",
            "data.view_rule=authors_imagenet", "data.rand_augment=authors", "data.cutout=none",
            "data.eval_batch=5", "method.bank_view=weak", "method.refresh_after_warmup=false",
            "method.warmup_epochs=1", "method.threshold=0.3", "method.bank_size=8", "method.get_num=4",
            "train.labeled_batch=2", "train.unlabeled_batch=3", "train.iters_per_epoch=2", "train.epochs=2",
            "train.eval_every=2", "train.checkpoint_every=100", "train.progress=false", "train.threads=1",
            "train.eval_protocol=best_test", "train.trackers=[]", f"train.out_dir={tmp_path}", "name=r"]
    assert train.main(args) == 0
    final = json.loads((tmp_path / "r" / "final.json").read_text())
    assert final["steps"] == 4 and "best TEST top-1" in final["protocol"]


@pytest.fixture(scope="module")
def jpeg_lt(tmp_path_factory) -> tuple[Path, dict[int, bytes]]:
    """A non-square JPEG dataset built by ``bmb-shards imagenet-mismatch --formats wds,ffcv``
    (2 classes: 4 labeled, 8 unlabeled (the labeled among them) and 3 test images each);
    returns the directory and each unlabeled index's JPEG bytes as the tars hold them."""
    pytest.importorskip("ffcv.writer", exc_type=ImportError)
    from shards.cli import main
    from shards.format import iter_tar_samples

    base = tmp_path_factory.mktemp("ffcv_views")
    for k, wnid in enumerate(("n01000000", "n02000000")):
        for part, n in (("train", 8), ("val", 3)):
            (base / "src" / part / wnid).mkdir(parents=True)
            for i in range(n):
                h, w = SIZES[(i + k) % len(SIZES)]
                Image.fromarray(_picture(h, w, seed=100 * k + i + 50 * (part == "val"))).save(
                    base / "src" / part / wnid / f"{wnid}_{i}.JPEG", quality=95)
    out = base / "d"
    assert main(["imagenet-mismatch", "--source", str(base / "src"), "--n1", "4", "--m1", "4", "--gamma-l", "1",
                 "--gamma-u", "1", "--formats", "wds,ffcv", "--out", str(out), "--no-progress",
                 "--workers", "1"]) == 0
    jpegs = {int(m["idx"]): m["jpg"] for f in sorted((out / "unlabeled").glob("*.tar"))
             for _, m in iter_tar_samples(f)}
    return out, jpegs


def _decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def test_ffcv_reader_cuts_the_webdataset_crops(jpeg_lt, tmp_path_factory):
    """FFCV (the .beton's re-encoded JPEGs) and webdataset (the original JPEGs): same samples,
    same crop places per batch and row, at any world size and after a resume; the crops are
    exact windows of the aspect-kept resize of the image the .beton stores (no Cutout)."""
    from pipelines.ffcv_views import BetonImages

    root, jpegs = jpeg_lt
    iv = ImageNetViews(resize=RESIZE, crop=CROP, seed=5)
    opts = dict(num_workers=2, imagenet_views=iv, num_strong=2)

    def batches(backend: str, n: int, **kw) -> list:
        kw = {**opts, **kw} if backend == "ffcv" else {**opts, "num_workers": 0, **kw}
        stream = build_train_stream(backend, root, labeled_batch=2, unlabeled_batch=kw.pop("ub", 4), seed=1, **kw)
        return [b for _, b in zip(range(n), stream)]

    ff, wd = batches("ffcv", 3), batches("webdataset", 3)
    stored = BetonImages(root / load_manifest(root)["splits"]["unlabeled"]["ffcv"]["file"])
    worst = 0
    for f, w in zip(ff, wd):
        assert f.labeled.shape == (2, 3, CROP, CROP) and f.unlabeled.shape == (4, 3, CROP, 3 * CROP)
        assert torch.equal(f.unlabeled_index, w.unlabeled_index) and torch.equal(f.labels, w.labels)
        assert torch.equal(f.unlabeled_labels, w.unlabeled_labels)
        for i, fs, ws in zip(f.unlabeled_index.tolist(), f.unlabeled, w.unlabeled):
            ref_f = _reference_resize(_decoded(stored.stored(i)[3].tobytes()))  # the image the .beton holds
            ref_w = _reference_resize(_decoded(jpegs[i]))
            assert ref_f.shape == ref_w.shape and min(ref_f.shape[:2]) == RESIZE  # aspect kept
            fs, ws = fs.permute(1, 2, 0).numpy(), ws.permute(1, 2, 0).numpy()
            for j in range(3):
                seg = np.s_[:, j * CROP : (j + 1) * CROP]
                t, s = _locate(fs[seg], ref_f)
                assert 0 <= t <= ref_f.shape[0] - CROP and 0 <= s <= ref_f.shape[1] - CROP
                assert (t, s) == _locate(ws[seg], ref_w)  # the webdataset reader's crop place
            worst = max(worst, int(np.abs(fs.astype(int) - ws).max()))
    assert 0 < worst < 32  # pixels differ by the .beton's JPEG re-encoding only
    # Resume: the stream restored after one step continues with the same crops.
    s1 = build_train_stream("ffcv", root, labeled_batch=2, unlabeled_batch=4, seed=1, **opts)
    it = iter(s1)
    next(it)
    s2 = build_train_stream("ffcv", root, labeled_batch=2, unlabeled_batch=4, seed=1, **opts)
    s2.load_state_dict(s1.state_dict())
    resumed = next(iter(s2))
    assert torch.equal(resumed.unlabeled, ff[1].unlabeled) and torch.equal(resumed.labeled, ff[1].labeled)
    assert not torch.equal(ff[0].unlabeled, ff[1].unlabeled)
    # World size 2: rank r's rows are rows 2r, 2r + 1 of the global batch, with their crops.
    parts = [batches("ffcv", 2, ub=2, rank=r, world_size=2, num_workers=1)[1].unlabeled for r in (0, 1)]
    assert torch.equal(torch.cat(parts), ff[1].unlabeled)
    with pytest.raises(ValueError, match="order='exact'"):
        build_train_stream("ffcv", root, labeled_batch=2, unlabeled_batch=4, order="quasi_random", os_cache=False,
                           **opts)
    # Evaluation: the centre crop of the aspect-kept resize.
    test = BetonImages(root / load_manifest(root)["splits"]["test"]["ffcv"]["file"])
    x, y = next(iter(build_eval_source("ffcv", root, "test", batch_size=6, num_workers=2, imagenet_views=iv)))
    assert x.shape == (6, 3, CROP, CROP) and torch.equal(y, torch.from_numpy(test.labels[:6]))
    for i, img in enumerate(x):
        ref = _reference_resize(_decoded(test.stored(i)[3].tobytes()))
        assert _locate(img.permute(1, 2, 0).numpy(), ref) == (round((ref.shape[0] - CROP) / 2),
                                                               round((ref.shape[1] - CROP) / 2))
    # The run config reaches it: a few training steps of launch/train.py on the .beton files.
    _train_a_few_steps(tmp_path_factory.mktemp("run"), root, "data.backend=ffcv", "data.workers=1")


def test_ffcv_raw_rows_give_the_webdataset_strips_exactly(tmp_path):
    """A .beton of raw pixels (the builder's PNG rows, lossless): FFCV's strips are the webdataset
    reader's, pixel for pixel, in training and evaluation."""
    pytest.importorskip("ffcv.writer", exc_type=ImportError)
    from shards.ffcv_out import write_beton

    _write_png_dataset(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for split, info in manifest["splits"].items():
        write_beton(tmp_path / f"{split}.beton", [tmp_path / info["shards"][0]["file"]],
                    np.arange(len(SIZES)) % 2, "png", np.arange(len(SIZES)))
        info["ffcv"] = {"file": f"{split}.beton", "sha256": ""}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    iv = ImageNetViews(resize=RESIZE, crop=CROP, seed=3)
    got = {}
    for backend, workers in (("ffcv", 2), ("webdataset", 0)):
        stream = build_train_stream(backend, tmp_path, labeled_batch=2, unlabeled_batch=5, num_workers=workers,
                                    imagenet_views=iv, num_strong=2)
        (x, _), = build_eval_source(backend, tmp_path, "test", batch_size=5, num_workers=workers, imagenet_views=iv)
        got[backend] = [t for _, b in zip(range(2), stream) for t in (b.labeled, b.unlabeled)] + [x]
    for f, w in zip(got["ffcv"], got["webdataset"]):
        assert torch.equal(f, w)
