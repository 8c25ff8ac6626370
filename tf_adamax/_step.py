"""One optimizer step over a list of variables: gradient transforms + kernels.

`apply_step` is the body the core optimizer runs once per `apply_gradients`
call (compiled as one XLA program when `jit_compile=True`). It takes the
variables, their slots and already-aggregated gradients, and applies, in Keras
3's order: loss-scale division, gradient accumulation, clipping, decoupled
weight decay + the Adamax update (`_math`), and the weight EMA. It reads no
optimizer object: everything arrives as arguments, so the same function serves
one device, each replica of a mirrored variable, or each parameter server.
"""

from __future__ import annotations

import typing

import tensorflow as tf

from tf_adamax import _math


class StepConfig(typing.NamedTuple):
    """Static (trace-time) settings of a step; see `Adamax` for meanings."""

    beta_1: typing.Any
    beta_2: typing.Any
    epsilon: typing.Any
    weight_decay: typing.Any
    clipnorm: typing.Any
    clipvalue: typing.Any
    global_clipnorm: typing.Any
    loss_scale_factor: typing.Any
    gradient_accumulation_steps: typing.Optional[int]
    use_ema: bool
    ema_momentum: float
    ema_overwrite_frequency: typing.Optional[int]
    sparse_mode: str


class VarState(typing.NamedTuple):
    """A variable and its slots (`average`/`accumulator` None when unused)."""

    var: typing.Any
    momentum: typing.Any
    norm: typing.Any
    average: typing.Any = None
    accumulator: typing.Any = None


class SparseRows(typing.NamedTuple):
    """A sparse gradient after `_math.sum_rows` (see there).

    `rows` may repeat; `once[i]` is the summed gradient of row `rows[i]` at
    one entry per distinct row and zero at the others, so sums and norms over
    it see each row once. `source` says where in `once` each row the kernel
    writes reads its gradient (per entry in lazy mode, per table row in
    exact mode).
    """

    rows: tf.Tensor
    once: tf.Tensor
    source: tf.Tensor


def prepare(grad, var, sparse_mode="lazy"):
    """Brings a gradient into the form the step works on.

    An IndexedSlices has its duplicate rows summed once, here, before any
    nonlinearity (clipping, |g|, max), in the form `sparse_mode`'s kernel
    takes (`var` gives the table size). Half-precision values come out in
    float32.
    """
    if isinstance(grad, tf.IndexedSlices):
        return SparseRows(*_math.sum_rows(grad.indices, grad.values, var,
                                          sparse_mode))
    # A half-precision gradient is divided by the loss scale and clipped in
    # float32 (the slots' dtype), as sparse rows are summed: in float16 a
    # scale of 2**15 flushes small gradients to zero, and 2**16 is inf.
    return tf.cast(grad, _math.compute_dtype(grad.dtype))


def _map(grad, fn):
    if isinstance(grad, SparseRows):
        return grad._replace(once=fn(grad.once))
    return fn(grad)


def _sq_norm(grad):
    values = grad.once if isinstance(grad, SparseRows) else grad
    values = tf.cast(values, _math.compute_dtype(values.dtype))
    return tf.reduce_sum(tf.square(values))


def _to_dense(grad, var):
    if isinstance(grad, SparseRows):
        return _math.densify(grad.rows, grad.once, _math.num_rows(var))
    return grad


def clip(config, grads, global_norm=None):
    """Keras 3 clipping, on gradients whose duplicates are already summed.

    Args:
      config: the `StepConfig`.
      grads: prepared gradients (tensors or `SparseRows`).
      global_norm: for `global_clipnorm`, the norm over ALL gradients when
        `grads` is only part of them (variables spread over devices);
        None computes it from `grads`.
    """
    if config.clipnorm is not None:
        def by_norm(g):
            l2sum = _sq_norm(g)
            # Two-tap where: no NaN gradient from sqrt at 0.
            safe = tf.where(l2sum > 0, l2sum, tf.ones_like(l2sum))
            l2norm = tf.where(l2sum > 0, tf.sqrt(safe), l2sum)
            clipnorm = _math.as_dtype(config.clipnorm, l2norm.dtype)
            scale = clipnorm / tf.maximum(l2norm, clipnorm)
            return _map(g, lambda v: v * tf.cast(scale, v.dtype))
        return [by_norm(g) for g in grads]
    if config.global_clipnorm is not None:
        if global_norm is None:
            global_norm = global_norm_of(grads)
        clip_norm = _math.as_dtype(config.global_clipnorm, global_norm.dtype)
        scale = clip_norm * tf.minimum(1.0 / global_norm, 1.0 / clip_norm)
        # NaN/inf norm propagates as in tf.clip_by_global_norm.
        scale = scale + (global_norm - global_norm)
        return [_map(g, lambda v: v * tf.cast(scale, v.dtype)) for g in grads]
    if config.clipvalue is not None:
        def by_value(v):
            c = _math.as_dtype(config.clipvalue, v.dtype)
            return tf.clip_by_value(v, -c, c)
        return [_map(g, by_value) for g in grads]
    return grads


def global_norm_of(grads):
    """L2 norm over a list of prepared gradients (float32 or wider)."""
    sq = [_sq_norm(g) for g in grads]
    # Mixed float32/float64 variables: add up in the widest dtype present.
    dtype = tf.float64 if any(x.dtype == tf.float64 for x in sq) else tf.float32
    return tf.sqrt(tf.add_n([tf.cast(x, dtype) for x in sq]) if sq
                   else tf.constant(0.0, dtype))


