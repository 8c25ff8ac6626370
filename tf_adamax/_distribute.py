"""The `tf.distribute` glue: where state lives and how updates are placed.

Everything strategy-specific is here, so the optimizer reads the same with and
without a strategy. Public APIs are used throughout except in `var_key`, which
needs a private attribute, isolated in `_private`.
"""

from __future__ import annotations

import functools
import math
import os
import typing

import tensorflow as tf

from tf_adamax import _math
from tf_adamax import _private


def unwrap(var):
    """The `tf.Variable` behind a Keras 3 variable or a tf-keras
    `AutoCastVariable` (or `var` itself).

    Keras 3 variables on the TensorFlow backend wrap a `tf.Variable` as
    `.value`; the core optimizer updates that variable directly. tf-keras's
    mixed-precision `AutoCastVariable` is itself a `tf.Variable` wrapping
    the float32 one (`_variable`): the wrapper and the variable are one
    model variable, with one set of slots (tf-keras keys both alike), and
    the update reads the float32 value, not the wrapper's cast.
    """
    if any(c.__name__ == "AutoCastVariable"  # no tf_keras import (under a
           for c in type(var).__mro__):      # strategy: a subclass of it)
        # From the instance's own attributes: on a distributed variable
        # (not this class) `getattr` would fall through to a value read.
        inner = vars(var).get("_variable")
        if isinstance(inner, tf.Variable):
            return inner
    if isinstance(var, tf.Variable):
        return var
    inner = getattr(var, "value", None)
    if isinstance(inner, tf.Variable):
        return inner
    return var


def name(var):
    """The name of the `tf.Variable` behind `var`, for messages."""
    return unwrap(var).name


def expand(var_list):
    """`var_list` with every ShardedVariable replaced by its shards.

    Gradients are taken (and slots kept) per shard: each shard is an ordinary
    variable on one parameter server.
    """
    out = []
    for var in var_list:
        if _private.is_sharded(var):
            out.extend(var.variables)
        else:
            out.append(var)
    return out


def key_owner(var):
    """The object that stands for a model variable in all its views (a
    mirrored variable for each of its per-device components, the
    `tf.Variable` behind a Keras wrapper)."""
    var = unwrap(var)
    container = _private.distributed_container(var)
    return var if container is None else container


def var_key(var):
    """A hashable key naming a model variable, the same for all its views
    (`key_owner`). It keeps the variable alive: for per-step use."""
    return key_owner(var).ref()


def is_parameter_server(strategy):
    return isinstance(strategy,
                      tf.distribute.experimental.ParameterServerStrategy)


def current_strategy():
    return tf.distribute.get_strategy()


def check_not_in_xla_replica():
    """Raises a clear error for `apply_gradients` inside an XLA replica fn.

    One XLA program runs on one device, so it can neither sum the replicas'
    gradients nor update variables held on other devices (the copies of a
    mirrored variable, or CentralStorage's variables on their one device).
    """
    if not in_replica_context() or _private.in_tpu_program():
        # A TPUStrategy's replicated program is XLA too, by design: there
        # the update runs once on the TPU variables (see `plan`).
        return
    strategy = current_strategy()
    if strategy.num_replicas_in_sync > 1 and _private.in_xla_context():
        raise RuntimeError(
            "apply_gradients was called inside a tf.function(jit_compile=True)"
            f" running in a replica context of {type(strategy).__name__} "
            f"({strategy.num_replicas_in_sync} replicas). One XLA program "
            "runs on one device: it cannot sum the replicas' gradients or "
            "update variables held on other devices. "
            "Compile only the forward/backward pass with jit_compile=True and "
            "call apply_gradients outside it (still inside strategy.run): "
            "tf_adamax compiles the update itself with XLA, one program per "
            "device.")


