"""What a Predictor is given, checked at the boundary: arguments, paths and arrays.

Arguments are refused before the model is loaded; a missing path or an unreadable
folder becomes a row's error instead of stopping the batch; arrays are checked by
name (shape, dtype) and prepared exactly as files are.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from malaria_classifier.data import is_image_file, walk_files
from malaria_classifier.images import resize_with_pad
from malaria_classifier.model_card import check_model_path


def check_predictor_arguments(
    model_path: str | Path | None,
    threshold: float | None,
    test_time_views: bool,
    check_ood: bool,
    decode_processes: bool,
) -> None:
    """Refuse wrong :class:`~malaria_classifier.prediction.Predictor` arguments, naming the value.

    Called before seconds of model loading, so a typo costs nothing.

    Raises:
        ValueError: For a model path that is missing or a folder, a threshold outside
            (0, 1), or a switch that is not True or False.
    """
    if model_path is not None and str(model_path).strip():
        check_model_path(model_path)  # seconds before TensorFlow would be loaded to say so
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not 0.0 < threshold < 1.0
    ):
        raise ValueError(
            f"threshold must be between 0 and 1 (exclusive), or None for the "
            f"model's own operating threshold; got {threshold!r}."
        )
    switches = {
        "test_time_views": test_time_views,
        "check_ood": check_ood,
        "decode_processes": decode_processes,
    }
    for name, value in switches.items():
        if not isinstance(value, bool | np.bool_):
            raise ValueError(f"{name} must be True or False, got {value!r}.")


def expand_inputs(
    inputs: Iterable[str | bytes | Path] | str | bytes | os.PathLike,
) -> Iterator[tuple[str, str | None]]:
    """Turn files and folders (searched recursively) into ``(path, error)`` pairs.

    A path that does not exist, or a folder that cannot be read, yields an error
    instead of stopping the batch; files inside folders that are not images (by
    suffix) are skipped silently, while a file named explicitly is always tried. One
    path on its own (a ``str``, ``bytes`` or ``Path``) is one input, not a sequence of
    characters.
    """
    if isinstance(inputs, str | bytes | os.PathLike):
        inputs = [inputs]
    for item in inputs:
        path = Path(os.fsdecode(item))  # a bytes name (os.listdir(b".")) too
        try:
            is_folder = stat.S_ISDIR(os.stat(path).st_mode)  # one system call a file
        except (FileNotFoundError, NotADirectoryError):
            if path.is_symlink():  # a broken link: reading it names the problem
                yield str(path), None
            else:
                yield str(path), f"{path}: does not exist. Check the path."
            continue
        except OSError:  # e.g. permission denied: reading it names the problem
            is_folder = False
        if is_folder:
            for candidate, error in walk_files(path):
                if error is not None:
                    yield str(candidate), error
                elif is_image_file(candidate):
                    yield str(candidate), None
        else:
            yield str(path), None


def distinct_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """The inputs without repeats and without those inside another input folder
    (``cells cells/``, a folder spelled relative and absolute, a file or sub-folder of a
    folder also named, before or after it).

    ``malaria predict`` uses it so that each file is predicted once and a patient's
    verdict never counts a cell twice; ``Predictor.predict_paths`` itself keeps one
    row per path it is given. Sets and each path's own parents, so 100,000 files
    named one by one (a shell glob) cost 100,000 look-ups, not 100,000 squared.
    """
    items = list(inputs)
    resolved = [Path(os.path.realpath(item)) for item in items]
    named = set(resolved)  # a named path that is another one's parent is a folder
    seen: set[Path] = set()
    kept = []
    for item, path in zip(items, resolved, strict=True):
        if path in seen or any(parent in named for parent in path.parents):
            continue
        seen.add(path)
        kept.append(Path(item))
    return kept


def check_rgb_array(image: np.ndarray, index: int) -> np.ndarray:
    """An image array as the model takes it: uint8 RGB ``(height, width, 3)``, 0-255.

    Raises:
        ValueError: Naming the image and what to pass instead; floats are refused
            rather than cast (a float image in [0, 1] cast to uint8 is all black).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(
            f"Image {index} has shape {image.shape}; expected (height, width, 3) RGB. Convert "
            f"grayscale or RGBA first (e.g. PIL's image.convert('RGB'))."
        )
    if image.dtype != np.uint8:
        raise ValueError(
            f"Image {index} is {image.dtype}; expected uint8 pixels 0-255. For floats in "
            f"[0, 1] pass (image * 255).round().astype('uint8')."
        )
    return image


def prepare_arrays(images: np.ndarray | Iterable[np.ndarray], image_size: int) -> np.ndarray:
    """Prepare arrays exactly as files are prepared (:func:`load_for_model`): a batch.

    Every array goes through :func:`resize_with_pad`, also one already of the input
    size: a 64x64 crop on a smear must be cut out like a file of that crop, or the
    API and ``predict_paths`` would give the same pixels different answers. For an
    array that is already a prepared model input the step changes nothing.

    Raises:
        ValueError: For one array instead of a list or batch, for no images, or
            (:func:`check_rgb_array`) for an array that is not uint8 RGB.
    """
    if not isinstance(images, (Sequence, np.ndarray)):
        images = list(images)  # a generator: len() needs a list
    if isinstance(images, np.ndarray) and images.ndim == 3:
        raise ValueError(
            f"Got one array of shape {images.shape}; pass a list of images (e.g. "
            f"[image]) or a batch of shape (n, height, width, 3)."
        )
    if not len(images):
        raise ValueError("Got no images; pass at least one (height, width, 3) array.")
    return np.stack(
        [
            resize_with_pad(check_rgb_array(image, index), image_size)
            for index, image in enumerate(images)
        ]
    )
