"""What in ``--out`` belongs to us: ownership marker, the build lock, listed files.

The builder only ever deletes or rewrites files that it can prove it wrote:

* **Ownership.** A ``manifest.json`` is ours when it carries ``"tool": "bmb-shards"`` (written
  since this marker exists) or, for datasets built before it, when it validates completely as
  format v1 and has a ``build_id``. The progress record (``.shards-progress.json``) likewise.
  Anything else -- a foreign ``manifest.json``, invalid JSON -- is never touched.
* **Listed files.** ``--overwrite`` deletes exactly the files our manifest / progress record
  list (plus those two records and our temp files ``.<name>.tmp-<pid>``); a file in ``--out``
  that is listed nowhere stops the build, naming it, before anything is deleted.
* **Temp files.** A temp file is ours only when its ``<pid>`` is one the progress record lists
  (``pids``: every builder process that wrote into ``--out``, recorded before it writes
  anything); only those are ever deleted. A user's file that merely looks like one
  (``.notes.tmp-1``) is left alone, with or without ``--overwrite``.
* **Lock.** ``--out/.bmb-shards.lock`` (JSON: tool, pid, host, start time, a random token) is
  created atomically (``os.link``) for the whole build; a second build of the same ``--out``
  fails at once naming the holder. A lock whose pid is not alive on this host is stale (the
  builder was killed) and is taken over with a warning on stderr.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shards import manifest as mf

TOOL = "bmb-shards"
LOCK = ".bmb-shards.lock"
PROGRESS_NAME = ".shards-progress.json"
_TEMP = re.compile(r"^\..+\.tmp-(\d+)$")  # our temp files: .<final name>.tmp-<pid>


class OutDirLocked(RuntimeError):
    """Another live build holds ``--out``'s lock."""


# ----------------------------------------------------------------------------------------------
# Ownership


def manifest_is_ours(m: Any) -> bool:
    """Whether a parsed ``manifest.json`` was written by this tool (see the module docstring)."""
    if not isinstance(m, dict):
        return False
    if m.get("tool") == TOOL:
        return True
    if not isinstance(m.get("build_id"), str):
        return False
    try:
        mf.validate_manifest(m)
    except ValueError:
        return False
    return True


def progress_is_ours(state: Any) -> bool:
    """Whether a parsed progress record was written by this tool."""
    if not isinstance(state, dict):
        return False
    if state.get("tool") == TOOL:
        return True
    return isinstance(state.get("build_id"), str) and isinstance(state.get("done"), dict)