def check_replica_context(variables):
    """Raises a clear error for mirrored variables updated outside
    `strategy.run`.

    Their gradients are per replica: inside `strategy.run` each replica
    passes its own and they are summed once. Outside it a single gradient
    has no replicas to be summed with (TF's own optimizers refuse too).
    """
    if in_replica_context():
        return
    for var in variables:
        inner = unwrap(var)
        if (isinstance(inner, tf.distribute.DistributedValues)
                and len(inner.values) > 1):
            raise RuntimeError(
                f"Variable {name(var)!r} is mirrored on {len(inner.values)} "
                "devices: call apply_gradients (or minimize) inside "
                "`strategy.run(...)`, where every replica passes its own "
                "gradients and they are summed once, not in the cross-replica "
                "context.")


def in_replica_context():
    """True inside `strategy.run` of a real (non-default) strategy."""
    return (tf.distribute.has_strategy()
            and tf.distribute.get_replica_context() is not None)


def merge(fn, *args):
    """Calls `fn(strategy, *args)` in the cross-replica context, once.

    From a replica context this is `merge_call`: gradients of all replicas
    meet there and every variable is updated once for all of them.
    """
    if in_replica_context():
        return tf.distribute.get_replica_context().merge_call(fn, args=args)
    return fn(current_strategy(), *args)


def check_same_strategy(strategy, var):
    """Raises a clear error when `var` lives under another strategy."""
    if not strategy.extended.variable_created_in_scope(unwrap(var)):
        raise ValueError(
            f"Variable {name(var)!r} was created under a different "
            "tf.distribute strategy than the optimizer "
            f"({type(strategy).__name__}). Create the optimizer inside the "
            "same `strategy.scope()` as the model's variables."
        )


def create_slot(strategy, var, name, dtype, shape, copy=False):
    """Creates a slot variable under `strategy`, colocated with `var`: zeros,
    or with `copy` a copy of `var`'s value (zeros while `var` holds none
    yet, as while `tf.saved_model.load` revives it before restoring).

    Under MirroredStrategy the slot is mirrored like its variable; under
    ParameterServerStrategy it lives on the variable's parameter server.
    """
    def initial_value():
        if copy and holds_value(unwrap(var)):
            return tf.cast(unwrap(var).read_value(), dtype)
        return tf.zeros(shape, dtype)

    with tf.init_scope():
        with strategy.scope(), strategy.extended.colocate_vars_with(
                unwrap(var)):
            return tf.Variable(
                initial_value, name=name, trainable=False,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                # Created eagerly (init_scope), not lifted out of a trace: a
                # tf.function whose first call created no variables may then
                # create slots for a new variable in a later trace (TF would
                # otherwise raise after that call had updated the weights).
                experimental_enable_variable_lifting=False,
            )


def holds_value(var):
    try:
        return bool(var.is_initialized())
    except (AttributeError, TypeError, ValueError, tf.errors.OpError):
        return False


def create_state(strategy, initial_value, name, dtype):
    """Creates an optimizer-wide variable (iterations, learning rate)."""
    with tf.init_scope():
        with strategy.scope():
            return tf.Variable(
                initial_value, name=name, dtype=dtype, trainable=False,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )


def is_tpu(strategy):
    """True for both TPUStrategy classes TF 2.21 exports (the experimental
    one is not a subclass of `tf.distribute.TPUStrategy`)."""
    return isinstance(strategy, (tf.distribute.TPUStrategy,
                                 tf.distribute.experimental.TPUStrategy))


def state_float_dtype(strategy):
    """float64 for the stored learning rate, except on TPUs (no float64).

    A float32 learning rate of 0.001 is off by 5e-8 relative, which a
    float64 model would see; TPUs cannot hold float64 state at all.
    """
    return tf.float32 if is_tpu(strategy) else tf.float64


