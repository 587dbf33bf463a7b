"""Model-card and JSON file helpers."""

import json
import math

from malaria_classifier.model_card import write_json_atomically


def test_json_files_are_strict_json_with_null_for_nan_and_infinity(tmp_path):
    """A diverged training's NaN loss must not make history.json unreadable in a browser."""
    path = tmp_path / "history.json"
    write_json_atomically(
        {"loss": math.nan, "bounds": [-math.inf, 1.5], "x": {"y": math.inf}}, path
    )

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    assert json.loads(path.read_text(), parse_constant=refuse) == {
        "loss": None,
        "bounds": [None, 1.5],
        "x": {"y": None},
    }
