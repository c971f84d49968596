"""The BMB authors' RandAugment(3, 4) and fixed Cutout against a PIL reference written from
their op list (``ildoonet/pytorch-randaugment`` ``augment_list``, as ``BMB/dataset/utils.py``
imports it): op by op, then whole 3-op sequences, on fixed inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from pipelines.augment import authors as AU

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

GEOMETRIC = ("rotate", "shear_x", "shear_y")


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(0, 256, (n, 3, 4, 4), generator=g).float()
    x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return (x + torch.randn(x.shape, generator=g) * 20).clamp(0, 255).to(torch.uint8)


# Their ranges, written out again here (not read from the module under test).
RANGES = {
    "autocontrast": (0, 1), "equalize": (0, 1), "invert": (0, 1), "rotate": (0, 30),
    "posterize": (0, 4), "solarize": (0, 256), "solarize_add": (0, 110), "color": (0.1, 1.9),
    "contrast": (0.1, 1.9), "brightness": (0.1, 1.9), "sharpness": (0.1, 1.9),
    "shear_x": (0.0, 0.3), "shear_y": (0.0, 0.3), "cutout_abs": (0, 40),
    "translate_x_abs": (0.0, 100), "translate_y_abs": (0.0, 100),
}


def _ref_op(name: str, im: Image.Image, m: float, negative: bool, where: tuple[float, float]) -> Image.Image:
    """One of their ops at magnitude ``m`` (of 30), in plain PIL; ``negative``: the random sign
    came out negative; ``where``: the two U(0, 1) behind ``np.random.uniform(w)`` / ``(h)``."""
    lo, hi = RANGES[name]
    v = m / 30 * (hi - lo) + lo
    s = -v if negative else v
    w, h = im.size
    if name == "autocontrast":
        return ImageOps.autocontrast(im)
    if name == "equalize":
        return ImageOps.equalize(im)
    if name == "invert":
        return ImageOps.invert(im)
    if name == "rotate":
        return im.rotate(s)
    if name == "posterize":
        return ImageOps.posterize(im, max(1, int(v)))
    if name == "solarize":
        return ImageOps.solarize(im, v)
    if name == "solarize_add":
        arr = np.clip(np.asarray(im).astype(np.int64) + v, 0, 255).astype(np.uint8)
        return ImageOps.solarize(Image.fromarray(arr), 128)
    if name in ("color", "contrast", "brightness", "sharpness"):
        return getattr(ImageEnhance, name.capitalize())(im).enhance(v)
    if name == "shear_x":
        return im.transform(im.size, Image.Transform.AFFINE, (1, s, 0, 0, 1, 0))
    if name == "shear_y":
        return im.transform(im.size, Image.Transform.AFFINE, (1, 0, 0, s, 1, 0))
    if name == "translate_x_abs":
        return im.transform(im.size, Image.Transform.AFFINE, (1, 0, s, 0, 1, 0))
    if name == "translate_y_abs":
        return im.transform(im.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, s))
    if name == "cutout_abs":
        # np.random.uniform(w) is uniform(low=w, high=1.0) = w + (1 - w) U.
        x0, y0 = w + (1 - w) * where[0], h + (1 - h) * where[1]
        x0, y0 = int(max(0, x0 - v / 2.0)), int(max(0, y0 - v / 2.0))
        out = im.copy()
        ImageDraw.Draw(out).rectangle((x0, y0, min(w, x0 + v), min(h, y0 + v)), (125, 123, 114))
        return out
    raise AssertionError(name)


def _reference(x: torch.Tensor, draw: AU.AuthorsDraw, m: float = 4) -> np.ndarray:
    arr = x.permute(0, 2, 3, 1).numpy()
    out = []
    for i in range(len(arr)):
        im = Image.fromarray(arr[i])
        for k in range(draw.ops.shape[1]):
            name = AU.AUTHORS_OPS[int(draw.ops[i, k])]
            im = _ref_op(name, im, m, bool(draw.negative[i, k]), tuple(draw.where[i, k].tolist()))
        out.append(np.asarray(im))
    return np.stack(out).astype(int)


def test_op_list_and_magnitude_rule():
    assert AU.AUTHORS_OPS == tuple(RANGES)
    assert AU.AUTHORS_RANGES == RANGES
    # The values RandAugment(3, 4) applies (their rule m / 30 * (max - min) + min).
    assert AU.authors_value("rotate", 4) == pytest.approx(4.0)
    assert AU.authors_value("posterize", 4) == pytest.approx(0.5333, abs=1e-4)  # int -> 0 -> 1 bit
    assert AU.authors_value("solarize", 4) == pytest.approx(34.1333, abs=1e-4)
    assert AU.authors_value("color", 4) == pytest.approx(0.34)
    assert AU.authors_value("translate_x_abs", 4) == pytest.approx(13.3333, abs=1e-4)
    assert AU.authors_value("cutout_abs", 4) == pytest.approx(5.3333, abs=1e-4)


@pytest.mark.parametrize("name", list(RANGES))
@pytest.mark.parametrize("m", [4, 13])
def test_each_op_matches_the_reference(name, m):
    n, h, w = 10, 23, 31  # non-square: a shear about the wrong corner would show
    x = _images(n, h, w, seed=3)
    g = torch.Generator().manual_seed(1)
    draw = AU.sample_authors_rand_augment(n, g, num_ops=1)
    draw = AU.AuthorsDraw(torch.full((n, 1), AU.AUTHORS_OPS.index(name)), draw.negative, draw.where)
    assert draw.negative.any() and not draw.negative.all()
    out = AU.apply_authors_rand_augment(x, draw, magnitude=m).permute(0, 2, 3, 1).numpy().astype(int)
    diff = np.abs(out - _reference(x, draw, m))
    if name in GEOMETRIC:
        # Nearest neighbour: a source point exactly on a pixel boundary may round either way.
        assert (diff > 0).mean() < 0.02, f"{name}: {(diff > 0).mean():.3%} pixels differ"
    else:
        assert diff.max() == 0, f"{name}: max |ours - reference| = {diff.max()}"
    assert not np.array_equal(out, x.permute(0, 2, 3, 1).numpy()), "the op changed nothing"


def test_posterize_at_magnitude_4_keeps_one_bit_not_zero():
    x = _images(2, 8, 8)
    draw = AU.AuthorsDraw(torch.full((2, 1), AU.AUTHORS_OPS.index("posterize")),
                          torch.zeros(2, 1, dtype=torch.bool), torch.zeros(2, 1, 2))
    out = AU.apply_authors_rand_augment(x, draw)
    assert set(out.unique().tolist()) <= {0, 128} and out.max() == 128


def test_three_op_sequences_match_the_reference():
    n, h, w = 48, 20, 26
    x = _images(n, h, w, seed=9)
    draw = AU.sample_authors_rand_augment(n, torch.Generator().manual_seed(4), num_ops=3)
    out = AU.apply_authors_rand_augment(x, draw).permute(0, 2, 3, 1).numpy().astype(int)
    ref = _reference(x, draw)
    geometric = torch.isin(draw.ops, torch.tensor([AU.AUTHORS_OPS.index(o) for o in GEOMETRIC])).any(1)
    exact = ~geometric.numpy()
    assert exact.sum() >= 10
    assert (out[exact] == ref[exact]).all()
    # With a rotation or shear, a nearest-neighbour tie (one row at shear 0.04) may round the
    # other way, and a later autocontrast / equalize / contrast (tables of the whole image) or
    # sharpness (a 3x3 filter) can carry that into more pixels: a few samples, small on average.
    per_sample = (out[~exact] != ref[~exact]).reshape((~exact).sum(), -1).mean(1)
    assert per_sample.mean() < 0.05 and np.median(per_sample) < 0.02, per_sample
    # Their draw is with replacement: some sample repeats an op.
    assert any(len(set(r)) < 3 for r in draw.ops.tolist())


def test_same_generator_state_same_output_and_inputs_untouched():
    x = _images(6, 16, 16)
    before = x.clone()
    a = AU.apply_authors_rand_augment(x, AU.sample_authors_rand_augment(6, torch.Generator().manual_seed(0)))
    b = AU.apply_authors_rand_augment(x, AU.sample_authors_rand_augment(6, torch.Generator().manual_seed(0)))
    assert torch.equal(a, b) and torch.equal(x, before)


@pytest.mark.parametrize("h,w,length", [(32, 32, 16), (64, 64, 32), (20, 27, 10)])
def test_fixed_cutout_is_cutout_default(h, w, length):
    u = torch.rand(200, 2, generator=torch.Generator().manual_seed(0))
    boxes = AU.fixed_cutout_boxes(u, length, h, w)
    for (r0, r1), (c0, c1), (uy, ux) in zip(boxes[:, 0].tolist(), boxes[:, 1].tolist(), u.tolist()):
        y, x = int(uy * h), int(ux * w)  # np.random.randint(h), randint(w)
        mask = np.ones((h, w))
        mask[np.clip(y - length // 2, 0, h): np.clip(y + length // 2, 0, h),
             np.clip(x - length // 2, 0, w): np.clip(x + length // 2, 0, w)] = 0
        ours = np.ones((h, w))
        ours[int(r0):int(r1), int(c0):int(c1)] = 0
        assert np.array_equal(mask, ours)
    full = (boxes[:, 0, 1] - boxes[:, 0, 0] == length) & (boxes[:, 1, 1] - boxes[:, 1, 0] == length)
    assert full.any()  # away from the border: the whole length x length square


def test_viewmaker_authors_policy_is_randaugment_then_crop_then_fixed_cutout():
    from pipelines.augment import ViewMaker, weak_view

    lab, unl = _images(3, 32, 32, seed=1), _images(4, 32, 32, seed=2)
    vm = ViewMaker(image_size=32, policy="authors", num_ops=3, cutout_mode="fixed", mean=(0.5, 0.4, 0.3))
    wl, wu, strong = vm.uint8_views(lab, unl, torch.Generator().manual_seed(5))
    # The same draws, in the documented order, composed by hand.
    g = torch.Generator().manual_seed(5)
    weak = weak_view(torch.cat([lab, unl]), g, out_size=32)
    src = unl.repeat(2, 1, 1, 1)
    src = AU.apply_authors_rand_augment(src, AU.sample_authors_rand_augment(8, g, num_ops=3))
    crops = weak_view(src, g, out_size=32)
    boxes = AU.fixed_cutout_boxes(torch.rand(8, 2, generator=g), 16, 32, 32)
    assert torch.equal(torch.cat([wl, wu]), weak)
    got = torch.cat(strong)
    fill = torch.tensor([128, 102, 76], dtype=torch.uint8).view(3, 1, 1)
    for i, ((r0, r1), (c0, c1)) in enumerate(boxes.long().tolist()):
        inside = got[i, :, r0:r1, c0:c1]
        assert (inside == fill).all()  # mean colour, the zero of the normalised tensor
        outside = got[i].clone()
        outside[:, r0:r1, c0:c1] = crops[i, :, r0:r1, c0:c1]
        assert torch.equal(outside, crops[i])
    assert ((boxes[:, :, 1] - boxes[:, :, 0]) == 16).all(1).any()


def test_dali_loader_views_refuse_the_authors_policy():
    pytest.importorskip("nvidia.dali")
    from pipelines.dali_views import DaliViews

    with pytest.raises(ValueError, match="data.views=trainer"):
        DaliViews(image_size=32, policy="authors")
    with pytest.raises(ValueError, match="data.views=trainer"):
        DaliViews(image_size=32, cutout_mode="fixed")
