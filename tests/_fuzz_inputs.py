"""Hypothesis strategies for hostile and broken image inputs (tests and bench share them).

Every strategy yields encoded bytes that a user could upload: valid images in many
modes and formats, the same with truncation or flipped bytes, headers claiming huge
sizes, and plain random bytes.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from hypothesis import strategies as st
from PIL import Image

MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "I;16", "I", "F", "1", "YCbCr")
FORMATS = ("PNG", "JPEG", "TIFF", "GIF", "BMP", "WEBP")


def encode(array: np.ndarray, mode: str, image_format: str, orientation: int | None) -> bytes:
    """Encode ``array`` (uint8 HxWx4 noise) as ``mode``/``image_format``; fall back to RGB."""
    image = Image.fromarray(array[..., :3], "RGB")
    if mode in ("RGBA", "PA", "LA"):
        image = Image.fromarray(array, "RGBA").convert(mode if mode != "PA" else "RGBA")
    elif mode in ("I;16", "I", "F"):
        image = image.convert("L").convert(mode)
    elif mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    options = {}
    if orientation is not None and image_format in ("JPEG", "TIFF", "PNG", "WEBP"):
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    try:
        image.save(buffer, format=image_format, **options)
    except (OSError, ValueError, KeyError):
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format=image_format)
    return buffer.getvalue()


def png_with_header(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` but whose data is tiny."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@st.composite
def valid_images(draw: st.DrawFn) -> bytes:
    """A small valid image in any supported mode and format, maybe with EXIF rotation."""
    width = draw(st.integers(1, 48))
    height = draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**32 - 1))
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    orientation = draw(st.one_of(st.none(), st.integers(1, 8)))
    return encode(array, draw(st.sampled_from(MODES)), draw(st.sampled_from(FORMATS)), orientation)


@st.composite
def animated_gifs(draw: st.DrawFn) -> bytes:
    """An animated GIF of 2-5 frames of different colours."""
    frames = [
        Image.new("P", (draw(st.integers(1, 32)), draw(st.integers(1, 32))), colour)
        for colour in range(draw(st.integers(2, 5)))
    ]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


@st.composite
def damaged(draw: st.DrawFn, source: st.SearchStrategy[bytes]) -> bytes:
    """A valid file truncated, with flipped bytes, or with junk inserted."""
    data = bytearray(draw(source))
    how = draw(st.sampled_from(("truncate", "flip", "insert", "zero_tail")))
    position = draw(st.integers(0, max(0, len(data) - 1)))
    if how == "truncate":
        return bytes(data[:position])
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            index = draw(st.integers(0, max(0, len(data) - 1)))
            if data:
                data[index] ^= draw(st.integers(1, 255))
        return bytes(data)
    if how == "insert":
        return (
            bytes(data[:position])
            + draw(st.binary(min_size=1, max_size=64))
            + bytes(data[position:])
        )
    return bytes(data[:position]) + b"\x00" * (len(data) - position)


huge_headers = st.builds(
    png_with_header,
    width=st.integers(0, 2**31 - 1),
    height=st.integers(0, 2**31 - 1),
    bit_depth=st.sampled_from((1, 8, 16)),
    colour_type=st.sampled_from((0, 2, 6)),
)

any_upload = st.one_of(
    st.binary(max_size=2048),
    valid_images(),
    animated_gifs(),
    damaged(valid_images()),
    damaged(animated_gifs()),
    huge_headers,
)
