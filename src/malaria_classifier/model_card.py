"""Where the bundled default model lives, and reading/writing model cards.

A model card is ``model_card.json`` in the same folder as a ``.keras`` model. It says
what the model was trained on, how the patients were split (and which patients went
where, so ``malaria evaluate`` can pick unseen ones), the settings, and how well the
model did on its own validation and test patients.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from malaria_classifier.outputs import open_output

DEFAULT_MODEL_DIR = Path(__file__).parent / "models" / "default"
MODEL_FILE = "model.keras"
CARD_FILE = "model_card.json"


def check_model_path(path: str | Path) -> Path:
    """The path of a ``.keras`` model file, checked without loading anything.

    Raises:
        ValueError: For a folder, a missing file or another kind of file, saying
            what to pass instead (``--model`` on the command line, ``model_path`` in
            Python).
    """
    model_path = Path(path)
    advice = (
        "Pass a .keras file written by `malaria train` (--model, or model_path in "
        "Python), or leave it out to use the bundled default."
    )
    if model_path.is_dir():
        # Not hidden files: a killed save leaves `.model.partial.keras` behind.
        inside = sorted(
            path for path in model_path.glob("*.keras") if not path.name.startswith(".")
        )
        hint = f" such as {inside[0]}" if inside else ""
        raise ValueError(
            f"Model {model_path} is a folder; pass the .keras file{hint} (written by "
            f"`malaria train` into its run folder)."
        )
    if not model_path.is_file():
        raise ValueError(f"Model file {model_path} does not exist. {advice}")
    if model_path.suffix.lower() != ".keras":
        raise ValueError(f"Model {model_path} is not a .keras file. {advice}")
    return model_path


def default_model_path() -> Path:
    """The bundled default model, shipped inside the package.

    Raises:
        ValueError: If the package was installed without it.
    """
    path = DEFAULT_MODEL_DIR / MODEL_FILE
    if not path.is_file():
        raise ValueError(
            f"The bundled default model is missing ({path}). Reinstall malaria-classifier, "
            f"or pass --model with a model from `malaria train`."
        )
    return path


def card_path_for(model_path: Path) -> Path:
    """The model card that belongs to a model file (same folder)."""
    return Path(model_path).parent / CARD_FILE


def read_model_card(model_path: Path) -> dict[str, Any]:
    """The card next to ``model_path``, or an empty dict when there is none."""
    path = card_path_for(model_path)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"Model card {path} is unreadable ({error}). Delete it or re-run `malaria train`."
        ) from None


def write_json_atomically(data: Any, path: Path) -> None:
    """Write JSON all at once or not at all, so a crash never leaves half a file.

    NaN and infinities are written as null (:func:`json_ready`), so every file is
    strict JSON that browsers, jq and other languages read.
    """
    with open_output(path, newline=None) as handle:
        handle.write(json.dumps(json_ready(data), indent=2, allow_nan=False) + "\n")


def json_ready(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (null).

    Python's ``json`` would write ``NaN`` and ``Infinity``, which are not JSON: a browser's
    ``JSON.parse`` refuses the whole file (a diverged training's NaN loss in
    ``history.json``, say). Readers take null for "no value".
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    return value
