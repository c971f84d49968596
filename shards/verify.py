"""``verify``: re-hash every file of a dataset and re-count its samples against the manifest."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from shards.manifest import load_manifest
from shards.order import file_order
from shards.tario import iter_tar_samples
from shards.writer import sha256_file


def verify_dataset(dataset_dir: str | os.PathLike) -> list[str]:
    """Check a built dataset; returns one message per problem (empty list: all good).

    Checks every shard's sha256, that each shard holds exactly its recorded samples with
    consecutive indices (``.idx`` == key) and labels whose histogram equals ``class_counts``,
    and the sha256 of array and FFCV files.
    """
    root = Path(dataset_dir)
    m = load_manifest(root)
    problems: list[str] = []
    enc = m["encoding"]
    for s, sp in m["splits"].items():
        hist = np.zeros(m["num_classes"], np.int64)
        expect = 0
        order = file_order(sp.get("order"), sp["count"])  # file position -> expected .idx
        for sh in sp["shards"]:
            f = root / sh["file"]
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
                    if set(mem) != {enc, "cls", "idx"}:
                        problems.append(f"{f}: sample {key} has members {sorted(mem)}")
                        break
                    idx, y = int(mem["idx"]), int(mem["cls"])
                    if key != f"{idx:08d}" or idx != order[expect + n]:
                        problems.append(
                            f"{f}: sample {key} out of order (expected {order[expect + n]:08d})"
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
                if not f.is_file():
                    problems.append(f"{f}: missing {kind} file")
                elif sha256_file(f) != want:
                    problems.append(f"{f}: sha256 mismatch (file changed or corrupt)")
    return problems
