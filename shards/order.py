"""The order in which a split's samples are written (tar shards, ``.beton``).

Which samples form a split is the split rule; the order they are *written* in is separate. The
training splits (``labeled``, ``unlabeled``) are written in a seeded shuffled order so that a
reader streaming shards through a small shuffle buffer (webdataset ``order="stream"``, DALI)
sees class-mixed batches; splits built in class order would give it batches of a handful of
classes. Evaluation splits (``val``, ``test``) are only ever read front to back, so they stay
in index order and every backend's evaluation pass delivers the same batches.

A sample's index within its split (``.idx``, the tar key, the array row) is its identity in
every order. The manifest records each split's order (``splits.<s>.order``):

* ``{"kind": "index"}``: file position ``p`` holds sample ``p``;
* ``{"kind": "shuffled", "seed": S}``: file position ``p`` holds sample ``perm[p]`` with
  ``perm = numpy.random.RandomState(S).permutation(count)`` (``RandomState`` streams are frozen
  by NumPy's compatibility policy, so the order, hence the bytes, never change). ``S`` is
  derived from the build's seed and the split name (:func:`order_seed`).

A manifest without ``order`` (datasets built before 2026-12-06) is in index order.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

SHUFFLED_SPLITS = ("labeled", "unlabeled")
KINDS = ("index", "shuffled")


def order_seed(seed: int, split: str) -> int:
    """The 32-bit seed of ``split``'s write order, derived from the build's ``seed``."""
    digest = hashlib.sha256(f"{int(seed)}/order/{split}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def order_record(seed: int, split: str) -> dict[str, Any]:
    """The manifest's ``order`` entry of ``split`` for a build with ``seed``."""
    if split in SHUFFLED_SPLITS:
        return {"kind": "shuffled", "seed": order_seed(seed, split)}
    return {"kind": "index"}


def file_order(record: dict[str, Any] | None, n: int) -> np.ndarray:
    """int64 ``(n,)``: the index of the sample at each file position (``None``: index order)."""
    if record is None or record.get("kind") == "index":
        return np.arange(n, dtype=np.int64)
    if record.get("kind") == "shuffled":
        return np.random.RandomState(int(record["seed"])).permutation(n).astype(np.int64)
    raise ValueError(f"unknown sample order {record!r} (known kinds: {KINDS})")