def replica_own(grad):
    """`grad` as this replica's own tensor, in a form every strategy's sum
    takes; called in the replica context, before the sum.

    * A new tensor per replica: `merge_call` regroups an object that every
      replica passed (a gradient computed outside `strategy.run` and
      captured) into one plain value, which TF's sum then fails to index
      (IndexError, TF's own optimizers too). Each replica's copy is summed
      like any other gradient.
    * TF 2.21 gathers the values of `tf.IndexedSlices` over replicas
      (MirroredStrategy, MultiWorkerMirroredStrategy) with kernels that have
      no bfloat16 version, so bfloat16 sparse gradients fail there (TF's own
      optimizers too). Their values are widened to float32: exact, and the
      dtype the sparse kernels sum them in anyway (`_math.compute_dtype`),
      so the step is the one a single device takes. Not on TPUs, whose sum
      takes bfloat16 (and densifies the slices: widening would double it).
    """
    if isinstance(grad, tf.IndexedSlices):
        values = grad.values
        widen = values.dtype == tf.bfloat16 and not is_tpu(
            tf.distribute.get_strategy())
        values = (tf.cast(values, tf.float32) if widen
                  else tf.identity(values))
        return tf.IndexedSlices(values, tf.identity(grad.indices),
                                grad.dense_shape)
    return tf.identity(grad)


def all_reduce(strategy, grads, variables):
    """Sums gradients over replicas (IndexedSlices stay sparse: concatenated).

    Called in the cross-replica context. Returns one value per gradient,
    possibly per-replica (mirrored) values.
    """
    if strategy.num_replicas_in_sync == 1 and not isinstance(
            grads[0], tf.distribute.DistributedValues):
        return list(grads)
    return sum_per_dtype(
        lambda pairs: strategy.extended.batch_reduce_to(
            tf.distribute.ReduceOp.SUM,
            [(g, unwrap(v)) for g, v in pairs]),
        list(zip(grads, variables)),
        lambda pair: local(strategy, pair[0])[0].dtype)


def sum_per_dtype(sum_fn, items, dtype_of):
    """`sum_fn(items) -> sums`, called once per gradient dtype when they mix.

    TF packs a batch of dense gradients into one buffer (ConcatV2) for its
    all-reduce, which fails when a model mixes, say, float16 and float32
    variables (TF's and Keras's own optimizers too). The items of each dtype
    are summed apart, in list order, so every worker issues the same
    collectives. `dtype_of(item)` is None for an item to pass through
    unchanged (a None gradient). Returns the sums in the order of `items`.
    """
    positions = {}
    for i, item in enumerate(items):
        dtype = dtype_of(item)
        if dtype is not None:
            positions.setdefault(dtype, []).append(i)
    if len(positions) < 2:
        return list(sum_fn(items))
    summed = list(items)
    for part in positions.values():
        for i, s in zip(part, sum_fn([items[i] for i in part])):
            summed[i] = s
    return summed


def sum_pairs_per_dtype(sum_fn, grads_and_vars):
    """`sum_per_dtype` for a Keras hook that sums `(gradient, variable)`
    pairs (None gradients pass through)."""
    return sum_per_dtype(sum_fn, list(grads_and_vars),
                         lambda pair: dtype_or_none(pair[0]))


def dtype_or_none(grad):
    return None if grad is None else grad.dtype


def local(strategy, value):
    """The per-device components of `value` on this worker, as a tuple."""
    return tuple(strategy.experimental_local_results(value))


class Group(typing.NamedTuple):
    """The work of one device: positions into the variable list.

    `replica` is the index into `local(...)` results for replicated
    (mirrored) state, or None when the variables are split over devices (one
    group per device, as under ParameterServerStrategy).
    """

    device: str
    positions: typing.List[int]
    replica: typing.Optional[int]
    # Inside a TPUStrategy's program: the update takes the distributed
    # variables themselves (`component` returns them whole).
    whole: bool = False


