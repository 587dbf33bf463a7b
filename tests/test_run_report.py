"""What a finished run reports: per-patient table, model card."""

import csv
import json

import keras


def test_the_per_patient_table_says_its_split_and_threshold(finished_run):
    with open(finished_run.run_dir / "evaluation" / "per_patient.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and {row["split"] for row in rows} == {"test"}
    assert {float(row["threshold"]) for row in rows} == {0.5}  # not calibrated yet


def test_model_card_describes_data_split_and_metrics(finished_run):
    card = json.loads((finished_run.run_dir / "model_card.json").read_text())
    assert card["class_order"] == ["Uninfected", "Parasitized"]
    assert card["input"]["shape"] == [32, 32, 3]
    assert card["split"]["unit"] == "patient"
    split_patients = card["split"]["patients"]
    assert not set(split_patients["train"]) & set(split_patients["test"])
    test_block = card["metrics"]["test"]
    assert test_block["split"] == "test" and test_block["positive_class"] == "Parasitized"
    assert len(test_block["metrics"]["accuracy"]["ci95"]) == 2
    assert card["versions"]["keras"] == keras.__version__
