"""The per-split shard sink of a build: encoded samples in file order rolled into atomic tar
shards (with their DALI index), each recorded in the out-dir state once finished."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shards import manifest as mf
from shards.format import sample_members
from shards.hashing import sha256_file
from shards.resume import OutDirState
from shards.tario import TarShardWriter


class SplitSink:
    """Receives encoded samples of one split in file order and rolls them into shards.

    Args:
        state: the build's out-dir state: where shards go, which are done; records new ones.
        split: split name.
        labels: int ``(N,)`` label of every sample in index order.
        order: int64 ``(N,)`` sample index at each file position.
        shard_size: samples per shard.
    """

    def __init__(self, state: OutDirState, split: str, labels: np.ndarray, order: np.ndarray, shard_size: int):
        self.state, self.split, self.labels = state, split, labels
        self.order = order  # file position -> sample index
        self.n = len(labels)
        self.size = shard_size
        self.num_shards = max(1, -(-self.n // self.size))
        self.dir = state.out / split
        self.expect = 0
        self.cur: tuple[int, Path, Any, TarShardWriter] | None = None
        self._skip_done()

    def shard_file(self, sid: int) -> str:
        return f"{self.split}/{self.split}-{sid:06d}.tar"

    def index_file(self, sid: int) -> str:
        """DALI's index of shard ``sid`` (named as DALI's ``wds2idx`` names it)."""
        return f"{self.split}/{self.split}-{sid:06d}.idx"

    def shard_range(self, sid: int) -> tuple[int, int]:
        return sid * self.size, min(self.n, (sid + 1) * self.size)

    def is_done(self, sid: int) -> bool:
        return self.shard_file(sid) in self.state.done

    def _skip_done(self) -> None:
        while self.expect < self.n and self.is_done(self.expect // self.size):
            self.expect = self.shard_range(self.expect // self.size)[1]

    def pending(self, start: int, stop: int) -> bool:
        if stop <= start:
            return False
        first, last = start // self.size, (stop - 1) // self.size
        return any(not self.is_done(s) for s in range(first, last + 1))

    def add(self, start: int, ext: str, blobs: Sequence[bytes]) -> None:
        for i, blob in enumerate(blobs):
            pos = start + i
            sid = pos // self.size
            if self.is_done(sid):
                continue
            if pos != self.expect:
                raise RuntimeError(
                    f"internal error: split {self.split} got position {pos}, expected {self.expect}"
                )
            if self.cur is None:
                self.dir.mkdir(parents=True, exist_ok=True)
                final = self.state.out / self.shard_file(sid)
                tmp = mf.temp_path(final)
                with mf.writing(final):
                    fh = open(tmp, "wb")  # noqa: SIM115 (closed by _finish or abort)
                    self.cur = (sid, tmp, fh, TarShardWriter(fh))
            idx = int(self.order[pos])
            key, members = sample_members(idx, int(self.labels[idx]), ext, blob)
            with mf.writing(self.state.out / self.shard_file(sid)):
                self.cur[3].add(key, members)
            self.expect = pos + 1
            if self.expect == self.shard_range(sid)[1]:
                self._finish()
                self._skip_done()

    def _finish(self) -> None:
        assert self.cur is not None
        sid, tmp, fh, tw = self.cur
        final = self.state.out / self.shard_file(sid)
        with mf.writing(final):
            tw.close()
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        index = self.state.out / self.index_file(sid)
        mf.atomic_write_text(index, tw.dali_index())
        os.replace(tmp, final)
        a, z = self.shard_range(sid)
        self.state.record_done(
            self.shard_file(sid),
            {
                "count": z - a,
                "sha256": sha256_file(final),
                "size": final.stat().st_size,
                "dali_index": {"file": self.index_file(sid), "sha256": sha256_file(index)},
            },
        )
        self.cur = None

    def abort(self) -> None:
        if self.cur is not None:
            _, tmp, fh, _ = self.cur
            with contextlib.suppress(OSError):  # a full disk fails the buffered write here too
                fh.close()
            tmp.unlink(missing_ok=True)
            self.cur = None

    def empty_split(self) -> None:
        """A split with no samples still gets one (empty) shard so every split has a file."""
        if self.n == 0 and not self.is_done(0):
            self.dir.mkdir(parents=True, exist_ok=True)
            final = self.state.out / self.shard_file(0)
            tmp = mf.temp_path(final)
            try:
                with mf.writing(final), open(tmp, "wb") as fh:
                    TarShardWriter(fh).close()
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
            self.state.record_done(
                self.shard_file(0),
                {
                    "count": 0,
                    "sha256": sha256_file(final),
                    "size": final.stat().st_size,
                    "dali_index": None,
                },
            )
