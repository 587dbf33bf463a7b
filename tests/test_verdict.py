"""Patient/slide/folder verdicts: the rule, its choice on validation patients, the CSV."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from malaria_classifier.prediction import PredictionRow
from malaria_classifier.verdict import (
    SUMMARY_COLUMNS,
    VerdictRule,
    choose_verdict_rule,
    drop_repeated_pictures,
    group_name,
    groups_without_a_patient,
    summarize_group,
    summarize_rows,
    verdict_for,
    write_summary,
)

RULE = VerdictRule(cell_threshold=0.9, min_suspicious_cells=2, min_cells=5)


def _row(path, probability, decision=None, error=""):
    if error:
        return PredictionRow(path, "", None, None, error, "")
    decision = decision or ("Parasitized" if probability >= 0.5 else "Uninfected")
    label = "Parasitized" if probability >= 0.5 else "Uninfected"
    return PredictionRow(path, label, probability, max(probability, 1 - probability), "", decision)


def test_verdict_needs_enough_very_suspicious_cells():
    assert verdict_for(np.array([0.95, 0.92, 0.1, 0.1, 0.1]), RULE) == ("positive", 0.92)
    verdict, confidence = verdict_for(np.array([0.95, 0.6, 0.1, 0.1, 0.1]), RULE)
    assert verdict == "negative" and confidence == pytest.approx(0.05)
    assert verdict_for(np.array([0.1, 0.2]), RULE) == ("indeterminate", None)


def test_group_names_by_patient_slide_and_folder():
    path = "/data/slide9/C33P1thinF_IMG_20150619_114756a_cell_179.png"
    assert group_name(path, "patient") == "P1"
    assert group_name(path, "slide") == "C33"
    assert group_name(path, "folder") == "/data/slide9"
    assert group_name(path, "all") == "all"
    with pytest.raises(
        ValueError, match="--group-by must be one of patient, slide, folder, all, got 'hospital'"
    ):
        group_name(path, "hospital")


def test_one_folder_spelled_three_ways_is_one_group(tmp_path, monkeypatch):
    folder = tmp_path / "slide9"
    folder.mkdir()
    (tmp_path / "link").symlink_to(folder)
    monkeypatch.chdir(tmp_path)
    names = [f"{folder}/a.png", "slide9/b.png", "link/c.png", "./slide9/../slide9/d.png"]
    assert {group_name(name, "folder") for name in names} == {str(folder.resolve())}


def test_a_missing_or_impossible_rule_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match="run `malaria calibrate`"):
        summarize_rows([_row("C1_thinF_x_cell_1.png", 0.1)], None)
    with pytest.raises(ValueError, match="cell_threshold must be a probability"):
        VerdictRule(cell_threshold=1.5)
    with pytest.raises(ValueError, match="min_suspicious_cells must be a whole number"):
        VerdictRule(cell_threshold=0.9, min_suspicious_cells=0)
    with pytest.raises(ValueError, match="min_cells must be a whole number of at least 1"):
        VerdictRule(cell_threshold=0.9, min_cells=-1)


def test_file_names_outside_the_nih_rule_are_groups_without_a_patient():
    rows = [_row("C33P1thinF_IMG_1_cell_1.png", 0.1), _row("C1_thinF_IMG_2_cell_3.png", 0.2)]
    rows += [_row("mine/cell1.png", 0.3), _row("mine/smear2_cell_4.png", 0.4)]
    summaries = summarize_rows(rows, RULE, "patient")
    assert groups_without_a_patient(summaries) == ["field:cell1", "field:smear2"]
    assert groups_without_a_patient(summarize_rows(rows, RULE, "folder")) == []


def test_a_picture_repeated_under_other_names_counts_once():
    rows = [_row(name, 0.99) for name in ("a.png", "b.png", "copy of a.png", "again.png")]
    rows += [_row("broken.png", 0.0, error="broken"), _row("b.png", 0.9)]
    kept, dropped = drop_repeated_pictures(rows, ["1", "2", "1", "1", None, None])
    assert [row.path for row in kept] == ["a.png", "b.png", "broken.png", "b.png"]
    assert dropped == 2


def test_repeated_pictures_are_found_by_their_bytes(tmp_path):
    (tmp_path / "a.png").write_bytes(b"one cell")
    (tmp_path / "copy.png").write_bytes(b"one cell")
    (tmp_path / "b.png").write_bytes(b"another cell")
    names = ["a.png", "copy.png", "b.png", "gone.png"]
    rows = [_row(str(tmp_path / name), 0.99) for name in names]
    rows.append(_row(str(tmp_path / "copy.png"), 0.0, error="failed"))
    kept, dropped = drop_repeated_pictures(rows)
    assert [Path(row.path).name for row in kept] == ["a.png", "b.png", "gone.png", "copy.png"]
    assert dropped == 1  # a file that is gone, or failed, is kept as it is


def test_failed_and_not_a_cell_rows_are_not_counted():
    rows = [_row(f"C1_thinF_x_cell_{i}.png", 0.1) for i in range(5)]
    rows += [_row("C1_thinF_x_cell_90.png", 0.99, decision="Not a cell")] * 3
    rows += [_row("C1_thinF_x_cell_91.png", 0.0, error="broken")]
    rows += [_row("C1_thinF_x_cell_92.png", 0.7)]
    summary = summarize_group("C1", rows, RULE)
    assert (summary.cells, summary.parasitized_cells) == (6, 1)
    assert summary.parasitemia == pytest.approx(1 / 6)
    assert summary.verdict == "negative"  # the three confident non-cells do not count


def test_summarize_rows_groups_and_writes_the_documented_csv():
    rows = [_row(f"C33P1thinF_a_cell_{i}.png", 0.97) for i in range(3)]
    rows += [_row(f"C33P1thinF_a_cell_{i + 10}.png", 0.05) for i in range(3)]
    rows += [_row(f"C2_thinF_b_cell_{i}.png", 0.05) for i in range(6)]
    summaries = summarize_rows(rows, RULE, "patient")
    assert [(s.group, s.verdict) for s in summaries] == [("C2", "negative"), ("P1", "positive")]
    buffer = io.StringIO()
    write_summary(summaries, buffer)
    lines = list(csv.reader(io.StringIO(buffer.getvalue())))
    assert tuple(lines[0]) == SUMMARY_COLUMNS
    assert SUMMARY_COLUMNS == (
        "group",
        "cells",
        "parasitized_cells",
        "parasitemia",
        "verdict",
        "confidence",
    )
    assert lines[2] == ["P1", "6", "3", "0.5000", "positive", "0.9700"]
    buffer = io.StringIO()
    write_summary(summaries, buffer, "json")  # `--summary s.json`
    saved = json.loads(buffer.getvalue())
    assert [tuple(row) for row in saved] == [SUMMARY_COLUMNS] * 2
    assert saved[1]["verdict"] == "positive" and saved[1]["confidence"] == pytest.approx(0.97)


def test_choose_verdict_rule_keeps_every_healthy_validation_donor_negative():
    rng = np.random.default_rng(0)
    probabilities = {
        "C1": np.r_[rng.uniform(0, 0.3, 68), 0.85, 0.7],  # one suspicious-looking cell
        "C2": rng.uniform(0, 0.3, 70),
        "P1": np.r_[rng.uniform(0, 0.3, 60), np.full(10, 0.99)],
        "P2": np.r_[rng.uniform(0, 0.3, 68), 0.95, 0.93],  # only two parasitized cells
        "P3": rng.uniform(0, 0.3, 70),  # undetectable
    }
    infected = {"C1": False, "C2": False, "P1": True, "P2": True, "P3": True}
    rule = choose_verdict_rule(probabilities, infected)
    verdicts = {name: verdict_for(p, rule)[0] for name, p in probabilities.items()}
    assert verdicts["C1"] == verdicts["C2"] == "negative"
    assert verdicts["P1"] == verdicts["P2"] == "positive"
    assert verdicts["P3"] == "negative"
    # two cells above a threshold between C1's 2nd (0.7) and P2's 2nd (0.93) give the
    # widest gap, so k = 2 wins over k = 1 (gap between 0.85 and 0.95)
    assert rule.min_suspicious_cells == 2
    assert 0.7 < rule.cell_threshold < 0.93


def test_choose_verdict_rule_needs_both_kinds_of_patient():
    with pytest.raises(ValueError, match="both healthy and infected"):
        choose_verdict_rule({"C1": np.array([0.1])}, {"C1": False})


def test_rule_round_trips_through_a_model_card():
    card = {"verdict_rule": {**RULE.to_dict(), "rule": "text"}}
    assert VerdictRule.from_card(card) == RULE
    assert VerdictRule.from_card({}) is None
