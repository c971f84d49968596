"""Encoding for :mod:`shards.writer`: the :class:`Job` unit, sample bytes (in worker processes,
module-level so they pickle), the ordered worker pool and the progress bar."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from shards.tario import JPEG_QUALITY, encode_png


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


def encode_job(kind: str, payload: Any, max_side: int | None) -> list[bytes]:
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


def ordered_map(
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


def worker_pool(workers: int) -> Any:
    # fork shares the parent's already-loaded source arrays with no copy; elsewhere spawn.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    return mp.get_context(method).Pool(workers, initializer=_worker_init)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", unit_scale=True, dynamic_ncols=True)
