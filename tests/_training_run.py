"""Tiny training settings and a crash helper shared by the training and run-folder tests.

The trained run itself is the session fixture ``finished_run`` in ``conftest.py``, so
the test files of training, checkpoints, the run folder and its report share one run.
"""

from __future__ import annotations

from malaria_classifier.config import TrainingConfig

TINY = TrainingConfig(
    image_size=32,
    base_filters=8,
    conv_blocks=2,
    dense_units=16,
    batch_size=16,
    epochs=2,
    learning_rate=0.003,
    validation_fraction=0.25,
    test_fraction=0.25,
)


def crash_after_first_epoch(monkeypatch):
    """Make training die after its first epoch's checkpoint; return the real callback."""
    from malaria_classifier.checkpoints import RunCheckpoint

    original = RunCheckpoint.on_epoch_end

    def crash(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 0:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C or the machine died

    monkeypatch.setattr(RunCheckpoint, "on_epoch_end", crash)
    return original
