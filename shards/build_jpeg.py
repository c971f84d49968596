"""Builders from a full-resolution ImageNet folder tree (``train/<wnid>/``, ``val/<wnid>/``).

* ImageNet127 at full resolution (:func:`build_imagenet127_jpeg`), the split of the authors'
  SGD scripts (``--dataset imagenet127``, ``BMB/dataset/imagenet127.py`` reading the lists of
  ``imagenet127_LT/generate_train_split.py``);
* the mismatch datasets of ``BMB/dataset/ImageNet_LT_mismatch/generate_dataset.py``
  (:func:`build_imagenet_mismatch`).

Both store the JPEG files' bytes (optionally resized, ``max_side``). ``plan_*`` functions compute
the split from the listing alone, for tests and checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shards import sources as src
from shards.build import BuildOptions, JpegParts, _fmt, jpeg_jobs, jpeg_split_specs
from shards.splits import DEFAULT_OVERLAP, INCLUDES, lt_split, prefix_counts, sample_per_class

# The authors' generate_train_split.py seeds Python's random module with 2023 before sampling.
IMAGENET127_SAMPLE_SEED = 2023


def _source_record(root: Path, kind: str, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "path": str(Path(root).resolve()), "checksum": None, **extra}


def _grouped(files: list[list[str]], labels_of: list[int], num_classes: int) -> list[list[str]]:
    """Relative paths regrouped by target class (class folders in order, files in order)."""
    out: list[list[str]] = [[] for _ in range(num_classes)]
    for fs, y in zip(files, labels_of):
        out[y].extend(fs)
    return out


def _flat(groups: list[list[str]]) -> tuple[list[str], np.ndarray]:
    paths = [p for g in groups for p in g]
    return paths, np.repeat(np.arange(len(groups), dtype=np.int64), [len(g) for g in groups])


def _test_split(root: Path, label_of: dict[str, int], num_classes: int) -> tuple[list[str], np.ndarray]:
    """Every ``val/<wnid>/`` image, labelled through ``label_of``, grouped by class."""
    val = src.scan_class_tree(root, "val")
    unknown = [w for w in val.classes if w not in label_of]
    if unknown:
        raise ValueError(f"{val.folder / unknown[0]}: class folder not among the train classes")
    return _flat(_grouped(val.files, [label_of[w] for w in val.classes], num_classes))


# ----------------------------------------------------------------------------------------------
# ImageNet127 at full resolution


@dataclass
class ImageNet127Plan:
    """The full-resolution ImageNet127 split: relative paths and 127-class labels per split."""

    parts: JpegParts
    class_names: list[str]
    class_map: dict[str, Any]
    labeled_from: str  # "sample" or the list file's name


def _labeled_from_list(path: Path, groups: list[list[str]], counts: list[int]) -> list[str]:
    """The authors' labeled list (``train/<wnid>/<img> <label>``), checked against the tree."""
    lst = src.read_split_list(path)
    label_of = {p: k for k, g in enumerate(groups) for p in g}
    seen: set[str] = set()
    for i, (p, y) in enumerate(zip(lst.paths, lst.labels.tolist()), 1):
        if p not in label_of:
            raise ValueError(f"{path}:{i}: {p} is not an image of the train tree")
        if label_of[p] != y:
            raise ValueError(f"{path}:{i}: {p} has label {y}, the class map says {label_of[p]}")
        if p in seen:
            raise ValueError(f"{path}:{i}: {p} listed twice")
        seen.add(p)
    got = np.bincount(lst.labels, minlength=len(groups)).tolist()
    bad = [k for k in range(len(groups)) if got[k] != counts[k]]
    if bad:
        k = bad[0]
        raise ValueError(
            f"{path}: class {k} has {got[k]} labeled images, the --labeled-ratio/--rounding rule "
            f"gives {counts[k]} (pass the ratio and rounding the list was made with)"
        )
    return lst.paths


def plan_imagenet127_jpeg(
    root: Path,
    meta_dir: Path,
    ratio: float,
    rounding: str = "floor",
    labeled_list: Path | None = None,
) -> ImageNet127Plan:
    """The authors' full-resolution ImageNet127 split.

    Every train image is unlabeled (grouped by 127-class, each class in sorted-path order). The
    labeled set has ``floor(p*n_k)`` images of class k (``rounding``), drawn as their
    ``generate_train_split.py`` does: one ``random.Random(2023)``, ``sample(class_list, n_k)``
    per class in label order -- over our sorted class list, as their list file's order is not
    published. ``labeled_list``: their own list instead (e.g. ``ImageNet127_LT_train_semi_1_
    labeled.txt``), checked image by image against the tree and the class map. Test = every
    ``val/<wnid>/`` image.
    """
    root = Path(root)
    wmap, names, class_map = src.load_wnid_to_127(meta_dir)
    tree = src.scan_class_tree(root, "train")
    unknown = [w for w in tree.classes if w not in wmap]
    if unknown:
        raise ValueError(f"{tree.folder / unknown[0]}: not one of the 1000 classes of the class map")
    missing = sorted(set(wmap) - set(tree.classes))
    if missing:
        raise ValueError(f"{tree.folder}: no folder for class {missing[0]} ({len(missing)} missing)")
    groups = _grouped(tree.files, [wmap[w] for w in tree.classes], 127)
    counts = prefix_counts([len(g) for g in groups], ratio, rounding)
    if labeled_list is not None:
        lab_paths = _labeled_from_list(Path(labeled_list), groups, counts)
    else:
        lab_paths = sample_per_class(groups, counts, IMAGENET127_SAMPLE_SEED)
    label_of = {p: k for k, g in enumerate(groups) for p in g}
    parts: JpegParts = {
        "labeled": (lab_paths, np.asarray([label_of[p] for p in lab_paths], np.int64)),
        "unlabeled": _flat(groups),
        "test": _test_split(root, wmap, 127),
    }
    return ImageNet127Plan(parts, names, class_map, Path(labeled_list).name if labeled_list else "sample")


