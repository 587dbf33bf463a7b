"""Where a tuning study lives and what it records, so a search can be resumed safely.

The study is kept in an SQL database (SQLite in the output folder by default,
:func:`sqlite_url`) with heartbeats, so a killed trial is retried
(:func:`open_study`). It records what its trials are scored on: training seeds per
trial, the settings not searched, and the data's fingerprint; a resumed session is
refused when any of them differ, since its trials could not be compared.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from malaria_classifier.config import TrainingConfig
from malaria_classifier.data import DatasetReport
from malaria_classifier.search_space import SearchSpace

SEED_VALUES = "validation_auc_by_seed"  # trial attribute: each seed's best AUC
SEEDS_PER_TRIAL = "seeds_per_trial"  # study attribute: the seeds every trial is scored on
# Study attribute: the settings not searched and the epoch budget, as the study began.
FIXED_SETTINGS = "fixed_settings"
# Study attribute: which images (relative path and content) the study's trials use.
DATA_FINGERPRINT = "data_fingerprint"
STUDY_FILE = "study.db"  # the default SQLite storage, in the output folder


def check_seeds_per_trial(study: Any, seeds_per_trial: int) -> None:
    """Record the study's seeds per trial, or refuse to mix objectives in one study."""
    recorded = study.user_attrs.get(SEEDS_PER_TRIAL)
    if recorded is None:
        if study.get_trials(deepcopy=False):  # a study from before the setting: one seed
            recorded = 1
        else:
            study.set_user_attr(SEEDS_PER_TRIAL, seeds_per_trial)
            return
    if recorded != seeds_per_trial:
        raise ValueError(
            f"Study {study.study_name!r} scores each trial on {recorded} training seed(s), "
            f"not {seeds_per_trial}: their values cannot be compared. Pass "
            f"--seeds-per-trial {recorded} to continue it, or a new --study-name or --output."
        )


def check_fixed_settings(study: Any, base: TrainingConfig, space: SearchSpace) -> None:
    """Record what the study holds fixed, or refuse to resume it with other settings.

    Trials run on another split seed, other split shares or another epoch budget score
    other patients or another search, so one study must not mix them.
    """
    fixed = {"config": base.to_dict(), "max_epochs": space.max_epochs}
    recorded = study.user_attrs.get(FIXED_SETTINGS)
    if recorded is None:  # a new study (or one from before the record was kept)
        study.set_user_attr(FIXED_SETTINGS, fixed)
        return
    if recorded == fixed:
        return
    changed = sorted(
        name
        for name in set(recorded["config"]) | set(fixed["config"])
        if recorded["config"].get(name) != fixed["config"].get(name)
    )
    if recorded["max_epochs"] != fixed["max_epochs"]:
        changed.append(f"--max-epochs (was {recorded['max_epochs']})")
    raise ValueError(
        f"Study {study.study_name!r} was started with other fixed settings "
        f"({', '.join(changed)}); its trials could not be compared with new ones. Resume it "
        f"with the --config and --max-epochs it started with, or pass a new --study-name "
        f"or --output."
    )


def check_data_fingerprint(study: Any, report: DatasetReport, data_dir: str | Path) -> None:
    """Record the data a study's trials use, or refuse to resume it on other data.

    Trials scored on other images score other patients, so their values cannot be
    compared. A study without trials (new, or whose first start was refused) and one
    from before the record was kept record the data they now get.
    """
    current = {
        "sha256": report.fingerprint(),
        "images": len(report.records),
        "folder": str(report.root),
    }
    recorded = study.user_attrs.get(DATA_FINGERPRINT)
    if recorded is None or not study.get_trials(deepcopy=False):
        study.set_user_attr(DATA_FINGERPRINT, current)
        return
    if recorded["sha256"] == current["sha256"]:
        return
    raise ValueError(
        f"Study {study.study_name!r} was scored on other data: its trials used the "
        f"{recorded['images']} images of {recorded['folder']} as they were then, and "
        f"--data {data_dir} ({current['images']} images) differs from them, so new trials "
        f"would score other patients. Pass the --data it started with to continue it, "
        f"or a new --study-name or --output for a study on these data."
    )


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of the SQLite database file ``path``, whatever its characters.

    Pasted into ``sqlite:///...`` as they are, a ``?`` would start URL options, ``#``
    is a fragment and ``%20`` is decoded to a space, so the study would be kept
    elsewhere or not opened; SQLAlchemy escapes them and decodes them back.
    """
    from sqlalchemy.engine import URL

    return URL.create("sqlite", database=str(path)).render_as_string(hide_password=False)


def open_study(storage: str, study_name: str, seed: int) -> Any:
    """Create or load the study: TPE sampler, median pruner, heartbeats in the database.

    A trial whose process was killed stops beating; after the grace period the next
    session marks it failed and queues its parameters again, so nothing is lost but
    the killed trial's partial epochs.

    The sampler is seeded with ``seed`` plus the number of trials the study already
    holds: a new study draws exactly what ``seed`` alone gives, and a resumed one
    does not replay the first session's random start-up parameters.
    """
    import optuna
    import sqlalchemy.exc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        # Heartbeats have been "experimental" since Optuna 2.8; the warning is noise.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            rdb = optuna.storages.RDBStorage(
                storage,
                heartbeat_interval=60,
                grace_period=180,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=1
                ),
            )
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as error:
            reason = str(error).splitlines()[0]
            raise ValueError(
                f"--storage {storage!r} could not be opened ({reason}). Give a database URL "
                f"such as sqlite:///runs/tune/study.db whose folder exists, or leave "
                f"--storage out to keep the study in the --output folder."
            ) from None
    study = optuna.create_study(
        storage=rdb,
        study_name=study_name,
        direction="maximize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2),
        load_if_exists=True,
    )
    earlier = len(study.get_trials(deepcopy=False))
    # NumPy seeds are below 2**32 (a config's seed may be 2**32 - 1).
    study.sampler = optuna.samplers.TPESampler(seed=(seed + earlier) % 2**32, n_startup_trials=5)
    return study


def count_finished_trials(study: Any) -> int:
    """Trials that count towards ``--trials``: completed or pruned (not failed)."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def best_trial_or_none(study: Any) -> Any:
    """The study's best completed trial; None before any has completed."""
    try:
        return study.best_trial
    except ValueError:  # no completed trial yet
        return None
