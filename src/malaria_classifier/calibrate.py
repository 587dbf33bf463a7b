"""Fit the trust layer of a trained model on its validation patients; report on test.

``malaria calibrate`` runs :func:`calibrate_model`. From the run's manifest it scores
the cells of each split once, then fits, **on validation patients only** (and the
training cells for the feature density of the "Not a cell" check):

1. the temperature (:mod:`calibration`), then the operating threshold and the
   "Uncertain" band on the calibrated scale;
2. the out-of-distribution limits (:mod:`ood`): strict ones on training and
   validation cells as imaged (``ood.json``, the default), and, unless asked not
   to, an other-labs set also fitted on a copy of each cell changed the way other
   laboratories' images differ (:func:`stress.draw_lab_variant`: smaller, softer,
   other stain, smear background; ``ood_other_labs.json``), which does not call
   such cells "Not a cell" but catches fewer non-cells;
3. the patient verdict rule (:mod:`verdict`).

It writes them into the model card and the ``ood*.json`` files beside the model, and adds a
``calibration_report`` with the same quantities measured on the *test* patients, which
were never used to choose anything.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from malaria_classifier.calibration import (
    DEFAULT_MIN_SPECIFICITY,
    apply_temperature,
    choose_threshold,
    choose_uncertain_margin,
    fit_temperature,
    reliability_bins,
)
from malaria_classifier.constants import POSITIVE_CLASS, POSITIVE_INDEX
from malaria_classifier.data import find_class_root
from malaria_classifier.decision import DecisionRule
from malaria_classifier.decoding import iter_images
from malaria_classifier.images import (
    ImageLoadError,
    load_rgb_image,
    resize_with_pad,
    sha256_of_file,
)
from malaria_classifier.model_card import (
    DEFAULT_MODEL_DIR,
    MODEL_FILE,
    card_path_for,
    read_model_card,
    write_json_atomically,
)
from malaria_classifier.ood import (
    OOD_FILE,
    OOD_OTHER_LABS_FILE,
    OodCheck,
    combine_signals,
    feature_model,
    final_layer_weights,
    fit_feature_density,
    fit_ood_check,
    save_ood_check,
)
from malaria_classifier.ood_statistics import image_statistics
from malaria_classifier.serving import read_serving_copy, write_serving_copy
from malaria_classifier.splits import missing_cells, read_manifest
from malaria_classifier.stress import LAB_VARIANTS_SUMMARY, draw_lab_variant
from malaria_classifier.verdict import VerdictRule, choose_verdict_rule, verdict_for


@dataclass
class SplitScores:
    """Everything measured once per cell of one split."""

    labels: np.ndarray  # 1 = Parasitized
    patients: np.ndarray
    probabilities: np.ndarray  # uncalibrated P(Parasitized)
    features: np.ndarray
    statistics: np.ndarray
    variants: np.ndarray | None = None  # per cell, the other-lab changes made (None: as imaged)


def score_cells(
    model: Any,
    paths: Sequence[Path],
    labels: Sequence[str],
    patients: Sequence[str],
    variant_seed: int | None = None,
    forward: Any = None,
) -> SplitScores:
    """Raw scores, penultimate features and image statistics of the readable cells.

    Args:
        model: The Keras model.
        paths: Cell image files.
        labels: The class name of each cell.
        patients: The patient of each cell.
        variant_seed: When given, each cell is first changed into one random
            other-laboratory variant (:func:`stress.draw_lab_variant`, drawn from a
            generator seeded by ``(variant_seed, position)``, so runs repeat).
        forward: The compiled feature function (:func:`feature_forward`); pass one
            built once when scoring several splits, or TensorFlow traces it again for
            every call (and warns about retracing).

    Raises:
        ValueError: If none of the files can be read.
    """
    size = int(model.input_shape[1])
    forward = forward or feature_forward(model)
    kept, images, variants = [], [], []
    outputs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for index, (image, variant) in enumerate(_model_inputs(list(paths), size, variant_seed)):
        if image is None:
            continue
        kept.append(index)
        images.append(image)
        variants.append(variant)
        if len(images) == 256:
            outputs.append(_score_batch(forward, np.stack(images)))
            images = []
    if images:
        outputs.append(_score_batch(forward, np.stack(images)))
    if not kept:
        raise ValueError("None of the cells in the manifest could be read; check --data.")
    probabilities, features, statistics = (
        np.concatenate(parts) for parts in zip(*outputs, strict=True)
    )
    return SplitScores(
        labels=np.array([labels[i] == POSITIVE_CLASS for i in kept], dtype=int),
        patients=np.array([patients[i] for i in kept]),
        probabilities=probabilities,
        features=features,
        statistics=statistics,
        variants=None if variant_seed is None else np.array(variants),
    )


def feature_forward(model: Any) -> Any:
    """The model's probabilities and penultimate features as one compiled function."""
    import tensorflow as tf

    network = feature_model(model)
    size = int(model.input_shape[1])
    # Any batch size, one trace: the last batch of each split is smaller.
    signature = [tf.TensorSpec([None, size, size, 3], tf.uint8)]
    return tf.function(lambda batch: network(batch, training=False), input_signature=signature)


