"""``verify``: re-hash every file of a dataset and re-count its samples against the manifest.

With ``decode=True`` (``bmb-shards verify --decode``) every image of every shard is also
decoded (in parallel over shards), and each undecodable sample is reported by shard and key --
what a training run with ``data.on_corrupt=error`` would otherwise only find when it draws it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from shards.format import (
    DataError,
    dataset_file,
    decode_image,
    iter_tar_samples,
    load_manifest,
    sample_key,
    split_order,
)
from shards.hashing import sha256_file


def verify_dataset(
    dataset_dir: str | os.PathLike,
    *,
    decode: bool = False,
    workers: int = 1,
    progress: bool = False,
) -> list[str]:
    """Check a built dataset; returns one message per problem (empty list: all good).

    Checks every shard's sha256, that each shard holds exactly its recorded samples with
    consecutive indices (``.idx`` == key) and labels whose histogram equals ``class_counts``,
    and the sha256 of array and FFCV files.

    Args:
        dataset_dir: the dataset directory.
        decode: also decode every image (:func:`decode_shards`), one message per bad sample.
        workers: decode processes (``decode`` only).
        progress: a tqdm bar on stderr while decoding.
    """
    root = Path(dataset_dir)
    m = load_manifest(root)  # checks every file name (shards.urls.check_name)
    problems: list[str] = []
    enc = m["encoding"]
    for s, sp in m["splits"].items():
        hist = np.zeros(m["num_classes"], np.int64)
        expect = 0
        order = split_order(m, s)  # file position -> expected .idx
        for sh in sp["shards"]:
            try:
                f = dataset_file(root, sh["file"])
            except DataError as e:  # a symlink leading out of the dataset: not read
                problems.append(str(e))
                expect += sh["count"]
                continue
            index = sh.get("dali_index")  # absent from datasets built before 2026-12-06
            if index:
                fi = root / index["file"]
                if fi.is_symlink() or not fi.is_file():
                    problems.append(f"{fi}: missing DALI index file")
                elif sha256_file(fi) != index["sha256"]:
                    problems.append(f"{fi}: sha256 mismatch (DALI index file changed or corrupt)")
            if not f.is_file():
                problems.append(f"{f}: missing shard")
                expect += sh["count"]
                continue
            if sha256_file(f) != sh["sha256"]:
                problems.append(f"{f}: sha256 mismatch (file changed or corrupt)")
                expect += sh["count"]
                continue
            n = 0
            try:
                for key, mem in iter_tar_samples(f):
                    if n >= sh["count"]:  # more samples than listed: counted below, not indexed
                        n += 1
                        continue
                    if set(mem) != {enc, "cls", "idx"}:
                        problems.append(f"{f}: sample {key} has members {sorted(mem)}")
                        break
                    try:
                        idx, y = int(mem["idx"]), int(mem["cls"])
                    except ValueError:
                        problems.append(f"{f}: sample {key!r} has an unparsable .cls/.idx")
                        break
                    if key != sample_key(idx) or idx != order[expect + n]:
                        problems.append(
                            f"{f}: sample {key} out of order "
                            f"(expected {sample_key(order[expect + n])})"
                        )
                        break
                    if not 0 <= y < m["num_classes"]:
                        problems.append(f"{f}: sample {key} has label {y} out of range")
                        break
                    hist[y] += 1
                    n += 1
            except ValueError as e:
                problems.append(str(e))
            if n != sh["count"]:
                problems.append(f"{f}: {n} samples, manifest says {sh['count']}")
            expect += sh["count"]
        if hist.tolist() != sp["class_counts"] and not any(str(root / s) in p for p in problems):
            problems.append(f"{root / s}: per-class counts differ from the manifest")
        for kind, files in (
            ("arrays", (sp.get("arrays") or {}).get("sha256", {})),
            ("ffcv", {"file": (sp.get("ffcv") or {}).get("sha256")} if sp.get("ffcv") else {}),
        ):
            for k, want in files.items():
                rel = sp[kind][k] if kind == "arrays" else sp[kind]["file"]
                f = root / rel
                if f.is_symlink() and not _inside(root, f):
                    problems.append(f"{f}: a symlink leading outside the dataset; not read")
                elif not f.is_file():
                    problems.append(f"{f}: missing {kind} file")
                elif sha256_file(f) != want:
                    problems.append(f"{f}: sha256 mismatch (file changed or corrupt)")
    if decode:
        problems += decode_shards(root, m, workers=workers, progress=progress)
    return problems


def _inside(root: Path, f: Path) -> bool:
    try:
        dataset_file(root, f.relative_to(root).as_posix())
    except (DataError, ValueError):
        return False
    return True


def _decode_shard(task: tuple[str, str, list[int] | None]) -> tuple[int, list[str]]:
    """Decode every image of one shard as the readers do (:func:`shards.format.decode_image`:
    header checks, pixel limit, 16-bit scaling); ``(samples seen, problems)``. Runs in a
    worker."""
    path, enc, size = task
    n, problems = 0, []
    try:
        for key, mem in iter_tar_samples(path):
            n += 1
            data = mem.get(enc)
            if data is None:
                problems.append(f"{path}: sample {key}: no .{enc} member (has {sorted(mem)})")
                continue
            try:
                img = decode_image(data)  # converts to RGB: a full decode
            except Exception as e:  # PIL raises many types for corrupt data
                why = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
                problems.append(f"{path}: sample {key}: cannot decode image ({why})")
                continue
            if size is not None and list(img.shape[:2]) != size:
                problems.append(
                    f"{path}: sample {key}: image is {img.shape[0]}x{img.shape[1]}, manifest "
                    f"says {size[0]}x{size[1]}"
                )
    except ValueError as e:  # unreadable tar
        problems.append(str(e))
    return n, problems


def decode_shards(root: Path, m: dict, *, workers: int = 1, progress: bool = False) -> list[str]:
    """Decode every image of every (present) shard; one message per undecodable sample, naming
    the shard and the sample key, in manifest order."""
    tasks, counts = [], []
    for sp in m["splits"].values():
        for sh in sp["shards"]:
            f = root / sh["file"]
            if f.is_file() and _inside(root, f):
                tasks.append((str(f), m["encoding"], m.get("image_size")))
                counts.append(int(sh["count"]))
    from tqdm import tqdm

    bar = tqdm(
        total=sum(counts),
        desc="decode",
        unit="img",
        unit_scale=True,
        dynamic_ncols=True,
        disable=not progress,
    )
    results: list[list[str]] = [[] for _ in tasks]
    try:
        if workers > 1 and len(tasks) > 1:
            import multiprocessing as mp

            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            with mp.get_context(method).Pool(min(workers, len(tasks))) as pool:
                it = pool.imap_unordered(_indexed_decode, list(enumerate(tasks)))
                for i, (n, probs) in it:
                    results[i] = probs
                    bar.update(n)
        else:
            for i, t in enumerate(tasks):
                n, results[i] = _decode_shard(t)
                bar.update(n)
    finally:
        bar.close()
    return [p for probs in results for p in probs]


def _indexed_decode(item: tuple[int, tuple]) -> tuple[int, tuple[int, list[str]]]:
    i, task = item
    return i, _decode_shard(task)