def global_grad_norm(config, grads, variables, accumulators=None):
    """The norm `global_clipnorm` clips to, over gradients of all devices.

    Used when the variables are split over devices (one program each), so no
    single program sees every gradient. With gradient accumulation
    (`accumulators`, one per variable) it is the norm of the means an update
    call clips, each accumulator read on its own device; calls that only
    accumulate do not use it.
    """
    prepared = _unscaled(config, [prepare(g, v)
                                  for g, v in zip(grads, variables)])
    if accumulators is not None:
        prepared = [_accumulated_mean(config, g, v, a)
                    for g, v, a in zip(prepared, variables, accumulators)]
    return global_norm_of(prepared)


def _unscaled(config, grads):
    """Prepared gradients divided by `loss_scale_factor` (if set)."""
    if config.loss_scale_factor is None:
        return grads
    return [_map(g, lambda v: v / _math.as_dtype(config.loss_scale_factor,
                                                 v.dtype)) for g in grads]


def _accumulated_mean(config, grad, var, accumulator):
    """The mean of the accumulated gradients and this call's (unscaled,
    prepared) `grad`, in the slots' dtype: a float16 mean of loss-scaled
    gradients would flush to zero."""
    mean = (tf.cast(_to_dense(grad, var), accumulator.dtype)
            + accumulator) / config.gradient_accumulation_steps
    return tf.cast(mean, _math.compute_dtype(var.dtype))


def _update(config, states, grads, decays, step, learning_rate):
    """Weight decay + Adamax for each variable (the `_math` kernels)."""
    for state, grad, decay in zip(states, grads, decays):
        hyper = _math.Hyper.of(
            config, learning_rate, step,
            weight_decay=config.weight_decay if decay else None)
        if isinstance(grad, SparseRows):
            _math.rows_step(state.var, state.momentum, state.norm, grad.rows,
                            grad.once, grad.source, hyper,
                            config.sparse_mode)
        else:
            _math.dense_step(state.var, state.momentum, state.norm, grad,
                             hyper)


@tf.autograph.experimental.do_not_convert
def apply_step(config: StepConfig, states, grads, decays, iteration,
               learning_rate, global_norm=None):
    """Applies one optimizer step to `states` (not incrementing iterations).

    Args:
      config: static `StepConfig`.
      states: list of `VarState`.
      grads: list of gradients (tensors or `tf.IndexedSlices`), aggregated.
      decays: list of bools, whether weight decay applies to each variable.
      iteration: int64 scalar, the optimizer's iteration count BEFORE this
        call (t = iteration + 1, or iteration // N + 1 with accumulation).
      learning_rate: scalar tensor, this step's learning rate.
      global_norm: see `clip`.

    Updates happen as side effects (ordered per resource by TF's automatic
    control dependencies); nothing is returned, so the function can be
    wrapped in `tf.function(jit_compile=True)` as is.
    """
    grads = _unscaled(config, [prepare(g, s.var, config.sparse_mode)
                               for g, s in zip(grads, states)])
    # Keras 3: with accumulation, t and the EMA count updates (calls // N).
    n = config.gradient_accumulation_steps
    updates = iteration // n if n else iteration
    step = updates + 1

    if n:
        def update_with_mean():
            mean = [_accumulated_mean(config, g, s.var, s.accumulator)
                    for g, s in zip(grads, states)]
            _update(config, states, clip(config, mean, global_norm), decays,
                    step, learning_rate)
            for s in states:  # ordered after the reads above (same resource)
                s.accumulator.assign(tf.zeros_like(s.accumulator),
                                     read_value=False)
            return tf.constant(True)

        def accumulate():
            for g, s in zip(grads, states):
                if isinstance(g, SparseRows):
                    s.accumulator.scatter_add(tf.IndexedSlices(
                        tf.cast(g.once, s.accumulator.dtype), g.rows))
                else:
                    # Not assign_add(g): its shape function merges g's shape
                    # with the variable's, from which TF's graph optimizer
                    # learns a shape known only at run time and folds away
                    # the run-time check that must fail first
                    # (`_checks.run_time_checks`). (A reshape to the static
                    # shape would tell it too.) XLA compiles both the same.
                    s.accumulator.assign(
                        s.accumulator + tf.cast(g, s.accumulator.dtype),
                        read_value=False)
            return tf.constant(False)

        tf.cond((iteration + 1) % n == 0, update_with_mean, accumulate)
    else:
        _update(config, states, clip(config, grads, global_norm),
                decays, step, learning_rate)

    if config.use_ema:
        _ema(config, states, updates)


def _ema(config, states, updates):
    """Keras 3's weight EMA; the first update copies the weights."""
    for s in states:
        s.average.assign(_math.moving_average(
            s.average, tf.cast(s.var, s.average.dtype),
            _math.ema_momentum(config.ema_momentum, updates,
                               s.average.dtype)), read_value=False)
    if config.ema_overwrite_frequency:
        freq = config.ema_overwrite_frequency

        def overwrite():
            for s in states:
                s.var.assign(tf.cast(s.average, s.var.dtype),
                             read_value=False)
            return tf.constant(True)

        tf.cond((updates + 1) % freq == 0, overwrite,
                lambda: tf.constant(False))
