"""shards/ builders on tiny sources in the real formats: CIFAR, downsampled ImageNet, JPEG trees.

Tests that need the real split lists / class maps read them from ``../shared/data`` beside the
checkout and skip when it is absent.
"""

from __future__ import annotations

import io
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.build import plan_imagenet127, plan_imagenet_lt
from shards.cli import main
from shards.format import load_manifest
from shards.sources import derive_wnid_to_127, load_imagenet127_map
from shards.splits import lt_counts, prefix_counts
from shards.verify import verify_dataset
from tests.fixtures_sources import write_cifar, write_downsampled_imagenet, write_jpeg_tree
from tests.shard_files import read_split, tree_bytes

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
Q = ["--no-progress", "--workers", "1"]


def cifar_cli(src: Path, out: Path, *extra: str) -> list[str]:
    return [
        "cifar-lt",
        "--source",
        str(src),
        "--dataset",
        "cifar10",
        "--out",
        str(out),
        *Q,
        "--n1",
        "15",
        "--m1",
        "25",
        "--gamma-l",
        "10",
        "--gamma-u",
        "5",
        *extra,
    ]


# ----------------------------------------------------------------------------------------------
# CIFAR


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory) -> dict:
    return write_cifar(tmp_path_factory.mktemp("c10"), "cifar10", train_per_class=45)


def test_cifar_lt_from_archive_roundtrip_and_counts(cifar10, tmp_path: Path) -> None:
    """The disjoint rule on request (the default, the authors' rule: tests/test_splits_authors.py)."""
    out = tmp_path / "d"
    extra = ("--formats", "wds,arrays", "--seed", "2", "--split-rule", "disjoint")
    assert main(cifar_cli(cifar10["archive"], out, *extra)) == 0
    m = load_manifest(out)
    assert m["class_names"] == cifar10["class_names"] and m["image_size"] == [32, 32]
    assert m["splits"]["labeled"]["class_counts"] == lt_counts(15, 10, 10)
    assert m["splits"]["unlabeled"]["class_counts"] == lt_counts(25, 5, 10)
    assert m["source"]["kind"] == "cifar10" and len(m["source"]["checksum"]["md5"]) == 32
    assert m["split_rule"] == {
        "rule": "cifar-lt",
        "n1": 15,
        "m1": 25,
        "gamma_l": 10.0,
        "gamma_u": 5.0,
    }
    xtr, ytr = cifar10["train"]
    seen = set()
    for s in ("labeled", "unlabeled"):
        x, y, _ = read_split(out, m, s)
        # every image is a source train image with its own label, none used twice
        rows = {xtr[i].tobytes(): i for i in range(len(xtr))}
        src_idx = [rows[img.tobytes()] for img in x]
        assert (ytr[src_idx] == y).all()
        assert not seen & set(src_idx)
        seen |= set(src_idx)
        assert np.array_equal(np.load(out / f"{s}/images.npy"), x)
    x, y, _ = read_split(out, m, "test")
    assert np.array_equal(x, cifar10["test"][0]) and np.array_equal(y, cifar10["test"][1])


def test_cifar_folder_equals_archive_and_is_deterministic(cifar10, tmp_path: Path) -> None:
    assert main(cifar_cli(cifar10["archive"], tmp_path / "a")) == 0
    assert main(cifar_cli(cifar10["archive"], tmp_path / "b", "--workers", "2")) == 0
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    assert main(cifar_cli(cifar10["folder"], tmp_path / "c")) == 0
    a, c = load_manifest(tmp_path / "a"), load_manifest(tmp_path / "c")
    assert a["splits"] == c["splits"]  # same shards (sha256) from folder and archive


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    c = write_cifar(tmp_path / "src", "cifar100", train_per_class=6, test_per_class=1)
    out = tmp_path / "d"
    args = [
        "cifar-lt",
        "--source",
        str(c["folder"].parent),
        "--dataset",
        "cifar100",
        "--out",
        str(out),
        "--n1",
        "3",
        "--m1",
        "3",
        "--gamma-l",
        "3",
        "--gamma-u",
        "3",
        *Q,
    ]
    assert main(args) == 0
    m = load_manifest(out)
    assert m["num_classes"] == 100 and m["splits"]["labeled"]["class_counts"] == lt_counts(
        3, 3, 100
    )
    x, y, _ = read_split(out, m, "test")
    assert np.array_equal(y, c["test"][1]) and np.array_equal(x, c["test"][0])


