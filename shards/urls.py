"""Datasets at a URL: naming a dataset's files there, opening them, wording a failed transfer.

Split out of :mod:`shards.format` along the one seam where the format meets the network: these
helpers know nothing of the manifest schema or the tar layout, only how a location is told
apart from a local directory (:func:`is_url`), how a file of the dataset is named there
(:func:`join_url`, from names checked by :func:`check_name`), how it is opened
(:func:`open_url`: commands run without a shell, except the user's own ``pipe:`` command, and
every read bounded by a stall timeout) and read to its end (:func:`read_url`, capped, and
:func:`read_stream`), and how a failed transfer is put in words (:func:`transfer_error`). The
manifest and the tar reader stay in :mod:`shards.format`, which re-exports every name here, so
the readers in :mod:`pipelines` still import only that module (``docs/datasets.md`` "Datasets
at a URL").
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shlex
import subprocess
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeVar

T = TypeVar("T")

URL_SCHEMES = ("http://", "https://", "pipe:", "s3://", "gs://")
"""Dataset locations read as streams (``order="stream"`` only), opened by :func:`open_url`."""

SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")
"""A file name a manifest may list: a relative path inside the dataset, ``/``-separated parts
of ASCII letters, digits, ``_``, ``-`` and ``.``, none starting with ``.`` or ``-`` (so no
``..``, no hidden files, no option-like words), no scheme, no shell or glob character, no
white space. Every name the builder writes (``labeled/labeled-000000.tar``) is one."""

MAX_NAME = 1024
READ_TIMEOUT_ENV = "BMB_READ_TIMEOUT"
DEFAULT_READ_TIMEOUT = 120.0
"""Seconds a network read may wait for its next byte (``$BMB_READ_TIMEOUT``), also curl's
connect timeout and its stall limit (``--speed-time``): a stalled transfer is an error."""

MANIFEST_MAX_BYTES = 64 << 20
"""``manifest.json`` larger than this is refused, local or remote (a real one is kilobytes to
a few MiB: ImageNet-LT's is about 1 MiB)."""

_OK_STATUS = (141, -13, 23)  # SIGPIPE (shell, signal) and curl's write error: we closed early


class TransferStalled(ValueError):
    """A network read that received nothing for the read timeout (:func:`read_timeout`)."""


def is_url(location: Any) -> bool:
    """Whether ``location`` (a ``data.dataset`` value) names a URL, not a local directory."""
    return isinstance(location, str) and location.startswith(URL_SCHEMES)


def check_name(name: Any, where: str = "") -> str:
    """``name`` if it is a safe dataset file name (:data:`SAFE_NAME`).

    Raises:
        ValueError: naming ``where`` (the manifest key) and the name, shown with ``repr`` and cut
            to 200 characters (never run, never pasted into a command).
    """
    if isinstance(name, str) and len(name) <= MAX_NAME and SAFE_NAME.fullmatch(name):
        return name
    shown = repr(name) if len(repr(name)) <= 200 else repr(name)[:200] + "..."
    raise ValueError(
        f"{where}{' ' if where else ''}file name {shown} is not a relative path inside the "
        "dataset (allowed: parts of letters, digits, '_', '-', '.' joined by '/', none starting "
        "with '.' or '-'); refusing to read it"
    )


def join_url(base: str, name: str) -> str:
    """The URL of file ``name`` (``manifest.json`` or a shard's ``file``) of the dataset at
    ``base``: ``base/name``. A ``pipe:`` command names the file with ``{}``
    (``pipe:aws s3 cp s3://bucket/ds/{} -``); without ``{}`` the name is appended to the
    command's last word (``pipe:curl -sf https://host/ds`` ->
    ``pipe:curl -sf https://host/ds/manifest.json``). ``name`` must pass :func:`check_name`
    and enters a ``pipe:`` command shell-quoted (a checked name needs no quotes: a second
    guard).

    Raises:
        ValueError: an unsafe ``name``.
    """
    name = check_name(name)
    if base.startswith("pipe:"):
        quoted = shlex.quote(name)
        return base.replace("{}", quoted) if "{}" in base else f"{base.rstrip('/')}/{quoted}"
    return f"{base.rstrip('/')}/{name}"


def read_timeout() -> float:
    """Seconds a network read may stall: ``$BMB_READ_TIMEOUT`` or :data:`DEFAULT_READ_TIMEOUT`.

    Raises:
        ValueError: a value that is not a positive number.
    """
    raw = os.environ.get(READ_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_READ_TIMEOUT
    try:
        t = float(raw)
    except ValueError:
        t = float("nan")
    if not t > 0 or t == float("inf"):
        raise ValueError(f"${READ_TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return t


class _Pipe:
    """The stdout of a reading command, read with a stall timeout (see :func:`open_url`)."""

    def __init__(self, url: str, args: list[str] | str, shell: bool, timeout: float):
        self.url, self.timeout, self._buf = url, timeout, b""
        self.proc = subprocess.Popen(  # noqa: S603 (argv, or the user's own pipe: command)
            args, shell=shell, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        self.closed = False

    def _fill(self, n: int) -> bytes:
        """Up to ``n`` bytes from the command, waiting at most ``timeout`` for each chunk."""
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], self.timeout)
        if not ready:
            self.proc.kill()
            raise TransferStalled(
                f"{self.url}: no data for {self.timeout:g} s: the transfer stalled (the limit is "
                f"${READ_TIMEOUT_ENV}, in seconds)"
            )
        return os.read(fd, max(n, 1 << 16))

    def read(self, n: int = -1) -> bytes:
        out = [self._buf]
        have = len(self._buf)
        while n < 0 or have < n:
            chunk = self._fill(n - have if n >= 0 else 1 << 20)
            if not chunk:
                break
            out.append(chunk)
            have += len(chunk)
        data = b"".join(out)
        if n < 0:
            self._buf = b""
            return data
        self._buf = data[n:]
        return data[:n]

    def close(self) -> None:
        """Close the stream and wait for the command.

        Raises:
            OSError: ``<url>: exit <status>`` for a failed command (not SIGPIPE: we closed early).
        """
        if self.closed:
            return
        self.closed = True
        self.proc.stdout.close()
        try:
            status = self.proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait()
        if status != 0 and status not in _OK_STATUS:
            raise OSError(f"{self.url}: exit {status}")

    def __enter__(self) -> _Pipe:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(OSError):  # the error in flight says more than the status
            self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if not self.closed:
                self.proc.kill()
                self.close()


def open_url(url: str) -> BinaryIO:
    """A binary read stream of ``url``, every read bounded by :func:`read_timeout`.

    ``http(s)://``: ``curl`` run directly (no shell) with ``--globoff`` (no URL globbing),
    ``--fail``, ``--location`` restricted to http(s), a connect timeout and a stall limit.
    ``gs://``: ``gsutil cat URL`` (no shell). ``pipe:CMD``: the user's command, in a shell
    (file names enter it only through :func:`join_url`). Errors may surface on read or close
    rather than here.

    Raises:
        ValueError: the URL cannot be opened (no handler, the program is missing), naming it.
    """
    timeout = read_timeout()
    if url.startswith(("http://", "https://")):
        t = f"{timeout:g}"
        args: list[str] | str = [
            "curl", "--globoff", "--fail", "--silent", "--location", "--proto", "=http,https",
            "--proto-redir", "=http,https", "--connect-timeout", t, "--speed-limit", "1",
            "--speed-time", t, "--url", url,
        ]  # fmt: skip
        shell = False
    elif url.startswith("gs://"):
        args, shell = ["gsutil", "cat", url], False
    elif url.startswith("pipe:"):
        args, shell = url[len("pipe:") :], True
    else:
        raise ValueError(
            f"{url}: cannot open (no reader for this scheme); use the pipe form, e.g. "
            "pipe:aws s3 cp s3://bucket/ds/{} -"
        )
    try:
        return _Pipe(url, args, shell, timeout)  # type: ignore[return-value]
    except OSError as e:
        raise ValueError(f"{url}: cannot open ({e})") from e


def transfer_error(url: str, e: Exception) -> str:
    """A failed transfer in words: :class:`_Pipe` reports a reading command's (``curl``, a
    ``pipe:`` command) non-zero exit status as an ``OSError`` ending ``exit <status>``."""
    m = re.search(r"exit (\d+)", str(e))
    if m is None:
        return f"{url}: cannot read ({e})"
    code = int(m.group(1))
    why = " (curl: an HTTP error status, e.g. 404 Not Found)" if code == 22 else ""
    return f"{url}: cannot read: the reading command exited with status {code}{why}"


def read_url(url: str, limit: int) -> bytes:
    """All bytes of ``url``, at most ``limit``; a failed transfer (e.g. HTTP 404), a stalled
    one or a larger file is a ValueError naming it."""
    try:
        with open_url(url) as f:
            data = f.read(limit + 1)
            if len(data) > limit:
                raise ValueError(
                    f"{url}: larger than {limit} bytes, the cap for this file; not read"
                )
            return data
    except ValueError:
        raise
    except Exception as e:  # the command's non-zero exit status
        raise ValueError(transfer_error(url, e)) from e


def _drain(f: BinaryIO) -> None:
    while f.read(1 << 16):
        pass


def read_stream(url: str, parse: Callable[[BinaryIO, str], Iterator[T]]) -> Iterator[T]:
    """What ``parse(stream, url)`` yields from :func:`open_url` of ``url``. A reading command's
    failure (``curl`` on HTTP 404, a ``pipe:`` command's error) shows as its exit status when
    the stream is closed, so the stream is read to its end (an archive's zero padding too:
    closed early, the command would fail writing it) and closed before the file counts as read.

    Raises:
        ValueError: ``parse``'s own (cut short or malformed), a stalled or failed transfer,
            naming it.
    """
    f = open_url(url)
    try:
        yield from parse(f, url)
        _drain(f)
    except (GeneratorExit, TransferStalled):  # stopped early or stalled: the status is moot
        with contextlib.suppress(OSError):
            f.close()
        raise
    except ValueError as e:  # cut short or malformed: a failed transfer explains it better
        try:
            _drain(f)  # (the rest of the file, so that a good command exits 0)
            f.close()
        except TransferStalled:
            raise e from None
        except OSError as closed:
            raise ValueError(transfer_error(url, closed)) from e
        raise
    except OSError as e:
        with contextlib.suppress(OSError):
            f.close()
        raise ValueError(transfer_error(url, e)) from e
    try:
        f.close()
    except OSError as e:
        raise ValueError(transfer_error(url, e)) from e
