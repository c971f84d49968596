"""Views in the loader (``data.views=loader``, CPU DALI): shapes, normalisation, weak-view
geometry, per-sample RandAugment, Cutout, the refusal for other backends, and a tiny run
through launch/train.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, pipeline_def, types  # noqa: E402

from pipelines import build_train_stream  # noqa: E402
from pipelines.dali_views import DaliViews, ViewBatch, rand_augment  # noqa: E402
from tests.pipeline_data import write_fixture  # noqa: E402

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
S = 16


def unnormalize(x: torch.Tensor) -> np.ndarray:
    """float NCHW views -> uint8 NHWC pixels (asserting they were whole levels)."""
    m = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    s = torch.tensor(STD).view(1, 3, 1, 1) * 255
    px = x * s + m
    assert torch.allclose(px, px.round(), atol=2e-3), "views are not normalised uint8 levels"
    return px.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("views_tiny")
    return root, write_fixture(root, ("wds",))  # 8x8 random images


@pytest.fixture(scope="module")
def same(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """16x16 images, every one the same: a smooth image with values in [20, 235] (no 0, no
    127, no 255), so that fills and RandAugment's changes are visible."""
    from shards.writer import write_dataset

    root = tmp_path_factory.mktemp("views_same")
    yy, xx = np.mgrid[0:S, 0:S]
    img = np.stack([20 + 13 * xx, 20 + 13 * yy, 235 - 6 * (xx + yy)], -1).astype(np.uint8)
    img[img == 127] = 126
    splits = {
        name: (np.repeat(img[None], n, 0), np.arange(n, dtype=np.int64) % 2)
        for name, n in (("labeled", 16), ("unlabeled", 64), ("test", 4))
    }
    write_dataset(root, name="same", class_names=["a", "b"], splits=splits, formats=("wds",),
                  shard_size=64)  # fmt: skip
    return root, img


def stream(root, views, bl=4, bu=8, **kw):
    return build_train_stream("dali", root, labeled_batch=bl, unlabeled_batch=bu, seed=1,
                              num_threads=1, views=views, **kw)  # fmt: skip


def crops(img: np.ndarray, size: int, p: int) -> np.ndarray:
    """Every flipped/shifted reflect-padded ``size`` crop of ``img`` (HWC): (n, size, size, 3)."""
    h, w, _ = img.shape
    pad = np.pad(img, ((p, p), (p, p), (0, 0)), mode="reflect")
    t, left = (h - size) // 2, (w - size) // 2
    out = [pad[t + dy : t + dy + size, left + dx : left + dx + size] for dy in range(2 * p + 1)
           for dx in range(2 * p + 1)]  # fmt: skip
    out = np.stack(out)
    return np.concatenate([out, out[:, :, ::-1]])


def test_shapes_dtypes_and_weak_views_are_shifted_flipped_crops(tiny):
    root, arrays = tiny
    k = 3
    v = DaliViews(image_size=8, num_strong=k, mean=MEAN, std=STD)
    it = iter(stream(root, v))
    x_u, y_u = arrays["unlabeled"]
    x_l = arrays["labeled"][0]
    shifted = 0
    for _ in range(3):
        b = next(it)
        assert isinstance(b, ViewBatch)
        lw, uw, strong = b.views
        assert lw.shape == (4, 3, 8, 8) and uw.shape == (8, 3, 8, 8) and len(strong) == k
        assert all(s.shape == (8, 3, 8, 8) for s in strong)
        assert all(t.dtype == torch.float32 and t.is_contiguous() for t in (lw, uw, *strong))
        assert b.labels.shape == (4,) and b.unlabeled_index.shape == (8,)
        i = b.unlabeled_index.numpy()
        assert np.array_equal(b.unlabeled_labels.numpy(), y_u[i])
        for view, src in zip(unnormalize(uw), x_u[i]):  # p = round(8 / 8) = 1
            cands = crops(src, 8, 1)
            hit = [j for j, c in enumerate(cands) if np.array_equal(view, c)]
            assert hit, "a weak view is not a flipped/shifted crop of its image"
            shifted += hit[0] % 9 != 4  # not the centred crop
        for view in unnormalize(lw):  # labeled samples carry no index: any labeled image
            assert any((crops(src, 8, 1) == view).all((1, 2, 3)).any() for src in x_l)
        for s in strong:  # RandAugment + Cutout stay within uint8 levels, normalised alike
            px = unnormalize(s)
            assert px.min() >= 0 and px.max() <= 255
    assert shifted >= 8  # the shifts are random (1 in 9 of 24 views is centred by chance)


