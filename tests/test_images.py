"""Tests for ``malaria_classifier.images``: decoding any image mode to RGB, errors, padding."""

from __future__ import annotations

import hashlib
import io
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from malaria_classifier import images
from malaria_classifier.images import (
    ImageLoadError,
    decode_image_bytes,
    load_for_model,
    load_rgb_image,
    plain_rgb_png_size,
    resize_with_pad,
    sha256_of_file,
)

EXIF_ORIENTATION = 0x0112


def _save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def _noise_png(path: Path, width: int = 40, height: int = 40, seed: int = 0) -> Path:
    """A random RGB PNG (compresses badly, so cutting it in half cuts the pixel data)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return _save(Image.fromarray(pixels), path)


def _error_for(path: Path) -> str:
    """A ``match`` pattern for an error message that starts with the file's name."""
    return "^" + re.escape(str(path)) + ": "


# --- modes -----------------------------------------------------------------------------


def test_rgb_png_is_returned_as_uint8_hwc_contiguous(tmp_path, make_png):
    path = make_png(tmp_path / "cell.png", size=(30, 20), color=(200, 100, 50))

    image = load_rgb_image(path)

    assert image.shape == (20, 30, 3)
    assert image.dtype == np.uint8
    assert image.flags["C_CONTIGUOUS"]
    assert (image == np.array([200, 100, 50], dtype=np.uint8)).all()


def test_rgb_pixels_keep_their_positions(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    path = _save(Image.fromarray(pixels), tmp_path / "noise.png")

    np.testing.assert_array_equal(load_rgb_image(path), pixels)


def test_grayscale_l_is_repeated_into_three_channels(tmp_path, make_png):
    path = make_png(tmp_path / "gray.png", size=(4, 3), color=77, mode="L")

    image = load_rgb_image(path)

    assert image.shape == (3, 4, 3)
    assert (image == 77).all()


def test_la_alpha_is_composited_on_black(tmp_path):
    image = Image.new("LA", (3, 1))
    image.putpixel((0, 0), (200, 255))
    image.putpixel((1, 0), (200, 0))
    image.putpixel((2, 0), (200, 128))
    path = _save(image, tmp_path / "la.png")

    pixels = load_rgb_image(path)

    assert pixels.shape == (1, 3, 3)
    assert pixels[0, 0].tolist() == [200, 200, 200]
    assert pixels[0, 1].tolist() == [0, 0, 0]
    assert pixels[0, 2].tolist() == [100, 100, 100]


def test_rgba_alpha_is_composited_on_black(tmp_path):
    image = Image.new("RGBA", (3, 1))
    image.putpixel((0, 0), (200, 100, 50, 255))
    image.putpixel((1, 0), (200, 100, 50, 0))
    image.putpixel((2, 0), (200, 100, 50, 128))
    path = _save(image, tmp_path / "rgba.png")

    pixels = load_rgb_image(path)

    assert pixels.shape == (1, 3, 3)
    assert pixels[0, 0].tolist() == [200, 100, 50]
    assert pixels[0, 1].tolist() == [0, 0, 0]  # fully transparent -> the black background
    assert pixels[0, 2].tolist() == [100, 50, 25]


def test_palette_colours_are_looked_up(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 150, 100])
    image.putpixel((1, 0), 1)
    path = _save(image, tmp_path / "palette.png")
    assert Image.open(path).mode == "P"

    pixels = load_rgb_image(path)

    assert pixels.tolist() == [[[10, 20, 30], [200, 150, 100]]]


def test_palette_transparency_becomes_black(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 150, 100])
    image.putpixel((1, 0), 1)
    path = _save(image, tmp_path / "palette_transparent.png", transparency=0)
    assert Image.open(path).info.get("transparency") == 0

    pixels = load_rgb_image(path)

    assert pixels.tolist() == [[[0, 0, 0], [200, 150, 100]]]


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "gray16.png")
    assert Image.open(path).mode == "I;16"

    pixels = load_rgb_image(path)

    assert pixels.dtype == np.uint8
    # 32896 = 128 * 257: clipping to 8 bits would give 255 here.
    assert pixels.tolist() == [[[0, 0, 0], [128, 128, 128], [255, 255, 255]]]


