"""Tests for ``malaria_classifier.config``: defaults < YAML file < explicit overrides."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from malaria_classifier.config import (
    TrainingConfig,
    config_from_dict,
    load_config,
    save_config,
)

DEFAULTS = {
    "image_size": 64,
    "base_filters": 16,
    "conv_blocks": 4,
    "convs_per_block": 1,
    "residual_separable_blocks": 0,
    "dense_units": 64,
    "colour_normalization": "per_cell",
    "dropout_rate": 0.3,
    "batch_size": 64,
    "learning_rate": 0.001,
    "label_smoothing": 0.0,
    "loss_drop_fraction": 0.0,
    "mixup_alpha": 0.0,
    "epochs": 20,
    "early_stopping_patience": 20,
    "augment": True,
    "zoom_range": 0.1,
    "shift_range": 0.05,
    "brightness_delta": 0.08,
    "contrast_range": 0.15,
    "saturation_range": 0.15,
    "hue_delta": 0.02,
    "channel_gain_range": 0.0,
    "low_resolution_probability": 0.25,
    "low_resolution_min_side": 12,
    "blur_probability": 0.15,
    "blur_max_sigma": 1.5,
    "background_probability": 0.0,
    "validation_fraction": 0.15,
    "test_fraction": 0.15,
    "seed": 42,
    "training_seed": None,
}


@pytest.fixture
def write_yaml(tmp_path):
    """Write text to ``tmp_path/config.yaml`` and return the path."""

    def write(text: str):
        path = tmp_path / "config.yaml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


def test_defaults():
    assert TrainingConfig().to_dict() == DEFAULTS
    assert list(TrainingConfig().to_dict()) == list(DEFAULTS)  # field order, for the YAML file


def test_load_config_without_file_gives_defaults():
    assert load_config() == TrainingConfig()


def test_config_is_frozen():
    config = TrainingConfig()

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3  # type: ignore[misc]


def test_yaml_overrides_defaults(write_yaml):
    path = write_yaml("epochs: 5\nlearning_rate: 0.01\naugment: false\n")

    config = load_config(path)

    assert config.epochs == 5
    assert config.learning_rate == 0.01
    assert config.augment is False
    assert config == TrainingConfig(epochs=5, learning_rate=0.01, augment=False)


def test_explicit_overrides_beat_yaml(write_yaml):
    path = write_yaml("epochs: 5\nbatch_size: 16\n")

    config = load_config(path, epochs=7, seed=1)

    assert config.epochs == 7
    assert config.batch_size == 16
    assert config.seed == 1


def test_none_overrides_are_ignored(write_yaml):
    path = write_yaml("epochs: 5\n")

    config = load_config(path, epochs=None, batch_size=None)

    assert config.epochs == 5
    assert config.batch_size == 64


def test_overrides_without_a_file():
    assert load_config(None, dense_units=32) == TrainingConfig(dense_units=32)


def test_empty_yaml_file_gives_defaults(write_yaml):
    assert load_config(write_yaml("")) == TrainingConfig()


def test_unknown_key_in_yaml_is_named(write_yaml):
    path = write_yaml("epochs: 5\nbatchsize: 16\n")

    with pytest.raises(
        ValueError,
        match=re.escape(f"{path}: unknown setting(s) ['batchsize']. Accepted settings: image_size"),
    ):
        load_config(path)


def test_unknown_override_is_named():
    with pytest.raises(ValueError, match=r"^settings: unknown setting\(s\) \['lr'\]"):
        load_config(lr=0.1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('batch_size: "big"\n', r"batch_size must be an integer, got 'big' \(str\)"),
        ("epochs: 2.5\n", r"epochs must be an integer, got 2\.5 \(float\)"),
        (
            'augment: "yes"\n',
            r"augment must be true or false, got 'yes' \(str\)\. Write true or false without",
        ),
        ("augment: 1\n", r"augment must be true or false, got 1 \(int\)"),
        ("batch_size: true\n", r"batch_size must be an integer, got True \(bool\)"),
        ('learning_rate: "0.01"\n', r"learning_rate must be a number, got '0\.01' \(str\)"),
        ("dropout_rate: false\n", r"dropout_rate must be a number, got False \(bool\)"),
        ("colour_normalization: 1\n", r"colour_normalization must be text, got 1 \(int\)"),
    ],
)
def test_wrong_types_are_rejected(write_yaml, text, message):
    path = write_yaml(text)

    with pytest.raises(ValueError, match=re.escape(f"{path}: ") + message):
        load_config(path)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learning_rate": 0}, r"learning_rate must be in \(0, 1\), got 0\.0"),
        ({"learning_rate": 1.5}, r"learning_rate must be in \(0, 1\), got 1\.5"),
        ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0\.5\), got 0\.5"),
        ({"mixup_alpha": -0.2}, r"mixup_alpha must be in \[0, 10\] .*, got -0\.2"),
        ({"dropout_rate": 1.0}, r"dropout_rate must be in \[0, 1\), got 1\.0"),
        ({"dropout_rate": -0.1}, r"dropout_rate must be in \[0, 1\), got -0\.1"),
        (
            {"image_size": 8, "conv_blocks": 4},
            r"image_size 8 is too small for 4 conv blocks .* use image_size >= 16",
        ),
        ({"batch_size": 0}, r"batch_size must be a positive integer, got 0"),
        ({"epochs": -3}, r"epochs must be a positive integer, got -3"),
        ({"conv_blocks": 0}, r"conv_blocks must be a positive integer, got 0"),
        ({"learning_rate": float("nan")}, r"learning_rate must be a finite number, got nan"),
        ({"blur_max_sigma": float("inf")}, r"blur_max_sigma must be a finite number, got inf"),
        ({"contrast_range": 1.5}, r"contrast_range must be between 0 and 0\.99, got 1\.5"),
        ({"zoom_range": -0.1}, r"zoom_range must be between 0 and 0\.9, got -0\.1"),
        ({"hue_delta": 0.7}, r"hue_delta must be between 0 and 0\.5, got 0\.7"),
        ({"shift_range": 0.6}, r"shift_range must be between 0 and 0\.5, got 0\.6"),
        ({"test_fraction": 0.0}, r"test_fraction must be between 0\.01 and 0\.8, got 0\.0"),
        (
            {"validation_fraction": 0.5, "test_fraction": 0.45},
            r"validation_fraction \+ test_fraction = 0\.95 leaves almost nothing",
        ),
        ({"seed": -1}, r"seed must be an integer from 0 to 4294967295 .*, got -1"),
        ({"training_seed": 2**32}, r"training_seed must be an integer from 0 to 4294967295"),
    ],
)
def test_invalid_values_are_rejected(values, message):
    with pytest.raises(ValueError, match=message):
        load_config(**values)


def test_boundary_values_are_accepted():
    config = load_config(dropout_rate=0, image_size=16, conv_blocks=4, batch_size=1)

    assert config.dropout_rate == 0.0
    assert config.image_size == 16


def test_yaml_list_is_rejected(write_yaml):
    path = write_yaml("- epochs: 5\n- batch_size: 16\n")

    with pytest.raises(
        ValueError, match=re.escape(f"{path} must hold a mapping of settings, got list")
    ):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochs: [5\n", " is not valid YAML"),
        ("epochs: 3\n1: 2\n", ": unknown setting(s) [1]"),  # a non-string key: no traceback
    ],
)
def test_unreadable_yaml_is_named(write_yaml, text, message):
    path = write_yaml(text)

    with pytest.raises(ValueError, match=re.escape(f"{path}{message}")):
        load_config(path)


def test_missing_file_is_rejected(tmp_path):
    path = tmp_path / "nope.yaml"

    with pytest.raises(ValueError, match=re.escape(f"Config file {path} does not exist")):
        load_config(path)


def test_folder_instead_of_file_is_rejected(tmp_path):
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"Config file {tmp_path} is a folder, not a YAML file. Pass the file itself "
            f"(such as {tmp_path / 'config.yaml'})."
        ),
    ):
        load_config(tmp_path)


def test_save_then_load_round_trips(tmp_path):
    config = TrainingConfig(
        image_size=96, conv_blocks=3, dropout_rate=0.0, augment=False, learning_rate=3e-4, seed=7
    )
    path = tmp_path / "config.yaml"

    save_config(config, path)

    assert load_config(path) == config
    assert yaml.safe_load(path.read_text(encoding="utf-8"))["image_size"] == 96
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no .tmp left


def test_saved_defaults_load_back_as_defaults(tmp_path):
    path = tmp_path / "config.yaml"

    save_config(TrainingConfig(), path)

    assert load_config(path) == TrainingConfig()
    assert list(yaml.safe_load(path.read_text(encoding="utf-8"))) == list(DEFAULTS)


def test_ints_are_accepted_for_float_fields(write_yaml):
    path = write_yaml("dropout_rate: 0\nblur_max_sigma: 2\n")

    config = load_config(path)

    assert config.dropout_rate == 0.0 and isinstance(config.dropout_rate, float)
    assert config.blur_max_sigma == 2.0 and isinstance(config.blur_max_sigma, float)


def test_config_from_dict_names_the_source():
    with pytest.raises(ValueError, match=r"^run/config\.yaml: epochs must be an? int"):
        config_from_dict({"epochs": "ten"}, source="run/config.yaml")


def test_replace_validates_again():
    config = TrainingConfig()

    assert config.replace(epochs=3).epochs == 3
    assert config.epochs == 20
    with pytest.raises(ValueError, match="learning_rate must be in"):
        config.replace(learning_rate=0.0)


def test_training_seed_defaults_to_the_split_seed():
    assert TrainingConfig(seed=7).randomness_seed == 7
    assert TrainingConfig(seed=7, training_seed=3).randomness_seed == 3


def test_training_seed_round_trips_set_and_unset(tmp_path):
    path = tmp_path / "config.yaml"
    for config in (TrainingConfig(training_seed=5), TrainingConfig()):
        save_config(config, path)

        assert load_config(path) == config


def test_training_seed_must_be_an_integer(write_yaml):
    with pytest.raises(ValueError, match="training_seed must be an integer, got 'x'"):
        load_config(write_yaml("training_seed: x\n"))


def test_a_bad_value_in_a_file_names_the_file_and_the_flags(write_yaml):
    path = write_yaml("contrast_range: 2.0\n")

    with pytest.raises(ValueError, match=re.escape(f"{path}: contrast_range must be between")):
        load_config(path)
    with pytest.raises(
        ValueError,
        match=re.escape(f"{path} with the command-line settings epochs: contrast_range"),
    ):
        load_config(path, epochs=3)


def test_a_config_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# r\xe9glages\nepochs: 3\n".encode("latin-1"))

    with pytest.raises(ValueError, match=re.escape(f"{path} is not UTF-8 text")):
        load_config(path)


def test_scientific_notation_is_read_as_a_number(write_yaml):
    # PyYAML (YAML 1.1) would read these as the text "1e-3"; YAML 1.2 and users read numbers.
    path = write_yaml("learning_rate: 1e-3\nlabel_smoothing: 5E-2\nblur_max_sigma: +2e0\n")

    config = load_config(path)

    assert config.learning_rate == 0.001 and isinstance(config.learning_rate, float)
    assert config.label_smoothing == 0.05
    assert config.blur_max_sigma == 2.0


HOW_TO_WRITE_A_NUMBER = "Write a number without quotes, such as 0.001 or 1e-3."


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "learning_rate: fast\n",
            "learning_rate must be a number, got 'fast' (str). " + HOW_TO_WRITE_A_NUMBER,
        ),
        (
            'learning_rate: "1e-3"\n',
            "learning_rate must be a number, got '1e-3' (str). " + HOW_TO_WRITE_A_NUMBER,
        ),
        (
            "epochs: 1e1\n",
            "epochs must be an integer, got 10.0 (float). Write a whole number without quotes "
            "or a decimal point, such as 20.",
        ),
    ],
)
def test_text_where_a_number_belongs_is_named_with_how_to_write_it(write_yaml, text, message):
    path = write_yaml(text)

    with pytest.raises(ValueError) as raised:
        load_config(path)
    assert str(raised.value) == f"{path}: {message}"