def _model_inputs(
    paths: list[Path], size: int, variant_seed: int | None
) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """Yield ``(model input or None if unreadable, variant name or None)`` per path."""
    if variant_seed is None:
        return ((image, None) for image, _error in iter_images(paths, size))
    return _iter_lab_variants(paths, size, variant_seed)


def _iter_lab_variants(
    paths: list[Path], size: int, seed: int, chunk: int = 256
) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """Yield ``(model input, variant name)`` per path, ``(None, None)`` if unreadable.

    The variant is applied to the native-resolution crop, before the model's own
    resize-with-pad, as ``bench/stress_test.py`` does.
    """

    def vary(position: int) -> tuple[np.ndarray | None, str | None]:
        try:
            image = load_rgb_image(paths[position])
        except ImageLoadError:
            return None, None
        changed, name = draw_lab_variant(image, np.random.default_rng([seed, position]))
        return resize_with_pad(changed, size), name

    with ThreadPoolExecutor(max_workers=2) as executor:
        for start in range(0, len(paths), chunk):
            yield from executor.map(vary, range(start, min(start + chunk, len(paths))))


def _score_batch(forward: Any, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    probabilities, features = forward(batch)
    return (
        probabilities.numpy()[:, POSITIVE_INDEX].astype(np.float64),
        features.numpy().astype(np.float64),
        image_statistics(batch),
    )


def score_run_splits(
    model_path: Path,
    run_dir: Path,
    data_dir: Path,
    train_cells: int = 6000,
    seed: int = 0,
    ood_variants: bool = False,
) -> tuple[Any, dict[str, SplitScores]]:
    """Load the model and score its train (a sample), validation and test cells.

    With ``ood_variants``, the same train and validation cells are scored once more,
    each changed into one random other-laboratory variant, as ``"train_variants"``
    and ``"validation_variants"`` (for fitting the "Not a cell" check; test cells
    are never varied here, so they stay the untouched report set).

    Raises:
        ValueError: If the run folder has no manifest.
    """
    from malaria_classifier.model import load_model

    manifest = Path(run_dir) / "manifest.csv"
    if not manifest.is_file():
        raise ValueError(
            f"{manifest} does not exist. Pass --run: the `malaria train` run folder whose "
            f"manifest.csv says which patients are validation and test."
        )
    rows = read_manifest(manifest)
    root = find_class_root(data_dir)
    check_model_matches_run(model_path, rows, manifest)
    _check_splits(rows, manifest)
    _check_cells_present(rows, root, manifest)
    model = load_model(str(model_path))
    rng = np.random.default_rng(seed)
    forward = feature_forward(model)
    scores = {}
    for split in ("train", "validation", "test"):
        chosen = [row for row in rows if row.split == split]
        if split == "train" and len(chosen) > train_cells:
            chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), train_cells, False))]
        columns = (
            [root / row.path for row in chosen],
            [row.label for row in chosen],
            [row.patient for row in chosen],
        )
        scores[split] = score_cells(model, *columns, forward=forward)
        if ood_variants and split != "test":
            # Its own seed per split: the i-th training and validation cells must not
            # draw the same changes.
            variant_seed = seed + 1 + ("train", "validation").index(split)
            scores[f"{split}_variants"] = score_cells(
                model, *columns, variant_seed=variant_seed, forward=forward
            )
    return model, scores