def test_cmyk_is_converted_to_rgb(tmp_path):
    image = Image.new("CMYK", (2, 1))
    image.putpixel((0, 0), (0, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 0))
    path = _save(image, tmp_path / "cmyk.tif")
    assert Image.open(path).mode == "CMYK"

    pixels = load_rgb_image(path)

    assert pixels.tolist() == [[[255, 255, 255], [0, 255, 255]]]


def test_one_bit_image_becomes_black_and_white(tmp_path):
    image = Image.new("1", (2, 1))
    image.putpixel((1, 0), 1)
    path = _save(image, tmp_path / "bits.png")
    assert Image.open(path).mode == "1"

    pixels = load_rgb_image(path)

    assert pixels.dtype == np.uint8
    assert pixels.tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_exif_orientation_is_applied(tmp_path):
    # 30 wide x 20 high, red block in the top-left corner, blue elsewhere.
    pixels = np.zeros((20, 30, 3), dtype=np.uint8)
    pixels[:, :] = (0, 0, 255)
    pixels[:10, :10] = (255, 0, 0)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "rotate 90 degrees clockwise to display"
    path = _save(Image.fromarray(pixels), tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)

    image = load_rgb_image(path)

    assert image.shape == (30, 20, 3)
    # Turned clockwise, the top-left corner ends up top-right; JPEG is lossy, hence the margins.
    top_right = image[2, -3].astype(int)
    top_left = image[2, 2].astype(int)
    assert top_right[0] > 200 and top_right[2] < 60
    assert top_left[2] > 200 and top_left[0] < 60


def test_decode_image_bytes_matches_loading_the_file(tmp_path):
    path = _noise_png(tmp_path / "noise.png", width=9, height=6)

    from_bytes = decode_image_bytes(path.read_bytes())

    assert from_bytes.shape == (6, 9, 3)
    np.testing.assert_array_equal(from_bytes, load_rgb_image(path))


def test_decode_image_bytes_reads_a_jpeg_upload():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 5), (0, 0, 0)).save(buffer, format="JPEG")

    pixels = decode_image_bytes(buffer.getvalue(), source="upload.jpg")

    assert pixels.shape == (5, 8, 3)
    assert pixels.max() <= 2  # black survives JPEG within rounding


# --- plain RGB PNGs: the libspng fast path -------------------------------------------------


def _pillow_only(path: Path) -> np.ndarray:
    """What Pillow alone makes of a file (the general path, no libspng)."""
    return np.asarray(images._decode_rgb_image(path.read_bytes(), str(path), 10**8))


def test_plain_rgb_png_takes_the_fast_path_and_decodes_like_pillow(tmp_path):
    path = _noise_png(tmp_path / "noise.png", width=37, height=23)

    assert plain_rgb_png_size(path.read_bytes()) == (37, 23)
    np.testing.assert_array_equal(load_rgb_image(path), _pillow_only(path))


def test_palette_png_without_transparency_takes_the_fast_path(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    path = _save(Image.fromarray(pixels).convert("P"), tmp_path / "palette.png")

    assert plain_rgb_png_size(path.read_bytes()) == (10, 12)
    np.testing.assert_array_equal(load_rgb_image(path), _pillow_only(path))


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("RGBA", {}),
        ("L", {}),
        ("P", {"transparency": 0}),
        ("I;16", {}),
        ("RGB", {"transparency": (1, 2, 3)}),
    ],
)
def test_pngs_that_need_converting_go_to_pillow(tmp_path, mode, options):
    pixels = np.random.default_rng(2).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode if mode != "I;16" else "I")
    path = _save(image if mode != "I;16" else image.convert("I;16"), tmp_path / "x.png", **options)

    assert plain_rgb_png_size(path.read_bytes()) is None
    np.testing.assert_array_equal(load_rgb_image(path), _pillow_only(path))


def test_png_text_or_exif_goes_to_pillow_so_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 30, 3), dtype=np.uint8)
    pixels[:10, :10] = (255, 0, 0)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # rotate 90 degrees clockwise to display
    path = _save(Image.fromarray(pixels), tmp_path / "rotated.png", exif=exif.tobytes())

    assert plain_rgb_png_size(path.read_bytes()) is None
    image = load_rgb_image(path)
    assert image.shape == (30, 20, 3)
    assert tuple(image[2, -3]) == (255, 0, 0)


