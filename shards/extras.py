"""The derived formats of a shard build: uint8 arrays and FFCV
``.beton`` files, written from the finished tar shards (so they match them exactly).

The image array is written with plain positioned writes, not a memory map: on a full disk a
write through a map dies by SIGBUS, a plain write fails with ENOSPC, reported as
:class:`shards.manifest.DiskFull` naming the file."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shards import manifest as mf
from shards.format import decode_image, iter_tar_samples
from shards.hashing import sha256_file
from shards.resume import OutDirState
from shards.sink import SplitSink


def write_extras(
    state: OutDirState,
    sinks: dict[str, SplitSink],
    *,
    formats: Sequence[str],
    encoding: str,
    image_size: Sequence[int] | None,
) -> dict[tuple[str, str], dict[str, Any]]:
    """Arrays and FFCV files, derived from the finished tars (so they match them exactly).

    Args:
        state: the build's out-dir state (where files go, which are done; records new ones).
        sinks: split -> its finished :class:`~shards.sink.SplitSink`.
        formats: the build's formats (``"arrays"`` and ``"ffcv"`` are written here).
        encoding: ``"png"`` or ``"jpg"``: the image member of each sample.
        image_size: ``[H, W]`` (needed for ``"arrays"``).
    """
    res: dict[tuple[str, str], dict[str, Any]] = {}
    for s, sk in sinks.items():
        files = [state.out / sk.shard_file(i) for i in range(sk.num_shards)]
        if "arrays" in formats:
            assert image_size is not None  # the builder refuses arrays of variable-size images
            res[(s, "arrays")] = _write_arrays(state, s, sk, files, encoding, tuple(image_size))
        if "ffcv" in formats:
            from shards.ffcv_out import write_beton

            rel = f"{s}/{s}.beton"
            if rel not in state.done:
                arr = None
                if (s, "arrays") in res:
                    arr = np.load(state.out / res[(s, "arrays")]["images"], mmap_mode="r")
                final = state.out / rel
                tmp = mf.temp_path(final)
                try:
                    with mf.writing(final):
                        write_beton(tmp, files, sk.labels, encoding, sk.order, arrays=arr)
                    os.replace(tmp, final)
                finally:
                    tmp.unlink(missing_ok=True)
                state.record_done(rel, {"sha256": sha256_file(final), "size": final.stat().st_size})
            res[(s, "ffcv")] = {"file": rel, **state.done[rel]}
    return res


def write_image_array(path: Path, files: list[Path], ext: str, shape: tuple[int, ...]) -> None:
    """``path``: the ``.npy`` uint8 array ``shape`` (``(N, H, W, 3)``) whose row ``i`` is the
    decoded image of the sample with stable index ``i`` of the tar ``files``, in the bytes
    :func:`numpy.lib.format.open_memmap` gives (header format 1.0), written with ``os.pwrite``."""
    row = int(np.prod(shape[1:]))
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)}
        )
        start = fh.tell()
        fh.flush()
        fd = fh.fileno()
        os.ftruncate(fd, start + row * shape[0])  # sparse: rows never written read as zeros
        for f in files:  # tars are in file order; array row i is the sample with idx i
            for _key, mem in iter_tar_samples(f):
                img = decode_image(mem[ext])
                if img.shape != tuple(shape[1:]):
                    raise ValueError(f"{f}: sample {_key!r}: image is {img.shape}, expected {shape[1:]}")
                data = memoryview(np.ascontiguousarray(img)).cast("B")
                written = os.pwrite(fd, data, start + int(mem["idx"]) * row)
                if written != row:
                    raise OSError(errno.ENOSPC, f"short write ({written} of {row} bytes)")
        os.fsync(fd)


def _write_arrays(
    state: OutDirState, s: str, sk: SplitSink, files: list[Path], encoding: str, hw: tuple[int, ...]
) -> dict[str, Any]:
    rel_i, rel_l = f"{s}/images.npy", f"{s}/labels.npy"
    if rel_i not in state.done or rel_l not in state.done:
        h, w = hw
        final_i, final_l = state.out / rel_i, state.out / rel_l
        tmp_i, tmp_l = mf.temp_path(final_i), mf.temp_path(final_l)
        try:
            with mf.writing(final_i):
                write_image_array(tmp_i, files, encoding, (sk.n, h, w, 3))
            with mf.writing(final_l), open(tmp_l, "wb") as fh:
                np.save(fh, sk.labels.astype(np.int64))
            os.replace(tmp_i, final_i)
            os.replace(tmp_l, final_l)
        finally:
            tmp_i.unlink(missing_ok=True)
            tmp_l.unlink(missing_ok=True)
        state.done[rel_i] = {"sha256": sha256_file(final_i), "size": final_i.stat().st_size}
        state.record_done(rel_l, {"sha256": sha256_file(final_l), "size": final_l.stat().st_size})
    out = {
        "images": rel_i,
        "labels": rel_l,
        "sha256": {"images": state.done[rel_i]["sha256"], "labels": state.done[rel_l]["sha256"]},
    }
    sizes = {k: state.done[r].get("size") for k, r in (("images", rel_i), ("labels", rel_l))}
    if all(isinstance(v, int) for v in sizes.values()):
        out["size"] = sizes
    return out
