"""Batched weak/strong views: shapes, content, per-sample randomness, determinism, PIL parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from pipelines import augment as A
from pipelines.augment import geometry, policy

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return torch.device(name)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, size, size): smooth colour fields + noise, so every op changes pixels."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(0, 256, (n, 3, 4, 4), generator=g).float()
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = x + torch.randn(x.shape, generator=g) * 20
    return x.clamp(0, 255).to(torch.uint8)


def _gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _strong(x: torch.Tensor, g: torch.Generator, **crop) -> torch.Tensor:
    """Strong views as ViewMaker makes them: a weak view, then RandAugment + Cutout in place."""
    return A.strong_from_weak(A.weak_view(x, g, **crop), g, owned=True)


def _fill_boxes(x: torch.Tensor, boxes: torch.Tensor, fill: int = 127) -> torch.Tensor:
    """Reference Cutout fill, one sample at a time with plain slicing."""
    out = x.clone()
    for i, ((r0, r1), (c0, c1)) in enumerate(boxes.long().tolist()):
        out[i, :, r0:r1, c0:c1] = fill
    return out


# ----------------------------------------------------------------------------- shapes, dtypes


@pytest.mark.parametrize("device", DEVICES)
def test_shapes_dtypes_devices(device):
    dev = _device(device)
    x = _images(6, 32).to(dev)
    g = _gen()
    assert A.weak_view(x, g).shape == (6, 3, 32, 32)
    assert A.weak_view(x, g, out_size=24).shape == (6, 3, 24, 24)
    assert A.weak_view(x, g, crop="rrc", out_size=20).shape == (6, 3, 20, 20)
    for crop in ("translate", "rrc"):  # several views of one image: one per source entry
        assert A.weak_view(x, g, source=torch.tensor([0, 0, 5]), crop=crop).shape == (3, 3, 32, 32)
    s = _strong(x, g, crop="rrc", out_size=28)
    assert s.shape == (6, 3, 28, 28) and s.dtype == torch.uint8 and s.device.type == dev.type
    ops, mags = A.sample_rand_augment(6, g)
    boxes = A.cutout_boxes(torch.rand(6, 3, generator=g), 0.5, 32, 32)
    assert boxes.shape == (6, 2, 2)
    ra = A.apply_rand_augment(x, ops, mags, boxes=boxes)
    for v in (A.weak_view(x, g), _strong(x, g), A.center_crop(x, 16), ra):
        assert v.dtype == torch.uint8 and v.device.type == dev.type
    assert A.center_crop(x, 16).shape == (6, 3, 16, 16)
    z = A.normalize(x, A.CIFAR10_MEAN, A.CIFAR10_STD)
    assert z.dtype == torch.float32 and z.shape == x.shape and z.device.type == dev.type

    vm = A.ViewMaker(image_size=32, num_strong=3)
    wl, wu, strong = vm(x[:2], x, g)
    assert wl.shape == (2, 3, 32, 32) and wu.shape == (6, 3, 32, 32)
    assert len(strong) == 3 and all(s.shape == (6, 3, 32, 32) for s in strong)
    assert all(t.dtype == torch.float32 and t.device.type == dev.type for t in (wl, wu, *strong))


def test_rrc_viewmaker_and_eval():
    x = _images(4, 40)
    vm = A.ViewMaker(image_size=32, crop="rrc", num_strong=1)
    wl, wu, (s,) = vm(x[:1], x, _gen())
    assert wl.shape == (1, 3, 32, 32) and wu.shape == s.shape == (4, 3, 32, 32)
    ev = vm.eval(x)
    torch.testing.assert_close(ev, A.normalize(x[..., 4:36, 4:36], vm.mean, vm.std))


def test_normalize_values():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    z = A.normalize(x, (0.5, 0.2, 1.0), (0.5, 0.1, 2.0))
    torch.testing.assert_close(z.view(3), torch.tensor([-1.0, 0.0, 0.0]))


# ----------------------------------------------------------------------------- weak view content


def test_weak_without_translation_is_identity_or_mirror_per_sample():
    x = _images(64, 16)
    y = A.weak_view(x, _gen(3), translate=0.0)
    same = (y == x).flatten(1).all(1)
    mirrored = (y == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    # Per-sample flips, not one decision per batch.
    assert 10 < int(mirrored.sum()) < 54


@pytest.mark.parametrize("size,translate", [(16, 0.125), (12, 0.5)])
def test_weak_is_a_reflect_padded_shift_of_the_input(size, translate):
    x = _images(12, size)
    y = A.weak_view(x, _gen(1), translate=translate)
    p = round(translate * size)
    padded = F.pad(x.float(), (p, p, p, p), mode="reflect")
    shifts = set()
    for i in range(len(x)):
        hits = [
            (f, a, b)
            for f in (0, 1)
            for a in range(2 * p + 1)
            for b in range(2 * p + 1)
            if torch.equal(
                (padded[i].flip(-1) if f else padded[i])[:, a : a + size, b : b + size],
                y[i].float(),
            )
        ]
        assert hits, f"sample {i} is not a flipped/shifted crop of its input"
        shifts.add(hits[0][1:])
    assert len(shifts) > 3  # per-sample shifts


def test_rrc_full_crop_is_a_resize():
    x = _images(8, 24)
    y = A.weak_view(x, _gen(), crop="rrc", out_size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    ref = F.interpolate(x.float(), size=(16, 16), mode="bilinear", align_corners=False)
    ref = (ref + 0.5).floor()
    for i in range(len(x)):
        err = min((y[i].float() - r).abs().max() for r in (ref[i], ref[i].flip(-1)))
        assert err <= 1, f"sample {i}: max error {err}"


def test_rrc_of_constant_image_is_constant():
    x = torch.full((5, 3, 30, 30), 77, dtype=torch.uint8)
    assert bool((A.weak_view(x, _gen(), crop="rrc", out_size=20) == 77).all())


@pytest.mark.parametrize("in_hw,out", [((40, 40), 32), ((30, 50), 20), ((24, 24), 40)])
def test_rrc_matches_grid_sample(in_hw, out, monkeypatch):
    # The separable resample against grid_sample(bilinear, border, align_corners=False) on the
    # same crops: rounding may move a value by one level, rarely.
    h, w = in_hw
    n = 32
    x = _images(n, max(h, w), seed=h + out)[..., :h, :w].contiguous()
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    sx, tx, sy, ty = geometry._rrc_maps(n, h, w, _gen(6), scale, ratio, True)
    lin = (torch.arange(out, dtype=torch.float32) * 2 + 1) / out - 1
    gx = (sx[:, None] * lin + tx[:, None])[:, None, :].expand(n, out, out)
    gy = (sy[:, None] * lin + ty[:, None])[:, :, None].expand(n, out, out)
    ref = F.grid_sample(
        x.float(),
        torch.stack([gx, gy], -1),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    ref = (ref + 0.5).floor()
    y = A.weak_view(x, _gen(6), crop="rrc", out_size=out, scale=scale, ratio=ratio)
    diff = (y.float() - ref).abs()
    assert diff.max() <= 1
    assert (diff > 0).float().mean() < 1e-3
    # Processing the views block by block (CPU) changes nothing.
    monkeypatch.setattr(geometry, "_CPU_BLOCK_BYTES", 1)
    assert torch.equal(A.weak_view(x, _gen(6), crop="rrc", out_size=out), y)


# ----------------------------------------------------------------------------- RandAugment


def _pil_reference(name: str, im: Image.Image, m: float) -> Image.Image:
    w, h = im.size
    if name == "identity":
        return im
    if name == "autocontrast":
        return ImageOps.autocontrast(im)
    if name == "equalize":
        return ImageOps.equalize(im)
    if name == "solarize":
        return ImageOps.solarize(im, m)
    if name == "posterize":
        return ImageOps.posterize(im, int(m))
    if name in ("color", "contrast", "brightness", "sharpness"):
        return getattr(ImageEnhance, name.capitalize())(im).enhance(m)
    if name == "rotate":
        return im.rotate(m)
    # PIL's affine maps output (x, y) to input (a x + b y + c, d x + e y + f) from the top-left
    # corner; ours act about the centre.
    if name == "shear_x":
        return im.transform(im.size, Image.Transform.AFFINE, (1, m, -m * h / 2, 0, 1, 0))
    if name == "shear_y":
        return im.transform(im.size, Image.Transform.AFFINE, (1, 0, 0, m, 1, -m * w / 2))
    if name == "translate_x":
        return im.transform(im.size, Image.Transform.AFFINE, (1, 0, round(m * w), 0, 1, 0))
    if name == "translate_y":
        return im.transform(im.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, round(m * h)))
    raise AssertionError(name)


@pytest.mark.parametrize("name", A.OPS)
def test_each_op_matches_pil(name):
    n, size = 12, 20
    x = _images(n, size, seed=5)
    lo, hi = A.MAGNITUDE_RANGES.get(name, (0.0, 0.0))
    mags = torch.linspace(lo, hi, n)
    if name == "posterize":
        mags = torch.tensor([4, 5, 6, 7, 8, 4, 5, 6, 7, 8, 4, 8], dtype=torch.float32)
    if name == "rotate":  # exact multiples of 90 degrees first, then arbitrary angles
        mags = torch.tensor([90.0, -90.0, 180.0, 0.0, *torch.linspace(-30, 30, n - 4).tolist()])
    ops = torch.full((n, 1), A.OPS.index(name))
    out = A.apply_rand_augment(x, ops, mags[:, None]).permute(0, 2, 3, 1).numpy().astype(int)
    arr = x.permute(0, 2, 3, 1).numpy()
    ref = np.stack(
        [
            np.asarray(_pil_reference(name, Image.fromarray(arr[i]), float(mags[i])))
            for i in range(n)
        ]
    ).astype(int)
    diff = np.abs(out - ref)
    if name in ("rotate", "shear_x", "shear_y"):
        # Nearest-neighbour: a source point exactly on a pixel boundary may round either way.
        assert (diff[:4] == 0).all() if name == "rotate" else True
        assert (diff > 0).mean() < 0.02, f"{name}: {(diff > 0).mean():.3%} pixels differ"
    else:
        assert diff.max() == 0, f"{name}: max |ours - PIL| = {diff.max()}"


@pytest.mark.parametrize("h,w", [(20, 20), (32, 32), (33, 47)])
def test_geometric_ops_pick_grid_sample_nearest_pixels(h, w):
    # Exactly the pixels grid_sample(nearest, zeros, align_corners=False) picks on the CPU for
    # the same grid -- including round magnitudes, whose source points may fall on pixel edges.
    n = 64
    x = _images(n, max(h, w), seed=h * w)[..., :h, :w].contiguous()
    g = torch.Generator().manual_seed(h + w)
    lin_x = ((torch.arange(w, dtype=torch.float32) * 2 + 1) / w - 1).view(1, 1, 1, w)
    lin_y = ((torch.arange(h, dtype=torch.float32) * 2 + 1) / h - 1).view(1, 1, h, 1)
    for name in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
        lo, hi = A.MAGNITUDE_RANGES[name]
        m = lo + torch.rand(n, generator=g) * (hi - lo)
        m[:12] = torch.linspace(lo, hi, 12)
        if name == "rotate":
            m[12:16] = torch.tensor([90.0, -90.0, 180.0, 0.0])
        if name.startswith("translate"):  # shifts by most of, all of and more than the side
            m[12:18] = torch.tensor([-1.5, -1.0, -0.97, 0.97, 1.0, 1.5])
        ops = torch.full((n, 1), A.OPS.index(name))
        out = A.apply_rand_augment(x, ops, m[:, None])
        a = policy._affine_coeffs(ops[:, 0], m, h, w)[:, :6].view(n, 2, 3, 1, 1)
        grid = (a[:, :, 0] * lin_x + (a[:, :, 1] * lin_y + a[:, :, 2])).permute(0, 2, 3, 1)
        ref = F.grid_sample(
            x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
        )
        assert torch.equal(out, ref.to(torch.uint8)), name


def test_sharpness_rounding_is_exact():
    # The SMOOTH filter rounds S * fl(1/13) to nearest: round(S / 13) for every possible sum S.
    s = torch.arange(0, 13 * 255 + 1, dtype=torch.float32)
    assert torch.equal(s.mul(1.0 / 13.0).round(), torch.div(s + 6, 13, rounding_mode="floor"))


def test_sampled_ops_and_magnitudes_cover_the_documented_ranges():
    ops, mags = A.sample_rand_augment(20000, _gen(), num_ops=2)
    assert ops.shape == mags.shape == (20000, 2)
    counts = torch.bincount(ops.flatten(), minlength=len(A.OPS))
    assert counts.min() > 0.8 * 40000 / len(A.OPS)  # every op, roughly uniformly
    for i, name in enumerate(A.OPS):
        m = mags[ops == i]
        lo, hi = A.MAGNITUDE_RANGES.get(name, (0.0, 0.0))
        assert m.min() >= lo and m.max() <= hi, name
        if name == "posterize":
            assert set(m.unique().tolist()) == {4.0, 5.0, 6.0, 7.0, 8.0}
        elif name in A.MAGNITUDE_RANGES:
            assert m.min() < lo + 0.05 * (hi - lo) and m.max() > hi - 0.05 * (hi - lo), name


def test_each_sample_gets_its_own_ops():
    x = _images(48, 16, seed=2)
    g = _gen(7)
    ops, mags = A.sample_rand_augment(48, g, num_ops=2)
    assert len(ops[:, 0].unique()) >= 8  # not one choice per batch
    boxes = A.cutout_boxes(torch.rand(48, 3, generator=g), 0.5, 16, 16)
    for b in (None, boxes):  # Cutout runs on the sorted copy: its boxes must follow the samples
        batched = A.apply_rand_augment(x, ops, mags, boxes=b)
        # Grouping by op must not mix samples up: batched == one sample at a time.
        for i in range(48):
            one = slice(i, i + 1)
            single = A.apply_rand_augment(
                x[one], ops[one], mags[one], boxes=None if b is None else b[one]
            )
            assert torch.equal(batched[i], single[0]), f"sample {i} ({ops[i].tolist()})"


def test_strong_views_of_one_image_all_differ():
    x = _images(1, 32).expand(32, -1, -1, -1).contiguous()
    y = _strong(x, _gen(4))
    assert len({bytes(v.numpy()) for v in y}) == 32
    # ... and so do a ViewMaker's strong views of one unlabeled batch.
    _, _, strong = A.ViewMaker(image_size=32, num_strong=2).uint8_views(x[:0], x[:16], _gen(4))
    assert len({bytes(v.numpy()) for v in torch.cat(strong)}) == 32


def test_cutout_is_one_gray_square_per_sample():
    # Cutout alone: the strong view's path with no RandAugment op (ViewMaker's num_ops=0).
    x = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)
    y = A.strong_from_weak(x, _gen(), num_ops=0, cutout=0.5)
    sides = []
    for i in range(64):
        gray = (y[i] == 127).all(0)
        assert bool(((y[i] == 127) | (y[i] == 200)).all())
        rows, cols = gray.any(1).nonzero(), gray.any(0).nonzero()
        if len(rows):
            r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
            assert bool(gray[r0:r1, c0:c1].all()) and int(gray.sum()) == (r1 - r0) * (c1 - c0)
            assert r1 - r0 <= 16 and c1 - c0 <= 16
            sides.append(max(int(r1 - r0), int(c1 - c0)))
    assert len(sides) > 48 and len(set(sides)) > 5  # random size per sample
    assert torch.equal(A.strong_from_weak(x, _gen(), num_ops=0, cutout=0.0), x)
    # The box of each sample is the one cutout_boxes gives for the generator's next draws.
    g = _gen()
    A.sample_rand_augment(64, g, num_ops=0)
    boxes = A.cutout_boxes(torch.rand(64, 3, generator=g), 0.5, 32, 32)
    assert torch.equal(y, _fill_boxes(x, boxes))


# ----------------------------------------------------------------------------- determinism, range


def test_same_seed_same_views_other_seed_other_views():
    x = _images(16, 32)
    vm = A.ViewMaker(image_size=32)
    a = vm(x[:8], x, _gen(11))
    b = vm(x[:8], x, _gen(11))
    c = vm(x[:8], x, _gen(12))
    for t, u, v in zip([a[0], a[1], *a[2]], [b[0], b[1], *b[2]], [c[0], c[1], *c[2]]):
        assert torch.equal(t, u)
        assert not torch.equal(t, v)


@pytest.mark.parametrize(
    "crop,size,l_size,u_size",
    [
        ("translate", 32, 32, 32),
        ("translate", 24, 32, 32),
        ("rrc", 24, 40, 40),
        ("translate", 32, 36, 32),  # labeled and unlabeled of different sizes
        ("rrc", 24, 40, 32),
    ],
)
def test_viewmaker_shortcuts_change_nothing(crop, size, l_size, u_size):
    # ViewMaker's shortcuts (crops straight from the distinct images via weak_view's
    # ``source``, Cutout on RandAugment's sorted copy, strong views made in their own memory)
    # give exactly the plain composition: weak views of the repeated batch, then
    # sample_rand_augment, apply_rand_augment, Cutout boxes filled afterwards, normalize.
    x = _images(24, max(l_size, u_size), seed=8)
    labeled, unlabeled = x[:8, :, :l_size, :l_size], x[8:, :, :u_size, :u_size].contiguous()
    vm = A.ViewMaker(image_size=size, crop=crop, num_strong=2)
    wl, wu, strong = vm(labeled, unlabeled, _gen(9))
    g = _gen(9)
    kw = {"crop": crop, "out_size": size}
    if l_size == u_size:
        views = A.weak_view(torch.cat([labeled, unlabeled, unlabeled, unlabeled]), g, **kw)
    else:  # one call per batch
        batches = [labeled, unlabeled, unlabeled, unlabeled]
        views = torch.cat([A.weak_view(b, g, **kw) for b in batches])
    ops, mags = A.sample_rand_augment(32, g, num_ops=2)
    boxes = A.cutout_boxes(torch.rand(32, 3, generator=g), 0.5, size, size)
    s = _fill_boxes(A.apply_rand_augment(views[24:], ops, mags), boxes)
    for got, want in ((wl, views[:8]), (wu, views[8:24]), *zip(strong, s.split(16))):
        assert torch.equal(got, A.normalize(want, vm.mean, vm.std))
    # strong_from_weak in the input's own memory (owned) == in fresh memory.
    fresh = A.strong_from_weak(views[24:], _gen(10))
    assert torch.equal(A.strong_from_weak(views[24:].clone(), _gen(10), owned=True), fresh)


@pytest.mark.parametrize("crop", ["translate", "rrc"])
def test_views_are_finite_and_in_range(crop):
    x = _images(32, 32)
    x[0] = 0
    x[1] = 255
    vm = A.ViewMaker(
        image_size=24 if crop == "rrc" else 32, crop=crop, mean=A.CIFAR10_MEAN, std=A.CIFAR10_STD
    )
    mean, std = torch.tensor(vm.mean).view(1, 3, 1, 1), torch.tensor(vm.std).view(1, 3, 1, 1)
    lo, hi = (0 - mean) / std - 1e-5, (1 - mean) / std + 1e-5
    wl, wu, strong = vm(x, x, _gen())
    for t in (wl, wu, *strong):
        assert bool(torch.isfinite(t).all())
        assert bool(((t >= lo) & (t <= hi)).all())


def test_non_contiguous_input_gives_the_same_views():
    x = _images(16, 32)
    xc = x.contiguous(memory_format=torch.channels_last)
    assert not xc.is_contiguous()
    for crop in ("translate", "rrc"):
        assert torch.equal(A.weak_view(xc, _gen(2), crop=crop), A.weak_view(x, _gen(2), crop=crop))
    assert torch.equal(A.strong_from_weak(xc, _gen(3)), A.strong_from_weak(x, _gen(3)))
    ops, mags = A.sample_rand_augment(16, _gen(4), num_ops=3)
    assert torch.equal(A.apply_rand_augment(xc, ops, mags), A.apply_rand_augment(x, ops, mags))
    cut = {"num_ops": 0, "cutout": 0.5}  # Cutout alone
    assert torch.equal(
        A.strong_from_weak(xc, _gen(5), **cut), A.strong_from_weak(x, _gen(5), **cut)
    )
    for crop in ("translate", "rrc"):
        vm = A.ViewMaker(image_size=32, crop=crop)
        a, b = vm.uint8_views(xc[:4], xc, _gen(6)), vm.uint8_views(x[:4], x, _gen(6))
        assert all(torch.equal(u, v) for u, v in zip([a[0], a[1], *a[2]], [b[0], b[1], *b[2]]))


def test_bad_input_raises_value_error():
    x = _images(2, 16)
    g = _gen()
    with pytest.raises(ValueError, match="uint8"):
        A.weak_view(x.float(), g)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        A.strong_from_weak(x[:, :1], g)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        A.ViewMaker(image_size=16)(x[:, :1], x, g)
    with pytest.raises(ValueError, match="cutout"):
        A.strong_from_weak(x, g, cutout=1.5)
    with pytest.raises(ValueError, match="crop"):
        A.weak_view(x, g, crop="random")
    with pytest.raises(ValueError, match="out_size"):
        A.weak_view(x, g, out_size=20)
    with pytest.raises(ValueError, match="out_size"):
        A.center_crop(x, 17)
    with pytest.raises(ValueError, match="translate"):
        A.weak_view(x, g, translate=1.5)
    with pytest.raises(ValueError, match="mean"):
        A.normalize(x, (0.5, 0.5), (0.5, 0.5))
    with pytest.raises(ValueError, match="generator"):
        A.weak_view(x, 0)
    with pytest.raises(ValueError, match="ops"):
        A.apply_rand_augment(x, torch.full((2, 1), 14), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="boxes"):
        A.apply_rand_augment(x, torch.zeros(2, 1), torch.zeros(2, 1), boxes=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="crop"):
        A.ViewMaker(image_size=32, crop="center")


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_cuda_images_with_a_cpu_generator_match_cpu():
    _device("cuda")
    x = _images(64, 32)
    for crop, size in (("translate", 32), ("rrc", 24)):
        vm = A.ViewMaker(image_size=size, crop=crop)
        ref = vm(x[:16], x, _gen(5))
        out = vm(x[:16].cuda(), x.cuda(), _gen(5))
        for r, o in zip([ref[0], ref[1], *ref[2]], [out[0], out[1], *out[2]]):
            assert o.is_cuda
            # Same parameters; float rounding (FMA) may move a value by one level or a
            # nearest-neighbour tie by one pixel, nothing more.
            diff = (o.cpu() - r).abs()
            assert (diff > 1e-4).float().mean() < 0.01, f"{crop}: {(diff > 1e-4).float().mean()}"


@pytest.mark.gpu
def test_cuda_generator_is_deterministic():
    _device("cuda")
    x = _images(32, 32).cuda()
    a = _strong(x, _gen(3, "cuda"))
    b = _strong(x, _gen(3, "cuda"))
    assert a.is_cuda and torch.equal(a, b)


def test_viewmaker_outputs_are_ordinary_tensors():
    # The views are made in inference mode; the normalised outputs must not be inference
    # tensors, which autograd refuses to save for backward.
    x = _images(6, 32)
    lw, uw, strong = A.ViewMaker(image_size=32)(x[:2], x[2:], _gen(12))
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    for v in [lw, uw, *strong]:
        assert not v.is_inference()
        F.conv2d(v, weight).square().sum().backward()
    assert weight.grad is not None


@pytest.mark.parametrize("crop", ["translate", "rrc"])
def test_uint8_views_are_the_views_before_normalisation(crop):
    x = _images(12, 32)
    vm = A.ViewMaker(
        image_size=28 if crop == "rrc" else 32, crop=crop, mean=A.CIFAR10_MEAN, std=A.CIFAR10_STD
    )
    floats = vm(x[:4], x[4:], _gen(11))
    raw = vm.uint8_views(x[:4], x[4:], _gen(11))
    assert raw[0].dtype == torch.uint8 and len(raw[2]) == 2
    for f, r in zip([floats[0], floats[1], *floats[2]], [raw[0], raw[1], *raw[2]]):
        assert torch.equal(vm.normalize(r), f)
