"""The TensorFlow internals this library depends on, kept in one place.

Each use is here because no public API does the job in TF 2.21; if TF
changes, this is the only file to touch.
"""

import tensorflow as tf
from tensorflow.python.distribute import tpu_util
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
    if container is None and not isinstance(var,
                                            tf.distribute.DistributedValues):
        # TF 2.21 keeps the link of a per-device ResourceVariable (a
        # CompositeTensor) on its handle, as `distribute_utils.
        # value_container` reads it.
        try:
            handle = var.handle
        except (AttributeError, ValueError, TypeError):
            handle = None
        container = getattr(handle, "_distributed_container", None)
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


def in_tpu_program():
    """True while building a TPUStrategy's replicated program (its
    `strategy.run`, and the `merge_call` inside it).

    There every core runs the same program on its own copy of each TPU
    variable, and `strategy.extended.update` calls the update once with the
    whole variable. TF exposes the test only in `tpu_util`.
    """
    return tpu_util.enclosing_tpu_context() is not None


def is_sharded(var):
    """True for a ParameterServerStrategy `ShardedVariable`.

    The class is only exported under `tf.__internal__`.
    """
    return isinstance(var, tf.__internal__.distribute.ShardedVariable)


def sharded_container(var):
    """The `ShardedVariable` that `var` is a shard of, or None (TF keeps a
    weak reference to it on each shard, under a private name)."""
    ref = getattr(var, "_sharded_container", None)
    return ref() if ref is not None else None


def copy_sharded_to_cpu(views, object_map):
    """Async checkpoints: copies sharded slot views (and their shards) into
    `object_map` when `save()` is called. TF's async helper copies the
    slots of plain variables only, so these would be read when written."""
    for view in views:
        view._copy_trackable_to_cpu(object_map)


def make_sharded(shards, name):
    """A `ShardedVariable` view over existing shard variables."""
    return tf.__internal__.distribute.ShardedVariable(shards, name=name)


def checkpoint_children(children, save_type, name, value):
    """`children` (of `_trackable_children`) for a checkpoint: the child
    `name` replaced by `value`, a `Float64Value` of it, under the name
    `name + "_float64"`.

    The learning-rate variable is float64, except on TPUs (float32), and a
    checkpoint restore fails outright (nothing restored, the model's
    variables included) when a stored dtype differs from the variable's: a
    TPU-written optimizer read on a CPU/GPU, or a Keras optimizer's
    checkpoint (its `_learning_rate` is float32) read into this one. Stored
    as float64 under a name of its own, the rate restores on every device,
    and another optimizer's rate is simply not matched.
    `_trackable_children` and `SaveType` are TF's (private) hooks for
    choosing what a checkpoint holds.
    """
    from tensorflow.python.trackable import base

    if value is None:
        return children
    if save_type == base.SaveType.CHECKPOINT:
        children = {k: v for k, v in children.items() if k != name}
    # A SavedModel keeps both: the variable, which its functions capture,
    # and the value its loader restores through the checkpoint view.
    return {**children, name + "_float64": value}


class Float64Value(tf.__internal__.tracking.Trackable):
    """A float variable as a float64 value in checkpoints (one object per
    variable: a checkpoint identifies its objects by identity)."""

    def __init__(self, variable, resolve=None):
        self.variable = variable
        self._resolve = resolve or (lambda: variable)

    def _serialize_to_tensors(self):
        variable = self._resolve()
        # On the host: TPUs have no float64.
        with tf.device(_host(variable)):
            return {"float64_value": tf.cast(
                tf.convert_to_tensor(variable), tf.float64)}

    def _export_to_saved_model_graph(self, object_map, tensor_map, options,
                                     **kwargs):
        # A SavedModel's saving graph reads the variable's copy there, which
        # TF maps before it serializes.
        del tensor_map, options, kwargs
        object_map[self] = Float64Value(
            self.variable, lambda: object_map[self.variable])
        return []

    def _copy_trackable_to_cpu(self, object_map):
        # Async checkpoints copy every object to the host when `save` is
        # called and write the copies later: without this the rate would be
        # read at writing time, possibly changed since.
        copy = object_map.get(self)
        if copy is None:
            with tf.device(_host(self.variable)):
                holder = tf.Variable(tf.zeros([], tf.float64), trainable=False)
            copy = object_map[self] = Float64Value(holder)
        with tf.device(copy.variable.device):
            copy.variable.assign(tf.cast(
                tf.convert_to_tensor(self.variable), tf.float64))

    def _restore_from_tensors(self, restored_tensors):
        variable = self._resolve()
        value = restored_tensors["float64_value"]
        with tf.device(_host(variable)):
            value = tf.cast(value, variable.dtype)
        return variable.assign(value)


def _host(variable):
    """The CPU of the worker holding `variable` (the default device if
    unknown)."""
    device = tf.DeviceSpec.from_string(getattr(variable, "device", "") or "")
    return device.replace(device_type="CPU", device_index=0).to_string()


def saved_optimizer_variable_names(path):
    """Names of the variables of a tf-keras SavedModel's optimizer, in its
    `_variables` order, or None when they cannot be read.

    tf-keras checkpoints an optimizer's slots by position in that list; the
    names (`m/<layer>/kernel`) say which model variable each slot was made
    for. Only the SavedModel's object graph holds them, and its proto module
    (`tensorflow.core.protobuf`) has no public `tf.` alias.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    try:
        with tf.io.gfile.GFile(tf.io.gfile.join(path, "saved_model.pb"),
                               "rb") as f:
            proto.ParseFromString(f.read())
        graph = proto.meta_graphs[0].object_graph_def
    except Exception:  # noqa: BLE001 -- unreadable: the caller falls back
        return None

    def child(node, name):
        for ref in graph.nodes[node].children:
            if ref.local_name == name:
                return ref.node_id
        return None

    node = child(0, "optimizer")
    node = None if node is None else child(node, "_variables")
    if node is None:
        return None
    names = []
    for ref in graph.nodes[node].children:
        saved = graph.nodes[ref.node_id]
        if saved.WhichOneof("kind") != "variable":
            return None
        names.append(saved.variable.name)
    return names