def plan(strategy, variables):
    """Splits an update into per-device programs.

    Mirrored variables: one group per local replica, each holding every
    variable (its component on that device), so each device updates its copy
    with one compiled program. Variables not replicated (no strategy, or
    parameter servers): one group per device holding the variables placed
    there, because a compiled program can only touch resources on its own
    device.
    """
    if _private.in_tpu_program():
        # Every TPU core runs this program on its own copy of each variable,
        # so the update is built once, on the TPU variables, as TF's
        # `strategy.extended.update` does there (it calls the update once
        # with the whole variable); per-device copies and device scopes
        # would make each core's program touch every core's copy.
        return [Group("", list(range(len(variables))), None, True)], True
    components = [local(strategy, unwrap(v)) for v in variables]
    counts = {len(c) for c in components}
    if len(counts) == 1 and counts.pop() > 1:
        n = len(components[0])
        return [
            Group(components[0][i].device, list(range(len(variables))), i)
            for i in range(n)
        ], True
    by_device = {}
    for i, c in enumerate(components):
        by_device.setdefault(c[0].device, []).append(i)
    return [Group(d, p, None) for d, p in by_device.items()], False


def component(strategy, value, group):
    """`value`'s component for `group` (the value itself if not per-device).

    For a `whole` group a variable is itself and a reduced gradient the
    value this program holds.
    """
    if group.whole and isinstance(value, tf.Variable):
        return value
    parts = local(strategy, value)
    if group.replica is None or len(parts) == 1:
        return parts[0]
    return parts[group.replica]


# Below this many variables a program's fixed launch cost is not worth
# splitting; see `split_for_cores`.
_MIN_VARIABLES_PER_PROGRAM = 32
# Each part is compiled on its own; beyond a few, more parts add compile
# time and contend for the same memory bandwidth.
_MAX_PROGRAMS_PER_DEVICE = 4


