"""One builder per paper setting: read the source, apply the split rule, stream jobs.

Each ``build_*`` function validates its inputs *before* touching ``out`` (bad input never
leaves a directory behind), then hands a job stream to :class:`shards.writer.DatasetBuilder`.
``plan_*`` functions compute the split alone (no images read), for ``--dry-run`` and tests.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shards import sources as src
from shards.splits import DEFAULT_OVERLAP, INCLUDES, first_per_class, lt_split, overlap_record, prefix_counts
from shards.writer import CHUNK, DatasetBuilder, Job, SplitSpec, array_jobs

JPG_CHUNK = 64


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, np.int64).tobytes())
    return h.hexdigest()


def _fmt(x: float) -> str:
    return f"{x:g}"


@dataclass
class BuildOptions:
    """Output options shared by every setting (see ``DatasetBuilder`` for each field)."""

    out: Path
    formats: Sequence[str] = ("wds",)
    shard_size: int | None = None
    workers: int = 1
    progress: bool = True
    overwrite: bool = False

    def builder(self, **kw: Any) -> DatasetBuilder:
        return DatasetBuilder(
            self.out,
            formats=self.formats,
            shard_size=self.shard_size,
            workers=self.workers,
            progress=self.progress,
            overwrite=self.overwrite,
            **kw,
        )


# ----------------------------------------------------------------------------------------------
# CIFAR-LT and subset-LT (any class-labeled source)


def parse_classes(spec: str | None, num_classes: int) -> np.ndarray:
    """``"0-9,20,30-39"`` -> sorted unique class ids (all classes when ``spec`` is None)."""
    if not spec:
        return np.arange(num_classes)
    ids: set[int] = set()
    for part in spec.split(","):
        a, _, b = part.strip().partition("-")
        try:
            lo, hi = int(a), int(b or a)
        except ValueError as e:
            raise ValueError(f"--classes: cannot parse {part!r} (use e.g. 0-99,120)") from e
        if not 0 <= lo <= hi < num_classes:
            raise ValueError(f"--classes: {part!r} is outside 0..{num_classes - 1}")
        ids.update(range(lo, hi + 1))
    return np.asarray(sorted(ids))


def lt_from_arrays(
    opts: BuildOptions,
    source: src.ArraySource,
    *,
    rule: str,
    n1: int,
    m1: int,
    gamma_l: float,
    gamma_u: float,
    seed: int,
    classes: str | None = None,
    name: str | None = None,
    overlap: str = DEFAULT_OVERLAP,
) -> dict[str, Any]:
    """Build a long-tailed split of an in-memory source (classes relabelled 0..K-1).

    ``overlap`` is the split rule (:func:`shards.splits.lt_split`): the authors' (unlabeled
    includes labeled, recorded as ``split_rule.overlap``) or ``disjoint`` (recorded by the key's
    absence, so a disjoint build's bytes are those of builds made before the key existed). The
    test split is the source's test set restricted to the chosen classes, unchanged.
    """
    keep = parse_classes(classes, len(source.class_names))
    remap = np.full(len(source.class_names), -1, np.int64)
    remap[keep] = np.arange(len(keep))
    tr_sel = np.flatnonzero(remap[source.train_y] >= 0)
    te_sel = np.flatnonzero(remap[source.test_y] >= 0)
    ytr = remap[source.train_y[tr_sel]]
    lab, unl = lt_split(ytr, len(keep), n1, m1, gamma_l, gamma_u, seed, overlap)
    lab, unl = tr_sel[lab], tr_sel[unl]
    parts = {
        "labeled": (lab, source.train_x, remap[source.train_y[lab]]),
        "unlabeled": (unl, source.train_x, remap[source.train_y[unl]]),
        "test": (te_sel, source.test_x, remap[source.test_y[te_sel]]),
    }
    split_rule: dict[str, Any] = {
        "rule": rule,
        "n1": n1,
        "m1": m1,
        "gamma_l": gamma_l,
        "gamma_u": gamma_u,
    }
    if classes:
        split_rule["classes"] = [int(k) for k in keep]
    split_rule.update(overlap_record(overlap))
    name = name or (
        f"{source.record['kind']}-lt-n{n1}-m{m1}-gl{_fmt(gamma_l)}-gu{_fmt(gamma_u)}-s{seed}"
    )
    b = opts.builder(
        name=name,
        class_names=[source.class_names[k] for k in keep],
        splits={s: SplitSpec(y, _digest(idx, y)) for s, (idx, _x, y) in parts.items()},
        encoding="png",
        image_size=list(source.train_x.shape[1:3]),
        source=source.record,
        split_rule=split_rule,
        seed=seed,
    )

    def jobs(b: DatasetBuilder) -> Iterator[Job]:
        for s, (idx, x, _y) in parts.items():
            order = b.order(s)
            for a in range(0, len(idx), CHUNK):
                z = min(len(idx), a + CHUNK)
                if b.pending(s, a, z):
                    yield Job(s, a, "png", x[idx[order[a:z]]])

    return b.run(jobs)


def load_imagenet_subset(root: Path, meta_dir: Path | None, classes: str | None) -> src.ArraySource:
    """Downsampled ImageNet restricted to ``classes`` (map_clsloc order), held in memory."""
    ds = src.scan_downsampled_imagenet(root)
    keep = parse_classes(classes, 1000)
    mask = np.zeros(1000, bool)
    mask[keep] = True
    names = [f"class_{k:04d}" for k in range(1000)]
    if meta_dir is not None and (Path(meta_dir) / "map_clsloc.txt").is_file():
        names = src.read_map_clsloc(Path(meta_dir) / "map_clsloc.txt")
    xs, ys = [], []
    offset = 0
    for f, n in zip(ds.train_files, ds.train_sizes):
        y = ds.train_y[offset : offset + n]
        offset += n
        if mask[y].any():  # only the chosen classes are kept in memory
            xs.append(ds.load_images(f)[mask[y]])
            ys.append(y[mask[y]])
    if not xs:
        raise ValueError(f"{root}: no train image of the chosen --classes")
    vx = ds.load_images(ds.val_file)
    sel = mask[ds.val_y]
    # keep every class id (unchosen ones simply have no images) so the --classes remap applies
    return src.ArraySource(
        np.concatenate(xs), np.concatenate(ys), vx[sel], ds.val_y[sel], names, ds.record()
    )


# ----------------------------------------------------------------------------------------------
# ImageNet127


def plan_imagenet127(train_y127: np.ndarray, ratio: float, rounding: str = "around") -> np.ndarray:
    """Labeled indices: the first ``round(p*n_k)`` images of each 127-class, source order.

    The authors' Imagenet32/64 loader (``small_imagenet127.py``): ``int(np.around(n_k*p))``
    (``rounding="floor"``: ``int(n_k*p)``), the first of each class in source order (their
    shuffle is commented out); the unlabeled set is the whole train set.
    """
    totals = np.bincount(train_y127, minlength=127)
    return first_per_class(train_y127, prefix_counts(totals, ratio, rounding))


def build_imagenet127(
    opts: BuildOptions,
    root: Path,
    meta_dir: Path,
    ratio: float,
    seed: int = 0,
    rounding: str = "around",
) -> dict[str, Any]:
    """ImageNet127 from downsampled ImageNet: labeled prefix, unlabeled = all train, test = val.

    Train files are read one at a time (Imagenet64 train is 15 GB) into a temporary array on
    disk, from which the shuffled training splits are gathered.
    """
    lut, names, meta_rec = src.load_imagenet127_map(meta_dir)
    ds = src.scan_downsampled_imagenet(root)
    ytr, yte = lut[ds.train_y], lut[ds.val_y]
    lab = plan_imagenet127(ytr, ratio, rounding)
    record = ds.record()
    record["class_map"] = meta_rec
    b = opts.builder(
        name=f"imagenet127-{ds.side}px-p{_fmt(ratio)}",
        class_names=names,
        splits={
            "labeled": SplitSpec(ytr[lab], _digest(lab, ytr[lab])),
            "unlabeled": SplitSpec(ytr, _digest(ytr)),
            "test": SplitSpec(yte, _digest(yte)),
        },
        encoding="png",
        image_size=[ds.side, ds.side],
        source=record,
        split_rule={
            "rule": "imagenet127",
            "labeled_ratio": ratio,
            "rounding": rounding,
            "overlap": INCLUDES,
        },
        seed=seed,
    )

    def jobs(b: DatasetBuilder) -> Iterator[Job]:
        # The training splits are written in a shuffled order (shards.order), which needs
        # random access to the train set, but its files are streamed (Imagenet64 train is
        # 15 GB of pickles). Decode them once into a temporary uint8 array on disk next to the
        # output (N x side x side x 3 bytes: 3.9 GB at 32 px, 15.7 GB at 64 px), gather from
        # it, delete it. An interrupted build leaves it as a temp file the next run removes.
        parts = {"labeled": lab, "unlabeled": np.arange(len(ytr))}
        if any(b.pending(s, 0, len(rows)) for s, rows in parts.items()):
            cache = b.out / f".train-images.npy.tmp-{os.getpid()}"
            try:
                x_all = np.lib.format.open_memmap(
                    cache, mode="w+", dtype=np.uint8, shape=(len(ytr), ds.side, ds.side, 3)
                )
                offset = 0
                for f, n in zip(ds.train_files, ds.train_sizes):
                    x = ds.load_images(f)
                    if len(x) != n:
                        raise ValueError(f"{f}: changed while building ({len(x)} != {n} images)")
                    x_all[offset : offset + n] = x
                    offset += n
                    del x
                for s, rows in parts.items():
                    order = b.order(s)
                    for a in range(0, len(rows), CHUNK):
                        z = min(len(rows), a + CHUNK)
                        if b.pending(s, a, z):
                            yield Job(s, a, "png", np.ascontiguousarray(x_all[rows[order[a:z]]]))
                del x_all
            finally:
                cache.unlink(missing_ok=True)
        if b.pending("test", 0, len(yte)):
            yield from array_jobs(b, "test", ds.load_images(ds.val_file))

    return b.run(jobs)


# ----------------------------------------------------------------------------------------------
# ImageNet-LT


@dataclass
class ImageNetLTPlan:
    """The ImageNet-LT split: lists read, labeled indices into the train list chosen."""

    train: src.ListSplit
    val: src.ListSplit
    test: src.ListSplit
    labeled: np.ndarray
    class_names: list[str]
    lists_sha256: dict[str, str]


def plan_imagenet_lt(split_lists: Path, ratio: float) -> ImageNetLTPlan:
    """Read the three lists; labeled = first ``ceil(p*n_k)`` train images per class (list order)."""
    d = Path(split_lists)
    files = {k: d / f"ImageNet_LT_{k}.txt" for k in ("train", "val", "test")}
    for f in files.values():
        if not f.is_file():
            raise ValueError(f"{f}: split list not found (pass --download to fetch it)")
    tr, va, te = (src.read_split_list(files[k]) for k in ("train", "val", "test"))
    c = int(max(tr.labels.max(), va.labels.max(), te.labels.max())) + 1
    totals = np.bincount(tr.labels, minlength=c)
    if (totals == 0).any():
        raise ValueError(f"{files['train']}: class {int(np.argmin(totals))} has no train image")
    lab = first_per_class(tr.labels, prefix_counts(totals, ratio, "ceil"))
    sha = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files.values()}
    return ImageNetLTPlan(tr, va, te, lab, src.wnid_names([tr, va, te], c), sha)


def build_imagenet_lt(
    opts: BuildOptions,
    imagenet_root: Path,
    split_lists: Path,
    ratio: float,
    max_side: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """ImageNet-LT: labeled prefix, unlabeled = all train, val and test lists; JPEG shards."""
    plan = plan_imagenet_lt(split_lists, ratio)
    root = Path(imagenet_root)
    if not root.is_dir():
        raise ValueError(f"{root}: ImageNet root not found")
    for sp in (plan.train, plan.val, plan.test):
        for i, p in enumerate(sp.paths, 1):
            if not (root / p).is_file():
                raise ValueError(f"{sp.file}:{i}: image {p} not found under {root}")
    tr = plan.train
    parts = {
        "labeled": ([tr.paths[i] for i in plan.labeled], tr.labels[plan.labeled]),
        "unlabeled": (tr.paths, tr.labels),
        "val": (plan.val.paths, plan.val.labels),
        "test": (plan.test.paths, plan.test.labels),
    }
    b = opts.builder(
        name=f"imagenet-lt-p{_fmt(ratio)}" + (f"-max{max_side}" if max_side else ""),
        class_names=plan.class_names,
        splits=jpeg_split_specs(parts),
        encoding="jpg",
        image_size=None,
        source={
            "kind": "imagenet-lt",
            "path": str(root.resolve()),
            "checksum": {"split_lists_sha256": plan.lists_sha256},
        },
        split_rule={
            "rule": "imagenet-lt",
            "labeled_ratio": ratio,
            "rounding": "ceil",
            "max_side": max_side,
        },
        seed=seed,
        max_side=max_side,
    )

    return b.run(jpeg_jobs(root, parts))


JpegParts = dict[str, tuple[list[str], np.ndarray]]  # split -> (relative paths, labels)


def jpeg_split_specs(parts: JpegParts) -> dict[str, SplitSpec]:
    """Each split's labels and identity (its relative paths and labels) for the builder."""
    return {
        s: SplitSpec(y, hashlib.sha256("\n".join(p).encode()).hexdigest() + _digest(y))
        for s, (p, y) in parts.items()
    }


def jpeg_jobs(root: Path, parts: JpegParts) -> Any:
    """The job stream writing each split's image files (paths relative to ``root``)."""

    def jobs(b: DatasetBuilder) -> Iterator[Job]:
        for s, (paths, _y) in parts.items():
            order = b.order(s)
            for a in range(0, len(paths), JPG_CHUNK):
                z = min(len(paths), a + JPG_CHUNK)
                if b.pending(s, a, z):
                    yield Job(s, a, "jpg", [str(root / paths[i]) for i in order[a:z]])

    return jobs
