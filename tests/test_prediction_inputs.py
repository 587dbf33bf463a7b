"""What a Predictor is given: folders walked, missing paths reported, repeats dropped."""

import os

from malaria_classifier.prediction_inputs import distinct_inputs, expand_inputs


def test_expand_inputs_recurses_folders_and_reports_missing_paths(mixed_folder, tmp_path):
    pairs = list(expand_inputs([mixed_folder, tmp_path / "missing.png"]))
    paths = [os.path.basename(path) for path, _ in pairs]
    assert "gray.png" in paths and "notes.txt" not in paths
    assert pairs[-1][1] is not None and "does not exist" in pairs[-1][1]


def test_a_bytes_path_is_one_input(mixed_folder):
    name = os.fsencode(mixed_folder / "cell_0.png")
    assert list(expand_inputs(name)) == [(str(mixed_folder / "cell_0.png"), None)]
    assert list(expand_inputs([name])) == [(str(mixed_folder / "cell_0.png"), None)]


def test_inputs_named_twice_or_inside_another_are_kept_once(mixed_folder, monkeypatch):
    monkeypatch.chdir(mixed_folder.parent)
    relative = type(mixed_folder)(mixed_folder.name)
    file = mixed_folder / "gray.png"
    missing = mixed_folder.parent / "missing.png"
    inputs = [mixed_folder, relative, file, missing, mixed_folder, missing]
    # A repeated cell would count twice in a patient's verdict.
    assert distinct_inputs(inputs) == [mixed_folder, missing]
    # In whatever order: a file or sub-folder named before its folder is left to it.
    sub_folder = mixed_folder / "sub"
    assert distinct_inputs([file, sub_folder, relative, missing]) == [relative, missing]
    # A folder is not a parent of a sibling whose name merely starts the same.
    sibling = mixed_folder.parent / (mixed_folder.name + "-2")
    assert distinct_inputs([sibling, mixed_folder]) == [sibling, mixed_folder]
