"""Every runtime's forward pass takes what the model takes, or says what it got."""

import numpy as np
import pytest
from _synthetic import save_tiny_model

from malaria_classifier.model import load_model
from malaria_classifier.runtimes import check_batch, make_forward

RUNTIMES = ["keras", "onnx", "tflite"]


@pytest.fixture(scope="module")
def forwards(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("model") / "model.keras", image_size=32)
    model = load_model(str(path))
    return {runtime: make_forward(model, runtime) for runtime in RUNTIMES}


@pytest.fixture(scope="module")
def cells():
    return np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_batch_scaled_to_0_1_is_refused_not_scored_as_black(runtime, forwards, cells):
    """Cast to uint8, every such cell became black and got the same confident score."""
    with pytest.raises(ValueError, match=r"raw RGB pixels as uint8 0-255 .* got float64 with"):
        forwards[runtime](cells / 255.0)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_batch_of_another_size_or_one_image_is_refused_by_shape(runtime, forwards, cells):
    with pytest.raises(ValueError, match=r"shape \(n, 32, 32, 3\), got \(4, 16, 16, 3\)"):
        forwards[runtime](cells[:, ::2, ::2])
    with pytest.raises(ValueError, match=r"got \(32, 32, 3\).*one image: image\[None\]"):
        forwards[runtime](cells[0])


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_integer_pixels_in_range_score_as_uint8(runtime, forwards, cells):
    expected = forwards[runtime](cells)
    np.testing.assert_array_equal(forwards[runtime](cells.astype(np.int64)), expected)
    assert expected.shape == (4, 2) and not np.isnan(expected).any()


def test_integers_outside_0_255_are_refused_not_wrapped():
    batch = np.full((1, 8, 8, 3), 300)
    with pytest.raises(ValueError, match=r"got int64 with values 300\.\.300"):
        check_batch(batch, (8, 8, 3))


def test_a_symbolic_dimension_matches_any_size():
    for height in (8, 5):
        batch = np.random.default_rng(height).integers(0, 256, (2, height, 8, 3), dtype=np.uint8)
        checked = check_batch(batch, ("height", 8, 3))
        assert checked.dtype == np.uint8
        np.testing.assert_array_equal(checked, batch)
    # ... and only that dimension: the fixed ones are still checked.
    with pytest.raises(ValueError, match=r"shape \(n, \?, 8, 3\), got \(2, 5, 7, 3\)"):
        check_batch(np.zeros((2, 5, 7, 3), dtype=np.uint8), ("height", 8, 3))