def check_model_matches_run(model_path: Path, rows: Sequence[Any], manifest: Path) -> None:
    """Refuse a model trained on another split than the run's manifest.

    Calibrating on "validation" cells the model was trained on, and reporting on
    "test" cells it saw, would give an honest-looking card with leaked figures. The
    model card lists the patients of each of the model's own splits; a model without
    them (trained elsewhere) is taken as it is.
    """
    own = read_model_card(model_path).get("split", {}).get("patients", {})
    if not own:
        return
    split_of = {patient: split for split, patients in own.items() for patient in patients}
    for row in rows:
        model_split = split_of.get(row.patient)
        if model_split is not None and model_split != row.split:
            raise ValueError(
                f"{model_path} was trained on another split than {manifest}: patient "
                f"{row.patient} is {model_split} for the model but {row.split} in the "
                f"manifest. Pass the --run folder the model was trained in."
            )


def _check_splits(rows: Sequence[Any], manifest: Path) -> None:
    """Before any scoring: validation needs both classes and both kinds of patient
    (the threshold and the verdict rule are chosen there); test needs cells to report."""
    by_split: dict[str, list[Any]] = {}
    for row in rows:
        by_split.setdefault(row.split, []).append(row)
    for split in ("validation", "test"):
        if not by_split.get(split):
            raise ValueError(
                f"{manifest} has no {split} cells (splits found: "
                f"{', '.join(sorted(by_split)) or 'none'}). Calibrate the run folder of a "
                f"`malaria train` run, whose manifest has train, validation and test splits."
            )
    validation = by_split["validation"]
    labels = {row.label for row in validation}
    infected = {row.patient for row in validation if row.label == POSITIVE_CLASS}
    healthy = {row.patient for row in validation} - infected
    if len(labels) < 2 or not healthy or not infected:
        raise ValueError(
            f"The validation split of {manifest} needs cells of both classes from both "
            f"infected patients and healthy donors (it has {len(infected)} infected and "
            f"{len(healthy)} healthy patients). Train again with another --seed or on more "
            f"patients, then calibrate that run."
        )


def _check_cells_present(rows: Sequence[Any], root: Path, manifest: Path) -> None:
    """Refuse to fit on part of the validation or test cells (another --data, say)."""
    needed = [row for row in rows if row.split in ("validation", "test")]
    missing = missing_cells(needed, root)
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(needed)} validation and test cells of {manifest} "
            f"are not in {root} (e.g. {missing[0]}): calibration would be fitted and "
            f"reported on part of them. Pass the --data folder the run was trained on."
        )


def _check_calibration_target(model_path: Path, min_specificity: float) -> None:
    """Cheap checks before minutes of scoring: the setting, and where results go."""
    if not (isinstance(min_specificity, float | int) and 0.0 < min_specificity < 1.0):
        raise ValueError(
            f"--min-specificity must be a number between 0 and 1 (exclusive), e.g. 0.97, "
            f"got {min_specificity}."
        )
    if not model_path.is_file():
        raise ValueError(
            f"{model_path} does not exist. Pass --model MODEL.keras, or --run RUN for the "
            f"model.keras of a `malaria train` run folder."
        )
    if not os.access(model_path.parent, os.W_OK | os.X_OK):
        raise ValueError(
            f"{model_path.parent} is not writable; calibrate writes model_card.json and "
            f"ood.json beside the model. Copy the model's folder somewhere you can write."
        )
    if model_path.resolve().parent == DEFAULT_MODEL_DIR.resolve():
        raise ValueError(
            f"{model_path} is the bundled default model; calibrate writes its files beside "
            f"the model and would change every prediction made without --model. Copy the "
            f"folder (cp -r {model_path.parent} my-model) and calibrate the copy."
        )


