"""Read one image file safely and turn it into the RGB array every other stage expects.

Every image the project touches (training, evaluation, prediction, the dashboard)
goes through :func:`load_rgb_image` and :func:`resize_with_pad` (which first cuts a
cell out of a smear background, :mod:`malaria_classifier.background`), so training
and serving see the same pixels. Files are only ever read, never written.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import stat
import struct
import warnings
from pathlib import Path

import imagecodecs
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from malaria_classifier.background import isolate_cell

# A cell crop is ~130 px a side; even a whole smear photo is ~16 Mpx. Anything far
# bigger is a mistake or a decompression bomb, so refuse it before decoding.
MAX_IMAGE_PIXELS = 50_000_000
MAX_FILE_BYTES = 64 * 1024 * 1024
# Pillow warns at open() about headers over its own, larger limit (~89 Mpx); the size
# check below refuses those before a pixel is decoded, with a message naming the file,
# so the warning only adds noise. One filter, set once (swapping filters per call is
# not thread-safe), and only for that warning from PIL.Image.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, module="PIL.Image")

# Truncated files must fail loudly rather than be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

SUPPORTED_FORMATS = "PNG, JPEG, TIFF, BMP, GIF or WebP"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks that may precede the pixels of a plain 8-bit RGB PNG without changing the
# RGB values Pillow returns (Pillow applies no gamma, colour profile or background).
# Anything else (text that may hold EXIF, eXIf itself, transparency, an unknown
# chunk) sends the file down the general Pillow path.
_PLAIN_PNG_CHUNKS = frozenset({b"sRGB", b"gAMA", b"cHRM", b"pHYs", b"sBIT", b"tIME", b"iCCP"})
# 8-bit colour types with three channels out: RGB, and a palette of RGB colours
# (~7% of the NIH crops) whose PLTE chunk is then expected.
_PLAIN_PNG_COLOUR_TYPES = {2: _PLAIN_PNG_CHUNKS, 3: _PLAIN_PNG_CHUNKS | {b"PLTE"}}


class ImageLoadError(ValueError):
    """An input image could not be used; the message names the file and the fix."""

    def __init__(self, source: str, problem: str, hint: str) -> None:
        self.source = source
        self.problem = problem
        self.hint = hint
        super().__init__(f"{source}: {problem}. {hint}")


def load_rgb_image(
    path: str | Path,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> np.ndarray:
    """Read an image file as an ``(height, width, 3)`` uint8 RGB array.

    Grayscale, palette, 16-bit, CMYK and alpha images are converted (alpha is
    composited on black, the background of NIH cell crops); EXIF orientation is
    applied so a phone photo is seen the right way up.

    Args:
        path: The image file. It is opened read-only.
        max_pixels: Largest width x height accepted (decompression-bomb guard).
        max_file_bytes: Largest file size accepted.

    Returns:
        The image as a C-contiguous uint8 array of shape ``(height, width, 3)``.

    Raises:
        ImageLoadError: If the path is missing, unreadable, too big, or not a
            decodable image. The message says what to do.
    """
    path = Path(path)
    data = _read_file_bytes(path, max_file_bytes)
    return decode_image_bytes(data, source=str(path), max_pixels=max_pixels)


def _open_without_waiting(path: str, flags: int) -> int:
    """Open without blocking: a named pipe with an image's name would otherwise wait
    for a writer forever (and the batch with it); it is then refused as not a file."""
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def _read_file_bytes(path: Path, max_file_bytes: int) -> bytes:
    """Read a whole regular file, refusing folders, devices and oversized files first."""
    source = str(path)
    try:
        with open(path, "rb", opener=_open_without_waiting) as handle:
            status = os.fstat(handle.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise ImageLoadError(source, "is not a regular file", "Pass image files.")
            if status.st_size > max_file_bytes:
                raise ImageLoadError(
                    source,
                    f"is {status.st_size:,} bytes, more than the {max_file_bytes:,}-byte limit",
                    "Pass single cell crops, not whole slide scans.",
                )
            data = handle.read(max_file_bytes + 1)
    except FileNotFoundError:
        raise ImageLoadError(source, "does not exist", "Check the path.") from None
    except IsADirectoryError:
        raise _folder_error(source) from None
    except PermissionError:
        if path.is_dir():  # how Windows refuses to open a folder
            raise _folder_error(source) from None
        raise ImageLoadError(
            source, "cannot be read (permission denied)", "Fix the file permissions."
        ) from None
    except OSError as error:
        raise ImageLoadError(source, f"cannot be read ({error})", "Check the path.") from None
    if not data:
        raise ImageLoadError(source, "is empty (0 bytes)", "Re-export or re-copy the image.")
    return data


def _folder_error(source: str) -> ImageLoadError:
    return ImageLoadError(source, "is a folder, not an image file", "Pass image files.")


def decode_image_bytes(
    data: bytes,
    source: str = "<upload>",
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> np.ndarray:
    """Decode encoded image bytes (e.g. an upload) into an RGB uint8 array.

    Args:
        data: The encoded file contents.
        source: A name for the image, used in error messages.
        max_pixels: Largest width x height accepted (checked from the header, before
            any pixel is decoded).
        max_file_bytes: Largest encoded size accepted (checked first).

    Returns:
        A uint8 array of shape ``(height, width, 3)``.

    Raises:
        ImageLoadError: If the bytes are not a decodable, reasonably sized image.
    """
    _check_encoded_size(len(data), source, max_file_bytes)
    pixels = _decode_rgb_pixels(data, source, max_pixels)
    if isinstance(pixels, np.ndarray):
        return pixels
    return np.asarray(pixels, dtype=np.uint8).copy()


def decode_upload(
    contents: str,
    source: str = "<upload>",
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> np.ndarray:
    """Decode a browser upload (``data:<type>;base64,<data>``, as ``dcc.Upload`` sends it).

    The size limit is enforced on the base64 text *before* it is decoded, so a huge
    upload costs no memory beyond the string the web server already holds.

    Raises:
        ImageLoadError: If the text is not a base64 data URL of a usable image.
    """
    data = data_url_bytes(contents, source, max_file_bytes)
    return decode_image_bytes(data, source, max_pixels, max_file_bytes)


def data_url_bytes(contents: str, source: str, max_file_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The file bytes inside a base64 data URL, size-checked before decoding.

    Raises:
        ImageLoadError: If the text is not a base64 data URL, or too large.
    """
    _header, separator, payload = contents.partition(",")
    if not separator or ";base64" not in _header:
        raise ImageLoadError(source, "is not a base64 data URL", "Upload the image file itself.")
    _check_encoded_size(len(payload) * 3 // 4, source, max_file_bytes)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageLoadError(
            source, "is not valid base64 (the upload arrived damaged)", "Upload the file again."
        ) from None


