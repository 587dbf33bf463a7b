"""Cross-validation: patient-grouped stratified folds, per-fold runs, resume, summary."""

import csv
import json
import math
import re
import shutil
from collections import defaultdict

import numpy as np
import pytest
from _synthetic import draw_cell, write_synthetic_dataset
from typer.testing import CliRunner

from malaria_classifier.cli import app
from malaria_classifier.config import TrainingConfig
from malaria_classifier.cv import (
    CrossValidationResult,
    cross_validate,
    fold_dir,
    format_table,
    most_errors,
    summarize_folds,
    write_results,
)
from malaria_classifier.cv_plan import plan_folds
from malaria_classifier.data import check_dataset
from malaria_classifier.evaluation import METRIC_NAMES
from malaria_classifier.splits import (
    assign_folds,
    check_no_leakage,
    fold_manifest,
    read_manifest,
)

TINY = TrainingConfig(
    image_size=16,
    base_filters=4,
    conv_blocks=2,
    dense_units=8,
    batch_size=16,
    epochs=1,
    validation_fraction=0.25,
    augment=False,
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    # 12 patients: 9 infected (6 parasitized + 6 uninfected cells each), 3 healthy donors.
    root = write_synthetic_dataset(
        tmp_path_factory.mktemp("data") / "cells", patients=12, cells_per_class=6, size=20
    )
    return check_dataset(root, progress=False)


def test_folds_keep_patients_whole_and_balance_infected_and_healthy(report):
    folds = assign_folds(report.records, report.hashes, folds=3, seed=1)
    fold_of_patient = defaultdict(set)
    for record, fold in zip(report.records, folds, strict=True):
        fold_of_patient[record.patient].add(fold)
    assert all(len(found) == 1 for found in fold_of_patient.values())
    parasitized = [
        sum(r.label == "Parasitized" for r, f in zip(report.records, folds, strict=True) if f == k)
        for k in range(3)
    ]
    assert parasitized == [18, 18, 18]  # 3 infected patients x 6 cells in every fold
    healthy = {"C910", "C911", "C912"}
    healthy_per_fold = [
        len({r.patient for r, f in zip(report.records, folds, strict=True) if f == k} & healthy)
        for k in range(3)
    ]
    assert healthy_per_fold == [1, 1, 1]
    assert assign_folds(report.records, report.hashes, folds=3, seed=1) == folds


def test_fold_manifest_tests_the_fold_and_splits_the_rest(report):
    folds = assign_folds(report.records, report.hashes, folds=3, seed=1)
    rows = fold_manifest(report.records, report.hashes, folds, 2, report.root, 0.25, seed=1)
    check_no_leakage(rows)
    test_patients = {r.patient for r, f in zip(report.records, folds, strict=True) if f == 2}
    assert {row.patient for row in rows if row.split == "test"} == test_patients
    assert {row.split for row in rows} == {"train", "validation", "test"}
    assert len(rows) == len(report.records)


@pytest.mark.parametrize(
    ("folds", "message"),
    [(1, "folds must be an integer of at least 2"), (13, "13 folds need at least 13 patient")],
)
def test_impossible_fold_counts_are_refused(report, folds, message):
    with pytest.raises(ValueError, match=message):
        assign_folds(report.records, report.hashes, folds=folds)


def test_summary_is_mean_and_sample_sd():
    rows = [dict.fromkeys(METRIC_NAMES, value) for value in (0.9, 0.95, 1.0)]
    mean, sd = summarize_folds(rows)
    assert mean["accuracy"] == pytest.approx(0.95)
    assert sd["roc_auc"] == pytest.approx(0.05)


def test_cross_validation_runs_every_fold_resumes_and_summarizes(report, tmp_path):
    run_dir = tmp_path / "cv"
    result = cross_validate(report.root, TINY, run_dir, folds=2, verbose=0, progress=False)
    assert [row["fold"] for row in result.folds] == [1, 2]
    assert sum(row["cells"] for row in result.folds) == len(report.records)
    for name in METRIC_NAMES:
        values = [row[name] for row in result.folds]
        assert result.mean[name] == pytest.approx(_mean_of_defined(values), nan_ok=True)
    assert json.loads((run_dir / "data_report.json").read_text())["counts"] == report.counts
    with open(run_dir / "cv_results.csv", newline="") as handle:
        lines = list(csv.reader(handle))
    assert [line[0] for line in lines] == ["fold", "1", "2", "mean", "sd"]
    saved = json.loads((run_dir / "cv_results.json").read_text())
    assert saved["mean"]["accuracy"] == pytest.approx(result.mean["accuracy"])

    # Per patient, out of fold: every patient once, in the fold that tested it.
    with open(run_dir / "cv_per_patient.csv", newline="") as handle:
        patients = list(csv.DictReader(handle))
    assert sorted(row["patient"] for row in patients) == sorted(
        {record.patient for record in report.records}
    )
    for fold in (1, 2):
        rows = [row for row in patients if row["fold"] == str(fold)]
        assert sum(int(row["cells"]) for row in rows) == result.folds[fold - 1]["cells"]
        wrong = sum(int(row["errors"]) for row in rows)  # read back from the CSV: text
        assert 1 - wrong / result.folds[fold - 1]["cells"] == pytest.approx(
            result.folds[fold - 1]["accuracy"]
        )
    assert result.folds_without_patient_table == []

    # Resume: finished folds are not retrained; a fold without metrics is completed.
    finished_model = fold_dir(run_dir, 0) / "model.keras"
    stamp = finished_model.stat().st_mtime_ns
    (fold_dir(run_dir, 1) / "metrics.json").unlink()
    again = cross_validate(report.root, TINY, run_dir, folds=2, verbose=0, progress=False)
    assert finished_model.stat().st_mtime_ns == stamp
    assert (fold_dir(run_dir, 1) / "metrics.json").is_file()
    assert again.folds[0] == result.folds[0]

    other_settings = (
        f"{run_dir} holds a cross-validation with other settings (2 folds; recipe in "
        f"{run_dir / 'config.yaml'}). Resume it with the same --folds and --config"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(other_settings)}"):
        cross_validate(report.root, TINY, run_dir, folds=3, verbose=0, progress=False)

    # The command prints the table of a finished cross-validation without training.
    arguments = ["cv", "--data", report.root, "--folds", 2, "--output", run_dir]
    output = CliRunner().invoke(
        app, [str(value) for value in [*arguments, "--config", run_dir / "config.yaml"]]
    )
    assert output.exit_code == 0, output.output
    assert "finished earlier" in output.output
    assert "mean" in output.output and "roc_auc" in output.output
    assert "cv_per_patient.csv" in output.output

    # A fold trained by an older version has no table: said, and the rest still listed.
    (fold_dir(run_dir, 1) / "evaluation" / "per_patient.csv").unlink()
    older = cross_validate(report.root, TINY, run_dir, folds=2, verbose=0, progress=False)
    assert older.folds_without_patient_table == [2]
    assert {row["fold"] for row in older.patients} == {1}
    assert "Folds without a per-patient table (trained by an older version): 2" in format_table(
        older
    )

    # A table without the errors column (an older `malaria evaluate`'s) still counts.
    table = fold_dir(run_dir, 0) / "evaluation" / "per_patient.csv"
    with open(table, newline="") as handle:
        full = list(csv.DictReader(handle))
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[name for name in full[0] if name != "errors"])
        writer.writeheader()
        writer.writerows({n: v for n, v in row.items() if n != "errors"} for row in full)
    oldest = cross_validate(report.root, TINY, run_dir, folds=2, verbose=0, progress=False)
    assert [row["errors"] for row in oldest.patients] == [int(row["errors"]) for row in full]


