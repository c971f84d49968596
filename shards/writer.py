"""The shard-building engine: ordered parallel encoding, atomic shards, resume, manifest last.

A build is described by its splits (labels known up front) and a stream of :class:`Job` s that
carry raw pixels or JPEG paths for consecutive *file positions* of a split: position ``p`` of
split ``s`` holds the sample with index ``builder.order(s)[p]`` (training splits are written in
a seeded shuffled order, see :mod:`shards.order`). Jobs are encoded by a
process pool but consumed strictly in submission order, so the output never depends on
``workers``. Each finished shard is renamed into place and recorded (with its sha256) in a
progress file; a re-run after an interruption keeps recorded shards whose bytes still match and
rewrites the rest. ``manifest.json`` is written last: a directory without it is incomplete.

:func:`write_dataset` is the small public entry point for in-memory arrays (test fixtures,
synthetic data); the CLI's builders in :mod:`shards.build` drive :class:`DatasetBuilder`.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shards import manifest as mf
from shards import outdir as od
from shards.format import decode_image, iter_tar_samples, sample_members
from shards.order import file_order, order_record
from shards.tario import JPEG_QUALITY, PNG_COMPRESS_LEVEL, TarShardWriter, encode_png

PROGRESS = ".shards-progress.json"
DEFAULT_SHARD_SIZE = {"png": 5000, "jpg": 1000}
CHUNK = 256  # images per job: large enough to amortise IPC, small for a smooth progress bar


@dataclass
class SplitSpec:
    """One split to build.

    Attributes:
        labels: int ``(N,)`` label of every sample in index order.
        fingerprint: digest of everything that determines the split's content (source
            checksum is recorded separately); part of the build identity.
    """

    labels: np.ndarray
    fingerprint: str


@dataclass
class Job:
    """The samples at file positions ``start .. start+n-1`` of ``split``, i.e. the samples
    with index ``builder.order(split)[start:start+n]``.

    ``kind == "png"``: ``payload`` is uint8 ``(n, H, W, 3)``.
    ``kind == "jpg"``: ``payload`` is a list of n JPEG file paths.
    """

    split: str
    start: int
    kind: str
    payload: Any

    def __len__(self) -> int:
        return len(self.payload)


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


# ----------------------------------------------------------------------------------------------
# Encoding (runs in worker processes; module-level so it pickles)


def _reencode_jpeg(im: Any) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False)
    return buf.getvalue()


def encode_jpeg_file(path: str, max_side: int | None) -> bytes:
    """Bytes to store for one full-resolution image file.

    The original bytes are kept when the file is an RGB JPEG that needs no resize (no quality
    loss, no work). Files that are CMYK/greyscale, another format named ``.JPEG`` (ImageNet has
    a few) or larger than ``max_side`` are decoded and re-encoded as RGB JPEG at fixed quality,
    so every stored image decodes the same way in every pipeline.

    Raises:
        ValueError: the file is missing or not a decodable image, naming it.
    """
    from PIL import Image

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read image file ({e.strerror})") from e
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode, (w, h) = im.format, im.mode, im.size
            im.load()  # full decode: truncated or corrupt files fail here, not at training time
            if max_side is not None and max(w, h) > max_side:
                scale = max_side / max(w, h)
                size = (max(1, round(w * scale)), max(1, round(h * scale)))
                return _reencode_jpeg(im.convert("RGB").resize(size, Image.Resampling.BICUBIC))
            if fmt != "JPEG" or mode != "RGB":
                return _reencode_jpeg(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{path}: unreadable image ({e})") from e
    return data


def _encode(kind: str, payload: Any, max_side: int | None) -> list[bytes]:
    if kind == "png":
        return [encode_png(img) for img in payload]
    if kind == "jpg":
        return [encode_jpeg_file(p, max_side) for p in payload]
    raise ValueError(f"unknown job kind {kind!r}")


def _worker_init() -> None:
    # The parent handles Ctrl-C (it owns temp files and the progress record); workers must not
    # die on it first with a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _ordered_map(
    fn: Callable[..., list[bytes]],
    jobs: Iterable[Job],
    pool: Any,
    max_pending: int,
    max_side: int | None,
) -> Iterator[tuple[Job, list[bytes]]]:
    """Encode jobs in a pool, yielding results in submission order with bounded look-ahead.

    ``Pool.imap`` would drain the job generator eagerly (loading a whole source into memory);
    this keeps at most ``max_pending`` jobs in flight.
    """
    if pool is None:
        for job in jobs:
            yield job, fn(job.kind, job.payload, max_side)
        return
    pending: deque = deque()
    for job in jobs:
        pending.append((job, pool.apply_async(fn, (job.kind, job.payload, max_side))))
        if len(pending) >= max_pending:
            j, r = pending.popleft()
            yield j, r.get()
    while pending:
        j, r = pending.popleft()
        yield j, r.get()


# ----------------------------------------------------------------------------------------------
# Per-split shard sink


class _SplitSink:
    """Receives encoded samples of one split in file order and rolls them into shards."""

    def __init__(self, builder: DatasetBuilder, split: str, labels: np.ndarray):
        self.b, self.split, self.labels = builder, split, labels
        self.order = builder.order(split)  # file position -> sample index
        self.n = len(labels)
        self.size = builder.shard_size
        self.num_shards = max(1, -(-self.n // self.size))
        self.dir = builder.out / split
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
        return self.shard_file(sid) in self.b.done

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
                final = self.b.out / self.shard_file(sid)
                tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
                fh = open(tmp, "wb")
                self.cur = (sid, tmp, fh, TarShardWriter(fh))
            idx = int(self.order[pos])
            key, members = sample_members(idx, int(self.labels[idx]), ext, blob)
            self.cur[3].add(key, members)
            self.expect = pos + 1
            if self.expect == self.shard_range(sid)[1]:
                self._finish()
                self._skip_done()

    def _finish(self) -> None:
        assert self.cur is not None
        sid, tmp, fh, tw = self.cur
        tw.close()
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        final = self.b.out / self.shard_file(sid)
        index = self.b.out / self.index_file(sid)
        mf.atomic_write_text(index, tw.dali_index())
        os.replace(tmp, final)
        a, z = self.shard_range(sid)
        self.b.record_done(
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
            fh.close()
            tmp.unlink(missing_ok=True)
            self.cur = None

    def empty_split(self) -> None:
        """A split with no samples still gets one (empty) shard so every split has a file."""
        if self.n == 0 and not self.is_done(0):
            self.dir.mkdir(parents=True, exist_ok=True)
            final = self.b.out / self.shard_file(0)
            tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            with open(tmp, "wb") as fh:
                TarShardWriter(fh).close()
            os.replace(tmp, final)
            self.b.record_done(
                self.shard_file(0),
                {"count": 0, "sha256": sha256_file(final), "size": final.stat().st_size, "dali_index": None},
            )


# ----------------------------------------------------------------------------------------------
# The builder


class DatasetBuilder:
    """Builds one dataset directory (see the module docstring for the guarantees).

    Args:
        out_dir: destination; must be absent, empty, or an earlier (partial) build of the same
            dataset. A directory holding a different dataset is an error unless ``overwrite``.
        name: dataset name recorded in the manifest.
        class_names: C names, label order.
        splits: split name -> :class:`SplitSpec`; needs ``labeled``, ``unlabeled``, ``test``.
        encoding: ``"png"`` (lossless, <= 64 px) or ``"jpg"`` (full resolution).
        image_size: ``[H, W]`` or ``None`` for variable-size images.
        source: ``{"kind", "path", "checksum"}`` record of the input.
        split_rule: the rule and its parameters.
        seed: split seed; also seeds the training splits' write order (:mod:`shards.order`).
        formats: subset of ``("wds", "arrays", "ffcv")``; ``wds`` is always written.
        shard_size: samples per tar shard (default 5000 for PNG, 1000 for JPEG).
        workers: encoding processes; ``<= 1`` encodes in this process.
        max_side: JPEG only: longest side after the optional build-time resize.
        progress: show a tqdm bar on stderr.
        overwrite: replace an existing dataset at ``out_dir``: deletes exactly the files its
            own manifest / progress record list, and refuses (deleting nothing) when ``out_dir``
            holds anything else or a ``manifest.json`` not written by this tool.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        name: str,
        class_names: Sequence[str],
        splits: dict[str, SplitSpec],
        encoding: str,
        image_size: Sequence[int] | None,
        source: dict[str, Any] | None = None,
        split_rule: dict[str, Any] | None = None,
        seed: int = 0,
        formats: Sequence[str] = ("wds",),
        shard_size: int | None = None,
        workers: int = 1,
        max_side: int | None = None,
        progress: bool = False,
        overwrite: bool = False,
    ):
        self.out = Path(out_dir)
        if encoding not in DEFAULT_SHARD_SIZE:
            raise ValueError(f"encoding must be 'png' or 'jpg', got {encoding!r}")
        bad = [f for f in formats if f not in mf.FORMATS]
        if bad:
            raise ValueError(f"unknown format(s) {bad}; choose from {list(mf.FORMATS)}")
        self.formats = sorted(set(formats) | {"wds"}, key=mf.FORMATS.index)
        if "arrays" in self.formats and image_size is None:
            raise ValueError(
                "--formats arrays needs fixed-size images; this dataset is variable-size "
                "(full-resolution JPEG)"
            )
        for s in mf.REQUIRED_SPLITS:
            if s not in splits:
                raise ValueError(f"split {s!r} is required (got {sorted(splits)})")
        for s in splits:
            if s not in mf.SPLITS:
                raise ValueError(f"unknown split {s!r}; splits are {list(mf.SPLITS)}")
        self.num_classes = len(class_names)
        for s, spec in splits.items():
            lab = np.asarray(spec.labels)
            if lab.ndim != 1 or (lab.size and (lab.min() < 0 or lab.max() >= self.num_classes)):
                raise ValueError(
                    f"split {s!r}: labels must be a 1-D array in 0..{self.num_classes - 1}"
                )
        self.shard_size = int(shard_size or DEFAULT_SHARD_SIZE[encoding])
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if "ffcv" in self.formats:
            from shards.ffcv_out import require_ffcv

            require_ffcv()
        self.splits = {s: splits[s] for s in mf.SPLITS if s in splits}
        self.orders = {s: order_record(seed, s) for s in self.splits}
        self._perms = {
            s: file_order(self.orders[s], len(sp.labels)) for s, sp in self.splits.items()
        }
        self.workers, self.max_side, self.progress = int(workers), max_side, progress
        self.overwrite = overwrite
        self.encoding = encoding
        self.meta: dict[str, Any] = {
            "tool": od.TOOL,  # ownership marker: only such a manifest's files are ever deleted
            "format_version": mf.FORMAT_VERSION,
            "tool_version": mf.TOOL_VERSION,
            "name": name,
            "source": source,
            "split_rule": split_rule,
            "seed": int(seed),
            "num_classes": self.num_classes,
            "class_names": [str(c) for c in class_names],
            "image_size": None if image_size is None else [int(x) for x in image_size],
            "encoding": encoding,
            "formats": self.formats,
        }
        ident = {
            **{k: v for k, v in self.meta.items() if k not in ("tool_version", "tool")},
            "source": None
            if source is None
            else {k: v for k, v in source.items() if k != "path"},  # moving the source is ok
            "shard_size": self.shard_size,
            "png_level": PNG_COMPRESS_LEVEL,
            "jpeg_quality": JPEG_QUALITY,
            "max_side": max_side,
            "fingerprints": {s: sp.fingerprint for s, sp in self.splits.items()},
            "orders": self.orders,
        }
        self.build_id = hashlib.sha256(mf.dumps(ident).encode()).hexdigest()
        self.done: dict[str, dict[str, Any]] = {}
        self.sinks: dict[str, _SplitSink] = {}
        self.stats = {"encoded": 0, "seconds": 0.0, "resumed_shards": 0, "up_to_date": False}
        self._lock: od.BuildLock | None = None

    # -- out-dir state ------------------------------------------------------------------------

    def _prepare_out(self) -> dict[str, Any] | None:
        """Lock ``out``, check it and load resume state; returns the manifest if complete.

        Only files that our own manifest / progress record list are ever deleted or reused
        (:mod:`shards.outdir`); a complete build is "up to date" only if every listed file
        exists with its recorded size, otherwise the missing files are rebuilt.
        """
        out = self.out
        man, prog = out / mf.MANIFEST, out / PROGRESS
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        self._lock = od.BuildLock(out)
        self._lock.acquire()
        old = od.read_json(man) if man.exists() else None
        state = od.read_json(prog) if prog.exists() else None
        if man.exists() and not od.manifest_is_ours(old):
            raise ValueError(
                f'--out {out}: {man} was not written by bmb-shards (no "tool": '
                f'"{od.TOOL}" marker, or not a valid format-v1 manifest); refusing to touch '
                "anything in this directory, --overwrite included. Choose another --out"
            )
        if prog.exists() and not od.progress_is_ours(state):
            raise ValueError(
                f"--out {out}: {prog} is not a bmb-shards progress record; refusing to touch "
                "this directory. Choose another --out"
            )
        if self.overwrite and (old is not None or state is not None):
            owned = od.owned_files(old, state)
            unknown = od.unknown_files(out, owned)
            if unknown:
                raise ValueError(
                    f"--out {out}: --overwrite deletes only files listed in the dataset's "
                    "manifest.json / .shards-progress.json, and this directory also holds "
                    f"other files: {od.describe(unknown)}. Nothing was deleted; move those "
                    "files away or choose another --out"
                )
            n = od.delete_owned(out, owned)
            self._say(f"{out}: --overwrite deleted {n} file(s) of the previous build")
            old = state = None
        if old is not None:
            if old.get("build_id") != self.build_id:
                raise ValueError(
                    f"--out {out} already holds a different dataset ({old.get('name')!r}, "
                    f"build_id {str(old.get('build_id'))[:12]}); choose another --out or pass "
                    "--overwrite to replace it (it deletes only the files its manifest lists)"
                )
            bad = od.check_complete(out, old)
            if not bad:
                self.stats["up_to_date"] = True
                return mf.load_manifest(out)
            print(
                f"WARNING: {out} holds this dataset, but {len(bad)} file(s) its manifest lists "
                f"are missing or changed size: {od.describe(bad)}; rebuilding them (the build "
                "is deterministic: the result is byte-identical to a fresh build)",
                file=sys.stderr,
            )
            # Back to an unfinished build whose done files are the manifest's: the resume path
            # below re-hashes what is there and rebuilds the rest.
            state = {"build_id": self.build_id, "done": self._done_from_manifest(old)}
            self.done = {}
            mf.atomic_write_text(prog, mf.dumps({**state, "tool": od.TOOL}))
            man.unlink()
        if state is not None:
            if state.get("build_id") != self.build_id:
                raise ValueError(
                    f"--out {out} holds an unfinished build of a different dataset "
                    f"({state.get('name')!r}); choose another --out or pass --overwrite"
                )
            for rel, rec in state.get("done", {}).items():
                p = out / rel
                if p.is_file() and sha256_file(p) == rec.get("sha256"):
                    self.done[rel] = rec
            self.stats["resumed_shards"] = len(self.done)
        else:
            unknown = od.unknown_files(out, set())
            if unknown:
                raise ValueError(
                    f"--out {out}: directory is not empty and is not a shards dataset "
                    f"({od.describe(unknown)}); refusing to write into it (choose an empty or "
                    "new directory)"
                )
        for s in ("", *mf.SPLITS):  # temp files of an interrupted run (we hold the lock)
            d = out / s
            if d.is_dir():
                for t in d.glob(".*.tmp-*"):
                    t.unlink()
        self._save_progress()
        return None

    @staticmethod
    def _done_from_manifest(m: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Progress records equivalent to a finished manifest's files."""
        done: dict[str, dict[str, Any]] = {}
        for sp in m["splits"].values():
            for sh in sp["shards"]:
                done[sh["file"]] = {k: v for k, v in sh.items() if k != "file"}
            a = sp.get("arrays")
            if a:
                for k in ("images", "labels"):
                    rec = {"sha256": a["sha256"][k]}
                    if isinstance(a.get("size"), dict) and k in a["size"]:
                        rec["size"] = a["size"][k]
                    done[a[k]] = rec
            f = sp.get("ffcv")
            if f:
                done[f["file"]] = {k: v for k, v in f.items() if k != "file"}
        return done

    def _save_progress(self) -> None:
        mf.atomic_write_text(
            self.out / PROGRESS,
            mf.dumps(
                {
                    "tool": od.TOOL,
                    "build_id": self.build_id,
                    "name": self.meta["name"],
                    "done": self.done,
                }
            ),
        )

    def record_done(self, rel: str, rec: dict[str, Any]) -> None:
        self.done[rel] = rec
        self._save_progress()

    def pending(self, split: str, start: int, stop: int) -> bool:
        """Whether file positions ``[start, stop)`` of ``split`` still have to be encoded."""
        return self.sinks[split].pending(start, stop)

    def order(self, split: str) -> np.ndarray:
        """int64 ``(N,)``: the index of the sample at each file position of ``split``."""
        return self._perms[split]

    # -- the build ----------------------------------------------------------------------------

    def run(self, make_jobs: Callable[[DatasetBuilder], Iterable[Job]]) -> dict[str, Any]:
        """Build everything and return the manifest.

        Holds ``out``'s build lock (:class:`shards.outdir.BuildLock`) from start to end.

        Args:
            make_jobs: called with this builder once resume state is known; yields the jobs in
                order (per split, consecutive file-position ranges, samples taken through
                :meth:`order`; splits may interleave). It should skip ranges for which
                :meth:`pending` is false.

        Raises:
            shards.outdir.OutDirLocked: another live build holds ``out``.
        """
        try:
            return self._run(make_jobs)
        finally:
            if self._lock is not None:
                self._lock.release()

    def _run(self, make_jobs: Callable[[DatasetBuilder], Iterable[Job]]) -> dict[str, Any]:
        done = self._prepare_out()
        if done is not None:
            self._say(f"{self.out}: already holds this dataset, complete; nothing to do")
            return done
        t0 = time.perf_counter()
        self.sinks = {
            s: _SplitSink(self, s, np.asarray(sp.labels)) for s, sp in self.splits.items()
        }
        todo = self._todo()
        bar = _bar(todo, f"encode {self.meta['name']}", self.progress)
        ext = self.encoding
        pool = None
        try:
            if self.workers > 1 and todo > 0:
                pool = _pool(self.workers)
            for job, blobs in _ordered_map(
                _encode, make_jobs(self), pool, 2 * max(1, self.workers), self.max_side
            ):
                self.sinks[job.split].add(job.start, ext, blobs)
                self.stats["encoded"] += len(blobs)
                bar.update(len(blobs))
            for sk in self.sinks.values():
                sk.empty_split()
                if sk.expect != sk.n:
                    raise RuntimeError(
                        f"internal error: split {sk.split} ended at sample {sk.expect} of {sk.n}"
                    )
        except BaseException:
            for sk in self.sinks.values():
                sk.abort()
            raise
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
        self.stats["seconds"] = dt = time.perf_counter() - t0
        n = self.stats["encoded"]
        self._say(
            f"encoded {n} images in {dt:.1f} s ({n / max(dt, 1e-9):.0f} img/s, "
            f"{self.workers} worker(s))"
            + (
                f"; kept {self.stats['resumed_shards']} file(s) of an earlier run"
                if self.stats["resumed_shards"]
                else ""
            )
        )
        extras = self._write_extras()
        manifest = dict(self.meta)
        manifest["build_id"] = self.build_id
        manifest["splits"] = {}
        for s, sk in self.sinks.items():
            shards = [
                {"file": sk.shard_file(i), **self.done[sk.shard_file(i)]}
                for i in range(sk.num_shards)
            ]
            manifest["splits"][s] = {
                "count": sk.n,
                "class_counts": [
                    int(c)
                    for c in np.bincount(sk.labels.astype(np.int64), minlength=self.num_classes)
                ],
                "shards": shards,
                "order": self.orders[s],
                "arrays": extras.get((s, "arrays")),
                "ffcv": extras.get((s, "ffcv")),
            }
        mf.write_manifest(self.out, manifest)
        (self.out / PROGRESS).unlink(missing_ok=True)
        return manifest

    def _say(self, msg: str) -> None:
        if self.progress:
            print(msg, file=sys.stderr)

    def _todo(self) -> int:
        n = 0
        for sk in self.sinks.values():
            for sid in range(sk.num_shards):
                if not sk.is_done(sid):
                    a, z = sk.shard_range(sid)
                    n += z - a
        return n

    def _write_extras(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Arrays and FFCV files, derived from the finished tars (so they match them exactly)."""
        res: dict[tuple[str, str], dict[str, Any]] = {}
        for s, sk in self.sinks.items():
            files = [self.out / sk.shard_file(i) for i in range(sk.num_shards)]
            if "arrays" in self.formats:
                res[(s, "arrays")] = self._arrays(s, sk, files)
            if "ffcv" in self.formats:
                from shards.ffcv_out import write_beton

                rel = f"{s}/{s}.beton"
                if rel not in self.done:
                    arr = None
                    if (s, "arrays") in res:
                        arr = np.load(self.out / res[(s, "arrays")]["images"], mmap_mode="r")
                    final = self.out / rel
                    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
                    try:
                        write_beton(tmp, files, sk.labels, self.encoding, sk.order, arrays=arr)
                        os.replace(tmp, final)
                    finally:
                        tmp.unlink(missing_ok=True)
                    self.record_done(
                        rel, {"sha256": sha256_file(final), "size": final.stat().st_size}
                    )
                res[(s, "ffcv")] = {"file": rel, **self.done[rel]}
        return res

    def _arrays(self, s: str, sk: _SplitSink, files: list[Path]) -> dict[str, Any]:
        rel_i, rel_l = f"{s}/images.npy", f"{s}/labels.npy"
        if rel_i not in self.done or rel_l not in self.done:
            h, w = self.meta["image_size"]
            final_i, final_l = self.out / rel_i, self.out / rel_l
            tmp_i = final_i.with_name(f".images.npy.tmp-{os.getpid()}")
            tmp_l = final_l.with_name(f".labels.npy.tmp-{os.getpid()}")
            try:
                arr = np.lib.format.open_memmap(
                    tmp_i, mode="w+", dtype=np.uint8, shape=(sk.n, h, w, 3)
                )
                for f in files:  # tars are in file order; array row i is the sample with idx i
                    for _key, mem in iter_tar_samples(f):
                        arr[int(mem["idx"])] = decode_image(mem[self.encoding])
                arr.flush()
                del arr
                with open(tmp_l, "wb") as fh:
                    np.save(fh, sk.labels.astype(np.int64))
                os.replace(tmp_i, final_i)
                os.replace(tmp_l, final_l)
            finally:
                tmp_i.unlink(missing_ok=True)
                tmp_l.unlink(missing_ok=True)
            self.done[rel_i] = {"sha256": sha256_file(final_i), "size": final_i.stat().st_size}
            self.record_done(
                rel_l, {"sha256": sha256_file(final_l), "size": final_l.stat().st_size}
            )
        out = {
            "images": rel_i,
            "labels": rel_l,
            "sha256": {"images": self.done[rel_i]["sha256"], "labels": self.done[rel_l]["sha256"]},
        }
        sizes = {k: self.done[r].get("size") for k, r in (("images", rel_i), ("labels", rel_l))}
        if all(isinstance(v, int) for v in sizes.values()):
            out["size"] = sizes
        return out


def _pool(workers: int) -> Any:
    # fork shares the parent's already-loaded source arrays with no copy; elsewhere spawn.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    return mp.get_context(method).Pool(workers, initializer=_worker_init)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", unit_scale=True, dynamic_ncols=True)


def array_jobs(
    builder: DatasetBuilder, split: str, images: np.ndarray, chunk: int = CHUNK
) -> Iterator[Job]:
    """Jobs for an in-memory uint8 ``(N, H, W, 3)`` split (row i = sample i), in file order,
    skipping finished shards."""
    order = builder.order(split)
    for a in range(0, len(images), chunk):
        z = min(len(images), a + chunk)
        if builder.pending(split, a, z):
            yield Job(split, a, "png", np.ascontiguousarray(images[order[a:z]]))


def write_dataset(
    out_dir: str | os.PathLike,
    *,
    name: str,
    class_names: Sequence[str],
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    formats: Sequence[str] = ("wds",),
    source: dict[str, Any] | None = None,
    split_rule: dict[str, Any] | None = None,
    seed: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE["png"],
    workers: int = 1,
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write in-memory images as a dataset directory (format v1) and return its manifest.

    Args:
        out_dir: destination directory (absent, empty, or a partial build of the same data).
        name: dataset name.
        class_names: C class names in label order.
        splits: split name -> ``(images uint8 (N, H, W, 3), labels int (N,))``; needs
            ``labeled``, ``unlabeled`` and ``test`` (``val`` optional). All splits share H, W
            (<= 64 px is the intended use: images are stored as lossless PNG).
        formats: any of ``"wds"`` (always), ``"arrays"``, ``"ffcv"``.
        source, split_rule, seed: recorded in the manifest as given.
        shard_size: samples per tar shard.
        workers: encoding processes.
        progress: show a progress bar.
        overwrite: replace an existing (different) dataset at ``out_dir``.

    Returns:
        The manifest dict, as written to ``out_dir/manifest.json``.

    Raises:
        ValueError: bad shapes/dtypes/labels (naming the split) or an ``out_dir`` that holds
            something else.
    """
    size = None
    specs: dict[str, SplitSpec] = {}
    for s, pair in splits.items():
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ValueError(f"split {s!r}: expected (images, labels)")
        images, labels = np.asarray(pair[0]), np.asarray(pair[1])
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"split {s!r}: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"split {s!r}: labels must be int (N,) with N={len(images)}, got "
                f"{labels.dtype} {labels.shape}"
            )
        hw = list(images.shape[1:3])
        if size is not None and hw != size and len(images):
            raise ValueError(f"split {s!r}: image size {hw} differs from other splits' {size}")
        if len(images):
            size = hw
        specs[s] = SplitSpec(labels.astype(np.int64), fingerprint_arrays(images, labels))
    b = DatasetBuilder(
        out_dir,
        name=name,
        class_names=class_names,
        splits=specs,
        encoding="png",
        image_size=size,
        source=source,
        split_rule=split_rule,
        seed=seed,
        formats=formats,
        shard_size=shard_size,
        workers=workers,
        progress=progress,
        overwrite=overwrite,
    )
    arrays = {s: np.asarray(p[0]) for s, p in splits.items()}

    def jobs(builder: DatasetBuilder) -> Iterator[Job]:
        for s in builder.splits:
            yield from array_jobs(builder, s, arrays[s])

    return b.run(jobs)
