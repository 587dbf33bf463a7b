"""Metrics are exact on hand-checked examples; intervals come from resampling patients."""

import json
import math

import numpy as np
import pytest

from malaria_classifier.evaluation import (
    METRIC_NAMES,
    bootstrap_intervals,
    compute_metrics,
    interval_caveat,
    per_patient_table,
    roc_points,
    summarize,
)

Y_TRUE = np.array([1, 1, 0, 0, 1, 0])
Y_SCORE = np.array([0.9, 0.4, 0.2, 0.6, 0.7, 0.1])


def test_compute_metrics_matches_hand_computed_values():
    metrics = compute_metrics(Y_TRUE, Y_SCORE, threshold=0.5)
    # predictions 1,0,0,1,1,0 -> tp=2, fn=1, fp=1, tn=2
    assert (metrics["tp"], metrics["fn"], metrics["fp"], metrics["tn"]) == (2, 1, 1, 2)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["specificity"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["mcc"] == pytest.approx(1 / 3)
    assert metrics["roc_auc"] == pytest.approx(8 / 9)


def test_threshold_moves_the_decision():
    metrics = compute_metrics(Y_TRUE, Y_SCORE, threshold=0.35)
    assert (metrics["tp"], metrics["fp"]) == (3, 1)


def test_undefined_metrics_are_nan_not_errors():
    metrics = compute_metrics(np.array([0, 0]), np.array([0.1, 0.2]))
    assert math.isnan(metrics["precision"])
    assert math.isnan(metrics["roc_auc"])
    assert metrics["specificity"] == 1.0


def _two_kinds_of_patients():
    """20 patients: 18 classified perfectly, 2 entirely wrong."""
    y_true, y_score, groups = [], [], []
    for patient in range(20):
        wrong = patient < 2
        for cell in range(10):
            label = cell % 2
            y_true.append(label)
            y_score.append(1.0 - label if wrong else float(label))
            groups.append(f"P{patient}")
    return np.array(y_true), np.array(y_score), groups


def test_bootstrap_interval_brackets_the_point_estimate_and_is_reproducible():
    y_true, y_score, groups = _two_kinds_of_patients()
    point = compute_metrics(y_true, y_score)["accuracy"]
    intervals = bootstrap_intervals(y_true, y_score, groups, n_resamples=500, seed=3)
    low, high = intervals["accuracy"]
    assert low < point < high
    assert point == pytest.approx(0.9)
    assert intervals == bootstrap_intervals(y_true, y_score, groups, n_resamples=500, seed=3)
    assert set(intervals) == set(METRIC_NAMES)


def test_bootstrap_resamples_patients_not_cells():
    y_true, y_score, groups = _two_kinds_of_patients()
    by_patient = bootstrap_intervals(y_true, y_score, groups, n_resamples=500)
    # Treating every cell as its own patient hides the between-patient variation.
    by_cell = bootstrap_intervals(
        y_true, y_score, [str(i) for i in range(len(groups))], n_resamples=500
    )
    width = lambda interval: interval[1] - interval[0]  # noqa: E731
    assert width(by_patient["accuracy"]) > 1.5 * width(by_cell["accuracy"])


def test_per_patient_table_counts_each_patient():
    rows = per_patient_table(Y_TRUE, Y_SCORE, ["A", "A", "A", "B", "B", "B"])
    assert [row.patient for row in rows] == ["A", "B"]
    assert (rows[0].cells, rows[0].parasitized_cells, rows[0].predicted_parasitized) == (3, 2, 1)
    assert [row.errors for row in rows] == [1, 1]
    assert rows[0].accuracy == pytest.approx(2 / 3)
    assert rows[1].accuracy == pytest.approx(2 / 3)


def test_summarize_names_split_unit_and_positive_class():
    report = summarize(Y_TRUE, Y_SCORE, ["A", "A", "B", "B", "C", "C"], "test", n_resamples=50)
    assert report["split"] == "test"
    assert report["positive_class"] == "Parasitized"
    assert "cell" in report["unit"] and "patient" in report["unit"]
    assert report["confusion_matrix"]["counts"] == [[2, 1], [1, 2]]
    assert report["patients"] == 3
    assert set(report["metrics"]) == set(METRIC_NAMES)


def test_roc_points_start_at_origin_and_end_at_one():
    roc = roc_points(Y_TRUE, Y_SCORE)
    assert roc["false_positive_rate"][0] == 0.0
    assert roc["true_positive_rate"][-1] == 1.0
    assert all(np.isfinite(roc["thresholds"]))


def test_one_class_gives_null_metrics_with_a_reason_and_no_roc_curve():
    y_true = np.ones(6, dtype=int)  # Parasitized cells only
    y_score = np.array([0.9, 0.8, 0.2, 0.95, 0.7, 0.99])
    block = summarize(y_true, y_score, ["P1", "P1", "P2", "P2", "P3", "P3"], "test", 0.5, 50)
    assert block["metrics"]["recall"]["value"] == pytest.approx(5 / 6)
    assert block["metrics"]["specificity"]["value"] is None
    assert block["metrics"]["roc_auc"]["ci95"] == [None, None]
    assert (
        block["undefined"]["roc_auc"]
        == "all cells are Parasitized; roc_auc needs cells of both classes"
    )
    assert "recall" not in block["undefined"]
    json.dumps(block, allow_nan=False)  # strict JSON: no NaN anywhere
    assert roc_points(y_true, y_score) is None


def test_no_parasitized_call_names_the_reason_for_precision_and_mcc():
    y_true = np.array([1, 1, 0, 0])
    y_score = np.array([0.4, 0.3, 0.2, 0.1])  # both classes, every cell called Uninfected
    block = summarize(y_true, y_score, ["P1", "P2", "C1", "C2"], "test", 0.5, 20)
    assert block["undefined"]["precision"].startswith("no cell was called Parasitized")
    assert block["undefined"]["mcc"].startswith("every cell was called the same label")
    assert block["metrics"]["roc_auc"]["value"] == pytest.approx(1.0)
    assert set(block["undefined"]) == {"precision", "mcc"}


@pytest.mark.parametrize(
    ("y_true", "y_score", "groups", "message"),
    [
        ([1, 2], [0.9, 0.1], ["a", "b"], "y_true must hold 1 for Parasitized"),
        (["Parasitized", "Uninfected"], [0.9, 0.1], ["a", "b"], "got values such as"),
        ([1, 0], [90.0, 10.0], ["a", "b"], "between 0 and 1 for every cell"),
        ([1, 0], [0.9, float("nan")], ["a", "b"], "no NaN"),
        ([1, 0, 1], [0.9, 0.1], ["a", "b"], "of one length"),
        ([1, 0], [0.9, 0.1], ["a"], "one patient per cell: 2 cells"),
        ([1, 0], [0.9, 0.1], "ab", "not be one string"),
        ([], [], [], "at least one cell"),
    ],
)
def test_wrong_labels_scores_or_groups_are_named(y_true, y_score, groups, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_intervals(y_true, y_score, groups)
    with pytest.raises(ValueError, match=message):
        per_patient_table(y_true, y_score, groups)


def test_a_confidence_in_percent_or_no_resamples_is_refused():
    with pytest.raises(ValueError, match="confidence must be between 0 and 1, e.g. 0.95; got 95"):
        bootstrap_intervals([1, 0], [0.9, 0.1], ["a", "b"], confidence=95)
    with pytest.raises(ValueError, match="n_resamples must be a positive integer"):
        bootstrap_intervals([1, 0], [0.9, 0.1], ["a", "b"], n_resamples=0)
    assert compute_metrics([True, False], [0.9, 0.1])["accuracy"] == 1.0  # booleans are fine


def test_intervals_from_few_patients_or_of_zero_width_come_with_a_warning():
    rng = np.random.default_rng(0)
    labels = np.tile([0, 1], 200)
    scores = np.clip(labels * 0.3 + rng.random(400) * 0.7, 0, 1)
    many = summarize(labels, scores, [f"P{i % 40}" for i in range(400)], "test")
    assert interval_caveat(many) is None

    few = summarize(labels, scores, [f"P{i % 3}" for i in range(400)], "test")
    assert "the test split has only 3 patient(s)" in interval_caveat(few)

    perfect = summarize(labels, labels.astype(float), [f"P{i % 40}" for i in range(400)], "test")
    caveat = interval_caveat(perfect)
    assert "accuracy" in caveat and "zero-width intervals" in caveat
    assert "only" not in caveat  # 40 patients: only the zero width is the problem


def test_every_metric_matches_scikit_learn_on_the_same_predictions():
    from sklearn import metrics as sk

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 300)
    scores = np.clip(labels * 0.35 + rng.random(300) * 0.65, 0, 1)
    threshold = 0.549
    called = (scores >= threshold).astype(int)
    block = summarize(labels, scores, [f"P{i % 12}" for i in range(300)], "test", threshold, 20)
    expected = {
        "accuracy": sk.accuracy_score(labels, called),
        "precision": sk.precision_score(labels, called),
        "recall": sk.recall_score(labels, called),
        "specificity": sk.recall_score(labels, called, pos_label=0),
        "f1": sk.f1_score(labels, called),
        "mcc": sk.matthews_corrcoef(labels, called),
        "roc_auc": sk.roc_auc_score(labels, scores),
    }
    for name, value in expected.items():
        assert block["metrics"][name]["value"] == pytest.approx(value, abs=1e-12), name
    counts = sk.confusion_matrix(labels, called, labels=[0, 1]).tolist()
    assert block["confusion_matrix"]["counts"] == counts


def _patients_of_one_class_now_and_then():
    """One infected patient among healthy donors: some resamples draw no infected one."""
    y_true = [1, 1, 0, 0] + [0] * 8
    y_score = [0.9, 0.3, 0.2, 0.6] + [0.1, 0.7, 0.2, 0.3, 0.1, 0.4, 0.2, 0.8]
    groups = ["P1"] * 4 + ["C1", "C1", "C2", "C2", "C3", "C3", "C4", "C4"]
    return np.array(y_true), np.array(y_score), groups


def test_resamples_are_whole_patients_and_match_a_plain_loop_with_scikit_learn():
    """Each resample draws patients with replacement and takes all their cells."""
    from sklearn import metrics as sk

    y_true, y_score, groups = _patients_of_one_class_now_and_then()
    intervals = bootstrap_intervals(y_true, y_score, groups, 0.5, n_resamples=200, seed=4)
    names = np.unique(groups)
    draws = np.random.default_rng(4).integers(0, len(names), size=(200, len(names)))
    aucs, accuracies = [], []
    for drawn in draws:
        cells = np.concatenate([np.flatnonzero(np.array(groups) == names[i]) for i in drawn])
        accuracies.append(sk.accuracy_score(y_true[cells], y_score[cells] >= 0.5))
        if len(set(y_true[cells])) == 2:
            aucs.append(sk.roc_auc_score(y_true[cells], y_score[cells]))
    assert intervals["accuracy"] == pytest.approx(tuple(np.quantile(accuracies, [0.025, 0.975])))
    assert intervals["roc_auc"] == pytest.approx(tuple(np.quantile(aucs, [0.025, 0.975])))


def test_resamples_without_a_value_are_counted_and_named_with_the_seed():
    y_true, y_score, groups = _patients_of_one_class_now_and_then()
    block = summarize(y_true, y_score, groups, "test", 0.5, n_resamples=200)
    names = np.unique(groups)
    draws = np.random.default_rng(0).integers(0, len(names), size=(200, len(names)))
    with_infected = int((draws == list(names).index("P1")).any(axis=1).sum())
    assert 0 < with_infected < 200
    bootstrap = block["bootstrap"]
    assert bootstrap["seed"] == 0 and bootstrap["confidence"] == 0.95
    assert bootstrap["usable_resamples"]["roc_auc"] == with_infected
    assert bootstrap["usable_resamples"]["recall"] == with_infected
    assert bootstrap["usable_resamples"]["accuracy"] == 200
    caveat = interval_caveat(block)
    assert f"recall, mcc, roc_auc: interval from {with_infected} of 200 resamples" in caveat
    assert block["caveat"] == caveat
    assert summarize(y_true, y_score, groups, "test", 0.5, 200) == block  # same seed, same figures


def test_one_patient_gives_no_interval_rather_than_a_zero_width_one():
    block = summarize(Y_TRUE, Y_SCORE, ["P4"] * 6, "test", 0.5, n_resamples=50)
    assert all(values["ci95"] == [None, None] for values in block["metrics"].values())
    assert block["metrics"]["accuracy"]["value"] == pytest.approx(4 / 6)
    assert block["bootstrap"]["usable_resamples"]["accuracy"] == 0
    caveat = interval_caveat(block)
    assert caveat.startswith("the test split has 1 patient: a bootstrap over patients")
    assert "no interval is given" in caveat
    json.dumps(block, allow_nan=False)
    assert all(
        math.isnan(bound) for bound in bootstrap_intervals(Y_TRUE, Y_SCORE, ["P4"] * 6)["f1"]
    )


def test_groups_that_are_field_images_not_patients_are_named_as_such():
    groups = ["field:lab2_a", "field:lab2_a", "field:lab2_b", "field:lab2_b", "P7", "P7"]
    block = summarize(Y_TRUE, Y_SCORE, groups, "test", 0.5, n_resamples=20)
    assert block["source_field_images"] == 2
    assert (
        "source field image" in block["unit"] and "source field image" in block["bootstrap"]["unit"]
    )
    caveat = interval_caveat(block)
    assert "2 of the 3 patients are source field images" in caveat
    assert "ids starting 'field:'" in caveat and "C<slide>P<patient>_" in caveat
    nih = summarize(Y_TRUE, Y_SCORE, ["P1", "P1", "P2", "P2", "C3", "C3"], "test", 0.5, 20)
    assert nih["source_field_images"] == 0 and nih["bootstrap"]["unit"] == "patient"


def test_per_patient_rows_name_their_split_and_threshold():
    rows = per_patient_table(Y_TRUE, Y_SCORE, ["A", "A", "A", "B", "B", "B"], 0.35, split="test")
    assert {(row.split, row.threshold) for row in rows} == {("test", 0.35)}
    assert rows[0].predicted_parasitized == 2  # 0.9 and 0.4 reach 0.35


def test_precision_without_a_parasitized_call_says_so_even_with_one_class():
    # All cells Parasitized, none called so: precision lacks a call, not a second class.
    block = summarize(np.ones(4, dtype=int), np.full(4, 0.2), ["P1", "P1", "P2", "P2"], "test")
    assert block["undefined"]["precision"].startswith("no cell was called Parasitized")
    assert block["undefined"]["specificity"] == (
        "all cells are Parasitized; specificity needs cells of both classes"
    )