def test_truncated_plain_png_gets_pillows_message(tmp_path):
    whole = _noise_png(tmp_path / "whole.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(whole[: len(whole) - 200])

    assert plain_rgb_png_size(path.read_bytes()) == (40, 40)
    with pytest.raises(ImageLoadError, match=_error_for(path) + "is truncated or corrupt"):
        load_for_model(path, 16)


def test_plain_png_claiming_huge_size_is_refused_before_decoding(tmp_path):
    data = bytearray(_noise_png(tmp_path / "small.png").read_bytes())
    data[16:24] = (100_000).to_bytes(4, "big") + (100_000).to_bytes(4, "big")  # IHDR size
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(data))

    with pytest.raises(ImageLoadError, match=_error_for(path) + "is 100000x100000 px"):
        load_rgb_image(path)


def test_shared_cells_decode_identically_on_both_paths(shared_data_dir):
    paths = sorted(shared_data_dir.glob("*/*.png"))[::150]

    fast = [plain_rgb_png_size(path.read_bytes()) is not None for path in paths]

    assert all(fast), "NIH crops are plain RGB or palette PNGs; the fast path should take them"
    for path in paths:
        np.testing.assert_array_equal(load_rgb_image(path), _pillow_only(path), err_msg=str(path))
        expected = resize_with_pad(_pillow_only(path), 64)
        np.testing.assert_array_equal(load_for_model(path, 64), expected, err_msg=str(path))


# --- errors ------------------------------------------------------------------------------