def build_imagenet127_jpeg(
    opts: BuildOptions,
    root: Path,
    meta_dir: Path,
    ratio: float,
    rounding: str = "floor",
    labeled_list: Path | None = None,
    max_side: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Full-resolution ImageNet127 (:func:`plan_imagenet127_jpeg`) as JPEG shards."""
    plan = plan_imagenet127_jpeg(root, meta_dir, ratio, rounding, labeled_list)
    rule: dict[str, Any] = {
        "rule": "imagenet127-jpeg",
        "labeled_ratio": ratio,
        "rounding": rounding,
        "overlap": INCLUDES,
        "max_side": max_side,
    }
    if labeled_list is not None:
        rule["labeled_list"] = plan.labeled_from
    else:
        rule["sample_seed"] = IMAGENET127_SAMPLE_SEED
    b = opts.builder(
        name=f"imagenet127-jpeg-p{_fmt(ratio)}" + (f"-max{max_side}" if max_side else ""),
        class_names=plan.class_names,
        splits=jpeg_split_specs(plan.parts),
        encoding="jpg",
        image_size=None,
        source=_source_record(root, "imagenet-jpeg", class_map=plan.class_map),
        split_rule=rule,
        seed=seed,
        max_side=max_side,
    )
    return b.run(jpeg_jobs(Path(root), plan.parts))


# ----------------------------------------------------------------------------------------------
# Mismatch datasets (generate_dataset.py)


def plan_imagenet_mismatch(
    root: Path,
    n1: int,
    m1: int,
    gamma_l: float,
    gamma_u: float,
    seed: int = 0,
    overlap: str = DEFAULT_OVERLAP,
) -> tuple[JpegParts, list[str]]:
    """The authors' mismatch split of every class folder of ``root/train`` (1000 for ImageNet).

    Class k (folders sorted by name) gets ``n_k`` labeled and, under their rule, the first
    ``n_k + m_k`` of its images as unlabeled (:func:`shards.splits.lt_split`; ``n_k``, ``m_k``
    the long-tailed counts of ``n1, gamma_l`` and ``m1, gamma_u``). Images in file-name order
    (theirs: ``os.listdir``'s); their generator never shuffles (its seed is always 0), ours
    shuffles per class when ``seed != 0`` as their CIFAR split does. Test = every
    ``val/<wnid>/`` image, labelled by the train folder's index.
    """
    root = Path(root)
    tree = src.scan_class_tree(root, "train")
    c = len(tree.classes)
    if c < 2:
        raise ValueError(f"{tree.folder}: needs at least 2 class folders, found {c}")
    paths, labels = _flat(tree.files)
    lab, unl = lt_split(labels, c, n1, m1, gamma_l, gamma_u, seed, overlap)
    parts: JpegParts = {
        "labeled": ([paths[i] for i in lab], labels[lab]),
        "unlabeled": ([paths[i] for i in unl], labels[unl]),
        "test": _test_split(root, {w: k for k, w in enumerate(tree.classes)}, c),
    }
    return parts, tree.classes


def build_imagenet_mismatch(
    opts: BuildOptions,
    root: Path,
    n1: int,
    m1: int,
    gamma_l: float,
    gamma_u: float,
    seed: int = 0,
    overlap: str = DEFAULT_OVERLAP,
    max_side: int | None = None,
) -> dict[str, Any]:
    """A mismatch dataset (:func:`plan_imagenet_mismatch`) as JPEG shards."""
    parts, classes = plan_imagenet_mismatch(root, n1, m1, gamma_l, gamma_u, seed, overlap)
    rule: dict[str, Any] = {
        "rule": "imagenet-mismatch",
        "n1": n1,
        "m1": m1,
        "gamma_l": gamma_l,
        "gamma_u": gamma_u,
        "overlap": overlap,
        "max_side": max_side,
    }
    b = opts.builder(
        name=f"imagenet-mismatch-n{n1}-m{m1}-gl{_fmt(gamma_l)}-gu{_fmt(gamma_u)}-s{seed}"
        + (f"-max{max_side}" if max_side else ""),
        class_names=classes,
        splits=jpeg_split_specs(parts),
        encoding="jpg",
        image_size=None,
        source=_source_record(root, "imagenet-jpeg"),
        split_rule=rule,
        seed=seed,
        max_side=max_side,
    )
    return b.run(jpeg_jobs(Path(root), parts))