def _check_encoded_size(size: int, source: str, max_file_bytes: int) -> None:
    if size > max_file_bytes:
        raise ImageLoadError(
            source,
            f"is {size:,} bytes, more than the {max_file_bytes:,}-byte limit",
            "Pass single cell crops, not whole slide scans.",
        )


def plain_rgb_png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height of a PNG whose pixels need nothing but decoding, else None.

    That is an 8-bit RGB or RGB-palette PNG, without transparency, with only
    colour-neutral chunks before its image data: what the NIH crops and most
    microscope software write. Reading the chunk headers costs a few microseconds
    and decodes nothing.
    """
    if len(data) < 33 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, bit_depth, colour_type = struct.unpack(">IIBB", data[16:26])
    allowed_chunks = _PLAIN_PNG_COLOUR_TYPES.get(colour_type)
    if bit_depth != 8 or allowed_chunks is None:
        return None
    position = 33  # signature (8) + IHDR: length (4), type (4), data (13), CRC (4)
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        if kind == b"IDAT":
            return width, height
        if kind not in allowed_chunks:
            return None
        position += 12 + length
    return None


def _decode_plain_png(data: bytes, source: str, max_pixels: int) -> np.ndarray | None:
    """The ``(height, width, 3)`` pixels of a plain RGB PNG, decoded by libspng; else None.

    libspng decodes these files about 1.5x faster than Pillow's own PNG decoder,
    and decoding is most of the time ``malaria predict`` spends per cell. The pixels
    are identical (PNG is lossless; tests compare every shared cell's pixels). A
    file it cannot decode goes back to Pillow, which names the problem.
    """
    size = plain_rgb_png_size(data)
    if size is None:
        return None
    _check_size(size, source, max_pixels)
    try:
        pixels = imagecodecs.spng_decode(data)
    except imagecodecs.SpngError:
        return None
    if pixels.shape != (size[1], size[0], 3) or pixels.dtype != np.uint8:
        return None
    return pixels


def _decode_rgb_pixels(data: bytes, source: str, max_pixels: int) -> Image.Image | np.ndarray:
    """Decode to RGB: an array from the plain-PNG fast path, else a Pillow image."""
    pixels = _decode_plain_png(data, source, max_pixels)
    return pixels if pixels is not None else _decode_rgb_image(data, source, max_pixels)


def _decode_rgb_image(data: bytes, source: str, max_pixels: int) -> Image.Image:
    """Decode to a Pillow RGB image, kept as Pillow so resizing needs no array copy."""
    if not data:
        raise ImageLoadError(source, "is empty (0 bytes)", "Re-export or re-copy the image.")
    not_an_image = ImageLoadError(
        source,
        "is not an image that can be read",
        f"Expected a {SUPPORTED_FORMATS} file; re-export it in one of those formats.",
    )
    # No warnings.catch_warnings() here: it swaps process-wide filters and is not
    # thread-safe, and decoding runs in threads. The size check refuses a bomb before
    # Pillow decodes a pixel (our limit is below Pillow's own warning threshold).
    try:
        with Image.open(io.BytesIO(data)) as image:
            _check_dimensions(image, source, max_pixels)
            image.seek(0)  # first frame of an animated GIF/TIFF
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb_image(image)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise not_an_image from None
    except Image.DecompressionBombError:
        raise ImageLoadError(
            source, "is too large to decode safely", "Pass single cell crops."
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as error:
        raise ImageLoadError(
            source,
            f"is truncated or corrupt ({error})",
            "Re-export or re-copy the image; the file on disk was not changed.",
        ) from None


def _check_dimensions(image: Image.Image, source: str, max_pixels: int) -> None:
    _check_size(image.size, source, max_pixels)


def _check_size(size: tuple[int, int], source: str, max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageLoadError(source, f"has no pixels ({width}x{height})", "Re-export the image.")
    if width * height > max_pixels:
        raise ImageLoadError(
            source,
            f"is {width}x{height} px, more than the {max_pixels:,} pixel limit",
            "Pass single cell crops, not whole slide scans.",
        )


def _to_rgb_image(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping high bit depths."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        values = np.asarray(image).astype(np.float64)
        # 16-bit data is scaled to 8 bits; Pillow's own convert("L") would clip at 255.
        if mode.startswith("I;16"):
            scale = 255.0 / 65535.0
        elif mode == "F" and values.max(initial=0) <= 1.0:
            scale = 255.0
        else:  # 32-bit "I" (how Pillow opens some 16-bit files): judge by the values
            scale = 255.0 / 65535.0 if values.max(initial=0) > 255 else 1.0
        gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def resize_with_pad(image: np.ndarray, size: int, cut_out_smear: bool = True) -> np.ndarray:
    """Fit an RGB image into a ``size`` x ``size`` square without stretching it.

    A crop that keeps a smear background is first cut down to its cell on black
    (:func:`malaria_classifier.background.isolate_cell`; NIH crops pass unchanged).
    The longer side is scaled to ``size`` (antialiased bilinear) and the rest is
    padded with black, the background NIH crops already have, so a cell keeps its
    shape whatever the crop's aspect ratio.

    Args:
        image: A uint8 array of shape ``(height, width, 3)``.
        size: The side of the square output.
        cut_out_smear: Cut a cell out of a smear background first (what every stage
            does); off only to study the raw crop, e.g. the Not-a-cell check's own
            background handling.

    Returns:
        A uint8 array of shape ``(size, size, 3)``.
    """
    return _fit_square(np.asarray(image, dtype=np.uint8), size, cut_out_smear)


def _fit_square(
    image: Image.Image | np.ndarray, size: int, cut_out_smear: bool = True
) -> np.ndarray:
    if cut_out_smear:
        pixels = image if isinstance(image, np.ndarray) else np.asarray(image)
        isolated = isolate_cell(pixels)
        if isolated is not pixels:
            image = isolated
    if isinstance(image, np.ndarray):
        height, width = image.shape[:2]
    else:
        width, height = image.size
    scale = size / max(height, width)
    new_width = max(1, round(width * scale))
    new_height = max(1, round(height * scale))
    if (new_width, new_height) != (width, height):
        if isinstance(image, np.ndarray):
            pixels = np.ascontiguousarray(image, dtype=np.uint8)
            image = Image.frombytes("RGB", (width, height), pixels)  # = fromarray, cheaper
        image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    # Padded with black into a new array: the same pixels as pasting onto a black
    # Pillow canvas, without the canvas and its two copies.
    fitted = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - new_height) // 2, (size - new_width) // 2
    fitted[top : top + new_height, left : left + new_width] = np.asarray(image)
    return fitted


def load_for_model(
    path: str | Path,
    size: int,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> np.ndarray:
    """Read a file and fit it to the model's square input (one call for all stages).

    Equal to ``resize_with_pad(load_rgb_image(path), size)`` without the intermediate
    array; this is the hot path of both training and prediction.
    """
    path = Path(path)
    data = _read_file_bytes(path, max_file_bytes)
    return _fit_square(_decode_rgb_pixels(data, str(path), max_pixels), size)


def sha256_of_file(path: str | Path) -> str:
    """Hash file contents, to find identical images under different names."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
