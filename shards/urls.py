"""Datasets at a URL: naming a dataset's files there, opening them, wording a failed transfer.

Split out of :mod:`shards.format` along the one seam where the format meets the network: these
helpers know nothing of the manifest schema or the tar layout, only how a location is told
apart from a local directory (:func:`is_url`), how a file of the dataset is named there
(:func:`join_url`), how it is opened (:func:`open_url`, :func:`webdataset.gopen`) and read to
its end (:func:`read_url`, :func:`read_stream`), and how a failed transfer is put in words
(:func:`transfer_error`). The manifest and the tar reader stay in :mod:`shards.format`, which
re-exports every name here, so the readers in :mod:`pipelines` still import only that module
(``docs/datasets.md`` "Datasets at a URL").
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeVar

T = TypeVar("T")

URL_SCHEMES = ("http://", "https://", "pipe:", "s3://", "gs://")
"""Dataset locations read as streams through :func:`webdataset.gopen` (``order="stream"`` only)."""


def is_url(location: Any) -> bool:
    """Whether ``location`` (a ``data.dataset`` value) names a URL, not a local directory."""
    return isinstance(location, str) and location.startswith(URL_SCHEMES)


def join_url(base: str, name: str) -> str:
    """The URL of file ``name`` (``manifest.json`` or a shard's ``file``) of the dataset at
    ``base``: ``base/name``. A ``pipe:`` command names the file with ``{}``
    (``pipe:aws s3 cp s3://bucket/ds/{} -``); without ``{}`` the name is appended to the
    command's last word (``pipe:curl -sf https://host/ds`` ->
    ``pipe:curl -sf https://host/ds/manifest.json``)."""
    if base.startswith("pipe:") and "{}" in base:
        return base.replace("{}", name)
    return f"{base.rstrip('/')}/{name}"


def open_url(url: str) -> BinaryIO:
    """A binary read stream of ``url`` (:func:`webdataset.gopen`: ``http(s)://`` through
    ``curl``, ``pipe:CMD`` through the shell; ``s3://``/``gs://`` by whatever handler the
    installed webdataset has). Errors may surface on read or close rather than here.

    Raises:
        ValueError: the URL cannot be opened, naming it.
    """
    from webdataset.gopen import gopen

    try:
        return gopen(url, "rb")
    except Exception as e:  # gopen raises ValueError/OSError/... depending on the handler
        raise ValueError(f"{url}: cannot open ({e})") from e


def transfer_error(url: str, e: Exception) -> str:
    """A failed transfer in words: webdataset reports a reading command's (``curl``, a
    ``pipe:`` command) non-zero exit status as an ``OSError`` quoting the whole command line."""
    m = re.search(r"exit (\d+)", str(e))
    if m is None:
        return f"{url}: cannot read ({e})"
    code = int(m.group(1))
    why = " (curl: an HTTP error status, e.g. 404 Not Found)" if code == 22 else ""
    return f"{url}: cannot read: the reading command exited with status {code}{why}"


def read_url(url: str) -> bytes:
    """All bytes of ``url``; a failed transfer (e.g. HTTP 404) is a ValueError naming it."""
    try:
        with open_url(url) as f:
            return f.read()
    except ValueError:
        raise
    except Exception as e:  # webdataset's pipe reader raises on a non-zero exit status
        raise ValueError(transfer_error(url, e)) from e


def read_stream(url: str, parse: Callable[[BinaryIO, str], Iterator[T]]) -> Iterator[T]:
    """What ``parse(stream, url)`` yields from :func:`open_url` of ``url``. A reading command's
    failure (``curl`` on HTTP 404, a ``pipe:`` command's error) shows as its exit status when
    the stream is closed, so the stream is read to its end (an archive's zero padding too:
    closed early, the command would fail writing it) and closed before the file counts as read.

    Raises:
        ValueError: ``parse``'s own (cut short or malformed), or a failed transfer, naming it.
    """
    f = open_url(url)
    try:
        yield from parse(f, url)
        while f.read(1 << 16):
            pass
    except GeneratorExit:  # the consumer stopped early: the command's exit status is moot
        with contextlib.suppress(OSError):
            f.close()
        raise
    except ValueError as e:  # cut short or malformed: a failed transfer explains it better
        try:
            while f.read(1 << 16):  # (the rest of the file, so that a good command exits 0)
                pass
            f.close()
        except OSError as closed:
            raise ValueError(transfer_error(url, closed)) from e
        raise
    except OSError as e:  # webdataset's Pipe.read raises once the command has failed
        with contextlib.suppress(OSError):
            f.close()
        raise ValueError(transfer_error(url, e)) from e
    try:
        f.close()
    except OSError as e:
        raise ValueError(transfer_error(url, e)) from e
