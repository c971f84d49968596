"""The dataset format (v1), written down once: manifest schema, tar layout, tar reader, decoding.

Everything that reads or writes a dataset directory goes through this module: the builder and
``bmb-shards verify`` (:mod:`shards`) and the input backends (:mod:`pipelines`, which import
this module and nothing else from :mod:`shards`). ``docs/datasets.md`` describes the format in
prose; this module is its definition.

* **Manifest** (:func:`load_manifest`, :func:`validate_manifest`): ``manifest.json``; every
  problem is a :class:`ManifestError` naming the file and the key.
* **Tar layout** (:func:`sample_members`, :func:`sample_fields`): a sample is the consecutive
  members ``<key>.<image ext>``, ``<key>.cls`` (ASCII label) and ``<key>.idx`` (ASCII stable
  index), key ``%08d`` of the index.
* **Tar reader** (:func:`tar_members`, :func:`shard_samples`): one plain-ustar parser for every
  reader. It reads front to back (the streaming reader: no seeks, so a pipe will do) or, asked
  to skip members, seeks past their data and reports where it lies (the index builder).
* **URLs** (:func:`is_url`, :func:`join_url`, :func:`open_url`, defined in :mod:`shards.urls`
  and re-exported here): a dataset directory served over the network, opened with
  ``webdataset.gopen`` and read front to back (the streaming reader only, ``docs/datasets.md``
  "Datasets at a URL"). They are the one part of the format that knows about transfers and
  nothing of the schema or the tar layout, hence their own module.
* **Decoding** (:func:`decode_image`, defined in :mod:`shards.images` and re-exported here):
  PNG/JPEG to RGB uint8, its header checked first (pixel limit, fixed size), then resized and
  center-cropped for variable-size datasets.
* **Trust.** Every file name a manifest lists is checked once, when the manifest is read
  (:func:`shards.urls.check_name`: a relative path inside the dataset, no shell or glob
  character), and a local one is opened only through :func:`dataset_file` (no symlink out of
  the dataset). Bad data met while reading is a :class:`DataError` naming the file and key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from shards.images import MAX_PIXELS, check_pixels, decode_image, image_size  # noqa: F401
from shards.order import file_order
from shards.splits import DISJOINT, INCLUDES, OVERLAPS
from shards.urls import (  # noqa: F401  (re-exported: the URL helpers were defined here)
    MANIFEST_MAX_BYTES,
    URL_SCHEMES,
    check_name,
    is_url,
    join_url,
    open_url,
    read_stream,
    read_url,
    transfer_error,
)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("labeled", "unlabeled", "val", "test")
REQUIRED_SPLITS = ("labeled", "unlabeled", "test")
ENCODINGS = ("png", "jpg")  # what the builder writes (manifest ``encoding``)
_IMAGE_EXTS = (*ENCODINGS, "jpeg")  # what the readers accept as a sample's image member
SMALL_MEMBERS = ("cls", "idx")

# ------------------------------------------------------------------------------------ manifest


class DataError(ValueError):
    """Bad input data: a manifest, a shard, an image or a transfer that cannot be used as the
    format says. The message names the file (or URL) and, where there is one, the sample key.
    ``launch/train.py`` reports it as a ``data error`` (exit status 2), at start or mid-run."""


class ManifestError(DataError):
    """A missing, unreadable or invalid ``manifest.json``; the message names the file and key."""


class ManifestNotFound(ManifestError, FileNotFoundError):
    """No ``manifest.json``: not a dataset directory, or its build did not finish."""


def _need(d: Any, key: str, typ: type | tuple[type, ...], where: str, file: Path) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ManifestError(f"{file}: missing key {where}{key!r}")
    v = d[key]
    if not isinstance(v, typ) or (isinstance(v, bool) and typ is int):
        raise ManifestError(
            f"{file}: key {where}{key!r} has type {type(v).__name__}, expected {typ}"
        )
    return v


def _count(d: Any, key: str, where: str, file: Path) -> int:
    """``d[key]``, a non-negative int (not a bool)."""
    v = _need(d, key, int, where, file)
    if v < 0:
        raise ManifestError(f"{file}: key {where}{key!r} is {v}, expected a count >= 0")
    return v


def _validate_split(sp: Any, s: str, nc: int, file: Path) -> None:
    where = f"splits.{s}."
    count = _count(sp, "count", where, file)
    cc = _need(sp, "class_counts", list, where, file)
    for k, c in enumerate(cc):
        if not isinstance(c, int) or isinstance(c, bool) or c < 0:
            raise ManifestError(
                f"{file}: key '{where}class_counts[{k}]' is {c!r}, expected a count >= 0"
            )
    if len(cc) != nc or sum(cc) != count:
        raise ManifestError(
            f"{file}: '{where}class_counts' must have {nc} entries summing to count={count}"
        )
    total = 0
    for i, sh in enumerate(_need(sp, "shards", list, where, file)):
        w = f"{where}shards[{i}]."
        _need(sh, "file", str, w, file)
        total += _count(sh, "count", w, file)
        _need(sh, "sha256", str, w, file)
        if sh.get("dali_index") is not None:  # absent in datasets built before 2026-12-06
            _need(sh["dali_index"], "file", str, w + "dali_index.", file)
            _need(sh["dali_index"], "sha256", str, w + "dali_index.", file)
    if total != count:
        raise ManifestError(f"{file}: shard counts of split {s!r} add to {total}, not {count}")
    if "order" in sp:  # absent in datasets built before 2026-12-06: index order
        kind = _need(sp["order"], "kind", str, where + "order.", file)
        if kind not in ("index", "shuffled"):
            raise ManifestError(
                f"{file}: '{where}order.kind' must be 'index' or 'shuffled', got {kind!r}"
            )
        if kind == "shuffled":
            _need(sp["order"], "seed", int, where + "order.", file)
    for k in ("arrays", "ffcv"):
        if k not in sp:
            raise ManifestError(f"{file}: missing key '{where}{k}'")
    if sp["arrays"] is not None:
        a = sp["arrays"]
        for k in ("images", "labels"):
            _need(a, k, str, where + "arrays.", file)
            _need(_need(a, "sha256", dict, where + "arrays.", file), k, str, where, file)
    if sp["ffcv"] is not None:
        _need(sp["ffcv"], "file", str, where + "ffcv.", file)
        _need(sp["ffcv"], "sha256", str, where + "ffcv.", file)


def validate_manifest(m: Any, file: Path | str = MANIFEST) -> dict[str, Any]:
    """Check a manifest dict against format v1 (every key ``docs/datasets.md`` lists).

    Raises:
        ManifestError: naming ``file`` and the first bad key.
    """
    file = file if is_url(file) else Path(file)  # a URL keeps its "//"
    if not isinstance(m, dict):
        raise ManifestError(f"{file}: top level must be a JSON object")
    fv = _need(m, "format_version", int, "", file)
    if fv != FORMAT_VERSION:
        raise ManifestError(
            f"{file}: format_version {fv} is not supported (this tool reads {FORMAT_VERSION})"
        )
    _need(m, "tool_version", str, "", file)
    _need(m, "name", str, "", file)
    _need(m, "seed", int, "", file)
    nc = _need(m, "num_classes", int, "", file)
    names = _need(m, "class_names", list, "", file)
    if len(names) != nc or not all(isinstance(x, str) for x in names):
        raise ManifestError(f"{file}: 'class_names' must be {nc} strings, got {len(names)} entries")
    enc = _need(m, "encoding", str, "", file)
    if enc not in ENCODINGS:
        raise ManifestError(f"{file}: 'encoding' must be 'png' or 'jpg', got {enc!r}")
    if "image_size" not in m:
        raise ManifestError(f"{file}: missing key 'image_size'")
    size = m["image_size"]
    if size is not None and (
        not isinstance(size, list) or len(size) != 2 or not all(isinstance(s, int) for s in size)
    ):
        raise ManifestError(f"{file}: 'image_size' must be [H, W] or null, got {size!r}")
    for k in ("source", "split_rule"):
        if k not in m or not (m[k] is None or isinstance(m[k], dict)):
            raise ManifestError(f"{file}: key {k!r} must be an object or null")
    overlap = (m["split_rule"] or {}).get("overlap", DISJOINT)
    if overlap not in OVERLAPS:
        raise ManifestError(f"{file}: 'split_rule.overlap' must be one of {OVERLAPS}, got {overlap!r}")
    splits = _need(m, "splits", dict, "", file)
    for s in REQUIRED_SPLITS:
        if s not in splits:
            raise ManifestError(f"{file}: missing split 'splits.{s}'")
    for s, sp in splits.items():
        if s not in SPLITS:
            raise ManifestError(f"{file}: unknown split {s!r} (expected one of {SPLITS})")
        _validate_split(sp, s, nc, file)
    check_file_names(m, file)
    return m


def split_overlap(m: dict[str, Any]) -> str:
    """How a dataset's unlabeled split relates to its labeled one (``split_rule.overlap``).

    Without the key: ImageNet127 and ImageNet-LT builds always took every train image as
    unlabeled (:data:`~shards.splits.INCLUDES`); every other build was ``disjoint``.
    """
    rule = m.get("split_rule") or {}
    if "overlap" in rule:
        return rule["overlap"]
    return INCLUDES if rule.get("rule") in ("imagenet127", "imagenet-lt") else DISJOINT


def _file_names(m: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """``(key, value)`` of every file name a manifest lists (what is there: a hand-made manifest
    read by the training readers may lack some)."""
    for s, sp in m["splits"].items():
        if not isinstance(sp, dict):
            continue
        for i, sh in enumerate(sp.get("shards") or []):
            if isinstance(sh, dict) and "file" in sh:
                yield f"splits.{s}.shards[{i}].file", sh["file"]
            if isinstance(sh, dict) and isinstance(sh.get("dali_index"), dict):
                yield f"splits.{s}.shards[{i}].dali_index.file", sh["dali_index"].get("file")
        for k in ("images", "labels"):
            if isinstance(sp.get("arrays"), dict) and k in sp["arrays"]:
                yield f"splits.{s}.arrays.{k}", sp["arrays"][k]
        if isinstance(sp.get("ffcv"), dict) and "file" in sp["ffcv"]:
            yield f"splits.{s}.ffcv.file", sp["ffcv"]["file"]


def check_file_names(m: dict[str, Any], file: Path | str = MANIFEST) -> None:
    """Check every file name ``m`` lists with :func:`shards.urls.check_name` (a relative path
    inside the dataset: no scheme, no absolute path, no ``..``, no shell or glob character).

    Raises:
        ManifestError: naming ``file``, the key and the name.
    """
    for key, name in _file_names(m):
        try:
            check_name(name, f"key {key!r}:")
        except ValueError as e:
            raise ManifestError(f"{file}: {e}") from None


def dataset_file(root: Path | str, name: str) -> Path:
    """``root/name``, a file of the local dataset at ``root``: ``name`` passes
    :func:`shards.urls.check_name` and the path, symlinks resolved, stays inside ``root``.

    Raises:
        DataError: an unsafe name, or a path leading out of the dataset, naming both.
    """
    try:
        check_name(name)
    except ValueError as e:
        raise DataError(f"{root}: {e}") from None
    path = Path(root) / name
    top, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([top, real]) != top:
        raise DataError(
            f"{path}: leads outside the dataset directory {root} (a symlink to {real}?); the "
            "readers open only files inside it. Copy the file into the dataset instead"
        )
    return path


def load_manifest(dataset_dir: str | os.PathLike, *, strict: bool = True) -> dict[str, Any]:
    """Read ``dataset_dir/manifest.json``.

    Args:
        dataset_dir: the dataset directory.
        strict: validate every key (:func:`validate_manifest`). The training readers pass
            ``False``: they check only that ``splits`` is an object and name any other missing
            or inconsistent entry (a shard, a count) when they meet it, so they also read
            hand-made manifests holding just the keys they use.

    Raises:
        ManifestNotFound: no manifest (also a :class:`FileNotFoundError`).
        ManifestError: invalid JSON or a bad key, naming the file (and the key).
    """
    if is_url(dataset_dir):
        return _load_manifest_url(join_url(str(dataset_dir), MANIFEST), strict)
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise ManifestNotFound(
            f"{path}: no manifest.json -- not a dataset directory, or its build did not finish "
            "(re-run the build command to complete it)"
        )
    try:
        with open(path, "rb") as f:
            raw = f.read(MANIFEST_MAX_BYTES + 1)
    except OSError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from e
    if len(raw) > MANIFEST_MAX_BYTES:
        raise ManifestError(
            f"{path}: larger than {MANIFEST_MAX_BYTES} bytes, the cap for manifest.json; not read"
        )
    return _parse_manifest(raw, path, strict)


def _load_manifest_url(url: str, strict: bool) -> dict[str, Any]:
    try:
        raw = read_url(url, MANIFEST_MAX_BYTES)
    except ValueError as e:  # opened but not read (e.g. HTTP 404): likely the wrong folder
        hint = " -- is the URL the dataset directory (the one holding manifest.json)?"
        raise ManifestNotFound(f"{e}{hint if 'cannot read' in str(e) else ''}") from e
    return _parse_manifest(raw, url, strict)


def _parse_manifest(raw: bytes, label: Path | str, strict: bool) -> dict[str, Any]:
    """The manifest in ``raw`` (UTF-8 JSON), read from ``label`` (a path or URL, for messages):
    validated in full (``strict``) or only for a ``splits`` object (:func:`load_manifest`)."""
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{label}: not valid JSON ({e})") from e
    except RecursionError:
        raise ManifestError(f"{label}: not a dataset manifest (JSON nested too deeply)") from None
    if strict:
        return validate_manifest(m, label)
    if not isinstance(m, dict) or not isinstance(m.get("splits"), dict):
        raise ManifestError(f"{label}: missing key 'splits' (or not an object)")
    check_file_names(m, label)
    return m


def split_order(manifest: dict[str, Any], split: str) -> np.ndarray:
    """int64 ``(N,)``: the stable index of the sample at each file position of ``split``
    (its ``order`` record, :mod:`shards.order`; none: index order)."""
    info = manifest["splits"][split]
    try:
        return file_order(info.get("order"), int(info["count"]))
    except ValueError as e:
        raise ManifestError(f"{MANIFEST}: split {split!r}: {e}") from e


# ---------------------------------------------------------------------------------- tar layout


def sample_key(index: int) -> str:
    """The tar key of the sample with stable index ``index``."""
    return f"{int(index):08d}"


def sample_members(index: int, label: int, ext: str, image: bytes) -> tuple[str, list]:
    """The key and members ``[(ext, bytes)]`` of sample ``index``, in the order they are written."""
    return sample_key(index), [
        (ext, image),
        ("cls", str(int(label)).encode("ascii")),
        ("idx", str(int(index)).encode("ascii")),
    ]


def split_name(name: str) -> tuple[str, str]:
    """``(key, ext)`` of a member name: the base name up to its first dot, and the rest."""
    key, _, ext = name.rsplit("/", 1)[-1].partition(".")
    return key, ext


def is_small_member(name: str) -> bool:
    """Whether a member is a ``.cls`` or ``.idx`` (read even where images are skipped)."""
    return split_name(name)[1] in SMALL_MEMBERS


def sample_fields(
    path: Path | str, key: str, exts: Collection[str], data: dict[str, bytes], expected: int | None
) -> tuple[str, int, int]:
    """Check one sample's members; ``(image ext, label, stable index)``.

    Args:
        path, key: the shard and the sample, for messages.
        exts: the member extensions the sample has (images may be unread).
        data: the bytes of its ``cls`` and ``idx`` members (at least).
        expected: the stable index this file position must hold (the manifest's order);
            ``None``: the split has no sample left for it.

    Raises:
        ValueError: a missing image/``.cls``/``.idx``, an unparsable one, or an index other
            than ``expected`` -- naming the shard and the key.
    """
    img = next((e for e in _IMAGE_EXTS if e in exts), None)
    if img is None or "cls" not in data or "idx" not in data:
        raise DataError(
            f"{path}: sample {key!r} lacks an image/.cls/.idx member (has {sorted(exts)})"
        )
    try:
        label, index = int(data["cls"].decode()), int(data["idx"].decode())
    except ValueError as e:
        raise DataError(f"{path}: sample {key!r}: bad .cls/.idx ({e})") from e
    if index != expected:
        want = "none" if expected is None else expected
        raise DataError(
            f"{path}: sample {key!r} has index {index}, expected {want} "
            "(shards out of order or not the manifest's)"
        )
    return img, label, index


# ---------------------------------------------------------------------------------- tar reader

BLOCK = 512
_END = bytes(BLOCK)
MAX_MEMBER_BYTES = 1 << 28
"""The largest tar member read (256 MiB; a full-resolution JPEG is a few MiB): a header
declaring more is an error naming the shard and the member, not an allocation."""


TarMember = tuple[str, int, int, "bytes | None"]
"""A regular-file member: ``(name, data offset, size, data)``; its full name, where its data
lies, and the data itself (``None`` where the reader was asked to skip it)."""


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").strip()
    return int(field, 8) if field else 0


def _checksum_ok(header: bytes) -> bool:
    """The ustar header checksum: the sum of its bytes, the checksum field counted as spaces."""
    try:
        want = _octal(header[148:156])
    except ValueError:
        return False
    return want == sum(header[:148]) + 256 + sum(header[156:])


def tar_members(
    f: BinaryIO, path: Path | str, *, skip: Callable[[str], bool] | None = None
) -> Iterator[TarMember]:
    """The regular-file members of a plain ustar archive (as the builder writes), in order.

    The one tar header parser. A minimal reader instead of :mod:`tarfile`, whose per-header
    Python work was two thirds of the stream reader's time on 32 px PNG shards. Without
    ``skip`` it never seeks (``f`` may be a pipe or a network stream); with it, members whose
    name ``skip`` accepts are not read: ``f`` (a seekable file) is positioned past their data.

    Raises:
        DataError: a partial header, a header whose checksum fails (not a tar archive: nothing
            of it is quoted), a malformed size field, a member over :data:`MAX_MEMBER_BYTES` or
            cut short, naming the file, the byte offset and the member. (An archive that ends at
            a member boundary just ends: callers check the sample count.)
    """
    end = os.fstat(f.fileno()).st_size if skip is not None else None
    pos, last = 0, None
    while True:
        header = f.read(BLOCK)
        if not header:
            return  # a missing end-of-archive marker is tolerated at a member boundary
        if len(header) < BLOCK:
            raise DataError(
                f"{path}: truncated shard: partial tar header at byte {pos} after member {last!r}"
            )
        if header == _END:
            return
        if not _checksum_ok(header):
            raise DataError(
                f"{path}: not a tar shard, or a corrupt one: bad tar header checksum at byte {pos} "
                f"(after member {last!r})"
            )
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:263] == b"ustar\0":  # POSIX ustar: a long name is split into a prefix
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            name = f"{prefix}/{name}" if prefix else name
        try:
            size = _octal(header[124:136])
        except ValueError as e:
            raise DataError(
                f"{path}: malformed tar header at byte {pos} ({name!r}, after member {last!r})"
            ) from e
        if size > MAX_MEMBER_BYTES:
            raise DataError(
                f"{path}: member {name!r} at byte {pos} declares {size} bytes, over the "
                f"{MAX_MEMBER_BYTES}-byte limit of one member (corrupt or not a dataset shard)"
            )
        offset = pos + BLOCK
        pos = offset + (size + BLOCK - 1) // BLOCK * BLOCK
        regular = header[156:157] in (b"0", b"\0")
        if end is not None and (not regular or skip(name)):
            have, data = end - offset, None
            f.seek(pos)
        else:
            data = f.read(pos - offset)
            have, data = len(data), data[:size]
        if have < size:
            raise DataError(
                f"{path}: truncated shard: member {name!r} has {max(have, 0)} of {size} bytes "
                f"(data at byte {offset})"
            )
        last = name
        if regular:
            yield name, offset, size, data


Sample = tuple[str, dict[str, tuple[int, int]], dict[str, bytes]]
"""``(key, {ext: (data offset, size)}, {ext: bytes of the members read})`` of one sample."""


def shard_samples(path: Path | str, *, skip_images: bool = False) -> Iterator[Sample]:
    """The samples of one tar shard in file order; consecutive members sharing a key form one
    sample (webdataset's rule). ``skip_images``: read only the ``.cls``/``.idx`` members (the
    index builder and the label checks: image data is located, not read).

    Raises:
        ValueError: an unreadable file or a truncated or malformed tar, naming it.
    """
    if is_url(path):
        if skip_images:
            raise DataError(f"{path}: a URL cannot be indexed (no seeks); read it as a stream")
        yield from _url_samples(str(path))
        return
    try:  # a small buffer where most bytes are seeked over, a large one to stream
        f = open(path, "rb", buffering=-1 if skip_images else 1 << 20)  # noqa: SIM115
    except OSError as e:
        raise DataError(f"{path}: not a readable tar shard ({e})") from e
    skip = (lambda name: not is_small_member(name)) if skip_images else None
    with f:
        yield from _samples(f, path, skip)


def _samples(f: BinaryIO, path: Path | str, skip: Callable[[str], bool] | None) -> Iterator[Sample]:
    """:func:`shard_samples` of an open file (left open)."""
    key, spans, data = None, {}, {}
    for name, offset, size, member in tar_members(f, path, skip=skip):
        k, _, ext = name.rsplit("/", 1)[-1].partition(".")  # split_name, inlined: per member
        if k != key:
            if key is not None:
                yield key, spans, data
            key, spans, data = k, {}, {}
        spans[ext] = (offset, size)
        if member is not None:
            data[ext] = member
    if key is not None:
        yield key, spans, data


def _url_samples(url: str) -> Iterator[Sample]:
    """:func:`shard_samples` of a URL, read to its end and closed before the shard counts as
    read (:func:`shards.urls.read_stream`: a failed transfer is a ValueError naming it)."""
    yield from read_stream(url, lambda f, u: _samples(f, u, None))


def iter_tar_samples(path: Path | str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` per sample of a shard, in file order (every member read).

    Raises:
        ValueError: an unreadable file or a truncated or malformed tar, naming it.
    """
    for key, _, data in shard_samples(path):
        yield key, data
