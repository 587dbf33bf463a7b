"""The README stays true: its config example loads, and CI runs its exact test command."""

import re
from pathlib import Path

from malaria_classifier.config import TrainingConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_config_example_is_valid_and_shows_the_defaults(tmp_path):
    block = re.search(r"```yaml\n(# my-config.yaml\n.*?)```", README, re.DOTALL)
    assert block, "README lost its config example"
    path = tmp_path / "my-config.yaml"
    path.write_text(block.group(1))
    assert load_config(path) == TrainingConfig()


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n# 2\. [^\n]*\n([^\n]+)\n```", README)
    assert len(commands) == 1, "README must keep exactly one test command (Quickstart step 2)"
    ci_script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[0] in ci_script.splitlines()
