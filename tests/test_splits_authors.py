"""The authors' data protocol (issue 19): split rule, ImageNet127 rounding, full-resolution builders.

References are written here from the authors' code (BMB/dataset/utils.py
``train_split_labeled_unlabeled``, imagenet127_LT/generate_train_split.py,
ImageNet_LT_mismatch/generate_dataset.py), independently of shards/splits.py.
"""

from __future__ import annotations

import random
import shlex
from pathlib import Path

import numpy as np
import pytest

from shards.build_jpeg import plan_imagenet_mismatch
from shards.cli import build_parser, main
from shards.demo import make_demo
from shards.format import ManifestError, iter_tar_samples, load_manifest, split_overlap, validate_manifest
from shards.sources import IMAGENET127_LISTS, git_blob_sha1, load_wnid_to_127
from shards.splits import DISJOINT, INCLUDES, lt_counts, prefix_counts
from tests.fixtures_sources import write_cifar, write_jpeg_tree
from tests.shard_files import read_split, tree_bytes

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
Q = ["--no-progress", "--workers", "1"]


def authors_split(labels, n_lab, n_unl, seed):
    """``train_split_labeled_unlabeled`` as the authors run it: ``np.random.seed(seed)`` once
    (``set_random_seed`` just before the split), ``np.random.shuffle`` per class iff seed != 0."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        lab, unl = [], []
        for i in range(len(n_lab)):
            idxs = np.where(np.array(labels) == i)[0]
            if seed != 0:
                np.random.shuffle(idxs)
            lab.extend(idxs[: n_lab[i]])
            unl.extend(idxs[: n_lab[i] + n_unl[i]])
        return np.array(lab), np.array(unl)
    finally:
        np.random.set_state(state)


def read_jpeg_split(d: Path, m: dict, split: str) -> tuple[list[bytes], list[int]]:
    """Stored image bytes and labels of a split, in index order."""
    rows = []
    for sh in m["splits"][split]["shards"]:
        for _key, mem in iter_tar_samples(d / sh["file"]):
            rows.append((int(mem["idx"]), mem["jpg"], int(mem["cls"])))
    rows.sort()
    assert [r[0] for r in rows] == list(range(len(rows)))
    return [r[1] for r in rows], [r[2] for r in rows]


# ----------------------------------------------------------------------------------------------
# CIFAR: the default is the authors' rule, disjoint on request


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory) -> dict:
    # unequal classes, shuffled labels across the 5 batches: source order matters
    return write_cifar(tmp_path_factory.mktemp("c10"), "cifar10", [40, 45, 38, 42, 45, 39, 41, 44, 40, 43])


def _cifar(src: Path, out: Path, *extra: str) -> list[str]:
    return ["cifar-lt", "--source", str(src), "--dataset", "cifar10", "--out", str(out), *Q,
            "--n1", "15", "--m1", "25", "--gamma-l", "10", "--gamma-u", "5", *extra]  # fmt: skip


@pytest.mark.parametrize("seed", [0, 3])
def test_default_split_is_the_authors_rule(cifar10, tmp_path: Path, seed: int) -> None:
    out = tmp_path / "d"
    assert main(_cifar(cifar10["archive"], out, "--seed", str(seed))) == 0
    m = load_manifest(out)
    n, mm = lt_counts(15, 10, 10), lt_counts(25, 5, 10)
    assert m["split_rule"]["overlap"] == INCLUDES == split_overlap(m)
    assert m["splits"]["unlabeled"]["class_counts"] == [a + b for a, b in zip(n, mm)]
    xtr, ytr = cifar10["train"]
    ref_lab, ref_unl = authors_split(ytr, n, mm, seed)
    xl, yl, _ = read_split(out, m, "labeled")
    xu, yu, _ = read_split(out, m, "unlabeled")
    # the authors' order: sample i of each split is their i-th index (compared by content)
    assert np.array_equal(xl, xtr[ref_lab]) and np.array_equal(yl, ytr[ref_lab])
    assert np.array_equal(xu, xtr[ref_unl]) and np.array_equal(yu, ytr[ref_unl])
    # every labeled image is among the unlabeled ones, as the first n_k of its class
    unl_bytes = {x.tobytes() for x in xu}
    assert all(x.tobytes() in unl_bytes for x in xl)
    for k in range(10):
        assert np.array_equal(xu[yu == k][: n[k]], xl[yl == k])
    if seed == 0:  # no shuffle at seed 0: each class in source order
        assert (np.diff(ref_unl[ytr[ref_unl] == 4]) > 0).all()
    else:  # seed 3 really shuffles
        assert not (np.diff(ref_unl[ytr[ref_unl] == 4]) > 0).all()


def test_disjoint_on_request_is_the_old_rule(cifar10, tmp_path: Path) -> None:
    out = tmp_path / "d"
    assert main(_cifar(cifar10["folder"], out, "--seed", "2", "--split-rule", "disjoint")) == 0
    m = load_manifest(out)
    assert "overlap" not in m["split_rule"] and split_overlap(m) == DISJOINT  # old manifests' bytes
    n, mm = lt_counts(15, 10, 10), lt_counts(25, 5, 10)
    assert m["splits"]["unlabeled"]["class_counts"] == mm
    xtr, ytr = cifar10["train"]
    rng = np.random.RandomState(2)  # the old rule: shuffle every class, n_k labeled, m_k next
    lab, unl = [], []
    for k in range(10):
        idx = np.flatnonzero(ytr == k)
        rng.shuffle(idx)
        lab.append(idx[: n[k]])
        unl.append(idx[n[k] : n[k] + mm[k]])
    xl, _, _ = read_split(out, m, "labeled")
    xu, _, _ = read_split(out, m, "unlabeled")
    assert np.array_equal(xl, xtr[np.concatenate(lab)]) and np.array_equal(xu, xtr[np.concatenate(unl)])
    # byte-identical re-run; the default differs from it
    assert main(_cifar(cifar10["folder"], tmp_path / "e", "--seed", "2", "--split-rule", "disjoint")) == 0
    assert tree_bytes(out) == tree_bytes(tmp_path / "e")


def test_cifar10_gamma100_counts() -> None:
    n, mm = lt_counts(1500, 100, 10), lt_counts(3000, 100, 10)
    assert sum(n) == 3720 and sum(mm) == 7443 and sum(n) + sum(mm) == 11163


def test_demo_default_prepends_the_labeled_images() -> None:
    kw = {"num_classes": 4, "n1": 6, "m1": 9, "gamma_l": 3.0, "gamma_u": 3.0, "test_per_class": 2, "size": 8}
    inc, dis = make_demo(**kw, overlap=INCLUDES), make_demo(**kw, overlap=DISJOINT)
    for s in ("labeled", "test"):
        assert all(np.array_equal(a, b) for a, b in zip(inc[s], dis[s]))
    (xl, yl), (xd, yd), (xu, yu) = inc["labeled"], dis["unlabeled"], inc["unlabeled"]
    for k in range(4):
        assert np.array_equal(xu[yu == k], np.concatenate([xl[yl == k], xd[yd == k]]))
    with pytest.raises(ValueError, match="split rule"):
        make_demo(**kw, overlap="both")


def test_manifest_overlap_is_validated_and_old_manifests_read_right(tmp_path: Path) -> None:
    out = tmp_path / "d"
    assert main(["demo", "--num-classes", "3", "--n1", "4", "--m1", "6", "--test-per-class", "1",
                 "--out", str(out), *Q]) == 0  # fmt: skip
    m = load_manifest(out)
    assert m["split_rule"]["overlap"] == INCLUDES
    m["split_rule"]["overlap"] = "some"
    with pytest.raises(ManifestError, match=r"split_rule\.overlap.*'some'"):
        validate_manifest(m, out / "manifest.json")
    del m["split_rule"]["overlap"]
    assert split_overlap(m) == DISJOINT  # a demo built before the key: disjoint
    assert split_overlap({"split_rule": {"rule": "imagenet-lt"}}) == INCLUDES  # always all of train


def test_rebuild_command_of_an_old_disjoint_dataset_keeps_it_disjoint() -> None:
    from pipelines.shard_index import rebuild_command

    shard = {"file": "x", "count": 10, "sha256": ""}
    split = {"count": 20, "shards": [shard, shard], "arrays": None, "ffcv": None}
    for rule, want in (({"rule": "demo-lt", "n1": 4}, DISJOINT), ({"rule": "demo-lt", "overlap": INCLUDES}, INCLUDES)):
        m = {"split_rule": rule, "source": {}, "seed": 0, "splits": {"unlabeled": split}}
        a = build_parser().parse_args(shlex.split(rebuild_command(Path("/o"), m))[1:])
        assert a.split_rule == want
    m = {"split_rule": {"rule": "imagenet127-jpeg", "labeled_ratio": 0.01, "rounding": "floor", "max_side": 500},
         "source": {"path": "/in"}, "seed": 0, "splits": {"unlabeled": split}}  # fmt: skip
    a = build_parser().parse_args(shlex.split(rebuild_command(Path("/o"), m).replace("<", ""))[1:])
    assert str(a.from_jpeg) == "/in" and a.rounding == "floor" and a.max_side == 500


# ----------------------------------------------------------------------------------------------
# ImageNet127 rounding


def test_rounding_rules() -> None:
    # np.around rounds half to even, like the authors' int(np.around(n*p))
    assert prefix_counts([250, 350, 1300, 969], 0.01, "around") == [2, 4, 13, 10]
    assert prefix_counts([250, 350, 1300, 969], 0.01, "floor") == [2, 3, 13, 9]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
@pytest.mark.parametrize("pct,floor,around", [(1, 12799, 12811), (10, 128101, 128118)])
def test_imagenet127_counts_of_both_rules(pct: int, floor: int, around: int) -> None:
    rows = (SHARED / "imagenet127" / f"ImageNet127_LT_train_semi_{pct}_sample_num.txt").read_text().split("\n")
    rows = [tuple(map(int, r.split())) for r in rows if r.strip()]
    totals = [r[1] for r in rows]
    assert prefix_counts(totals, pct / 100, "floor") == [r[0] for r in rows] and sum(r[0] for r in rows) == floor
    assert sum(prefix_counts(totals, pct / 100, "around")) == around


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
def test_real_class_map_agrees_with_the_authors_labeled_list() -> None:
    d = SHARED / "imagenet127"
    wmap, names, _ = load_wnid_to_127(d)
    lines = (d / "ImageNet127_LT_train_semi_1_labeled.txt").read_text().split("\n")
    rows = [ln.rsplit(None, 1) for ln in lines if ln.strip()]
    assert len(rows) == 12799 and len(wmap) == 1000 and len(names) == 127
    blob = IMAGENET127_LISTS["ImageNet127_LT_train_semi_1_labeled.txt"][1]  # what --download checks
    assert git_blob_sha1((d / "ImageNet127_LT_train_semi_1_labeled.txt").read_bytes()) == blob
    assert all(wmap[p.split("/")[1]] == int(y) for p, y in rows)
    totals = [int(r.split()[1]) for r in (d / "ImageNet127_LT_train_semi_1_sample_num.txt").read_text().split("\n")
              if r.strip()]  # fmt: skip
    got = np.bincount([int(y) for _, y in rows], minlength=127).tolist()
    assert got == prefix_counts(totals, 0.01, "floor")  # --labeled-list accepts it with the defaults


# ----------------------------------------------------------------------------------------------
# Full-resolution ImageNet127 (stand-in map: 1000 made-up wnids, class = index % 127)


@pytest.fixture(scope="module")
def in127(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("in127")
    meta = root / "meta"
    meta.mkdir()
    wnids = [f"n{90000000 + 7 * i:08d}" for i in range(1000)]
    rows = ["wnid\tidx1000_in_map_clsloc\tclass127_index\tclass127_wnid\thow_derived"]
    rows += [f"{w}\t{i + 1}\t{i % 127}\tn8{i % 127:07d}\ttest" for i, w in enumerate(wnids)]
    (meta / "wnid_to_127.tsv").write_text("\n".join(rows) + "\n")
    per = np.random.default_rng(5).integers(1, 4, 1000)
    train = [f"train/{w}/{w}_{j}.JPEG" for w, c in zip(wnids, per) for j in range(c)]
    val = [f"val/{w}/ILSVRC2012_val_{i:08d}.JPEG" for i, w in enumerate(wnids[:300])]
    files = write_jpeg_tree(root / "imagenet", train + val, seed=1)
    return {"root": root / "imagenet", "meta": meta, "wnids": wnids, "train": train, "val": val, "bytes": files}


def _in127_cli(d: dict, out: Path, *extra: str) -> list[str]:
    return ["imagenet127", "--from-jpeg", str(d["root"]), "--meta-dir", str(d["meta"]),
            "--labeled-ratio", "0.5", "--out", str(out), "--shard-size", "700", *Q, *extra]  # fmt: skip


def test_imagenet127_from_jpeg_follows_the_authors(in127: dict, tmp_path: Path) -> None:
    out = tmp_path / "d"
    assert main(_in127_cli(in127, out)) == 0
    m = load_manifest(out)
    assert m["encoding"] == "jpg" and m["image_size"] is None and m["num_classes"] == 127
    rule = m["split_rule"]
    assert rule["rule"] == "imagenet127-jpeg" and rule["rounding"] == "floor" and rule["sample_seed"] == 2023
    label = {w: i % 127 for i, w in enumerate(in127["wnids"])}
    # reference from generate_train_split.py: per class (label order) its images, n_k = int(n*p),
    # random.seed(2023) once, random.sample(class_list, n_k)
    groups: list[list[str]] = [[] for _ in range(127)]
    for p in sorted(in127["train"]):
        groups[label[p.split("/")[1]]].append(p)
    rnd = random.Random(2023)
    ref_lab = [p for g in groups for p in rnd.sample(g, int(len(g) * 0.5))]
    ref_unl = [p for g in groups for p in g]
    b = in127["bytes"]
    for split, ref in (("labeled", ref_lab), ("unlabeled", ref_unl)):
        got, y = read_jpeg_split(out, m, split)
        assert got == [b[p] for p in ref]  # original JPEG bytes, in the reference order
        assert y == [label[p.split("/")[1]] for p in ref]
    assert set(ref_lab) <= set(ref_unl) and len(ref_unl) == len(in127["train"])
    got, y = read_jpeg_split(out, m, "test")
    assert sorted(got) == sorted(b[p] for p in in127["val"]) and y == sorted(y)
    assert main(_in127_cli(in127, tmp_path / "e", "--workers", "2")) == 0
    assert tree_bytes(out) == tree_bytes(tmp_path / "e")


def test_imagenet127_from_jpeg_labeled_list_and_bad_inputs(in127: dict, tmp_path: Path, capsys) -> None:
    label = {w: i % 127 for i, w in enumerate(in127["wnids"])}
    groups: list[list[str]] = [[] for _ in range(127)]
    for p in sorted(in127["train"]):
        groups[label[p.split("/")[1]]].append(p)
    chosen = [p for g in groups for p in reversed(g[len(g) - int(len(g) * 0.5):])]
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{p} {label[p.split('/')[1]]}\n" for p in chosen))
    out = tmp_path / "d"
    assert main(_in127_cli(in127, out, "--labeled-list", str(lst))) == 0
    m = load_manifest(out)
    got, _ = read_jpeg_split(out, m, "labeled")
    assert got == [in127["bytes"][p] for p in chosen] and m["split_rule"]["labeled_list"] == "list.txt"

    def err(*extra: str, root: Path | None = None) -> str:
        args = _in127_cli(in127, tmp_path / "bad", *extra)
        if root is not None:
            args[2] = str(root)
        assert main(args) == 2
        assert not (tmp_path / "bad").exists()  # nothing written before the inputs are checked
        return capsys.readouterr().err

    p0 = chosen[0]
    lst.write_text(f"{p0} {(label[p0.split('/')[1]] + 1) % 127}\n")
    assert f"{lst}:1: {p0} has label" in err("--labeled-list", str(lst))
    lst.write_text("".join(f"{p} {label[p.split('/')[1]]}\n" for p in chosen[1:]))
    assert "labeled images, the --labeled-ratio/--rounding rule gives" in err("--labeled-list", str(lst))
    assert "--labeled-list needs --from-jpeg" in err_source(tmp_path, in127, capsys, "--labeled-list", str(lst))
    partial = tmp_path / "partial"
    write_jpeg_tree(partial, [in127["train"][0], in127["val"][0]])
    assert "no folder for class" in err(root=partial)
    stray = tmp_path / "stray"
    write_jpeg_tree(stray, ["train/n00000001/a.JPEG"])
    assert "not one of the 1000 classes" in err(root=stray)


def err_source(tmp_path: Path, d: dict, capsys, *extra: str) -> str:
    args = ["imagenet127", "--source", str(tmp_path), "--meta-dir", str(d["meta"]), "--labeled-ratio", "0.1",
            "--out", str(tmp_path / "bad"), *Q, *extra]  # fmt: skip
    assert main(args) == 2
    return capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Mismatch datasets (generate_dataset.py)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mm") / "imagenet"
    wnids = [f"n0{k}123456" for k in (7, 1, 5, 3, 9, 2)]  # listed unsorted on purpose
    train = [f"train/{w}/{w}_{j}.JPEG" for w in wnids for j in rng_names(w)]
    val = [f"val/{w}/v_{j}.JPEG" for w in wnids for j in range(2)]
    return {"root": root, "bytes": write_jpeg_tree(root, train + val, seed=2), "train": train, "wnids": sorted(wnids)}


def rng_names(w: str) -> list[int]:
    return [int(v) for v in np.random.default_rng(int(w[1:])).permutation(1000)[:20]]


@pytest.mark.parametrize("gamma_u", [1.0, 2.0, 6.0])
def test_mismatch_plan_follows_generate_dataset(tree: dict, gamma_u: float) -> None:
    parts, classes = plan_imagenet_mismatch(tree["root"], 8, 10, 4.0, gamma_u)
    assert classes == tree["wnids"]
    n, mm = lt_counts(8, 4.0, 6), lt_counts(10, gamma_u, 6)
    lab, unl = [], []
    for k, w in enumerate(classes):  # their rule over the sorted listing: no shuffle (seed 0)
        files = sorted(p for p in tree["train"] if p.split("/")[1] == w)
        lab += files[: n[k]]
        unl += files[: n[k] + mm[k]]
    assert parts["labeled"][0] == lab and parts["unlabeled"][0] == unl
    assert np.bincount(parts["unlabeled"][1], minlength=6).tolist() == [a + b for a, b in zip(n, mm)]
    dis, _ = plan_imagenet_mismatch(tree["root"], 8, 10, 4.0, gamma_u, seed=0, overlap=DISJOINT)
    assert not set(dis["labeled"][0]) & set(dis["unlabeled"][0])
    assert np.bincount(dis["unlabeled"][1], minlength=6).tolist() == mm


def test_mismatch_build_and_bad_inputs(tree: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "d"
    base = ["imagenet-mismatch", "--source", str(tree["root"]), "--n1", "8", "--m1", "10", "--gamma-l", "4",
            "--gamma-u", "2", *Q]  # fmt: skip
    assert main([*base, "--out", str(out)]) == 0
    m = load_manifest(out)
    parts, _ = plan_imagenet_mismatch(tree["root"], 8, 10, 4.0, 2.0)
    for s in ("labeled", "unlabeled", "test"):
        got, y = read_jpeg_split(out, m, s)
        assert got == [tree["bytes"][p] for p in parts[s][0]] and y == parts[s][1].tolist()
    assert m["split_rule"]["overlap"] == INCLUDES and m["class_names"] == tree["wnids"]
    a = build_parser().parse_args(["imagenet-mismatch", "--source", "x", "--gamma-l", "1", "--gamma-u", "1",
                                   "--out", "o"])  # fmt: skip
    assert (a.n1, a.m1) == (600, 300)
    assert main([*base, "--n1", "30", "--out", str(tmp_path / "bad")]) == 2
    assert "class 0 has 20 train images, fewer than the 30 labeled" in capsys.readouterr().err
    write_jpeg_tree(tree["root"], ["val/n00000000/x.JPEG"])
    try:
        assert main([*base, "--out", str(tmp_path / "bad")]) == 2
        assert "n00000000: class folder not among the train classes" in capsys.readouterr().err
    finally:
        (tree["root"] / "val" / "n00000000" / "x.JPEG").unlink()
        (tree["root"] / "val" / "n00000000").rmdir()
    assert not (tmp_path / "bad").exists()


def test_mismatch_build_resumes_after_an_interrupt(tree: dict, tmp_path: Path, monkeypatch) -> None:
    import shards.build_jpeg as BJ
    from shards import writer as W

    args = ["imagenet-mismatch", "--source", str(tree["root"]), "--n1", "8", "--m1", "10", "--gamma-l", "4",
            "--gamma-u", "2", "--shard-size", "4", *Q]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    real = BJ.jpeg_jobs

    def flaky(root, parts):
        def jobs(b):
            for i, job in enumerate(real(root, parts)(b)):
                if i == 2:
                    raise KeyboardInterrupt
                yield job

        return jobs

    monkeypatch.setattr(BJ, "jpeg_jobs", flaky)
    d = tmp_path / "d"
    assert main([*args, "--out", str(d)]) == 130
    assert not (d / "manifest.json").exists() and (d / W.PROGRESS).exists()
    monkeypatch.setattr(BJ, "jpeg_jobs", real)
    assert main([*args, "--out", str(d)]) == 0
    assert tree_bytes(d) == tree_bytes(tmp_path / "ref")
