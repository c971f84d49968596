"""Writing ``manifest.json`` (canonical, atomic) and summarising it.

A dataset directory is complete exactly when its ``manifest.json`` exists: the builder writes
it last, atomically. The schema, its validation and :func:`load_manifest` are in
:mod:`shards.format` (shared with the readers in :mod:`pipelines`); see ``docs/datasets.md``
for every key.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shards.format import (  # noqa: F401  (the schema lives in shards.format)
    FORMAT_VERSION,
    MANIFEST,
    REQUIRED_SPLITS,
    SPLITS,
    load_manifest,
    validate_manifest,
)

TOOL_VERSION = "0.1.0"
FORMATS = ("wds", "arrays", "ffcv")


def dumps(obj: Any) -> str:
    """Canonical JSON text (sorted keys, indent 2, trailing newline) -- byte-stable."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=True) + "\n"


class DiskFull(RuntimeError):
    """A build write failed for lack of space (ENOSPC, EDQUOT); the message names the file."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def temp_path(final: Path) -> Path:
    """The temp file a build writes ``final`` through: ``.<name>.tmp-<pid>`` beside it (the pid
    is recorded in the progress record, so a re-run deletes only its own builds' temp files)."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def writing(final: Path) -> Iterator[None]:
    """Turn a disk-full ``OSError`` met while writing ``final`` into :class:`DiskFull` naming
    it (the caller removes its temp file; nothing half-written is listed as done)."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise DiskFull(
            f"{final}: disk full while writing it ({os.strerror(e.errno)}); the unfinished file "
            "was removed and finished files are kept: free space, then re-run the same command "
            "to resume"
        ) from e


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file and ``os.replace`` (readers never see half)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with writing(path), open(tmp, "w", encoding="ascii", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # incl. Ctrl-C: never leave the temp file behind
        tmp.unlink(missing_ok=True)
        raise


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Validate and write ``out_dir/manifest.json`` atomically."""
    validate_manifest(manifest, Path(out_dir) / MANIFEST)
    atomic_write_text(Path(out_dir) / MANIFEST, dumps(manifest))


def formats_of(m: dict[str, Any]) -> list[str]:
    """Formats present in a manifest: ``wds`` always, plus ``arrays``/``ffcv`` when written."""
    out = ["wds"]
    for k in ("arrays", "ffcv"):
        if any(sp.get(k) for sp in m["splits"].values()):
            out.append(k)
    return out


def summary(m: dict[str, Any]) -> str:
    """Human-readable summary: classes, per-split counts, imbalance ratio, formats."""
    lines = [
        f"name:        {m['name']}",
        f"built by:    shards {m['tool_version']} (format v{m['format_version']})",
        f"source:      {(m.get('source') or {}).get('kind', '-')}"
        f"  {(m.get('source') or {}).get('path', '')}",
        f"split rule:  {json.dumps(m.get('split_rule'), sort_keys=True)}",
        f"seed:        {m['seed']}",
        f"classes:     {m['num_classes']}  ({', '.join(m['class_names'][:5])}"
        f"{', ...' if m['num_classes'] > 5 else ''})",
        f"image size:  {m['image_size'] or 'variable'}  encoding: {m['encoding']}",
        f"formats:     {', '.join(formats_of(m))}",
        "",
        f"{'split':<10} {'images':>10} {'shards':>7} {'max/class':>10} {'min/class':>10}"
        f" {'imbalance':>10}",
    ]
    for s in SPLITS:
        if s not in m["splits"]:
            continue
        sp = m["splits"][s]
        cc = sp["class_counts"]
        hi, lo = max(cc), min(cc)
        ratio = f"{hi / lo:.1f}" if lo > 0 else ("inf" if hi else "-")
        lines.append(
            f"{s:<10} {sp['count']:>10} {len(sp['shards']):>7} {hi:>10} {lo:>10} {ratio:>10}"
        )
    return "\n".join(lines)