def _expect_error(capsys, args: list[str], *needles: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err


def test_cifar_bad_inputs(cifar10, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    _expect_error(capsys, cifar_cli(tmp_path / "nope.tar.gz", out), "nope.tar.gz", "not found")
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(cifar10["archive"].read_bytes()[:3000])
    _expect_error(capsys, cifar_cli(bad, out), str(bad), "corrupt or unreadable archive")
    _expect_error(
        capsys,
        cifar_cli(cifar10["archive"], out, "--expected-md5", "0" * 32),
        "md5 mismatch",
        str(cifar10["archive"]),
    )
    # wrong pickle keys, and a label out of range, in a copy of the folder
    for name, mutate, needle in (
        ("keys", lambda d: d.pop(b"labels"), "missing key(s) ['labels']"),
        (
            "range",
            lambda d: d[b"labels"].__setitem__(3, 10),
            "label 10 in 'labels' is out of range",
        ),
    ):
        folder = tmp_path / name / "cifar-10-batches-py"
        shutil.copytree(cifar10["folder"], folder)
        p = folder / "data_batch_2"
        d = pickle.loads(p.read_bytes(), encoding="bytes")
        mutate(d)
        p.write_bytes(pickle.dumps(d, protocol=2))
        _expect_error(capsys, cifar_cli(folder, out), str(p), needle)
    assert not out.exists()  # no partial output from any bad input


def test_cifar_download_checks_md5(cifar10, tmp_path: Path, capsys) -> None:
    dest = tmp_path / "dl"
    url = cifar10["archive"].as_uri()
    _expect_error(
        capsys, cifar_cli(dest, tmp_path / "o", "--download", "--url", url), "md5 mismatch", url
    )
    assert not (dest / "cifar-10-python.tar.gz").exists() and not (tmp_path / "o").exists()
    md5 = __import__("hashlib").md5(cifar10["archive"].read_bytes()).hexdigest()
    args = cifar_cli(dest, tmp_path / "o", "--download", "--url", url, "--expected-md5", md5)
    assert main(args) == 0 and (dest / "cifar-10-python.tar.gz").is_file()


@pytest.mark.slow
def test_cifar10_lt_paper_setting_counts(tmp_path: Path) -> None:
    """N1=1500, M1=3000, gamma=100 on a CIFAR-10-shaped source with 4500 images per class."""
    c = write_cifar(tmp_path / "src", "cifar10", 4500, test_per_class=1, archive=False)
    out = tmp_path / "d"
    assert (
        main(
            [
                "cifar-lt",
                "--source",
                str(c["folder"]),
                "--dataset",
                "cifar10",
                "--out",
                str(out),
                "--no-progress",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    m = load_manifest(out)
    assert m["splits"]["labeled"]["class_counts"] == [1500, 899, 539, 323, 193, 116, 69, 41, 25, 15]
    # the default (authors') rule: class k's unlabeled set is its n_k labeled + m_k more images
    m_k = lt_counts(3000, 100, 10)
    assert m_k == [3000, 1798, 1078, 646, 387, 232, 139, 83, 50, 30] and sum(m_k) == 7443
    assert m["splits"]["unlabeled"]["class_counts"] == [
        a + b for a, b in zip(m["splits"]["labeled"]["class_counts"], m_k)
    ]
    assert m["splits"]["labeled"]["count"] == 3720 and m["splits"]["unlabeled"]["count"] == 11163


# ----------------------------------------------------------------------------------------------
# ImageNet127 and subset-lt on downsampled ImageNet


@needs_shared
def test_wnid_to_127_derivable_from_public_files() -> None:
    d = SHARED / "imagenet127"
    w = d / "wmigftl_label_sets"
    m = derive_wnid_to_127(w / "val.txt", w / "val_up_down_127.txt", w / "synsets.txt")
    rows = [ln.split("\t") for ln in (d / "wnid_to_127.tsv").read_text().splitlines()[1:]]
    assert m == {r[0]: int(r[2]) for r in rows}


@needs_shared
@pytest.mark.parametrize("ratio,col_file", [(0.01, "1"), (0.1, "10")])
def test_imagenet127_plan_matches_authors_counts(ratio: float, col_file: str) -> None:
    f = SHARED / "imagenet127" / f"ImageNet127_LT_train_semi_{col_file}_sample_num.txt"
    rows = [tuple(map(int, ln.split())) for ln in f.read_text().splitlines()]
    totals = [r[1] for r in rows]
    y = np.random.default_rng(0).permutation(np.repeat(np.arange(127), totals))
    # their full-resolution lists (these files) floor; their Imagenet32/64 loader (our default
    # for the downsampled source) rounds with np.around
    lab = plan_imagenet127(y, ratio, "floor")
    assert np.bincount(y[lab], minlength=127).tolist() == [r[0] for r in rows]
    assert len(lab) == {0.01: 12799, 0.1: 128101}[ratio]
    assert len(plan_imagenet127(y, ratio)) == {0.01: 12811, 0.1: 128118}[ratio]
    # the first floor(p*n_k) of each class in source order
    k = int(y[0])
    assert lab[0] == 0 and (np.flatnonzero(y == k)[: rows[k][0]] == lab[y[lab] == k]).all()


@pytest.fixture(scope="module")
def meta127(tmp_path_factory) -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data not present")
    d = tmp_path_factory.mktemp("meta")
    for n in ("wnid_to_127.tsv", "synset_words_up_down_127.txt"):
        shutil.copy(SHARED / "imagenet127" / n, d / n)
    return d


@pytest.mark.parametrize("fmt", ["pickle", "npz"])
def test_imagenet127_roundtrip_and_counts(meta127: Path, tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(1)
    per = rng.integers(0, 4, 1000)
    y = rng.permutation(np.repeat(np.arange(1000), per))
    train = np.array_split(y, 3)
    yv = rng.integers(0, 1000, 40)
    truth = write_downsampled_imagenet(tmp_path / "src" / "Imagenet32_train", train, yv, 32, fmt)
    out = tmp_path / "d"
    args = [
        "imagenet127",
        "--source",
        str(tmp_path / "src"),
        "--meta-dir",
        str(meta127),
        "--labeled-ratio",
        "0.1",
        "--out",
        str(out),
        "--shard-size",
        "500",
        *Q,
    ]
    assert main(args) == 0
    m = load_manifest(out)
    lut, names, _ = load_imagenet127_map(meta127)
    y127 = lut[truth["train"][1]]
    totals = np.bincount(y127, minlength=127)
    assert m["num_classes"] == 127 and m["class_names"] == names and names[0] == "loaf of bread"
    assert m["splits"]["labeled"]["class_counts"] == prefix_counts(totals, 0.1, "around")
    assert m["split_rule"]["rounding"] == "around"
    assert m["splits"]["unlabeled"]["class_counts"] == totals.tolist()
    x, yy, _ = read_split(out, m, "unlabeled")
    assert np.array_equal(x, truth["train"][0]) and np.array_equal(yy, y127)
    x, yy, _ = read_split(out, m, "test")
    assert np.array_equal(x, truth["val"][0]) and np.array_equal(yy, lut[yv])
    x, yy, _ = read_split(out, m, "labeled")
    lab = plan_imagenet127(y127, 0.1)
    assert np.array_equal(x, truth["train"][0][lab]) and np.array_equal(yy, y127[lab])
    assert verify_dataset(out) == []


def test_downsampled_imagenet_bad_label(meta127: Path, tmp_path: Path, capsys) -> None:
    write_downsampled_imagenet(tmp_path / "src", [np.array([0, 5, 7])], np.array([1]), 8)
    p = tmp_path / "src" / "train_data_batch_1"
    d = pickle.loads(p.read_bytes())
    d["labels"][1] = 1001
    p.write_bytes(pickle.dumps(d))
    _expect_error(
        capsys,
        [
            "imagenet127",
            "--source",
            str(tmp_path / "src"),
            "--meta-dir",
            str(meta127),
            "--labeled-ratio",
            "0.1",
            "--out",
            str(tmp_path / "o"),
        ],
        str(p),
        "label 1001 in 'labels' is out of range 1..1000",
    )
    assert not (tmp_path / "o").exists()


def test_subset_lt_on_downsampled_imagenet(tmp_path: Path) -> None:
    y = np.repeat(np.arange(1000), 1)
    y[:60] = np.repeat([10, 11, 12], 20)  # classes 10..12 get 20+ images each
    truth = write_downsampled_imagenet(tmp_path / "src", [y[:500], y[500:]], np.arange(1000), 8)
    out = tmp_path / "d"
    args = [
        "subset-lt",
        "--source",
        str(tmp_path / "src"),
        "--source-kind",
        "imagenet",
        "--classes",
        "10-12",
        "--n1",
        "8",
        "--m1",
        "10",
        "--gamma-l",
        "4",
        "--gamma-u",
        "1",
        "--out",
        str(out),
        *Q,
    ]
    assert main(args) == 0
    m = load_manifest(out)
    assert m["num_classes"] == 3 and m["split_rule"]["classes"] == [10, 11, 12]
    assert m["splits"]["labeled"]["class_counts"] == lt_counts(8, 4, 3) == [8, 4, 2]
    assert m["splits"]["unlabeled"]["class_counts"] == [18, 14, 12]  # n_k + m_k (authors' rule)
    x, yy, _ = read_split(out, m, "test")
    assert np.array_equal(yy, [0, 1, 2]) and np.array_equal(x, truth["val"][0][10:13])


# ----------------------------------------------------------------------------------------------
# ImageNet-LT (real split lists, stand-in train list and JPEGs)


def _standin_train(lists: Path) -> list[str]:
    """The real 80% prefix per class, padded with made-up names to the real class totals."""
    lab80 = (lists / "ImageNet_LT_train_semi_80_labeled.txt").read_text().splitlines()
    totals = [
        int(ln.split()[1])
        for ln in (lists / "ImageNet_LT_train_semi_80_sample_num.txt").read_text().splitlines()
    ]
    by: dict[int, list[str]] = {}
    for ln in lab80:
        by.setdefault(int(ln.rsplit(None, 1)[1]), []).append(ln)
    out = []
    for k, n in enumerate(totals):
        wnid = by[k][0].split("/")[1]
        out += by[k] + [f"train/{wnid}/{wnid}_standin_{j}.JPEG {k}" for j in range(n - len(by[k]))]
    return out


@pytest.fixture(scope="module")
def lt_lists(tmp_path_factory) -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data not present")
    real = SHARED / "imagenet_lt"
    d = tmp_path_factory.mktemp("lt")
    (d / "ImageNet_LT_train.txt").write_text("\n".join(_standin_train(real)) + "\n")
    for n in ("val", "test"):
        shutil.copy(real / f"ImageNet_LT_{n}.txt", d)
    return d


@pytest.mark.parametrize("ratio,pct,total", [(0.2, 20, 23573), (0.5, 50, 58169)])
def test_imagenet_lt_plan_matches_authors_lists(lt_lists: Path, ratio, pct, total) -> None:
    plan = plan_imagenet_lt(lt_lists, ratio)
    rows = (SHARED / "imagenet_lt" / f"ImageNet_LT_train_semi_{pct}_sample_num.txt").read_text()
    want = [int(r.split()[0]) for r in rows.splitlines()]
    y = plan.train.labels[plan.labeled]
    assert len(plan.labeled) == total and np.bincount(y, minlength=1000).tolist() == want
    assert len(plan.train.paths) == 115846 and len(plan.val.paths) == 20000
    assert len(plan.test.paths) == 50000 and plan.class_names[0] == "n01440764"
    # labeled = per-class prefix of the authors' 80% list (which is itself a prefix)
    lab80 = (SHARED / "imagenet_lt" / "ImageNet_LT_train_semi_80_labeled.txt").read_text()
    first = {}
    for ln in lab80.splitlines():
        first.setdefault(int(ln.rsplit(None, 1)[1]), []).append(ln.rsplit(None, 1)[0])
    got = [plan.train.paths[i] for i in plan.labeled]
    assert got == [p for k in range(1000) for p in first[k][: want[k]]]


def _small_lt(lt_lists: Path, dst: Path, classes: int = 3) -> Path:
    """The lists restricted to the first ``classes`` labels (real lines)."""
    dst.mkdir()
    for n in ("train", "val", "test"):
        lines = (lt_lists / f"ImageNet_LT_{n}.txt").read_text().splitlines()
        keep = [ln for ln in lines if int(ln.rsplit(None, 1)[1]) < classes]
        (dst / f"ImageNet_LT_{n}.txt").write_text("\n".join(keep) + "\n")
    return dst


@pytest.fixture(scope="module")
def lt_small(lt_lists: Path, tmp_path_factory) -> tuple[Path, Path, dict]:
    base = tmp_path_factory.mktemp("ltsmall")
    lists = _small_lt(lt_lists, base / "lists")
    paths = []
    for n in ("train", "val", "test"):
        paths += [
            ln.rsplit(None, 1)[0]
            for ln in (lists / f"ImageNet_LT_{n}.txt").read_text().splitlines()
        ]
    jpegs = write_jpeg_tree(base / "imagenet", paths)
    return lists, base / "imagenet", jpegs


def _lt_args(root: Path, lists: Path, out: Path, *extra: str, ratio: str = "0.2") -> list[str]:
    """``bmb-shards imagenet-lt`` arguments for a JPEG tree and split lists."""
    return [
        "imagenet-lt",
        "--imagenet-root",
        str(root),
        "--split-lists",
        str(lists),
        "--labeled-ratio",
        ratio,
        "--out",
        str(out),
        *extra,
        *Q,
    ]


def test_imagenet_lt_build_keeps_jpeg_bytes(lt_small, tmp_path: Path) -> None:
    lists, root, jpegs = lt_small
    out = tmp_path / "d"
    assert main(_lt_args(root, lists, out, "--shard-size", "200")) == 0
    m = load_manifest(out)
    assert m["encoding"] == "jpg" and m["image_size"] is None and m["num_classes"] == 3
    want = [
        int(r.split()[0])
        for r in (SHARED / "imagenet_lt" / "ImageNet_LT_train_semi_20_sample_num.txt")
        .read_text()
        .splitlines()[:3]
    ]
    assert m["splits"]["labeled"]["class_counts"] == want
    assert m["splits"]["val"]["class_counts"] == [20, 20, 20]
    assert m["splits"]["test"]["class_counts"] == [50, 50, 50]
    plan = plan_imagenet_lt(lists, 0.2)
    from shards.format import iter_tar_samples

    got = {
        int(mem["idx"]): mem["jpg"]
        for sh in m["splits"]["unlabeled"]["shards"]
        for _, mem in iter_tar_samples(out / sh["file"])
    }  # the shards hold the split in shuffled order; idx i is list line i
    assert [got[i] for i in range(len(got))] == [jpegs[p] for p in plan.train.paths]
    assert verify_dataset(out) == []
    # --max-side resizes at build time
    out2 = tmp_path / "r"
    assert main(_lt_args(root, lists, out2, "--max-side", "8")) == 0
    m2 = load_manifest(out2)
    for _, mem in iter_tar_samples(out2 / m2["splits"]["test"]["shards"][0]["file"]):
        assert max(Image.open(io.BytesIO(mem["jpg"])).size) <= 8


def test_imagenet_lt_bad_inputs(lt_small, tmp_path: Path, capsys) -> None:
    lists, root, _ = lt_small
    bad_lists = tmp_path / "lists"
    shutil.copytree(lists, bad_lists)
    f = bad_lists / "ImageNet_LT_val.txt"
    lines = f.read_text().splitlines()
    lines[4] = "train/n01440764/does_not_exist.JPEG 0"
    f.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o"
    _expect_error(
        capsys,
        _lt_args(root, bad_lists, out, ratio="0.5"),
        f"{f}:5",
        "does_not_exist.JPEG not found",
    )
    # an unreadable JPEG: copy the tree, truncate one file
    root2 = tmp_path / "img"
    shutil.copytree(root, root2)
    p = root2 / lists.joinpath("ImageNet_LT_test.txt").read_text().split()[0]
    p.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    _expect_error(capsys, _lt_args(root2, lists, out, ratio="0.5"), str(p), "unreadable image")
    assert not (tmp_path / "o" / "manifest.json").exists()


# ----------------------------------------------------------------------------------------------
# FFCV


def test_ffcv_beton_roundtrip(tmp_path: Path) -> None:
    pytest.importorskip("ffcv.writer", exc_type=ImportError)
    from ffcv.reader import Reader

    from shards.writer import write_dataset

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    y = rng.integers(0, 3, 20)
    sp = {s: (x, y) for s in ("labeled", "unlabeled", "test")}
    m = write_dataset(
        tmp_path / "a", name="t", class_names=list("abc"), splits=sp, formats=("wds", "ffcv")
    )
    write_dataset(
        tmp_path / "b", name="t", class_names=list("abc"), splits=sp, formats=("wds", "ffcv")
    )
    f = tmp_path / "a" / m["splits"]["labeled"]["ffcv"]["file"]
    assert f.read_bytes() == (tmp_path / "b" / m["splits"]["labeled"]["ffcv"]["file"]).read_bytes()
    r = Reader(str(f))
    assert r.num_samples == 20
    assert verify_dataset(tmp_path / "a") == []


def test_missing_archive_member(tmp_path: Path, capsys) -> None:
    a = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(a, "w:gz") as t:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        t.addfile(info, io.BytesIO(b""))
    _expect_error(
        capsys, cifar_cli(a, tmp_path / "o"), str(a), "no member 'cifar-10-batches-py/data_batch_2'"
    )
