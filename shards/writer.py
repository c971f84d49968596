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

The pieces, each taking values (never the builder): :mod:`shards.encode` (jobs, sample bytes, the
ordered pool), :mod:`shards.sink` (one split's shards), :mod:`shards.resume` (the out-dir lock,
checks and progress record, held by the builder as ``state``), :mod:`shards.extras` (arrays and
``.beton`` files derived from the finished shards) and :mod:`shards.hashing` (digests).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shards import manifest as mf
from shards import outdir as od
from shards.encode import Job, ordered_map, progress_bar, worker_pool
from shards.encode import encode_job as _encode
from shards.extras import write_extras
from shards.hashing import fingerprint_arrays
from shards.order import file_order, order_record
from shards.resume import PROGRESS, OutDirState
from shards.sink import SplitSink
from shards.tario import JPEG_QUALITY, PNG_COMPRESS_LEVEL

__all__ = [
    "CHUNK",
    "DEFAULT_SHARD_SIZE",
    "PROGRESS",
    "DatasetBuilder",
    "Job",
    "SplitSpec",
    "array_jobs",
    "write_dataset",
]

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
        self.state = OutDirState(self.out, build_id=self.build_id, name=name, overwrite=overwrite, say=self._say)
        self.sinks: dict[str, SplitSink] = {}
        self.stats = {"encoded": 0, "seconds": 0.0, "resumed_shards": 0, "up_to_date": False}

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
            self.state.release()

    def _run(self, make_jobs: Callable[[DatasetBuilder], Iterable[Job]]) -> dict[str, Any]:
        done = self.state.prepare()
        if done is not None:
            self.stats["up_to_date"] = True
            self._say(f"{self.out}: already holds this dataset, complete; nothing to do")
            return done
        self.stats["resumed_shards"] = len(self.state.done)
        t0 = time.perf_counter()
        self.sinks = {
            s: SplitSink(self.state, s, np.asarray(sp.labels), self._perms[s], self.shard_size)
            for s, sp in self.splits.items()
        }
        todo = self._todo()
        bar = progress_bar(todo, f"encode {self.meta['name']}", self.progress)
        ext = self.encoding
        pool = None
        try:
            if self.workers > 1 and todo > 0:
                pool = worker_pool(self.workers)
            for job, blobs in ordered_map(
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
        extras = write_extras(
            self.state,
            self.sinks,
            formats=self.formats,
            encoding=self.encoding,
            image_size=self.meta["image_size"],
        )
        manifest = dict(self.meta)
        manifest["build_id"] = self.build_id
        manifest["splits"] = {}
        for s, sk in self.sinks.items():
            shards = [
                {"file": sk.shard_file(i), **self.state.done[sk.shard_file(i)]}
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