def test_zero_byte_file_is_rejected(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")

    with pytest.raises(ImageLoadError, match=_error_for(path) + r"is empty \(0 bytes\)"):
        load_rgb_image(path)


def test_truncated_png_is_rejected(tmp_path):
    whole = _noise_png(tmp_path / "whole.png").read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(whole[: len(whole) // 2])

    with pytest.raises(ImageLoadError, match=_error_for(path) + "is truncated or corrupt"):
        load_rgb_image(path)


def test_text_file_named_png_is_rejected(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n", encoding="utf-8")

    with pytest.raises(
        ImageLoadError,
        match=_error_for(path) + r"is not an image that can be read\. Expected a PNG",
    ):
        load_rgb_image(path)


def test_directory_is_rejected(tmp_path):
    folder = tmp_path / "folder.png"
    folder.mkdir()

    with pytest.raises(ImageLoadError, match=_error_for(folder) + "is a folder, not an image file"):
        load_rgb_image(folder)


def test_missing_path_is_rejected(tmp_path):
    path = tmp_path / "missing.png"

    with pytest.raises(ImageLoadError, match=_error_for(path) + r"does not exist\. Check the path"):
        load_rgb_image(path)


def test_too_many_pixels_is_rejected(tmp_path, make_png):
    path = make_png(tmp_path / "big.png", size=(20, 10))

    with pytest.raises(
        ImageLoadError, match=_error_for(path) + "is 20x10 px, more than the 199 pixel limit"
    ):
        load_rgb_image(path, max_pixels=199)
    assert load_rgb_image(path, max_pixels=200).shape == (10, 20, 3)


def test_too_large_file_is_rejected(tmp_path, make_png):
    path = make_png(tmp_path / "big.png", size=(20, 20))
    size = path.stat().st_size

    with pytest.raises(
        ImageLoadError,
        match=_error_for(path) + rf"is {size:,} bytes, more than the {size - 1:,}-byte limit",
    ):
        load_rgb_image(path, max_file_bytes=size - 1)
    assert load_rgb_image(path, max_file_bytes=size).shape == (20, 20, 3)


def test_error_carries_its_parts(tmp_path):
    path = tmp_path / "missing.png"

    with pytest.raises(ImageLoadError) as caught:
        load_rgb_image(path)

    assert caught.value.source == str(path)
    assert caught.value.problem == "does not exist"
    assert isinstance(caught.value, ValueError)


def test_decode_errors_name_the_source():
    with pytest.raises(ImageLoadError, match=r"^upload\.png: is not an image that can be read"):
        decode_image_bytes(b"GIF89a but not really", source="upload.png")
    with pytest.raises(ImageLoadError, match=r"^<upload>: is empty \(0 bytes\)"):
        decode_image_bytes(b"")


@pytest.mark.parametrize("kind", ["valid", "truncated"])
def test_input_file_is_never_modified(tmp_path, kind):
    path = _noise_png(tmp_path / "cell.png")
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    before_bytes = path.read_bytes()
    before_mtime = path.stat().st_mtime_ns

    if kind == "truncated":
        with pytest.raises(ImageLoadError, match=_error_for(path) + "is truncated or corrupt"):
            load_rgb_image(path)
    else:
        assert load_rgb_image(path).shape == (40, 40, 3)

    assert path.read_bytes() == before_bytes
    assert path.stat().st_mtime_ns == before_mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cell.png"]


# --- resize_with_pad ---------------------------------------------------------------------


def _solid(height: int, width: int, color=(200, 100, 50)) -> np.ndarray:
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, :] = color
    return image


def test_wide_image_is_padded_top_and_bottom_not_stretched():
    out = resize_with_pad(_solid(20, 40), 20)

    assert out.shape == (20, 20, 3)
    assert out.dtype == np.uint8
    content_rows = np.flatnonzero(out.any(axis=(1, 2)))
    assert content_rows.tolist() == list(range(5, 15))  # 10-row band, 5 black rows each side
    assert (out[:5] == 0).all() and (out[15:] == 0).all()
    assert (out[5:15] == np.array([200, 100, 50], dtype=np.uint8)).all()


def test_tall_image_is_padded_left_and_right():
    out = resize_with_pad(_solid(40, 20), 20)

    content_columns = np.flatnonzero(out.any(axis=(0, 2)))
    assert content_columns.tolist() == list(range(5, 15))
    assert (out[:, :5] == 0).all() and (out[:, 15:] == 0).all()


def test_odd_padding_is_centered():
    out = resize_with_pad(_solid(10, 40), 20)  # content 5 rows high, 15 rows of padding

    content_rows = np.flatnonzero(out.any(axis=(1, 2)))
    assert content_rows.tolist() == list(range(7, 12))


def test_same_size_image_is_returned_exactly():
    image = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    original = image.copy()

    out = resize_with_pad(image, 16)

    np.testing.assert_array_equal(out, original)
    np.testing.assert_array_equal(image, original)  # the input is not changed


def test_small_image_is_upscaled():
    out = resize_with_pad(_solid(5, 10), 40)

    assert out.shape == (40, 40, 3)
    content_rows = np.flatnonzero(out.any(axis=(1, 2)))
    assert content_rows.tolist() == list(range(10, 30))
    assert (out[10:30] == np.array([200, 100, 50], dtype=np.uint8)).all()


def test_square_small_image_fills_the_canvas():
    out = resize_with_pad(_solid(5, 5, color=(9, 8, 7)), 32)

    assert out.shape == (32, 32, 3)
    assert (out == np.array([9, 8, 7], dtype=np.uint8)).all()


# --- sha256_of_file ----------------------------------------------------------------------


@pytest.mark.parametrize("n_bytes", [0, 100, 3 * 2**20 + 17])
def test_sha256_of_file_equals_hashlib(tmp_path, n_bytes):
    data = np.random.default_rng(n_bytes).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(data)

    assert sha256_of_file(path) == hashlib.sha256(data).hexdigest()


def test_device_files_are_refused_without_reading_them():
    with pytest.raises(ImageLoadError, match=r"^/dev/zero: is not a regular file"):
        load_rgb_image("/dev/zero")


def test_a_header_past_pillows_own_limit_is_refused_without_a_warning(tmp_path):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", 10_000, 10_000)  # IHDR claims 100 Mpx
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # with a valid CRC
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bytes(data))
    # In a fresh interpreter: pytest swaps warning filters around each test.
    script = (
        "import sys\n"
        "from malaria_classifier.images import ImageLoadError, load_rgb_image\n"
        "try:\n    load_rgb_image(sys.argv[1])\n"
        "except ImageLoadError as error:\n    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "default", "-c", script, str(bomb)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "more than the 50,000,000 pixel limit" in result.stdout
    assert "DecompressionBombWarning" not in result.stderr
