"""The derived formats of :class:`shards.writer.DatasetBuilder`: uint8 arrays and FFCV
``.beton`` files, written from the finished tar shards (so they match them exactly)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shards.encode import sha256_file
from shards.format import decode_image, iter_tar_samples

if TYPE_CHECKING:
    from shards.sink import SplitSink
    from shards.writer import DatasetBuilder


def write_extras(b: DatasetBuilder) -> dict[tuple[str, str], dict[str, Any]]:
    """Arrays and FFCV files, derived from the finished tars (so they match them exactly)."""
    res: dict[tuple[str, str], dict[str, Any]] = {}
    for s, sk in b.sinks.items():
        files = [b.out / sk.shard_file(i) for i in range(sk.num_shards)]
        if "arrays" in b.formats:
            res[(s, "arrays")] = _write_arrays(b, s, sk, files)
        if "ffcv" in b.formats:
            from shards.ffcv_out import write_beton

            rel = f"{s}/{s}.beton"
            if rel not in b.done:
                arr = None
                if (s, "arrays") in res:
                    arr = np.load(b.out / res[(s, "arrays")]["images"], mmap_mode="r")
                final = b.out / rel
                tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
                try:
                    write_beton(tmp, files, sk.labels, b.encoding, sk.order, arrays=arr)
                    os.replace(tmp, final)
                finally:
                    tmp.unlink(missing_ok=True)
                b.record_done(rel, {"sha256": sha256_file(final), "size": final.stat().st_size})
            res[(s, "ffcv")] = {"file": rel, **b.done[rel]}
    return res


def _write_arrays(b: DatasetBuilder, s: str, sk: SplitSink, files: list[Path]) -> dict[str, Any]:
    rel_i, rel_l = f"{s}/images.npy", f"{s}/labels.npy"
    if rel_i not in b.done or rel_l not in b.done:
        h, w = b.meta["image_size"]
        final_i, final_l = b.out / rel_i, b.out / rel_l
        tmp_i = final_i.with_name(f".images.npy.tmp-{os.getpid()}")
        tmp_l = final_l.with_name(f".labels.npy.tmp-{os.getpid()}")
        try:
            arr = np.lib.format.open_memmap(tmp_i, mode="w+", dtype=np.uint8, shape=(sk.n, h, w, 3))
            for f in files:  # tars are in file order; array row i is the sample with idx i
                for _key, mem in iter_tar_samples(f):
                    arr[int(mem["idx"])] = decode_image(mem[b.encoding])
            arr.flush()
            del arr
            with open(tmp_l, "wb") as fh:
                np.save(fh, sk.labels.astype(np.int64))
            os.replace(tmp_i, final_i)
            os.replace(tmp_l, final_l)
        finally:
            tmp_i.unlink(missing_ok=True)
            tmp_l.unlink(missing_ok=True)
        b.done[rel_i] = {"sha256": sha256_file(final_i), "size": final_i.stat().st_size}
        b.record_done(rel_l, {"sha256": sha256_file(final_l), "size": final_l.stat().st_size})
    out = {
        "images": rel_i,
        "labels": rel_l,
        "sha256": {"images": b.done[rel_i]["sha256"], "labels": b.done[rel_l]["sha256"]},
    }
    sizes = {k: b.done[r].get("size") for k, r in (("images", rel_i), ("labels", rel_l))}
    if all(isinstance(v, int) for v in sizes.values()):
        out["size"] = sizes
    return out
