"""Train on several devices or machines with ``tf.distribute``.

- ``none``: the default strategy (one device; what a laptop uses).
- ``mirrored``: :class:`tf.distribute.MirroredStrategy` over the GPUs of this machine,
  or over its logical CPU devices when it has no GPU (so CI exercises the code path).
- ``multiworker``: :class:`tf.distribute.MultiWorkerMirroredStrategy` across machines;
  each machine runs the same ``malaria train`` command with its own ``TF_CONFIG``
  (see docs/distributed.md).

``batch_size`` and ``learning_rate`` in the config are **per replica**: the global
batch is ``batch_size x replicas`` and the learning rate grows by the same factor
(the linear scaling rule), so one config file means the same training on 1 or 8 GPUs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from malaria_classifier.config import TrainingConfig

STRATEGIES: tuple[str, ...] = ("none", "mirrored", "multiworker")
TF_CONFIG_EXAMPLE = (
    'TF_CONFIG=\'{"cluster": {"worker": ["10.0.0.1:12345", "10.0.0.2:12345"]}, '
    '"task": {"type": "worker", "index": 0}}\''
)


@dataclass(frozen=True)
class Distribution:
    """A created strategy and where this process sits in the cluster.

    Attributes:
        name: One of :data:`STRATEGIES`.
        strategy: The ``tf.distribute.Strategy`` to build and train the model under.
        replicas: Model copies training in step (devices x machines).
        workers: Machines (processes) taking part; 1 unless ``multiworker``.
        is_chief: Whether this process writes the run folder (only one does).
    """

    name: str
    strategy: Any
    replicas: int
    workers: int = 1
    is_chief: bool = True


class WorkerLostError(ValueError):
    """Another worker of a multi-worker run stopped or cannot be reached (exit status 2)."""


def check_strategy(name: str) -> str:
    """Return ``name`` if it is a known strategy.

    Raises:
        ValueError: Naming the value and the accepted ones.
    """
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}; use one of {', '.join(STRATEGIES)}.")
    return name


def parse_tf_config(text: str | None) -> dict[str, Any]:
    """Validate a ``TF_CONFIG`` value before any machine starts waiting for the others.

    A mistake here would otherwise show up as every worker hanging at the first step.

    Returns:
        The parsed mapping, with ``cluster`` and ``task`` checked.

    Raises:
        ValueError: If it is missing, not JSON, or names tasks that do not exist.
    """
    if not text:
        raise ValueError(
            f"--strategy multiworker needs the TF_CONFIG environment variable on every "
            f"machine, e.g. {TF_CONFIG_EXAMPLE} (index 1 on the second machine). "
            f"See docs/distributed.md."
        )
    try:
        tf_config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}): {text!r}") from None
    if not isinstance(tf_config, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object, got {text!r}.")
    cluster = tf_config.get("cluster")
    if not isinstance(cluster, dict) or not cluster.get("worker"):
        raise ValueError(
            f'TF_CONFIG needs "cluster": {{"worker": ["host:port", ...]}}, got {text!r}.'
        )
    for task_type, addresses in cluster.items():
        _check_addresses(task_type, addresses)
    _check_task(tf_config.get("task"), cluster)
    return tf_config


def _check_addresses(task_type: str, addresses: Any) -> None:
    if task_type not in ("chief", "worker", "evaluator"):
        raise ValueError(
            f"TF_CONFIG cluster has a {task_type!r} job; MultiWorkerMirroredStrategy uses "
            f"'worker' (and optionally one 'chief')."
        )
    if not isinstance(addresses, list) or not addresses:
        raise ValueError(f"TF_CONFIG cluster {task_type!r} must be a list of 'host:port'.")
    for address in addresses:
        host, _, port = str(address).rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(
                f"TF_CONFIG address {address!r} of {task_type!r} is not 'host:port' "
                f"(e.g. '10.0.0.1:12345')."
            )
    if task_type == "chief" and len(addresses) != 1:
        raise ValueError(f"TF_CONFIG may have one 'chief', got {len(addresses)}.")


def _check_task(task: Any, cluster: dict[str, list[str]]) -> None:
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ValueError(
            'TF_CONFIG needs "task": {"type": "worker", "index": N} saying which machine this is.'
        )
    task_type, index = task["type"], task["index"]
    if task_type not in cluster:
        raise ValueError(
            f"TF_CONFIG task type {task_type!r} is not in the cluster ({', '.join(cluster)})."
        )
    if (
        not isinstance(index, int)
        or isinstance(index, bool)
        or not 0 <= index < len(cluster[task_type])
    ):
        raise ValueError(
            f"TF_CONFIG task index {index!r} is out of range: the cluster has "
            f"{len(cluster[task_type])} {task_type!r} task(s), numbered from 0."
        )


def is_chief_task(tf_config: dict[str, Any]) -> bool:
    """The chief writes the run folder: the 'chief' task, or worker 0 when there is none."""
    task = tf_config["task"]
    if "chief" in tf_config["cluster"]:
        return task["type"] == "chief"
    return task["type"] == "worker" and task["index"] == 0


def make_distribution(name: str = "none") -> Distribution:
    """Create the strategy ``name``; call it before any other TensorFlow work.

    ``MultiWorkerMirroredStrategy`` configures TensorFlow's runtime for collective
    operations, which is only possible before the runtime starts.

    Raises:
        ValueError: For an unknown name or a bad ``TF_CONFIG``.
    """
    check_strategy(name)
    if name == "multiworker":
        tf_config = parse_tf_config(os.environ.get("TF_CONFIG"))
    import tensorflow as tf

    if name == "none":
        return Distribution(name, tf.distribute.get_strategy(), replicas=1)
    if name == "mirrored":
        strategy = tf.distribute.MirroredStrategy(devices=_mirrored_devices(tf))
        return Distribution(name, strategy, replicas=strategy.num_replicas_in_sync)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    workers = sum(len(tf_config["cluster"].get(kind, [])) for kind in ("chief", "worker"))
    return Distribution(
        name,
        strategy,
        replicas=strategy.num_replicas_in_sync,
        workers=workers,
        is_chief=is_chief_task(tf_config),
    )


def _mirrored_devices(tf) -> list[str] | None:
    """All GPUs; without any, the logical CPU devices (one replica unless split)."""
    if tf.config.list_physical_devices("GPU"):
        return None  # MirroredStrategy's own default: every visible GPU
    return [device.name for device in tf.config.list_logical_devices("CPU")]


def workers_disagree(distribution: Distribution, facts: dict[str, Any]) -> dict[str, list[int]]:
    """The facts on which the workers differ, each with every worker's value; {} if none.

    Each worker reads its own run folder and data, so before they train together they
    must agree on what they train: a worker given another copy of the run folder (one
    left from an earlier session, say) would resume from another epoch and train a
    different model in step with the others, silently. A collective operation: every
    worker must call it at the same point, with the same names in the same order.

    Args:
        distribution: From :func:`make_distribution`; with one worker nothing is compared.
        facts: Name -> JSON-serializable value. A whole number from 0 to 2**48 (an
            epoch) is compared as it is and comes back as it is; any other value is
            compared by a 48-bit SHA-256 digest of its JSON.

    Returns:
        Name -> the distinct values of the workers that differ, sorted (digests for
        values that are not whole numbers).

    Raises:
        WorkerLostError: When another worker stopped before reaching this point.
    """
    if distribution.workers < 2 or not facts:
        return {}
    import tensorflow as tf

    local = [_comparable(value) for value in facts.values()]
    strategy = distribution.strategy
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda _context: tf.constant(local, tf.int64)
    )
    try:
        gathered = strategy.gather(per_replica, axis=0).numpy().reshape(-1, len(local))
    except tf.errors.UnavailableError as error:  # a worker stopped (its output says why)
        raise WorkerLostError(
            f"Another worker stopped before training started (its own output says why), "
            f"or cannot be reached ({type(error).__name__}). Nothing was trained."
        ) from None
    values = {
        name: sorted({int(v) for v in gathered[:, column]}) for column, name in enumerate(facts)
    }
    return {name: found for name, found in values.items() if len(found) > 1}


def _comparable(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**48:
        return value
    text = json.dumps(value, sort_keys=True, default=str)
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:12], 16)


def scale_for_replicas(config: TrainingConfig, replicas: int) -> TrainingConfig:
    """The config with the global batch size and the linearly scaled learning rate.

    Example:
        >>> scaled = scale_for_replicas(TrainingConfig(batch_size=64, learning_rate=0.001), 4)
        >>> scaled.batch_size, scaled.learning_rate
        (256, 0.004)

    Raises:
        ValueError: If the scaled learning rate leaves the valid range (< 1).
    """
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}.")
    if replicas == 1:
        return config
    learning_rate = config.learning_rate * replicas
    if learning_rate >= 1.0:
        raise ValueError(
            f"learning_rate {config.learning_rate} x {replicas} replicas = {learning_rate} "
            f"is too large; lower learning_rate in the config (it is per replica)."
        )
    return config.replace(batch_size=config.batch_size * replicas, learning_rate=learning_rate)


def describe(distribution: Distribution, config: TrainingConfig) -> dict[str, Any]:
    """What the model card records about how the run was spread out."""
    scaled = scale_for_replicas(config, distribution.replicas)
    return {
        "strategy": distribution.name,
        "replicas": distribution.replicas,
        "workers": distribution.workers,
        "per_replica_batch_size": config.batch_size,
        "global_batch_size": scaled.batch_size,
        "learning_rate": scaled.learning_rate,
    }


@contextlib.contextmanager
def keras_fit_fixes(distribution: Distribution) -> Iterator[None]:
    """Let Keras 3 ``fit`` run under ``MultiWorkerMirroredStrategy``; a no-op otherwise.

    Keras 3 (checked up to 3.15) breaks with more than one worker
    (tensorflow/tensorflow#72388) in two places: it averages each step's scalar logs
    with ``strategy.reduce("MEAN", value, axis=0)`` ("Invalid reduction dimension 0
    for input with 0 dimensions"), and before the first step it all-reduces a whole
    ``(images, labels)`` batch, which the multi-worker strategy cannot take. So, only
    while a multi-worker ``fit`` runs: scalar logs are averaged over replicas with
    ``axis=None`` (the same mean, and every worker sees the same logs, so early
    stopping decides alike), and models created inside this context build lazily in
    the first step, as Keras does without a strategy. Remove once Keras fixes it:
    ``tests/test_distribute.py`` trains two workers and will show it.

    Use it inside ``strategy.scope()``, and create and fit the model inside it.
    """
    if distribution.workers < 2:
        yield
        return
    from keras.src.backend.tensorflow import trainer as tensorflow_trainer

    original_reduce = tensorflow_trainer.reduce_per_replica
    original_init = tensorflow_trainer.TensorFlowTrainer.__init__

    def reduce_per_replica(values, strategy, reduction):
        if reduction != "auto":  # predict's "concat" works as it is
            return original_reduce(values, strategy, reduction)
        import keras

        return keras.tree.map_structure(
            lambda value: strategy.reduce("MEAN", value, axis=None), values
        )

    def init_without_eager_build(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        # With no strategy recorded, Keras skips its batch all-reduce and builds in
        # the first step; the strategy still comes from the enclosing scope.
        self._distribute_strategy = None

    tensorflow_trainer.reduce_per_replica = reduce_per_replica
    tensorflow_trainer.TensorFlowTrainer.__init__ = init_without_eager_build
    try:
        yield
    finally:
        tensorflow_trainer.reduce_per_replica = original_reduce
        tensorflow_trainer.TensorFlowTrainer.__init__ = original_init
