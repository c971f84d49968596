"""Digests of the shard builder: a file's chunked sha256 (recorded per shard, re-checked on resume
and by ``verify``) and the identity of in-memory arrays.

``bmb.checkpoint.sha256_of`` is the training side's twin (it also counts bytes); ``bmb`` may not
import ``shards``, so each side keeps its own."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def sha256_file(path: str | Path, bufsize: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def fingerprint_arrays(*arrays: np.ndarray) -> str:
    """Digest of arrays' dtype, shape and bytes (identity of in-memory inputs)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()