def test_most_errors_names_the_worst_patients_with_their_fold():
    patients = [
        {"fold": 1, "patient": "P1", "cells": 50, "errors": 2},
        {"fold": 2, "patient": "P77", "cells": 482, "errors": 107},
        {"fold": 2, "patient": "P9", "cells": 391, "errors": 22},
        {"fold": 3, "patient": "C5", "cells": 40, "errors": 0},
    ]
    assert most_errors(patients, count=2) == (
        "P77 (fold 2): 107 of 482 cells, P9 (fold 2): 22 of 391 cells"
    )
    assert most_errors(patients, count=9).count("(fold") == 3  # no patient without errors


def test_each_fold_leaves_out_only_its_own_listed_training_cells(report, tmp_path):
    """Nested lists: fold k's list (flags from models that never saw fold k) is fold k's alone."""
    fold_of_record = assign_folds(report.records, report.hashes, 2, TINY.seed)
    manifests = [
        fold_manifest(
            report.records, report.hashes, fold_of_record, fold, report.root, 0.25, TINY.seed
        )
        for fold in (0, 1)
    ]
    train_rows = [[row for row in rows if row.split == "train"] for rows in manifests]
    own_test_cell = next(row for row in manifests[0] if row.split == "test")
    # Fold 1's list: one of its training cells (by hash) and one of its own test cells
    # (by path), which must stay in; fold 2's list: two of its training cells.
    listed = {
        1: {train_rows[0][0].sha256, own_test_cell.path},
        2: {train_rows[1][0].path, train_rows[1][1].sha256},
    }
    run_dir = tmp_path / "cv"
    cross_validate(
        report.root, TINY, run_dir, folds=2, verbose=0, progress=False, exclude_cells=listed
    )

    for fold, expected in ((0, train_rows[0][:1]), (1, train_rows[1][:2])):
        assert read_manifest(fold_dir(run_dir, fold) / "manifest.csv") == manifests[fold]
        assert read_manifest(fold_dir(run_dir, fold) / "left_out_of_training.csv") == expected

    with pytest.raises(ValueError, match="another --exclude-cells list"):
        cross_validate(report.root, TINY, run_dir, folds=2, verbose=0, progress=False)
    with pytest.raises(ValueError, match=r"names fold\(s\) \[3\], but there are only 2 folds"):
        cross_validate(
            report.root, TINY, tmp_path / "other", folds=2, verbose=0, exclude_cells={3: {"x"}}
        )