def split_for_cores(groups, variables, cores):
    """Splits each CPU group of many variables into up to `cores` programs (at
    most `_MAX_PROGRAMS_PER_DEVICE`).

    XLA:CPU runs one program's kernels one after another and its launch pays
    a fixed cost per resource variable (profiled for benchmarks/: ~5 us per
    variable in TF's launch, ~7 us per compiled loop, three loops per
    variable). Programs of independent groups run concurrently on TF's
    inter-op threads, so a group of many variables is cut into consecutive
    parts of about equal size, one per core. GPU and TPU groups (and groups
    whose device is not known) stay whole: there one launch of one program is
    cheapest.
    """
    out = []
    for group in groups:
        parts = min(max(1, cores // len(groups)), _MAX_PROGRAMS_PER_DEVICE,
                    len(group.positions) // _MIN_VARIABLES_PER_PROGRAM)
        device_type = tf.DeviceSpec.from_string(group.device or "").device_type
        if parts < 2 or (device_type or "").upper() != "CPU":
            out.append(group)
            continue
        sizes = [unwrap(variables[i]).shape.num_elements() or 1
                 for i in group.positions]
        total, filled, cut, part = sum(sizes), 0, 1, []
        for position, size in zip(group.positions, sizes):
            part.append(position)
            filled += size
            if cut < parts and filled * parts >= total * cut:
                out.append(group._replace(positions=part))
                part, cut = [], cut + 1
        if part:
            out.append(group._replace(positions=part))
    return out


def cores():
    """Threads TF runs independent ops on (0 configured means one per core)."""
    return (tf.config.threading.get_inter_op_parallelism_threads()
            or os.cpu_count() or 1)


def compiled(fn):
    """`fn` as a tf.function compiled with XLA, one per call of this.

    Over a `functools.partial`: TF counts traces per Python function, and
    would warn of retracing once five optimizers (or programs) wrapping the
    same function had each traced theirs once.
    """
    return tf.function(functools.partial(fn), jit_compile=True,
                       reduce_retracing=True)


def bucketed(grads, variables):
    """Pads the sparse gradients whose length may vary to a size bucket for
    XLA.

    XLA compiles one program per combination of input shapes. When the
    number of sparse rows is only known at run time (parameter-server
    shards, ragged batches, `tf.unique`d ids), or when the update is called
    eagerly (where every call brings its concrete length), it is rounded up
    to one of four sizes per power of two, so the update compiles a handful
    of times instead of once per new length (each compile costs ~0.1-0.2 s
    on CPU, and its program stays mapped for the life of the process). All
    such gradients of one program are padded to the same size, the bucket
    of the longest: with a bucket each, K tables whose lengths vary
    independently would compile one program per combination (12**3 for
    three tables of 16-127 ids). Padding rows name row `num_rows` (out of
    range: the kernels' scatters drop it, the exact kernel's row map sends
    it to a spare slot, and the row sums leave it out) and carry zeros, so
    no row changes because of them. Dense gradients, and sparse ones of
    static length inside a `tf.function`, are returned as they are.
    """
    varying = [i for i, g in enumerate(grads)
               if isinstance(g, tf.IndexedSlices) and (
                   g.indices.shape[0] is None or tf.executing_eagerly())]
    if not varying:
        return list(grads)
    n = tf.reduce_max(tf.stack([tf.shape(grads[i].indices)[0]
                                for i in varying]))
    octave = tf.math.floor(tf.math.log(tf.cast(tf.maximum(n, 1),
                                               tf.float32)) / math.log(2))
    step = tf.cast(tf.pow(2.0, tf.maximum(octave - 2.0, 0.0)), tf.int32)
    size = (n + step - 1) // step * step
    padded = list(grads)
    for i in varying:
        grad = grads[i]
        pad = size - tf.shape(grad.indices)[0]
        rows = tf.cast(_math.num_rows(unwrap(variables[i])),
                       grad.indices.dtype)
        values = tf.concat([grad.values, tf.zeros(
            tf.concat([[pad], tf.shape(grad.values)[1:]], 0),
            grad.values.dtype)], 0)
        indices = tf.concat([grad.indices, tf.fill([pad], rows)], 0)
        padded[i] = tf.IndexedSlices(values, indices, grad.dense_shape)
    return padded


class CompiledParts:
    """`fn(grads, items, *args)` as one XLA program per device and part.

    For the Keras adapters' update without a strategy: the variables are
    grouped by device, each program placed on its group's device (so `fn`
    must get the optimizer's own state, step and rate, as `args`), and a
    long list on CPU is cut as `split_for_cores` cuts the core's programs
    (one per core, run concurrently in a graph). `items` holds one entry
    per variable (every variable the program touches, slots included, so
    that a trace reused for other variables of the same shapes updates
    those); each part's `fn` gets its gradients and items. Each part keeps
    its own tf.function, so each is traced once; all are traced before any
    runs, so an error while tracing one part changes nothing. `fns` lists
    them.
    """

    def __init__(self, fn):
        self._fn = fn
        self.fns = []

    def __call__(self, grads, variables, items, *args):
        tf_vars = [unwrap(v) for v in variables]
        by_device = {}
        for i, v in enumerate(tf_vars):
            by_device.setdefault(getattr(v, "device", "") or "", []).append(i)
        groups = [Group(device=d, positions=p, replica=None)
                  for d, p in by_device.items()]
        parts = split_for_cores(groups, tf_vars, cores())
        while len(self.fns) < len(parts):
            self.fns.append(compiled(self._fn))
        calls = [(fn, part.device or None,
                  bucketed([grads[i] for i in part.positions],
                           [tf_vars[i] for i in part.positions]),
                  [items[i] for i in part.positions])
                 for fn, part in zip(self.fns, parts)]
        traced = []
        for fn, device, part_grads, part_items in calls:
            with tf.device(device):
                traced.append(fn.get_concrete_function(part_grads, part_items,
                                                       *args))
        for concrete, (_, device, part_grads, part_items) in zip(traced,
                                                                 calls):
            with tf.device(device):
                concrete(part_grads, part_items, *args)
