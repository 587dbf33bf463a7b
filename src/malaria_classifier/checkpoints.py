"""Epoch checkpoints of a run folder and the rule that commits them.

``RUN/checkpoint/`` holds ``state.json`` (epoch, best validation loss, early-stopping
wait, history, training seconds), the epoch-named checkpoint it names, with optimizer
state (``epoch-NNN.keras``), and the best epoch's model (``best-epoch-NNN.keras``).
Each epoch's files get new names and ``state.json`` is renamed into place after them, so
it is the single commit point: a kill at any moment resumes from one consistent epoch.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import keras

from malaria_classifier.images import sha256_of_file
from malaria_classifier.model_card import MODEL_FILE, write_json_atomically

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
# Run folders from before epoch-named checkpoints keep theirs under this name.
LEGACY_CHECKPOINT = "last.keras"


def new_state() -> dict[str, Any]:
    """The state of a run that has trained no epoch yet."""
    return {"epoch": 0, "best_val_loss": math.inf, "best_epoch": 0, "wait": 0, "history": []}


def read_state(path: Path) -> dict[str, Any]:
    """Read ``state.json``; a best validation loss written as null comes back as infinity."""
    state = json.loads(path.read_text(encoding="utf-8"))
    best = state["best_val_loss"]  # null: no epoch had a validation loss yet
    state["best_val_loss"] = math.inf if best is None else float(best)
    return state


def save_model_atomically(model: keras.Model, path: Path, include_optimizer: bool) -> None:
    """Save to a temporary file, then rename over ``path``.

    Without the optimizer the file is about three times smaller; that is what gets
    shipped. The checkpoint keeps it so a resumed run continues Adam's state.
    """
    if not include_optimizer and getattr(model, "optimizer", None) is not None:
        model = _uncompiled_copy(model)
    temporary = path.with_name(f".{path.stem}.partial.keras")
    model.save(temporary)
    temporary.replace(path)


def _uncompiled_copy(model: keras.Model) -> keras.Model:
    # keras.models.clone_model would carry the compiled optimizer along in Keras 3.
    copy = keras.Model.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


class RunCheckpoint(keras.callbacks.Callback):
    """Keeps the best model, the last checkpoint and the history on disk every epoch.

    It also does early stopping, because its state (best loss, epochs without
    improvement) must survive an interruption together with the checkpoint.

    Each epoch's files get new, epoch-named paths and ``state.json`` names them; it is
    renamed into place last, so it is the single commit point. A kill before it leaves
    the previous epoch's state with the previous epoch's checkpoint (the new files are
    removed on resume); a kill after it leaves this epoch complete, and ``model.keras``
    is brought up to date from the checkpoint folder if the kill came before that.
    """

    def __init__(
        self, run_dir: Path, patience: int, state: dict[str, Any], session_started: float
    ) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.patience = patience
        self.state = state
        # Seconds of earlier sessions, so a resumed run's card reports all its training.
        self.earlier_seconds = float(state.get("seconds", 0.0))
        self.session_started = session_started

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        logs = {key: float(value) for key, value in (logs or {}).items()}
        logs["learning_rate"] = float(
            keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        )
        checkpoint_dir = self.run_dir / CHECKPOINT_DIR
        # A copy: the state on disk must change only when state.json is renamed.
        state = json.loads(json.dumps(self.state))
        state["history"].append({"epoch": epoch + 1, **logs})
        validation_loss = logs.get("val_loss", math.inf)
        improved = validation_loss < state["best_val_loss"]
        if improved:
            state.update(best_val_loss=validation_loss, best_epoch=epoch + 1, wait=0)
            state["best_checkpoint"] = f"best-epoch-{epoch + 1:03d}.keras"
            save_model_atomically(
                self.model, checkpoint_dir / state["best_checkpoint"], include_optimizer=False
            )
        else:
            state["wait"] += 1
        state["checkpoint"] = f"epoch-{epoch + 1:03d}.keras"
        save_model_atomically(self.model, checkpoint_dir / state["checkpoint"], True)
        state["epoch"] = epoch + 1
        state["seconds"] = self.earlier_seconds + time.monotonic() - self.session_started
        write_json_atomically(state, checkpoint_dir / STATE_FILE)  # the commit point
        self.state.clear()
        self.state.update(state)
        if improved:
            publish_best_model(self.run_dir, state)
        remove_uncommitted_checkpoints(self.run_dir, state)
        write_json_atomically(state["history"], self.run_dir / "history.json")
        if state["wait"] >= self.patience:
            self.model.stop_training = True


def publish_best_model(run_dir: Path, state: dict[str, Any]) -> None:
    """Copy the best epoch's model, as ``state.json`` names it, to ``model.keras``.

    Called after each improvement and on resume, so a kill between the commit of
    ``state.json`` and this copy costs nothing.
    """
    name = state.get("best_checkpoint")
    if name is None:
        return  # a run folder from before epoch-named checkpoints wrote model.keras itself
    source = run_dir / CHECKPOINT_DIR / name
    target = run_dir / MODEL_FILE
    if target.is_file() and sha256_of_file(target) == sha256_of_file(source):
        return
    temporary = target.with_name(f".{target.stem}.partial.keras")
    shutil.copyfile(source, temporary)
    temporary.replace(target)


def remove_uncommitted_checkpoints(run_dir: Path, state: dict[str, Any]) -> None:
    """Delete checkpoint files that ``state.json`` does not name.

    They are the previous epochs' (superseded) or an epoch killed before its commit.
    """
    keep = {state.get("checkpoint", LEGACY_CHECKPOINT), state.get("best_checkpoint")}
    for path in (run_dir / CHECKPOINT_DIR).glob("*.keras"):
        if path.name not in keep:
            path.unlink(missing_ok=True)
