"""``bmb-shards`` / ``python -m shards``: build the paper's long-tailed SSL datasets as shards.

Commands: ``cifar-lt``, ``imagenet127``, ``imagenet-lt``, ``imagenet-mismatch``, ``subset-lt``,
``demo`` (build), ``verify`` and ``info`` (inspect). Exit status: 0 ok, 1 ``verify`` found a
problem, 2 bad input (also: another build holds ``--out``'s lock), 130 interrupted (re-run the
same command to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from shards import sources as src
from shards.build import (
    BuildOptions,
    build_imagenet127,
    build_imagenet_lt,
    load_imagenet_subset,
    lt_from_arrays,
    plan_imagenet_lt,
)
from shards.build_jpeg import build_imagenet127_jpeg, build_imagenet_mismatch
from shards.format import load_manifest
from shards.manifest import FORMATS, summary
from shards.splits import DEFAULT_OVERLAP, OVERLAPS, class_counts, overlap_record

CIFAR_DEFAULTS = {"cifar10": (1500, 3000, 100.0), "cifar100": (150, 300, 10.0)}


def _formats(text: str) -> list[str]:
    out = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in out if f not in FORMATS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown format(s) {bad}; choose from {list(FORMATS)}")
    return out


def _add_output(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument(
        "--out",
        type=Path,
        required=True,
        help="dataset directory to create (locked by .bmb-shards.lock while building: a second "
        "build of it fails at once). Re-running resumes an interrupted build and rebuilds files "
        "of a finished one that are missing or changed size",
    )
    g.add_argument(
        "--formats",
        type=_formats,
        default=["wds"],
        help="comma list of outputs: wds (webdataset tar shards, always written), arrays "
        "(uint8 images.npy + labels.npy per split; fixed-size images only), ffcv (.beton per "
        "split; needs pip install 'bmb[ffcv]'). Default: wds",
    )
    g.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help="samples per tar shard (default 5000 for PNG, 1000 for JPEG)",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="encoding processes (default: min(8, CPUs)); output is identical for any value",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a different dataset already in --out: deletes exactly the files its own "
        "manifest.json / .shards-progress.json list; refuses (deleting nothing), naming them, "
        "if --out holds any other file or a manifest.json not written by bmb-shards",
    )


def _add_split_rule(g: Any) -> None:
    g.add_argument(
        "--split-rule",
        choices=OVERLAPS,
        default=DEFAULT_OVERLAP,
        help="unlabeled_includes_labeled (default, the authors' code): labeled = the first n_k "
        "images of class k, unlabeled = the first n_k + m_k, so it contains the labeled ones; "
        "disjoint: labeled and unlabeled share no image (this tool's rule before 2026-12-08)",
    )


def _add_lt(p: argparse.ArgumentParser, required: bool, heads: tuple[int, int] | None = None) -> None:
    """The long-tailed split's options; ``heads``: defaults of --n1/--m1 (then not required)."""
    g = p.add_argument_group("long-tailed split (docs/datasets.md)")
    for flag, what, default in (("--n1", "labeled", heads and heads[0]), ("--m1", "unlabeled", heads and heads[1])):
        g.add_argument(flag, type=int, required=required and default is None, default=default,
                       help=f"{what} images of the head class" + (f" (default {default})" if default else ""))
    g.add_argument("--gamma-l", type=float, required=required, help="labeled imbalance ratio")
    g.add_argument("--gamma-u", type=float, required=required, help="unlabeled imbalance ratio")
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="per-class shuffle seed (default 0). The authors' rule keeps each class in source "
        "order at seed 0 and shuffles (numpy RandomState(seed), one stream over the classes) "
        "otherwise; disjoint shuffles at every seed",
    )
    _add_split_rule(g)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every command (also used to render docs/datasets.md)."""
    ap = argparse.ArgumentParser(
        prog="bmb-shards",
        description="Build the long-tailed semi-supervised splits of the BMB paper as "
        "fast-loading webdataset shards (plus optional arrays / FFCV), and check them.",
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("cifar-lt", help="CIFAR-10/100-LT from the official python archive")
    p.add_argument(
        "--source",
        type=Path,
        required=True,
        help="cifar-*-python.tar.gz, its extracted folder, or a folder holding either "
        "(with --download: where the archive is saved)",
    )
    p.add_argument("--dataset", choices=sorted(src.CIFAR), required=True)
    p.add_argument(
        "--download",
        action="store_true",
        help="fetch the archive from its official address if --source is missing, and check "
        "its published md5",
    )
    p.add_argument("--url", help="mirror URL to download from instead of the official one")
    p.add_argument(
        "--expected-md5",
        help="check the archive's md5 (default with --download: the published checksum)",
    )
    _add_lt(p, required=False)
    _add_output(p)

    p = sub.add_parser(
        "subset-lt",
        help="a long-tailed split of any class-labeled source (CIFAR or downsampled ImageNet)",
    )
    p.add_argument(
        "--source",
        type=Path,
        required=True,
        help="CIFAR archive/folder, or "
        "downsampled-ImageNet folder (train_data_batch_* and val_data, pickle/npz)",
    )
    p.add_argument(
        "--source-kind",
        choices=["cifar10", "cifar100", "imagenet"],
        required=True,
        help="what --source is",
    )
    p.add_argument(
        "--classes",
        help="subset of source classes, e.g. 0-99 or 3,7,10-19 (ImageNet: 0-based "
        "map_clsloc order); relabelled 0..K-1 in increasing id. Default: all",
    )
    p.add_argument("--meta-dir", type=Path, help="ImageNet: folder with map_clsloc.txt (names)")
    p.add_argument("--name", help="dataset name (default derived from the options)")
    _add_lt(p, required=True)
    _add_output(p)

    p = sub.add_parser(
        "imagenet127",
        help="ImageNet127 (1000 classes grouped into 127) from Imagenet32/64 or ImageNet JPEGs",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--source",
        type=Path,
        help="folder (searched recursively) with train_data_batch_1..10 and val_data, pickle "
        "or .npz, labels 1..1000 in map_clsloc.txt order (downsampled ImageNet, PNG shards)",
    )
    where.add_argument(
        "--from-jpeg",
        type=Path,
        metavar="IMAGENET_ROOT",
        help="full-resolution ImageNet folder holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG "
        "(all 1000 classes): JPEG shards of the original bytes, as the authors' SGD scripts read",
    )
    p.add_argument(
        "--meta-dir",
        type=Path,
        required=True,
        help="folder with wnid_to_127.tsv (or map_clsloc.txt + Huh et al.'s val.txt, "
        "val_up_down_127.txt, synsets.txt) and optionally synset_words_up_down_127.txt",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="fetch the missing public class-map files into --meta-dir, and a missing "
        "--labeled-list named ImageNet127_LT_train_semi_1_labeled.txt (the authors' 1%% list) "
        "(pinned URLs, git blob id checked)",
    )
    p.add_argument(
        "--labeled-ratio",
        type=float,
        required=True,
        help="fraction p of each class labeled (paper: 0.01, 0.1); unlabeled = every train image",
    )
    p.add_argument(
        "--rounding",
        choices=["around", "floor"],
        help="labeled count per class: around = int(np.around(p*n_k)) (default with --source: the "
        "authors' Imagenet32/64 loader; 12,811 at 1%%), floor = int(p*n_k) (default with "
        "--from-jpeg: the authors' full-resolution lists; 12,799 at 1%%)",
    )
    p.add_argument(
        "--labeled-list",
        type=Path,
        help="--from-jpeg: take the labeled images from this list (train/<wnid>/<img> <label> "
        "lines, e.g. the authors' ImageNet127_LT_train_semi_1_labeled.txt) instead of drawing "
        "them (random.Random(2023).sample per class, as their generate_train_split.py)",
    )
    p.add_argument(
        "--max-side",
        type=int,
        help="--from-jpeg: resize so the longer side is at most N px (re-encoded JPEG q95); "
        "default: keep the original bytes",
    )
    p.add_argument("--seed", type=int, default=0, help="recorded only (the split is not random)")
    _add_output(p)

    p = sub.add_parser("imagenet-lt", help="ImageNet-LT (full-resolution JPEG) via its lists")
    p.add_argument(
        "--imagenet-root",
        type=Path,
        required=True,
        help="ImageNet folder holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG",
    )
    p.add_argument(
        "--split-lists",
        type=Path,
        required=True,
        help="folder with ImageNet_LT_train.txt, ImageNet_LT_val.txt, ImageNet_LT_test.txt",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="fetch missing split lists into --split-lists (pinned URLs, git blob id checked)",
    )
    p.add_argument(
        "--labeled-ratio",
        type=float,
        required=True,
        help="fraction p: labeled = first ceil(p*n_k) per class in list order (paper: 0.2, 0.5)",
    )
    p.add_argument(
        "--max-side",
        type=int,
        help="resize so the longer side is at most N px (re-encoded JPEG q95); default: keep "
        "the original bytes",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="only read the lists and print the split's counts (no images read or written)",
    )
    p.add_argument("--seed", type=int, default=0, help="recorded only (the split is not random)")
    _add_output(p)

    p = sub.add_parser(
        "imagenet-mismatch",
        help="long-tailed labeled/unlabeled split of all ImageNet classes at full resolution "
        "(the authors' ImageNet_LT_mismatch/generate_dataset.py)",
    )
    p.add_argument(
        "--source",
        type=Path,
        required=True,
        help="ImageNet folder holding train/<wnid>/*.JPEG (every class folder is a class, "
        "sorted by name) and val/<wnid>/*.JPEG (the test split)",
    )
    p.add_argument(
        "--max-side",
        type=int,
        help="resize so the longer side is at most N px (re-encoded JPEG q95); default: keep "
        "the original bytes",
    )
    _add_lt(p, required=True, heads=(600, 300))  # the paper's N1, M1 for this setting
    _add_output(p)

    p = sub.add_parser(
        "demo", help="the embedded procedural demo data (long-tailed rings, no download)"
    )
    p.add_argument("--num-classes", type=int, default=10, help="classes (default 10)")
    p.add_argument("--n1", type=int, default=200, help="labeled images of the head class (200)")
    p.add_argument("--m1", type=int, default=800, help="unlabeled images of the head class (800)")
    p.add_argument("--gamma-l", type=float, default=100.0, help="labeled imbalance ratio (100)")
    p.add_argument("--gamma-u", type=float, default=100.0, help="unlabeled imbalance ratio (100)")
    p.add_argument("--test-per-class", type=int, default=100, help="balanced test set (100/class)")
    p.add_argument("--size", type=int, default=32, help="image side in px (32)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (0)")
    _add_split_rule(p)
    _add_output(p)

    p = sub.add_parser(
        "verify",
        help="re-hash every file and re-count samples (--decode: also decode every image)",
        description="Re-hash every file a dataset's manifest lists and re-count its samples and "
        "labels. With --decode also decode every image and report each undecodable sample by "
        "shard and key (what a training run would otherwise find only when it draws it). Exit "
        "status 1 when anything is wrong.",
    )
    p.add_argument("dir", type=Path, help="dataset directory")
    p.add_argument(
        "--decode",
        action="store_true",
        help="also decode every image of every shard and list each undecodable sample "
        "(shard, key)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="--decode: decode processes, one shard each at a time (default: min(8, CPUs))",
    )
    p.add_argument("--no-progress", action="store_true", help="--decode: no progress bar")
    p = sub.add_parser("info", help="print a dataset's summary")
    p.add_argument("dir", type=Path, help="dataset directory")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    return ap


def _opts(a: argparse.Namespace) -> BuildOptions:
    return BuildOptions(
        out=a.out,
        formats=a.formats,
        shard_size=a.shard_size,
        workers=a.workers,
        progress=not a.no_progress,
        overwrite=a.overwrite,
    )


def _cifar_source(a: argparse.Namespace) -> src.ArraySource:
    spec = src.CIFAR[a.dataset]
    path, md5 = a.source, a.expected_md5
    if a.download:
        md5 = md5 or spec["md5"]
        archive = path if path.name.endswith(".tar.gz") else path / spec["archive"]
        folder_given = path.is_dir() and (path / spec["folder"]).is_dir()
        if not archive.exists() and not folder_given:
            print(f"downloading {a.url or spec['url']} -> {archive}", file=sys.stderr)
            src.download(a.url or spec["url"], archive, md5=md5)
        path = archive if archive.exists() else path
    return src.load_cifar(path, a.dataset, expected_md5=md5)


def _run_build(a: argparse.Namespace) -> dict[str, Any] | None:
    opts = _opts(a) if hasattr(a, "out") else None
    if a.command == "cifar-lt":
        n1, m1, g = CIFAR_DEFAULTS[a.dataset]
        source = _cifar_source(a)
        return lt_from_arrays(
            opts,
            source,
            rule="cifar-lt",
            n1=a.n1 if a.n1 is not None else n1,
            m1=a.m1 if a.m1 is not None else m1,
            gamma_l=a.gamma_l if a.gamma_l is not None else g,
            gamma_u=a.gamma_u if a.gamma_u is not None else g,
            seed=a.seed,
            overlap=a.split_rule,
        )
    if a.command == "subset-lt":
        if a.source_kind == "imagenet":
            source = load_imagenet_subset(a.source, a.meta_dir, a.classes)
        else:
            source = src.load_cifar(a.source, a.source_kind)
        return lt_from_arrays(
            opts,
            source,
            rule="subset-lt",
            n1=a.n1,
            m1=a.m1,
            gamma_l=a.gamma_l,
            gamma_u=a.gamma_u,
            seed=a.seed,
            classes=a.classes,
            name=a.name,
            overlap=a.split_rule,
        )
    if a.command == "imagenet127":
        if a.download:
            names = ["map_clsloc.txt", "synset_words_up_down_127.txt"]
            if not (a.meta_dir / "wnid_to_127.tsv").is_file():
                names += ["val.txt", "val_up_down_127.txt", "synsets.txt"]
            src.fetch_files(src.IMAGENET127_META, names, a.meta_dir)
        lst = a.labeled_list
        if a.download and lst is not None and not lst.is_file() and lst.name in src.IMAGENET127_LISTS:
            src.fetch_files(src.IMAGENET127_LISTS, [lst.name], lst.parent)
        if a.from_jpeg is not None:
            return build_imagenet127_jpeg(
                opts, a.from_jpeg, a.meta_dir, a.labeled_ratio, a.rounding or "floor",
                a.labeled_list, a.max_side, a.seed,
            )  # fmt: skip
        for flag, value in (("--labeled-list", a.labeled_list), ("--max-side", a.max_side)):
            if value is not None:
                raise ValueError(f"{flag} needs --from-jpeg (the --source images are PNG arrays)")
        return build_imagenet127(
            opts, a.source, a.meta_dir, a.labeled_ratio, a.seed, a.rounding or "around"
        )
    if a.command == "imagenet-mismatch":
        return build_imagenet_mismatch(
            opts, a.source, a.n1, a.m1, a.gamma_l, a.gamma_u, a.seed, a.split_rule, a.max_side
        )
    if a.command == "imagenet-lt":
        if a.download:
            src.fetch_files(src.IMAGENET_LT_LISTS, list(src.IMAGENET_LT_LISTS), a.split_lists)
        if a.dry_run:
            plan = plan_imagenet_lt(a.split_lists, a.labeled_ratio)
            c = len(plan.class_names)
            lab = plan.train.labels[plan.labeled]
            for s, y in (
                ("labeled", lab),
                ("unlabeled", plan.train.labels),
                ("val", plan.val.labels),
                ("test", plan.test.labels),
            ):
                cc = class_counts(y, c)
                print(
                    f"{s:<10} {len(y):>8} images   max/class {max(cc):>5}  min/class {min(cc):>5}"
                )
            return None
        return build_imagenet_lt(
            opts, a.imagenet_root, a.split_lists, a.labeled_ratio, a.max_side, a.seed
        )
    if a.command == "demo":
        from shards.demo import class_names, make_demo
        from shards.writer import DEFAULT_SHARD_SIZE, write_dataset

        params = {"num_classes": a.num_classes, "n1": a.n1, "m1": a.m1, "gamma_l": a.gamma_l,
                  "gamma_u": a.gamma_u, "test_per_class": a.test_per_class, "size": a.size}
        return write_dataset(
            a.out, name="demo", class_names=class_names(a.num_classes),
            splits=make_demo(**params, seed=a.seed, overlap=a.split_rule), formats=a.formats,
            source={"kind": "procedural-demo", "path": None, "checksum": None},
            split_rule={"rule": "demo-lt", **params, **overlap_record(a.split_rule)}, seed=a.seed,
            shard_size=a.shard_size or DEFAULT_SHARD_SIZE["png"], workers=a.workers,
            progress=not a.no_progress, overwrite=a.overwrite,
        )
    raise AssertionError(a.command)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    a = build_parser().parse_args(argv)
    try:
        if a.command == "verify":
            from shards.verify import verify_dataset

            problems = verify_dataset(
                a.dir, decode=a.decode, workers=a.workers, progress=not a.no_progress
            )
            for p in problems:
                print(f"FAIL {p}", file=sys.stderr)
            if problems:
                print(f"{len(problems)} problem(s) in {a.dir}", file=sys.stderr)
                return 1
            print(
                f"OK {a.dir}: every file matches its manifest"
                + ("; every image decodes" if a.decode else "")
            )
            return 0
        if a.command == "info":
            m = load_manifest(a.dir)
            print(json.dumps(m, indent=2, sort_keys=True) if a.json else summary(m))
            return 0
        t0 = time.perf_counter()
        m = _run_build(a)
        if m is None:
            return 0
        dt = time.perf_counter() - t0
        print(summary(m))
        print()
        print(f"wrote {a.out} in {dt:.1f} s")
        return 0
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished shards are kept; re-run the same command to resume",
            file=sys.stderr,
        )
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
