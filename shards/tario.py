"""Writing byte-deterministic webdataset tar shards: fixed member metadata, fixed PNG settings.

``tarfile`` in USTAR format with every header field fixed (mtime 0, uid/gid 0, mode 0o644,
empty user/group names) so the same samples always give the same bytes, on any machine. The
member layout and the reader are in :mod:`shards.format`.
"""

from __future__ import annotations

import io
import tarfile
from typing import BinaryIO

import numpy as np
from PIL import Image

# Fixed zlib level: PNG bytes depend on it, so it is part of the format (level 6 is zlib's
# default trade-off; see docs/benchmarks.md "Shard building" for size and speed).
PNG_COMPRESS_LEVEL = 6
JPEG_QUALITY = 95


def encode_png(img: np.ndarray) -> bytes:
    """Lossless PNG of one RGB uint8 image ``(H, W, 3)``; no timestamps or text chunks."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img), "RGB").save(
        buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False
    )
    return buf.getvalue()


class TarShardWriter:
    """Appends webdataset samples to one tar file with fixed member metadata."""

    def __init__(self, fileobj: BinaryIO):
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)
        # (key, [(ext, data offset, size)]) per sample, for the DALI index file
        self.samples: list[tuple[str, list[tuple[str, int, int]]]] = []

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """Write one sample: members ``(ext, bytes)`` become ``<key>.<ext>`` in the given order."""
        entry: list[tuple[str, int, int]] = []
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            self._tar.addfile(info, io.BytesIO(data))
            # the tar now stands just after this member's data, padded to a 512-byte block
            entry.append((ext, self._tar.offset - (len(data) + 511) // 512 * 512, len(data)))
        self.samples.append((key, entry))

    def dali_index(self) -> str:
        """The shard's index file as DALI's ``wds2idx`` writes it (format ``v1.2``).

        One line ``v1.2 <samples>``, then per sample ``<ext> <data offset> <size> <member name>``
        for each member, space-separated. Passed as ``index_paths`` to
        ``fn.readers.webdataset`` it spares DALI parsing every shard when a pipeline starts.
        """
        lines = [f"v1.2 {len(self.samples)}"]
        for key, entry in self.samples:
            lines.append(" ".join(f"{ext} {off} {size} {key}.{ext}" for ext, off, size in entry))
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        self._tar.close()