def _check_run_finished(model_path: Path, run_dir: Path) -> None:
    """Refuse the model of a run that is still training or was interrupted.

    Its ``model.keras`` is only the best epoch so far, it has no model card to extend
    (calibrate would write a card with nothing but the trust layer), and finishing
    the run later rewrites the card without the calibration.
    """
    from malaria_classifier.checkpoints import CHECKPOINT_DIR
    from malaria_classifier.run_folder import is_run_finished

    is_runs_model = model_path.resolve() == (run_dir / MODEL_FILE).resolve()
    if is_runs_model and (run_dir / CHECKPOINT_DIR).is_dir() and not is_run_finished(run_dir):
        raise ValueError(
            f"The run in {run_dir} has not finished (no model_card.json or metrics.json "
            f"yet). Finish it first: malaria train --data DATA --output {run_dir} --resume; "
            f"then calibrate it."
        )


def fit_trust_layer(
    model: Any, scores: dict[str, SplitScores], min_specificity: float
) -> dict[str, Any]:
    """Fit temperature, threshold, Uncertain band, OOD check and verdict rule.

    Only ``scores["train"]`` and ``scores["validation"]`` are used; the "Not a cell"
    check of the rule is the strict one, fitted on the cells as imaged (the
    ``"_variants"`` scores, when present, are for :func:`fit_ood_layer`'s other-labs
    check, fitted separately by :func:`calibrate_model`).
    """
    validation = scores["validation"]
    temperature = fit_temperature(validation.labels, validation.probabilities)
    calibrated = apply_temperature(validation.probabilities, temperature)
    choice = choose_threshold(validation.labels, calibrated, min_specificity)
    margin = choose_uncertain_margin(validation.labels, calibrated, choice.threshold)
    as_imaged = {split: part for split, part in scores.items() if not split.endswith("_variants")}
    ood = fit_ood_layer(model, as_imaged)
    kept = _accepted(ood, model, validation)
    verdict_rule = choose_verdict_rule(
        *_by_patient(validation.patients[kept], calibrated[kept], validation.labels[kept])
    )
    rule = DecisionRule(choice.threshold, temperature, margin, ood)
    return {"rule": rule, "threshold_choice": choice, "verdict_rule": verdict_rule}


def fit_ood_layer(model: Any, scores: dict[str, SplitScores]) -> OodCheck:
    """The "Not a cell" check: feature density on training cells, limits on all fitting cells.

    The density describes the cells the model was trained on, so it uses the
    unchanged training cells only; the limits also cover the other-laboratory
    variants when ``scores`` has them (``score_run_splits(..., ood_variants=True)``).
    ``fitted_on`` says which cells, how many, and which changes they carried.
    """
    train, validation = scores["train"], scores["validation"]
    density = fit_feature_density(train.features, train.labels)

    def signals(split: str) -> np.ndarray | None:
        part = scores.get(split)
        if part is None:
            return None
        return combine_signals(part.statistics, part.features, density, final_layer_weights(model))

    ood = fit_ood_check(
        signals("train"),
        signals("validation"),
        density,
        train_variant_signals=signals("train_variants"),
        validation_variant_signals=signals("validation_variants"),
    )
    ood.fitted_on.update(
        train_cells=len(train.labels),
        validation_cells=len(validation.labels),
        feature_density_fitted_on="training cells as imaged",
        variants=LAB_VARIANTS_SUMMARY if "train_variants" in scores else "none: cells as imaged",
    )
    for split in ("train_variants", "validation_variants"):
        if split in scores:
            ood.fitted_on[f"{split}_cells"] = len(scores[split].labels)
            ood.fitted_on[f"{split}_changes"] = _change_counts(scores[split].variants)
    return ood


