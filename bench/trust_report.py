"""Calibration, operating point, abstention, Not-a-cell check and verdicts, on test patients.

    python bench/trust_report.py --run ../main/runs/default --data ../shared/data/nih-cell-images

Uses the trust layer *as shipped* with the bundled model, or with ``--model`` (model card
+ ood.json, fitted by `malaria calibrate` on validation patients; pass ``--figure`` then,
so docs/images is left alone) and measures it on the run's test
patients, plus a programmatic non-cell set (tests/_noncells.py, seed 1: never used for
fitting or design). 95% CIs: bootstrap over patients (cells) or Wilson (images).
Also times Predictor.predict_paths with the check off, on (default) and with views.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from _noncells import make_non_cells  # noqa: E402

from malaria_classifier.calibration import reliability_bins  # noqa: E402
from malaria_classifier.data import find_class_root  # noqa: E402
from malaria_classifier.decision import load_decision_rule  # noqa: E402
from malaria_classifier.evaluation import bootstrap_intervals  # noqa: E402
from malaria_classifier.images import load_rgb_image, resize_with_pad  # noqa: E402
from malaria_classifier.model_card import default_model_path, read_model_card  # noqa: E402
from malaria_classifier.ood import combine_signals, final_layer_weights  # noqa: E402
from malaria_classifier.plots import reliability_diagram  # noqa: E402
from malaria_classifier.prediction import Predictor  # noqa: E402
from malaria_classifier.split_scoring import score_run_splits  # noqa: E402
from malaria_classifier.splits import read_manifest  # noqa: E402
from malaria_classifier.verdict import VerdictRule, verdict_for  # noqa: E402


def patient_bootstrap(values_by_patient, statistic, resamples=1000, seed=0):
    """95% percentile interval of statistic(list of per-patient arrays) over patient resamples."""
    rng = np.random.default_rng(seed)
    names = list(values_by_patient)
    results = []
    for _ in range(resamples):
        drawn = rng.integers(0, len(names), len(names))
        results.append(statistic([values_by_patient[names[i]] for i in drawn]))
    return np.quantile(results, [0.025, 0.975])


def wilson(successes, total, z=1.96):
    if total == 0:
        return (float("nan"), float("nan"))
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (centre - half, centre + half)


def ece_of(parts, threshold):
    labels = np.concatenate([p[0] for p in parts])
    scores = np.concatenate([p[1] for p in parts])
    return reliability_bins(labels, scores, threshold).expected_calibration_error


def report_calibration(scores, rule, split):
    raw, calibrated = scores.probabilities, rule.calibrate(scores.probabilities)
    print(f"\n## Calibration, {split} patients ({len(raw)} cells, 15 bins, top-label ECE)")
    by_patient = {
        p: (
            scores.labels[scores.patients == p],
            raw[scores.patients == p],
            calibrated[scores.patients == p],
        )
        for p in sorted(set(scores.patients))
    }
    rows = (
        ("uncalibrated, threshold 0.5", 1, 0.5),
        ("calibrated, threshold 0.5", 2, 0.5),
        (f"calibrated, operating threshold {rule.threshold:.4f}", 2, rule.threshold),
    )
    for name, column, threshold in rows:
        parts = {p: (v[0], v[column]) for p, v in by_patient.items()}
        value = ece_of(list(parts.values()), threshold)
        low, high = patient_bootstrap(parts, lambda ps, t=threshold: ece_of(ps, t))
        print(f"  ECE {name}: {value:.4f} [{low:.4f}, {high:.4f}]")
    return (
        reliability_bins(scores.labels, raw, 0.5).to_dict(),
        reliability_bins(scores.labels, calibrated, rule.threshold).to_dict(),
    )


def report_operating_point(scores, rule, split):
    calibrated = rule.calibrate(scores.probabilities)
    intervals = bootstrap_intervals(scores.labels, calibrated, scores.patients, rule.threshold)
    predicted = calibrated >= rule.threshold
    sensitivity = predicted[scores.labels == 1].mean()
    specificity = (~predicted[scores.labels == 0]).mean()
    print(f"\n## Operating threshold {rule.threshold:.4f} (chosen on validation), {split} cells")
    print(
        f"  sensitivity {sensitivity:.4f} [{intervals['recall'][0]:.4f}, {intervals['recall'][1]:.4f}]"
    )
    print(
        f"  specificity {specificity:.4f} [{intervals['specificity'][0]:.4f}, {intervals['specificity'][1]:.4f}]"
    )
    decisions, _ = rule.decide(calibrated)
    decisions = np.array(decisions)
    clear = decisions != "Uncertain"
    errors = predicted != scores.labels
    print(
        f"  Uncertain (margin band): {np.mean(~clear):.4f} of cells; error rate "
        f"{errors.mean():.4f} on all cells, {errors[clear].mean():.4f} on clear decisions"
    )


def report_ood(model, scores_by_split, rule, cells_for_non_cells, per_kind, model_path=None):
    print("\n## Not-a-cell check")
    for split in ("validation", "test"):
        scores = scores_by_split[split]
        signals = combine_signals(
            scores.statistics, scores.features, rule.ood.density, final_layer_weights(model)
        )
        rejected = np.array([bool(r) for r in rule.ood.reasons(signals)])
        parts = {p: rejected[scores.patients == p] for p in sorted(set(scores.patients))}
        low, high = patient_bootstrap(parts, lambda ps: np.concatenate(ps).mean())
        print(
            f"  false rejection, {split} cells: {rejected.sum()}/{len(rejected)} = "
            f"{rejected.mean():.4f} [{low:.4f}, {high:.4f}] (patient bootstrap)"
        )
    predictor = Predictor(model_path)
    non_cells = make_non_cells(per_kind, seed=1, cells=cells_for_non_cells)
    rows = predictor.predict_images([resize_with_pad(image, 64) for _, image in non_cells])
    kinds = [kind for kind, _ in non_cells]
    total_rejected = 0
    for kind in dict.fromkeys(kinds):
        decided = [row.decision for row, k in zip(rows, kinds, strict=True) if k == kind]
        rejected = sum(d == "Not a cell" for d in decided)
        total_rejected += rejected
        print(f"  {kind:<14} rejected {rejected}/{len(decided)}")
    low, high = wilson(total_rejected, len(rows))
    print(
        f"  non-cells rejected: {total_rejected}/{len(rows)} = {total_rejected / len(rows):.4f} "
        f"[{low:.4f}, {high:.4f}] (Wilson)"
    )
    called = [row.decision for row in rows if row.decision != "Not a cell"]
    print(
        f"  non-cells not rejected were decided: {dict((d, called.count(d)) for d in set(called))}"
    )


def report_verdicts(model, scores, rule, verdict_rule, split):
    calibrated = rule.calibrate(scores.probabilities)
    signals = combine_signals(
        scores.statistics, scores.features, rule.ood.density, final_layer_weights(model)
    )
    kept = np.array([not r for r in rule.ood.reasons(signals)])
    print(
        f"\n## Patient verdicts, {split} patients (rule: >= {verdict_rule.min_suspicious_cells} "
        f"cells with calibrated P >= {verdict_rule.cell_threshold:.4f})"
    )
    counts = {"infected": [0, 0], "healthy": [0, 0]}
    for patient in sorted(set(scores.patients)):
        mask = (scores.patients == patient) & kept
        infected = bool(scores.labels[scores.patients == patient].any())
        verdict, confidence = verdict_for(calibrated[mask], verdict_rule)
        top = np.sort(calibrated[mask])[::-1][:3]
        key = "infected" if infected else "healthy"
        counts[key][0] += 1
        counts[key][1] += verdict == ("positive" if infected else "negative")
        print(
            f"  {patient:<6} {'infected' if infected else 'healthy ':<8} cells {mask.sum():>4} "
            f"truly parasitized {int(scores.labels[mask].sum()):>4} -> {verdict:<13} top-3 P {np.round(top, 4).tolist()}"
        )
    for key, wanted in (("infected", "positive"), ("healthy", "negative")):
        n, right = counts[key]
        low, high = wilson(right, n)
        print(
            f"  {key} called {wanted}: {right}/{n} = {right / n:.3f} [{low:.3f}, {high:.3f}] (Wilson)"
        )


def report_throughput(paths, rounds, model_path=None):
    print(
        f"\n## Throughput, Predictor.predict_paths on {len(paths)} cells (median of {rounds} rounds)"
    )
    setups = {
        "no Not-a-cell check": dict(check_ood=False),
        "default (check on)": {},
        "check on + views (x4 forward)": dict(test_time_views=True),
    }
    predictors = {name: Predictor(model_path, **kwargs) for name, kwargs in setups.items()}
    for predictor in predictors.values():
        list(predictor.predict_paths(paths[:256]))  # warm up the traced function
    rates = {name: [] for name in setups}
    for _ in range(rounds):
        for name, predictor in predictors.items():
            started = time.perf_counter()
            list(predictor.predict_paths(paths))
            rates[name].append(len(paths) / (time.perf_counter() - started))
    base = statistics.median(rates["no Not-a-cell check"])
    for name, values in rates.items():
        rounds_text = " / ".join(f"{v:.0f}" for v in values)
        print(
            f"  {name:<30} {statistics.median(values):6.0f} img/s (rounds {rounds_text}); "
            f"ratio {statistics.median(values) / base:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, default=ROOT.parent / "main" / "runs" / "default")
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data" / "nih-cell-images"
    )
    parser.add_argument(
        "--model", type=Path, help="calibrated model (.keras); default: the bundled model"
    )
    parser.add_argument("--non-cells-per-kind", type=int, default=50)
    parser.add_argument("--throughput-images", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--figure", type=Path, default=ROOT / "docs" / "images" / "reliability_test.png"
    )
    args = parser.parse_args()

    model_path = args.model or default_model_path()
    card = read_model_card(model_path)
    rule = load_decision_rule(model_path, card)
    verdict_rule = VerdictRule.from_card(card)
    model, scores = score_run_splits(model_path, args.run, args.data)
    before, after = report_calibration(scores["test"], rule, "test")
    report_calibration(scores["validation"], rule, "validation")
    figure = reliability_diagram({"uncalibrated": before, "calibrated": after}, "test")
    figure.savefig(args.figure, dpi=100, bbox_inches="tight")
    print(f"  reliability diagram: {args.figure}")
    report_operating_point(scores["test"], rule, "test")
    root = find_class_root(args.data)
    test_rows = [row for row in read_manifest(args.run / "manifest.csv") if row.split == "test"]
    cells = [load_rgb_image(root / row.path) for row in test_rows[::50]]
    report_ood(model, scores, rule, cells, args.non_cells_per_kind, model_path)
    report_verdicts(model, scores["test"], rule, verdict_rule, "test")
    report_verdicts(model, scores["validation"], rule, verdict_rule, "validation")
    paths = [root / row.path for row in test_rows][: args.throughput_images]
    report_throughput(paths, args.rounds, model_path)


if __name__ == "__main__":
    main()
