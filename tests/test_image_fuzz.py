"""Hostile and broken input never crashes, hangs or allocates without bound.

Property: for any bytes, decoding either returns a uint8 ``(h, w, 3)`` array within the
pixel limit or raises :class:`ImageLoadError` naming the file, nothing else. CI runs a
few hundred examples per property; ``bench/fuzz_images.py`` runs over 10,000
(``MALARIA_FUZZ_EXAMPLES`` raises the count here too). No deadlines: no timed asserts.
"""

import base64
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from _fuzz_inputs import animated_gifs, any_upload, png_with_header
from hypothesis import HealthCheck, given, settings
from PIL import Image

from malaria_classifier.images import (
    ImageLoadError,
    decode_image_bytes,
    decode_upload,
    load_for_model,
    load_rgb_image,
)

# Pillow warns about each corrupt EXIF/TIFF tag it skips; that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
EXAMPLES = int(os.environ.get("MALARIA_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
SMALL_PIXEL_LIMIT = 1_000_000


def _check_outcome(call, source):
    try:
        image = call()
    except ImageLoadError as error:
        assert str(error).startswith(source)
        assert error.hint  # every error says what to do
        return None
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] * image.shape[1] <= SMALL_PIXEL_LIMIT
    return image


@FUZZ
@given(any_upload)
def test_any_bytes_decode_or_fail_with_an_image_load_error(data):
    _check_outcome(lambda: decode_image_bytes(data, "upload.png", SMALL_PIXEL_LIMIT), "upload.png")


@FUZZ
@given(any_upload)
def test_any_browser_upload_decodes_or_fails_cleanly(data):
    contents = "data:image/png;base64," + base64.b64encode(data).decode()
    _check_outcome(lambda: decode_upload(contents, "up", SMALL_PIXEL_LIMIT), "up")


@FUZZ
@given(any_upload)
def test_any_file_loads_for_the_model_or_fails_cleanly(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "input.png"
        path.write_bytes(data)
        image = _check_outcome(lambda: load_for_model(path, 32, SMALL_PIXEL_LIMIT), str(path))
        if image is not None:
            assert image.shape == (32, 32, 3)
        assert path.read_bytes() == data  # never modified


TOO_MANY_PIXELS = (
    r"is {}x{} px, more than the 50,000,000 pixel limit\. "
    r"Pass single cell crops, not whole slide scans\.$"
)
NO_PIXELS = r"has no pixels \({}x{}\)\. Re-export the image\.$"


@pytest.mark.parametrize(
    ("width", "height", "problem"),
    [
        (100_000, 100_000, TOO_MANY_PIXELS),
        (2**31 - 1, 1, TOO_MANY_PIXELS),
        (0, 10, NO_PIXELS),
        (10, 0, NO_PIXELS),
        (70_000, 70_000, TOO_MANY_PIXELS),
    ],
)
def test_huge_or_empty_headers_are_refused_before_decoding(width, height, problem):
    with pytest.raises(ImageLoadError, match=r"^bomb\.png: " + problem.format(width, height)):
        decode_image_bytes(png_with_header(width, height), "bomb.png")


def test_upload_size_limit_applies_before_base64_decoding():
    contents = "data:image/png;base64," + "A" * 4_000_000  # ~3 MB once decoded
    with pytest.raises(ImageLoadError, match="byte limit"):
        decode_upload(contents, "big", max_file_bytes=1_000_000)
    with pytest.raises(ImageLoadError, match="not a base64 data URL"):
        decode_upload("just text", "plain")
    with pytest.raises(ImageLoadError, match="not valid base64"):
        decode_upload("data:image/png;base64,@@@@", "bad")


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    image = decode_image_bytes(buffer.getvalue())
    assert image.shape == (8, 8, 3) and image[0, 0, 0] > 200 and image[0, 0, 2] < 50


@FUZZ
@given(animated_gifs())
def test_every_animated_gif_decodes(data):
    assert decode_image_bytes(data).shape[2] == 3


def test_a_symlink_loop_is_a_clear_error(tmp_path):
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    with pytest.raises(ImageLoadError, match=r"loop\.png: cannot be read"):
        load_rgb_image(loop)


def test_a_symlink_loop_in_a_folder_does_not_stop_prediction(tmp_path):
    from malaria_classifier.prediction_inputs import expand_inputs

    folder = tmp_path / "cells"
    folder.mkdir()
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "sub").symlink_to(folder, target_is_directory=True)  # a folder loop
    pairs = list(expand_inputs([folder]))
    assert [Path(path).name for path, _ in pairs] == ["loop.png"]
