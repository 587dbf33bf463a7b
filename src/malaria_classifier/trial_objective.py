"""The objective of a tuning trial: train its recipe, score it on validation patients.

A trial trains on the training patients of the usual split and is scored by its best
validation-patient ROC AUC over the epochs (test patients are never loaded), averaged
over ``seeds_per_trial`` training seeds; the first seed's epochs are reported to
Optuna's pruner, which may stop the trial early.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import keras

from malaria_classifier.config import TrainingConfig
from malaria_classifier.model import build_model, compile_model
from malaria_classifier.splits import ManifestRow
from malaria_classifier.study_storage import SEED_VALUES
from malaria_classifier.training import cosine_learning_rate, make_split_datasets


class BestValidationAuc(keras.callbacks.Callback):
    """Keep the best validation AUC over the epochs."""

    def __init__(self) -> None:
        super().__init__()
        self.best = -math.inf
        self.last = math.nan

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        self.last = float((logs or {}).get("val_auc", math.nan))
        if math.isfinite(self.last):
            self.best = max(self.best, self.last)


class ReportToTrial(BestValidationAuc):
    """Also report validation AUC to Optuna after each epoch; stop the trial if pruned."""

    def __init__(self, trial: Any) -> None:
        super().__init__()
        self.trial = trial

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        import optuna

        super().on_epoch_end(epoch, logs)
        self.trial.report(self.last, step=epoch + 1)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"validation AUC {self.last:.4f} at epoch {epoch + 1}")


def seed_configs(config: TrainingConfig, seeds: int) -> list[TrainingConfig]:
    """The recipe once per training seed: the config's own, then the next ``seeds - 1``.

    Only weights, shuffling and augmentation change (``training_seed``); the split
    stays the one of ``config.seed``, so every run is scored on the same patients.
    """
    first = config.randomness_seed
    return [config] + [config.replace(training_seed=first + k) for k in range(1, seeds)]


def score_trial(
    config: TrainingConfig, root: Path, rows: list[ManifestRow], trial: Any, seeds: int = 1
) -> float:
    """Train a trial's recipe with ``seeds`` training seeds; return the mean best AUC.

    One training cannot tell recipes apart whose difference is smaller than the
    spread between seeds (docs/benchmarks.md 9.2 and 9.9: 0.002-0.005 AUC on the
    same patients), so the objective can average several. The first seed's epochs are
    reported to the pruner; a trial it prunes trains no further seeds. Each seed's
    best AUC is kept in the trial's ``validation_auc_by_seed`` attribute.
    """
    values: list[float] = []
    for index, seed_config in enumerate(seed_configs(config, seeds)):
        values.append(train_trial(seed_config, root, rows, trial, report=index == 0))
        trial.set_user_attr(SEED_VALUES, values)
    return sum(values) / len(values)


def train_trial(
    config: TrainingConfig, root: Path, rows: list[ManifestRow], trial: Any, report: bool = True
) -> float:
    """Train one trial's recipe; return its best validation AUC (test never loaded).

    With ``report`` False the epochs are not reported to Optuna (a trial reports each
    epoch once), so this training cannot be pruned.
    """
    keras.utils.set_random_seed(config.randomness_seed)
    datasets = make_split_datasets(root, rows, config)
    model = compile_model(
        build_model(config), config.learning_rate, config.label_smoothing, config.loss_drop_fraction
    )
    reporter = ReportToTrial(trial) if report else BestValidationAuc()
    try:
        model.fit(
            datasets["train"],
            validation_data=datasets["validation"],
            epochs=config.epochs,
            shuffle=False,
            callbacks=[
                keras.callbacks.LearningRateScheduler(cosine_learning_rate(config)),
                keras.callbacks.EarlyStopping(
                    "val_auc", mode="max", patience=config.early_stopping_patience
                ),
                reporter,
            ],
            verbose=0,
        )
    finally:
        # Free the graph and weights even when the trial is pruned (an exception).
        keras.backend.clear_session()
    return reporter.best