def test_train_refuses_a_list_made_per_fold(report, tmp_path):
    listed = tmp_path / "flags.csv"
    listed.write_text("fold,sha256\n1,abc\n", encoding="utf-8")
    arguments = ["train", "--data", report.root, "--output", tmp_path / "run"]
    output = CliRunner().invoke(
        app, [str(value) for value in [*arguments, "--exclude-cells", listed]]
    )
    assert output.exit_code != 0
    assert "gives cells per cross-validation fold (column fold)" in output.output
    assert "Traceback" not in output.output
    assert not (tmp_path / "run").exists()


def test_fewer_than_two_folds_is_refused_before_anything_is_written(report, tmp_path):
    run_dir = tmp_path / "cv"
    with pytest.raises(ValueError, match="--folds must be an integer of at least 2, got 1"):
        cross_validate(report.root, TINY, run_dir, folds=1, verbose=0, progress=False)
    assert not run_dir.exists()


def test_undefined_fold_figures_are_null_in_strict_json(tmp_path):
    folds = [
        {"fold": 1, "patients": 3, "cells": 9, **dict.fromkeys(METRIC_NAMES, 0.9)},
        {"fold": 2, "patients": 3, "cells": 9, **dict.fromkeys(METRIC_NAMES, 0.8)},
    ]
    folds[1]["precision"] = math.nan  # no cell called Parasitized in fold 2
    mean, sd = summarize_folds(folds)
    write_results(CrossValidationResult(tmp_path, folds, mean, sd, 1.0))

    text = (tmp_path / "cv_results.json").read_text()
    saved = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert saved["folds"][1]["precision"] is None
    # Mean over the one fold with a value; no sd from one fold.
    assert saved["mean"]["precision"] == pytest.approx(0.9) and saved["sd"]["precision"] is None
    assert saved["mean"]["accuracy"] == pytest.approx(0.85)


