"""The TensorFlow internals this library depends on, kept in one place.

Each use is here because no public API does the job in TF 2.21; if TF
changes, this is the only file to touch.
"""

import tensorflow as tf
from tensorflow.python.ops import control_flow_util
from tensorflow.python.saved_model.registration import registration


def distributed_container(var):
    """The MirroredVariable (etc.) owning a per-device component, or None.

    Inside `strategy.extended.update` and in replica context TF hands out
    per-device components; the slot table is keyed by the distributed
    container. TF exposes it only as `_distributed_container` (tf-keras's
    `_var_key` uses the same attribute).
    """
    container = getattr(var, "_distributed_container", None)
    return container() if container is not None else None


def register_for_saved_model(cls):
    """Lets `tf.saved_model.load` revive `cls` as itself.

    Without it a loaded SavedModel turns the optimizer into a generic
    `_UserObject`, which has no `add_slot`, and loading the slot variables
    fails. TF's `register_serializable` is not exported publicly.
    """
    return registration.register_serializable(
        package="tf_adamax", predicate=lambda obj: type(obj) is cls)(cls)


def in_xla_context():
    """True while tracing inside a `tf.function(jit_compile=True)`.

    Used only to turn a confusing cross-device XLA failure into a clear
    error; TF has no public query for it.
    """
    return control_flow_util.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph())


def is_sharded(var):
    """True for a ParameterServerStrategy `ShardedVariable`.

    The class is only exported under `tf.__internal__`.
    """
    return isinstance(var, tf.__internal__.distribute.ShardedVariable)


def make_sharded(shards, name):
    """A `ShardedVariable` view over existing shard variables."""
    return tf.__internal__.distribute.ShardedVariable(shards, name=name)
