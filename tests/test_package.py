"""The package root is light to import and exposes the documented API."""

import subprocess
import sys

import malaria_classifier


def test_importing_the_package_does_not_load_tensorflow():
    code = "import sys, malaria_classifier; print('tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False"


def test_public_api_is_reachable_from_the_package_root():
    assert malaria_classifier.Predictor.__name__ == "Predictor"
    assert callable(malaria_classifier.train_model)
    assert callable(malaria_classifier.evaluate_model)
    assert malaria_classifier.CLASS_NAMES == ("Uninfected", "Parasitized")
    assert malaria_classifier.POSITIVE_CLASS == "Parasitized"


def test_dir_lists_the_public_api_including_the_lazy_names():
    names = dir(malaria_classifier)
    assert {"Predictor", "train_model", "evaluate_model", "TrainingConfig"} <= set(names)
    assert "Any" not in names and "_LAZY" not in names