def _mean_of_defined(values):
    defined = [value for value in values if not math.isnan(value)]
    return float(np.mean(defined)) if defined else math.nan


class _TrainingStartedError(Exception):
    """Raised by a stand-in for train_model: every check before training has passed."""


@pytest.fixture
def no_training(monkeypatch):
    """Replace each fold's training with a record of the call, then stop."""
    calls = []

    def fake_train_model(data_dir, config, run_dir, **options):
        calls.append({"run_dir": run_dir, **options})
        raise _TrainingStartedError

    monkeypatch.setattr("malaria_classifier.cv.train_model", fake_train_model)
    return calls


@pytest.fixture(scope="module")
def few_infected(tmp_path_factory):
    """Two infected patients (P1, P2) and four healthy donors: fewer infected than 5 folds."""
    root = write_synthetic_dataset(
        tmp_path_factory.mktemp("few") / "cells", patients=3, cells_per_class=4, size=20
    )
    rng = np.random.default_rng(5)
    for donor in (905, 906, 907):
        for cell in range(4):
            name = f"C{donor}NThinF_IMG_2015_{donor}_cell_{cell}.png"
            draw_cell(20, False, rng).save(root / "Uninfected" / name)
    return check_dataset(root, progress=False)


def test_with_fewer_infected_patients_than_folds_every_fold_is_tested_and_trainable(
    few_infected, tmp_path, no_training
):
    assert few_infected.patients["with_parasitized_cells"] == 2
    assert few_infected.patients["total"] == 6

    manifests = plan_folds(few_infected, 5, range(5), TINY)

    tested = [{row.patient for row in manifests[fold] if row.split == "test"} for fold in range(5)]
    assert all(tested)  # no empty fold: each fold_<k> tests somebody
    assert sorted(patient for patients in tested for patient in patients) == sorted(
        {record.patient for record in few_infected.records}
    )
    for rows in manifests.values():
        check_no_leakage(rows)
        assert {row.split for row in rows} == {"train", "validation", "test"}
        assert {row.label for row in rows if row.split == "train"} == {"Parasitized", "Uninfected"}

    # The cross-validation passes every check and starts fold 1 with that manifest.
    with pytest.raises(_TrainingStartedError):
        cross_validate(few_infected.root, TINY, tmp_path / "cv", folds=5, progress=False)
    assert no_training[0]["manifest"] == manifests[0]


def test_all_folds_are_checked_before_the_first_trains(report, tmp_path, no_training):
    """Fold 3's list leaves no parasitized training cell: refused before fold 1 trains."""
    parasitized = {
        record.path.relative_to(report.root).as_posix()
        for record in report.records
        if record.label == "Parasitized"
    }
    run_dir = tmp_path / "cv"
    with pytest.raises(
        ValueError,
        match="Fold 3 of 3: the cell list leaves no Parasitized cell in its training split",
    ):
        cross_validate(
            report.root, TINY, run_dir, folds=3, progress=False, exclude_cells={3: parasitized}
        )
    assert no_training == []
    assert not run_dir.exists()


