"""``manifest.json``: the record of a built dataset (format v1), its validation and summary.

A dataset directory is complete exactly when its ``manifest.json`` exists: the builder writes
it last, atomically. See ``docs/datasets.md`` for every key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
TOOL_VERSION = "0.1.0"
MANIFEST = "manifest.json"
SPLITS = ("labeled", "unlabeled", "val", "test")
REQUIRED_SPLITS = ("labeled", "unlabeled", "test")
FORMATS = ("wds", "arrays", "ffcv")


def dumps(obj: Any) -> str:
    """Canonical JSON text (sorted keys, indent 2, trailing newline) -- byte-stable."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=True) + "\n"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file and ``os.replace`` (readers never see half)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="ascii", newline="\n") as f:
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


def _need(d: Any, key: str, typ: type | tuple[type, ...], where: str, file: Path) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ValueError(f"{file}: missing key {where}{key!r}")
    v = d[key]
    if not isinstance(v, typ) or (isinstance(v, bool) and typ is int):
        raise ValueError(f"{file}: key {where}{key!r} has type {type(v).__name__}, expected {typ}")
    return v


def validate_manifest(m: Any, file: Path | str = MANIFEST) -> dict[str, Any]:
    """Check a manifest dict against format v1.

    Raises:
        ValueError: naming ``file`` and the first bad key.
    """
    file = Path(file)
    if not isinstance(m, dict):
        raise ValueError(f"{file}: top level must be a JSON object")
    fv = _need(m, "format_version", int, "", file)
    if fv != FORMAT_VERSION:
        raise ValueError(
            f"{file}: format_version {fv} is not supported (this tool reads {FORMAT_VERSION})"
        )
    _need(m, "tool_version", str, "", file)
    _need(m, "name", str, "", file)
    _need(m, "seed", int, "", file)
    nc = _need(m, "num_classes", int, "", file)
    names = _need(m, "class_names", list, "", file)
    if len(names) != nc or not all(isinstance(x, str) for x in names):
        raise ValueError(f"{file}: 'class_names' must be {nc} strings, got {len(names)} entries")
    enc = _need(m, "encoding", str, "", file)
    if enc not in ("png", "jpg"):
        raise ValueError(f"{file}: 'encoding' must be 'png' or 'jpg', got {enc!r}")
    if "image_size" not in m:
        raise ValueError(f"{file}: missing key 'image_size'")
    size = m["image_size"]
    if size is not None and (
        not isinstance(size, list) or len(size) != 2 or not all(isinstance(s, int) for s in size)
    ):
        raise ValueError(f"{file}: 'image_size' must be [H, W] or null, got {size!r}")
    for k in ("source", "split_rule"):
        if k not in m or not (m[k] is None or isinstance(m[k], dict)):
            raise ValueError(f"{file}: key {k!r} must be an object or null")
    splits = _need(m, "splits", dict, "", file)
    for s in REQUIRED_SPLITS:
        if s not in splits:
            raise ValueError(f"{file}: missing split 'splits.{s}'")
    for s, sp in splits.items():
        where = f"splits.{s}."
        if s not in SPLITS:
            raise ValueError(f"{file}: unknown split {s!r} (expected one of {SPLITS})")
        count = _need(sp, "count", int, where, file)
        cc = _need(sp, "class_counts", list, where, file)
        if len(cc) != nc or sum(cc) != count:
            raise ValueError(
                f"{file}: '{where}class_counts' must have {nc} entries summing to count={count}"
            )
        shards = _need(sp, "shards", list, where, file)
        total = 0
        for i, sh in enumerate(shards):
            w = f"{where}shards[{i}]."
            _need(sh, "file", str, w, file)
            total += _need(sh, "count", int, w, file)
            _need(sh, "sha256", str, w, file)
            if sh.get("dali_index") is not None:  # absent in datasets built before 2026-12-06
                _need(sh["dali_index"], "file", str, w + "dali_index.", file)
                _need(sh["dali_index"], "sha256", str, w + "dali_index.", file)
        if total != count:
            raise ValueError(f"{file}: shard counts of split {s!r} add to {total}, not {count}")
        if "order" in sp:  # absent in datasets built before 2026-12-06: index order
            kind = _need(sp["order"], "kind", str, where + "order.", file)
            if kind not in ("index", "shuffled"):
                raise ValueError(
                    f"{file}: '{where}order.kind' must be 'index' or 'shuffled', got {kind!r}"
                )
            if kind == "shuffled":
                _need(sp["order"], "seed", int, where + "order.", file)
        for k in ("arrays", "ffcv"):
            if k not in sp:
                raise ValueError(f"{file}: missing key '{where}{k}'")
        if sp["arrays"] is not None:
            a = sp["arrays"]
            for k in ("images", "labels"):
                _need(a, k, str, where + "arrays.", file)
                _need(_need(a, "sha256", dict, where + "arrays.", file), k, str, where, file)
        if sp["ffcv"] is not None:
            _need(sp["ffcv"], "file", str, where + "ffcv.", file)
            _need(sp["ffcv"], "sha256", str, where + "ffcv.", file)
    return m


def load_manifest(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``dataset_dir/manifest.json``.

    Raises:
        FileNotFoundError: no manifest (the directory is not a finished dataset).
        ValueError: invalid JSON or a bad key, with the file named.
    """
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no manifest.json -- not a dataset directory, or its build did not finish "
            "(re-run the build command to complete it)"
        )
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return validate_manifest(m, path)


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