def test_views_read_the_same_samples_as_the_uint8_path(tiny):
    root, _ = tiny
    a = iter(stream(root, DaliViews(image_size=8, num_strong=1, mean=MEAN, std=STD)))
    b = iter(stream(root, None))
    for _ in range(3):
        x, y = next(a), next(b)
        assert torch.equal(x.unlabeled_index, y.unlabeled_index)
        assert torch.equal(x.labels, y.labels)


@pytest.mark.gpu
def test_gpu_views_stay_on_the_gpu_and_are_shifted_flipped_crops(tiny):
    """``mixed`` decode: every view is made and normalised on the GPU (never on the host)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    root, arrays = tiny
    v = DaliViews(image_size=8, num_strong=2, mean=MEAN, std=STD)
    it = iter(stream(root, v, device="cuda"))
    x_u = arrays["unlabeled"][0]
    for _ in range(3):
        b = next(it)
        lw, uw, strong = b.views
        assert all(t.is_cuda and t.dtype == torch.float32 for t in (lw, uw, *strong))
        assert lw.shape == (4, 3, 8, 8) and uw.shape == (8, 3, 8, 8) and len(strong) == 2
        i = b.unlabeled_index.cpu().numpy()
        for view, src in zip(unnormalize(uw.cpu()), x_u[i]):
            assert (crops(src, 8, 1) == view).all((1, 2, 3)).any()
        for s in strong:
            unnormalize(s.cpu())


def test_rrc_views_resize_within_the_source_range(tiny):
    root, arrays = tiny
    v = DaliViews(image_size=6, crop="rrc", num_strong=1, mean=MEAN, std=STD)
    b = next(iter(stream(root, v)))
    lw, uw, strong = b.views
    assert lw.shape == (4, 3, 6, 6) and uw.shape == (8, 3, 6, 6) and strong[0].shape == (8, 3, 6, 6)
    src = arrays["unlabeled"][0][b.unlabeled_index.numpy()]
    px = unnormalize(uw).astype(int)
    lo, hi = src.min((1, 2))[:, None, None, :], src.max((1, 2))[:, None, None, :]
    assert ((px >= lo) & (px <= hi)).all()  # bilinear: never outside the image's own range


def test_strong_views_of_identical_images_differ_per_sample(same):
    root, img = same
    # No translation: a weak view is the image or its mirror image, nothing else.
    v = DaliViews(image_size=S, num_strong=2, mean=MEAN, std=STD, translate=0.0)
    b = next(iter(stream(root, v, bu=32)))
    weak = unnormalize(b.views[1])
    plain = [img, img[:, ::-1]]
    assert all(any(np.array_equal(w, p) for p in plain) for w in weak)
    for s in b.views[2]:
        px = unnormalize(s)
        distinct = {p.tobytes() for p in px}
        assert len(distinct) >= 24, len(distinct)  # 32 identical inputs, per-sample ops
    a, c = (unnormalize(s) for s in b.views[2])
    assert sum(not np.array_equal(x, y) for x, y in zip(a, c)) >= 24  # the K views differ too


@pipeline_def(batch_size=64, num_threads=1, device_id=None, seed=5, enable_conditionals=True)
def _ra_pipe(img: np.ndarray):
    x = types.Constant(img, device="cpu", layout="HWC")
    x = fn.cast(x, dtype=types.UINT8)
    return rand_augment(fn.copy(x), 1, S)


def test_one_batch_gets_different_ops(same):
    """Identical inputs, one RandAugment op each: some samples keep the image (identity,
    posterize 8 bits, solarize above the maximum), some get a geometric op (black fill),
    some a colour op (changed, no black fill) -- the op is drawn per sample."""
    _, img = same
    p = _ra_pipe(img)
    p.build()
    (out,) = p.run()
    x = np.asarray(out.as_tensor())
    kinds = {"unchanged": 0, "geometric": 0, "colour": 0}
    for s in x:
        if np.array_equal(s, img):
            kinds["unchanged"] += 1
        elif (s == 0).all(-1).any():
            kinds["geometric"] += 1
        else:
            kinds["colour"] += 1
    assert all(n >= 3 for n in kinds.values()), kinds


def test_cutout_is_one_gray_square_up_to_half_the_side(same):
    root, img = same
    v = DaliViews(image_size=S, num_strong=1, mean=MEAN, std=STD, translate=0.0, num_ops=0)
    b = next(iter(stream(root, v, bu=32)))
    sides = []
    for s in unnormalize(b.views[2][0]):
        base = (
            img if (s == img).all(-1).sum() >= (s == img[:, ::-1]).all(-1).sum() else img[:, ::-1]
        )
        diff = (s != base).any(-1)
        assert (s[diff] == 127).all()
        if diff.any():
            rows, cols = np.where(diff.any(1))[0], np.where(diff.any(0))[0]
            assert diff[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()  # one rectangle
            sides.append(max(len(rows), len(cols)))
    assert sides and max(sides) <= S // 2 - 1 and len(set(sides)) > 2


def test_resume_continues_the_same_views(tiny):
    root, _ = tiny
    v = DaliViews(image_size=8, num_strong=2, mean=MEAN, std=STD)
    s = stream(root, v)
    it = iter(s)
    next(it)
    state = s.state_dict()
    want = next(it).views
    s2 = stream(root, v)
    s2.load_state_dict(state)
    got = next(iter(s2)).views
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(torch.equal(a, b) for a, b in zip(got[2], want[2]))


# ----------------------------------------------------------------------------- the trainer

TINY = [
    "model.encoder=small", "model.width=8", "train.labeled_batch=16", "train.unlabeled_batch=16",
    "train.iters_per_epoch=4", "train.epochs=1", "train.eval_every=4", "train.checkpoint_every=100",
    "train.log_every=2", "train.progress=false", "method.warmup_epochs=0", "method.threshold=0.15",
    "method.bank_size=32", "method.get_num=16", "data.eval_batch=64", "train.threads=1",
    "data.workers=1",
]  # fmt: skip
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "launch", "configs", "demo.yaml")  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from shards import cli as shards_cli

    out = tmp_path_factory.mktemp("views_demo") / "demo"
    assert shards_cli.main(["demo", "--out", str(out), "--n1", "20", "--m1", "40", "--gamma-l", "10",
                            "--gamma-u", "10", "--test-per-class", "4", "--formats", "wds",
                            "--workers", "1", "--no-progress"]) == 0  # fmt: skip
    return out


def test_train_py_runs_with_loader_views(demo, tmp_path, monkeypatch):
    from bmb.trainer import Trainer
    from launch import train

    seen = []
    step = Trainer.train_step

    def spy(self, batch):
        seen.append(type(batch).__name__)
        return step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", spy)
    code = train.main(["--config", CONFIG, *TINY, f"data.dataset={demo}", f"train.out_dir={tmp_path}",
                       "name=r", "data.backend=dali", "data.views=loader"])  # fmt: skip
    assert code == 0
    final = json.loads((tmp_path / "r" / "final.json").read_text())
    assert final["steps"] == 4 and 0.0 <= final["top1"] <= 1.0
    assert seen == ["ViewBatch"] * 4  # the engine got the loader's views


@pytest.mark.parametrize("backend", ["tensor", "webdataset"])
def test_loader_views_refused_for_other_backends(demo, tmp_path, backend, capsys):
    from launch import train

    code = train.main(["--config", CONFIG, *TINY, f"data.dataset={demo}", f"train.out_dir={tmp_path}",
                       "name=r", f"data.backend={backend}", "data.views=loader"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "data.views=loader needs data.backend=dali" in err and f"data.backend={backend}" in err
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- per-op fidelity

_SAME_UP_TO_SIGN = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_each_op_matches_viewmakers_kernel(device):
    """Every DALI op at a given bin against ViewMaker's kernel at that bin's magnitude: the
    geometric ops, solarize, posterize, color and brightness pixel for pixel (shears and
    translations: up to the sign of the magnitude -- the ranges are symmetric), contrast all
    but an ulp's worth, autocontrast within one level (DALI rounds where PIL truncates),
    sharpness within one
    level inside the 1-px border (PIL leaves the border, DALI filters it), equalize only run
    (OpenCV's table; docs/fidelity.md)."""
    from pipelines.augment import MAGNITUDE_RANGES, OPS, apply_rand_augment
    from pipelines.dali_views import MAGNITUDE_BINS, _midpoints, suite

    assert len(suite(24)) == len(OPS)  # the loader's ops are ours, in our order
    if device == "gpu" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    n, size, bins = 10, 24, MAGNITUDE_BINS
    g = torch.Generator().manual_seed(0)
    low = torch.randint(0, 256, (n, 3, 4, 4), generator=g).float()
    imgs = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")
    imgs = imgs.round().clamp(0, 255).to(torch.uint8)
    hwc = imgs.permute(0, 2, 3, 1).contiguous().numpy()
    idx = np.linspace(0, bins - 1, n).round().astype(np.int32)
    ops = suite(size)
    for j, name in enumerate(OPS):

        @pipeline_def(batch_size=n, num_threads=1, device_id=0 if device == "gpu" else None, seed=0)
        def p(op):
            x = fn.external_source(source=lambda: list(hwc), layout="HWC")
            x = x.gpu() if device == "gpu" else x
            b = fn.external_source(source=lambda: [np.array(v, np.int32) for v in idx])
            return op(x, magnitude_bin=b, num_magnitude_bins=bins, fill_value=0,
                          interp_type=types.INTERP_NN)  # fmt: skip

        pipe = p(ops[j])
        pipe.build()
        (out,) = pipe.run()
        out = out.as_cpu() if device == "gpu" else out
        got = torch.from_numpy(np.asarray(out.as_tensor())).permute(0, 3, 1, 2).int()
        if name == "posterize":
            mags = torch.from_numpy(4 + idx * 5 // bins).float()
        elif name in MAGNITUDE_RANGES:
            mags = torch.from_numpy(_midpoints(*MAGNITUDE_RANGES[name], bins)[idx])
        else:
            mags = torch.zeros(n)

        def ours(m, j=j):
            return apply_rand_augment(imgs, torch.full((n, 1), j), m[:, None]).int()

        diff = (got - ours(mags)).abs()
        if name == "rotate":  # the same angle convention
            assert diff.max() == 0, name
        elif name in _SAME_UP_TO_SIGN:  # DALI's forward map: the magnitude's sign flips
            assert torch.equal(got, ours(-mags)), name
        elif name in ("identity", "solarize", "posterize", "color", "brightness"):
            assert diff.max() == 0, name
        elif name == "contrast":  # float32 vs float64 blends: rarely an ulp across a level
            assert diff.max() <= 1 and (diff == 0).float().mean() > 0.999, name
        elif name == "autocontrast":
            assert diff.max() <= 1, (name, diff.max())
        elif name == "sharpness":
            assert diff[..., 1:-1, 1:-1].max() <= 1, (name, diff.max())
        else:
            assert name == "equalize" and got.shape == (n, 3, size, size)


def test_every_preset_makes_its_views_in_the_trainer():
    """docs/fidelity.md row 26: every preset uses data.views=trainer (FixMatch-exact)."""
    from bmb.config import load_config

    configs = Path(CONFIG).parent
    presets = [p for p in configs.rglob("*.yaml") if "base" not in p.relative_to(configs).parts]
    assert len(presets) > 20
    for p in presets:
        assert load_config(p).data.views == "trainer", p
    ledger = (configs.parents[1] / "docs" / "fidelity.md").read_text().replace("**", "")
    assert "Every preset uses `data.views=trainer`" in ledger
