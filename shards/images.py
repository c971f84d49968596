"""Decoding a sample's image: PNG/JPEG bytes to RGB uint8, with its header checked first.

Part of the dataset format (:mod:`shards.format` re-exports every name here). An image's header
is read before any pixel is decoded (PIL's lazy ``Image.open`` parses the header only), so

* an image declaring more than ``max_pixels`` pixels (:data:`MAX_PIXELS` unless the caller
  passes ``data.max_pixels``) is refused unread: a 30000 x 30000 PNG of a few kilobytes would
  otherwise take gigabytes to decode;
* in a fixed-size dataset an image of another size is refused before decoding;
* only PNG and JPEG are decoded (the formats the builder writes and DALI and FFCV read).

16-bit PNGs (grey ``I;16``) are scaled to 8 bits (``round(v * 255 / 65535)``), never clipped;
16-bit RGB(A) PNGs are reduced to their high bytes by PIL. Every reader that decodes with PIL
(``webdataset`` both orders, the arrays and FFCV writers, ``bmb-shards verify --decode``) goes
through :func:`decode_image`, so they agree on every image.
"""

from __future__ import annotations

import io
import struct

import numpy as np

MAX_PIXELS = 1 << 26
"""Default pixel-count limit of one image (67,108,864: 8192 x 8192; ImageNet's largest image
has about 32 M). Config ``data.max_pixels``."""

IMAGE_FORMATS = ("PNG", "JPEG")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_PNG = b"\x89PNG\r\n\x1a\n"


def check_pixels(height: int, width: int, max_pixels: int) -> None:
    """Raise ValueError when ``height * width`` exceeds ``max_pixels`` (``data.max_pixels``)."""
    if height * width > max_pixels:
        raise ValueError(
            f"image declares {height}x{width} = {height * width} pixels, over the limit of "
            f"{max_pixels} (data.max_pixels); not decoded"
        )


def image_size(data: bytes) -> tuple[int, int]:
    """``(H, W)`` from an encoded image's header only (nothing is decoded).

    Raises:
        ValueError: not a PNG or JPEG, or a header PIL cannot parse.
    """
    from PIL import Image

    if data[:8] == _PNG and data[12:16] == b"IHDR" and len(data) >= 24:  # no PIL: its bomb check
        w, h = struct.unpack(">II", data[16:24])  # would pre-empt data.max_pixels' message
        return h, w
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in IMAGE_FORMATS:
                raise ValueError(f"image format {img.format} is not PNG or JPEG")
            return img.height, img.width
    except Image.DecompressionBombError as e:  # PIL's own limit (above 2 x 89 M pixels)
        raise ValueError(f"image too large: {e}; not decoded") from e
    except OSError as e:  # PIL's UnidentifiedImageError and friends
        raise ValueError(_quiet(e)) from e


def _quiet(e: Exception) -> str:
    """PIL's message without the ``<_io.BytesIO object at 0x...>`` it names the file by."""
    import re

    return re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e)) or type(e).__name__


def _rgb(img) -> object:
    """``img`` (a PIL image, decoded here) as 8-bit RGB; 16-bit grey is scaled, not clipped."""
    from PIL import Image

    if img.mode in _SIXTEEN_BIT:
        a = np.asarray(img).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"image mode {img.mode} holds values outside 0..65535")
        a8 = ((a * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.repeat(a8[..., None], 3, axis=2), "RGB")
    return img.convert("RGB")


def decode_image(
    data: bytes,
    out_hw: tuple[int, int] | None = None,
    fixed: bool = True,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Decode PNG/JPEG bytes to RGB uint8 ``(H, W, 3)``.

    Args:
        data: the encoded image.
        out_hw: the size to deliver; ``None``: as stored.
        fixed: the dataset has a fixed image size, which the image must already have
            (``ValueError`` otherwise, before decoding). ``False`` (variable-size, full-res JPEG
            datasets): the shorter side is resized to ``out_hw[0]`` and the center square cropped.
        max_pixels: the largest ``H * W`` decoded (:func:`check_pixels`).

    Raises:
        ValueError: not PNG/JPEG, too many pixels, the wrong size, or undecodable.
    """
    from PIL import Image

    h0, w0 = image_size(data)
    check_pixels(h0, w0, max_pixels)
    if out_hw is not None and fixed and (h0, w0) != tuple(out_hw):
        raise ValueError(f"image is {h0}x{w0}, dataset says {out_hw[0]}x{out_hw[1]}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if out_hw is not None and not fixed:
                h, w = out_hw
                # draft() lets libjpeg decode at 1/2, 1/4, 1/8 scale when that still covers the
                # target -- most of the 224/256 px speed-up for full-res JPEGs.
                side = min(img.size)
                img.draft("RGB", (max(h, w) * img.width // side, max(h, w) * img.height // side))
            rgb = _rgb(img)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's decode errors
        raise ValueError(_quiet(e)) from e
    if out_hw is None or fixed:
        return np.asarray(rgb)
    target = out_hw[0]
    scale = target / min(rgb.size)
    nw, nh = max(target, round(rgb.width * scale)), max(target, round(rgb.height * scale))
    rgb = rgb.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - target) // 2, (nh - target) // 2
    return np.asarray(rgb.crop((left, top, left + target, top + target)))