def read_json(path: Path) -> Any:
    """Parsed JSON of ``path``, or ``None`` when it is unreadable or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _safe_rel(rel: Any) -> str | None:
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")):
        return None
    parts = Path(rel).parts
    if ".." in parts or Path(rel).is_absolute():
        return None
    return Path(rel).as_posix()


def _records(node: Any) -> Iterator[tuple[str, int | None]]:
    """``(relative path, recorded size or None)`` of every ``{"file": ...}`` record in ``node``,
    at any depth (shard records, their ``dali_index``, ``ffcv`` ...)."""
    if isinstance(node, dict):
        rel = _safe_rel(node.get("file"))
        if rel is not None:
            size = node.get("size")
            yield rel, size if isinstance(size, int) else None
        for k, v in node.items():
            if k != "file":
                yield from _records(v)
    elif isinstance(node, list):
        for v in node:
            yield from _records(v)


def manifest_files(m: dict[str, Any]) -> Iterator[tuple[str, int | None]]:
    """``(relative path, recorded byte size or None)`` of every file a manifest lists.

    Shard records and any other ``{"file": ...}`` record under ``splits``, and the ``arrays``
    entries' ``images``/``labels``.
    """
    for sp in (m.get("splits") or {}).values():
        if not isinstance(sp, dict):
            continue
        arrays = sp.get("arrays")
        if isinstance(arrays, dict):
            sizes = arrays.get("size") if isinstance(arrays.get("size"), dict) else {}
            for k in ("images", "labels"):
                rel = _safe_rel(arrays.get(k))
                if rel is not None:
                    s = sizes.get(k)
                    yield rel, s if isinstance(s, int) else None
        yield from _records({k: v for k, v in sp.items() if k != "arrays"})


def owned_files(manifest: Any = None, progress: Any = None) -> set[str]:
    """Relative paths of everything our records list, the records themselves included."""
    out = {mf.MANIFEST} if manifest is not None else set()
    if isinstance(manifest, dict):
        out |= {rel for rel, _ in manifest_files(manifest)}
    if isinstance(progress, dict):
        out.add(PROGRESS_NAME)
        done = progress.get("done") or {}
        out |= {r for r in map(_safe_rel, done) if r is not None}
        out |= {rel for rel, _ in _records(list(done.values()) if isinstance(done, dict) else [])}
    return out


def _is_our_temp(rel: str, pids: set[int] | None = None) -> bool:
    """``.<name>.tmp-<pid>`` directly in ``out`` or in a split folder (where we write); with
    ``pids``, only if its pid is one of them (a builder of this ``out``)."""
    parent, _, name = rel.rpartition("/")
    m = _TEMP.match(name)
    if parent not in ("", *mf.SPLITS) or m is None:
        return False
    return pids is None or int(m.group(1)) in pids


def recorded_pids(progress: Any) -> set[int]:
    """The builder pids a progress record lists (none for records written before ``pids``)."""
    pids = progress.get("pids") if isinstance(progress, dict) else None
    if not isinstance(pids, list):
        return set()
    return {p for p in pids if isinstance(p, int) and not isinstance(p, bool)}


def delete_temps(out: Path, pids: set[int]) -> int:
    """Delete our temp files (:func:`_is_our_temp` with ``pids``) in ``out`` and its split
    folders; returns how many."""
    n = 0
    for d in ("", *mf.SPLITS):
        if (out / d).is_dir():
            for p in (out / d).iterdir():
                if p.is_file() and not p.is_symlink() and _is_our_temp(p.relative_to(out).as_posix(), pids):
                    p.unlink(missing_ok=True)
                    n += 1
    return n


def is_temp_or_lock(rel: str) -> bool:
    """Our temp files (``.<name>.tmp-<pid>``) and the lock (and its creation temp)."""
    return rel == LOCK or rel.startswith(LOCK + "-") or _is_our_temp(rel)


def unknown_files(out: Path, owned: set[str]) -> list[str]:
    """Files (and symlinks) under ``out`` that are neither listed nor our temp/lock files."""
    found = []
    for dirpath, dirnames, filenames in os.walk(out):
        base = Path(dirpath).relative_to(out)
        for name in sorted(filenames) + sorted(
            d for d in dirnames if (Path(dirpath) / d).is_symlink()
        ):
            rel = (base / name).as_posix()
            if rel not in owned and not is_temp_or_lock(rel):
                found.append(rel)
        dirnames.sort()
    return sorted(found)


def delete_owned(out: Path, owned: set[str], pids: set[int]) -> int:
    """Delete the owned files that exist, our temp files (of builders ``pids``), then the
    directories left empty."""
    n, dirs = 0, set()
    for rel in sorted(owned):
        p = out / rel
        if p.is_file() or p.is_symlink():
            p.unlink()
            n += 1
            dirs.update(q for q in p.parents if q != out and out in q.parents)
    delete_temps(out, pids)
    for d in sorted(dirs, key=lambda q: len(q.parts), reverse=True):
        try:
            d.rmdir()  # only if empty
        except OSError:
            pass
    return n


def describe(paths: list[str], limit: int = 10) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" (and {len(paths) - limit} more)" if len(paths) > limit else "")


def check_complete(out: Path, m: dict[str, Any]) -> list[str]:
    """Listed files that are missing or whose size differs from the recorded one.

    Sizes are recorded since the ownership marker exists; for older manifests only existence
    is checked. (Content is checked by ``bmb-shards verify``, which re-hashes everything.)
    """
    bad = []
    for rel, size in manifest_files(m):
        p = out / rel
        if not p.is_file():
            bad.append(f"{rel} (missing)")
        elif size is not None and p.stat().st_size != size:
            bad.append(f"{rel} ({p.stat().st_size} bytes, manifest says {size})")
    return bad


# ----------------------------------------------------------------------------------------------
# The lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError:
        return True
    return True


class PidLock:
    """A lock file held by one process (see the module docstring; ``bmb.rundir.RunLock`` is the
    trainer's). Subclasses word the refusals: :meth:`held`, :meth:`unreadable`, :meth:`stale`."""

    tool = TOOL
    error: type[Exception] = OutDirLocked

    def __init__(self, path: Path):
        self.path = Path(path)
        self.token = secrets.token_hex(8)
        self.held = False

    def held_message(self, who: str, other_host: bool) -> str:
        raise NotImplementedError

    def unreadable_message(self) -> str:
        raise NotImplementedError

    def stale_message(self, who: str) -> str:
        raise NotImplementedError

    def superseded(self, info: dict[str, Any]) -> bool:
        """Whether the holder is known to be dead whatever its host (e.g. an earlier run of
        this very SLURM job); such a lock is taken over like a stale one."""
        return False

    def _record(self) -> dict[str, Any]:
        return {
            "tool": self.tool,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "token": self.token,
        }

    def _try_create(self) -> bool:
        tmp = self.path.with_name(f"{self.path.name}-{os.getpid()}-{self.token}")
        text = json.dumps(self._record(), sort_keys=True) + "\n"
        tmp.write_text(text, encoding="ascii")
        try:
            os.link(tmp, self.path)  # atomic, and the lock is never seen half-written
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create instead
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(text)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; raise :attr:`error` if it is held."""
        for _ in range(5):
            if self._try_create():
                self.held = True
                return
            if self.path.is_symlink():
                raise self.error(f"{self.path} is a symbolic link, not a lock file; remove it and re-run")
            info = read_json(self.path)
            if not isinstance(info, dict):
                if not self.path.exists():
                    continue  # released meanwhile
                raise self.error(self.unreadable_message())
            pid, host = info.get("pid"), info.get("host")
            who = f"pid {pid} on host {host}, started {info.get('started')}"
            if self.superseded(info):
                pass
            elif host != socket.gethostname():
                raise self.error(self.held_message(who, True))
            elif isinstance(pid, int) and not isinstance(pid, bool) and _pid_alive(pid):
                raise self.error(self.held_message(who, False))
            # Stale: move it aside atomically (only one taker succeeds), check it is the one
            # judged stale, then retry the create.
            aside = self.path.with_name(f"{self.path.name}-stale-{os.getpid()}-{self.token}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            taken = read_json(aside)
            if taken != info:  # someone else's fresh lock: put it back, report it held
                try:
                    os.link(aside, self.path)
                finally:
                    aside.unlink(missing_ok=True)
                continue
            aside.unlink(missing_ok=True)
            print(self.stale_message(who), file=sys.stderr)
        raise self.error(f"could not take the lock {self.path}; another process is racing for it")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        info = read_json(self.path)
        if isinstance(info, dict) and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)


class BuildLock(PidLock):
    """``out/.bmb-shards.lock`` held for one build (see the module docstring)."""

    def __init__(self, out: Path):
        super().__init__(Path(out) / LOCK)

    def held_message(self, who: str, other_host: bool) -> str:
        if other_host:
            return (f"--out {self.path.parent} is locked by a build on another host ({who}; lock "
                    f"file {self.path}). Wait for it; if that build is dead, delete the lock file")
        return (f"--out {self.path.parent} is being built by another bmb-shards process ({who}; lock file "
                f"{self.path}). Wait for it to finish, or choose another --out")

    def unreadable_message(self) -> str:
        return (f"{self.path} exists but is unreadable; another build may be starting. If no "
                "bmb-shards build is running on this --out, delete that file and re-run")

    def stale_message(self, who: str) -> str:
        return (f"WARNING: taking over the stale build lock {self.path} of {who}: that process "
                "is not running on this host (killed?); its finished files are checked and "
                "kept, the rest rebuilt")