def test_a_refused_cv_writes_nothing_and_the_right_settings_then_start(
    report, tmp_path, no_training
):
    run_dir = tmp_path / "cv"
    with pytest.raises(ValueError, match="13 folds need at least 13 patient groups, but only 12"):
        cross_validate(report.root, TINY, run_dir, folds=13, progress=False)
    with pytest.raises(ValueError, match=r"Data folder .*nowhere does not exist"):
        cross_validate(tmp_path / "nowhere", TINY, run_dir, folds=2, progress=False)
    assert not run_dir.exists()  # no cv_plan.json or config.yaml to refuse the next call

    with pytest.raises(_TrainingStartedError):
        cross_validate(report.root, TINY, run_dir, folds=2, progress=False)

    assert no_training[0]["run_dir"] == fold_dir(run_dir, 0)
    assert {row.split for row in no_training[0]["manifest"]} == {"train", "validation", "test"}
    plan = json.loads((run_dir / "cv_plan.json").read_text())
    assert plan["folds"] == 2 and plan["data_sha256"] == report.fingerprint()
    assert (run_dir / "config.yaml").is_file()
    saved_report = json.loads((run_dir / "data_report.json").read_text())
    assert saved_report == json.loads(json.dumps(report.to_dict()))
    assert not (fold_dir(run_dir, 0) / "data_report.json").exists()  # once, not per fold


def test_resuming_on_other_data_is_refused(report, tmp_path, no_training):
    run_dir = tmp_path / "cv"
    with pytest.raises(_TrainingStartedError):
        cross_validate(report.root, TINY, run_dir, folds=2, progress=False)
    moved = shutil.copytree(report.root, tmp_path / "moved" / "cells")
    other = shutil.copytree(report.root, tmp_path / "other" / "cells")
    next((other / "Uninfected").iterdir()).unlink()

    with pytest.raises(ValueError, match="holds a cross-validation of other data") as refused:
        cross_validate(other, TINY, run_dir, folds=2, progress=False)
    assert str(run_dir) in str(refused.value)
    assert "Resume it with the --data folder it started with" in str(refused.value)

    # The same cells elsewhere are the same data; a plan from before fingerprints passes.
    with pytest.raises(_TrainingStartedError):
        cross_validate(moved, TINY, run_dir, folds=2, progress=False)
    plan = json.loads((run_dir / "cv_plan.json").read_text())
    del plan["data_sha256"]
    (run_dir / "cv_plan.json").write_text(json.dumps(plan))
    with pytest.raises(_TrainingStartedError):
        cross_validate(other, TINY, run_dir, folds=2, progress=False)
    assert len(no_training) == 3


def test_a_metric_undefined_in_a_fold_is_averaged_over_the_others(tmp_path):
    folds = [
        {"fold": k, "patients": 3, "cells": 9, **dict.fromkeys(METRIC_NAMES, value)}
        for k, value in ((1, 0.9), (2, 0.8), (3, 0.7))
    ]
    folds[1]["precision"] = math.nan  # no cell called Parasitized in fold 2
    for row in folds:
        row["roc_auc"] = math.nan  # e.g. no infected test patient anywhere
    folds[2]["recall"] = math.nan
    folds[0]["recall"] = math.nan

    mean, sd = summarize_folds(folds)

    assert mean["precision"] == pytest.approx(0.8) and sd["precision"] == pytest.approx(0.1414214)
    assert mean["recall"] == pytest.approx(0.8) and math.isnan(sd["recall"])
    assert math.isnan(mean["roc_auc"]) and math.isnan(sd["roc_auc"])
    assert mean["accuracy"] == pytest.approx(0.8) and sd["accuracy"] == pytest.approx(0.1)
    result = CrossValidationResult(tmp_path, folds, mean, sd, 1.0)
    write_results(result)
    saved = json.loads((tmp_path / "cv_results.json").read_text())
    assert saved["folds_defined"]["precision"] == 2 and saved["folds_defined"]["accuracy"] == 3
    assert saved["folds_defined"]["roc_auc"] == 0
    assert (
        "Means over the folds where a metric is defined: precision 2 of 3 (undefined in fold 2); "
        "recall 1 of 3 (undefined in fold 1, 3); roc_auc 0 of 3 (undefined in fold 1, 2, 3)"
    ) in format_table(result)