def _change_counts(variants: np.ndarray | None) -> dict[str, int]:
    """How many varied cells carried each change ("hue", "smear background", ...)."""
    counts = Counter(
        name
        for variant in (variants if variants is not None else [])
        for name in variant.split(" + ")
    )
    return dict(sorted(counts.items()))


def _accepted(ood: Any, model: Any, scores: SplitScores) -> np.ndarray:
    signals = combine_signals(
        scores.statistics, scores.features, ood.density, final_layer_weights(model)
    )
    return np.array([not reason for reason in ood.reasons(signals)], dtype=bool)


def _by_patient(
    patients: np.ndarray,
    probabilities: np.ndarray,
    labels: np.ndarray,
    usable: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
    """Per patient: the calibrated scores of the usable cells, and whether any cell is
    parasitized.

    With ``usable`` (a mask of cells that passed the "Not a cell" check), every patient
    is listed, also one whose cells were all "Not a cell": that patient gets no usable
    score and so an indeterminate verdict, and still counts among the infected
    patients or healthy donors (else the report reads "0/0 healthy negative").
    """
    names = sorted(set(patients.tolist()))
    usable = np.ones(len(patients), dtype=bool) if usable is None else usable
    return (
        {name: probabilities[(patients == name) & usable] for name in names},
        {name: bool(labels[patients == name].any()) for name in names},
    )


def report_split(
    model: Any, scores: SplitScores, rule: DecisionRule, verdict_rule: VerdictRule
) -> dict[str, Any]:
    """Calibration, operating point, abstention, OOD and verdict figures for one split."""
    calibrated = rule.calibrate(scores.probabilities)
    predicted = calibrated >= rule.threshold
    signals = combine_signals(
        scores.statistics, scores.features, rule.ood.density, final_layer_weights(model)
    )
    reasons = rule.ood.reasons(signals)
    decisions, _ = rule.decide(calibrated, reasons)
    decisions = np.array(decisions)
    kept = decisions != "Not a cell"
    probabilities, infected = _by_patient(scores.patients, calibrated, scores.labels, kept)
    verdicts = {name: verdict_for(p, verdict_rule)[0] for name, p in probabilities.items()}
    clear = np.isin(decisions, ["Parasitized", "Uninfected"])
    return {
        "cells": len(scores.labels),
        "patients": len(set(scores.patients.tolist())),
        "reliability_uncalibrated": reliability_bins(
            scores.labels, scores.probabilities, 0.5
        ).to_dict(),
        "reliability_calibrated": reliability_bins(
            scores.labels, calibrated, rule.threshold
        ).to_dict(),
        "sensitivity": _share_or_none(predicted[scores.labels == 1]),
        "specificity": _share_or_none(~predicted[scores.labels == 0]),
        "uncertain_fraction": float(np.mean(decisions == "Uncertain")),
        "error_rate_all": float(np.mean(predicted != scores.labels)),
        "error_rate_clear_decisions": _share_or_none((predicted != scores.labels)[clear]),
        "not_a_cell_fraction": float(np.mean(~kept)),
        "verdicts": {
            "infected_patients": sum(infected.values()),
            "infected_called_positive": sum(
                verdicts[p] == "positive" for p in verdicts if infected[p]
            ),
            "healthy_donors": sum(not v for v in infected.values()),
            "healthy_called_negative": sum(
                verdicts[p] == "negative" for p in verdicts if not infected[p]
            ),
            "indeterminate": sum(verdict == "indeterminate" for verdict in verdicts.values()),
            "per_patient": verdicts,
        },
    }


def _share_or_none(flags: np.ndarray) -> float | None:
    """The share of True flags; None (JSON null, not NaN) when there are none to count,
    e.g. the sensitivity of a split without parasitized cells."""
    return float(np.mean(flags)) if flags.size else None


def calibrate_model(
    model_path: str | Path,
    run_dir: str | Path,
    data_dir: str | Path,
    min_specificity: float = DEFAULT_MIN_SPECIFICITY,
    ood_variants: bool = True,
) -> dict[str, Any]:
    """Fit the trust layer for ``model_path`` and store it beside the model.

    A model whose serving copy is missing or stale (converted by an older version of
    this package, or before the ``.keras`` file changed) gets a fresh one too, so
    ``malaria predict`` on it starts without TensorFlow again.

    Example:
        >>> calibrate_model("runs/r1/model.keras", "runs/r1", "cell_images")  # doctest: +SKIP

    Args:
        model_path: The ``.keras`` model; its ``model_card.json`` is updated and
            ``ood.json`` (strict "Not a cell" limits) written next to it.
        run_dir: The training run folder (for ``manifest.csv``: which patients are which).
        data_dir: The data folder the manifest's paths are relative to.
        min_specificity: Cell-level specificity the threshold must keep on validation.
        ood_variants: Also fit a second, "other-labs" set of "Not a cell" limits
            (``ood_other_labs.json``) on one other-laboratory variant of each training
            and validation cell as well (about twice the scoring time), which accepts
            smaller, softer, differently stained cells and crops that keep the smear
            background; ``Predictor(not_a_cell="other-labs")`` applies it.

    Returns:
        The updated model card.
    """
    model_path = Path(model_path)
    _check_calibration_target(model_path, min_specificity)
    _check_run_finished(model_path, Path(run_dir))
    model, scores = score_run_splits(
        model_path, Path(run_dir), Path(data_dir), ood_variants=ood_variants
    )
    fitted = fit_trust_layer(model, scores, min_specificity)
    if read_serving_copy(model_path) is None:
        write_serving_copy(model, model_path)
    rule, choice, verdict_rule = fitted["rule"], fitted["threshold_choice"], fitted["verdict_rule"]
    other_labs = fit_ood_layer(model, scores) if ood_variants else None
    # One id in every file of this fit, and the model it was fitted on: a calibrate killed
    # between its writes, or a model trained further, is refused at load time
    # (decision.check_same_fit) instead of mixing fits.
    model_sha256 = sha256_of_file(model_path)
    fit_id = f"{model_sha256[:16]}-{uuid.uuid4().hex[:16]}"
    for check in (rule.ood, other_labs):
        if check is not None:
            check.fitted_on["fit_id"] = fit_id
    card = read_model_card(model_path)
    card["decision_threshold"] = rule.threshold
    card["calibration"] = {
        "method": "temperature scaling of the log-odds log(p1) - log(p0)",
        "temperature": rule.temperature,
        "fitted_on": "validation patients (cells of the manifest's validation split)",
        "operating_point": {
            "target": choice.target,
            "threshold": choice.threshold,
            "validation_sensitivity": choice.sensitivity,
            "validation_specificity": choice.specificity,
        },
        "uncertain_margin_logit": rule.uncertain_margin,
        "uncertain_rule": "Uncertain when |logit(p) - logit(threshold)| < margin: the "
        "smallest band leaving <= 2% errors among the other validation cells, at most 10% "
        "of cells",
        "out_of_distribution_file": OOD_FILE,
        "out_of_distribution_file_other_labs": OOD_OTHER_LABS_FILE if ood_variants else None,
        "fit_id": fit_id,
        "model_sha256": model_sha256,
    }
    card["verdict_rule"] = {
        **verdict_rule.to_dict(),
        "rule": "positive if at least min_suspicious_cells usable cells have calibrated "
        "P(Parasitized) >= cell_threshold; else negative, or indeterminate with fewer "
        "than min_cells usable cells",
        "fitted_on": "validation patients",
    }
    card["calibration_report"] = {
        split: report_split(model, scores[split], rule, verdict_rule)
        for split in ("validation", "test")
    }
    # Everything is computed: the files change one right after the other, card last
    # (it is what says which files belong to the fit).
    save_ood_check(rule.ood, model_path.parent / OOD_FILE)
    other_labs_path = model_path.parent / OOD_OTHER_LABS_FILE
    if other_labs is not None:
        save_ood_check(other_labs, other_labs_path)
    else:
        other_labs_path.unlink(missing_ok=True)  # never leave limits of an older fit
    write_json_atomically(card, card_path_for(model_path))
    return card
