"""The Adamax update, written once.

Every path (the core optimizer's per-variable and fused updates, the dense,
exact-sparse and lazy-sparse steps, the Keras 3 and tf-keras adapters) calls the
functions here. They take variables/tensors and hyperparameter tensors; they own
no state, know nothing of Keras or `tf.distribute`, and contain only ops XLA
compiles (no host round trips, no data-dependent shapes), so they run unchanged
inside `tf.function(jit_compile=True)` on CPU, GPU and TPU.

Update rule (Kingma & Ba 2014, section 7.1), with t = iterations + 1:

    m = beta_1 * m + (1 - beta_1) * g
    u = max(beta_2 * u, |g|)
    w = w - learning_rate * m / ((1 - beta_1 ** t) * (u + epsilon))

Decoupled weight decay, when set, is `w = w - w * weight_decay * learning_rate`
before the step, as Keras 3 applies it.
"""

from __future__ import annotations

import typing

import tensorflow as tf


class Hyper(typing.NamedTuple):
    """Scalar hyperparameters of one update, already resolved for this step.

    Each field is a scalar (Python float or tensor) in any float dtype; the
    kernels cast them to the computation dtype of the variable they update.
    `weight_decay` is None when no decoupled weight decay applies.
    """

    learning_rate: typing.Any
    beta_1: typing.Any
    beta_2: typing.Any
    epsilon: typing.Any
    step: typing.Any  # t = iterations + 1, any numeric dtype
    weight_decay: typing.Any = None


def compute_dtype(var_dtype):
    """The dtype the slots of a `var_dtype` variable are kept and computed in.

    float16/bfloat16 variables keep float32 slots: their 10/7-bit mantissas
    would round a momentum of 1e-4 * gradient to zero.
    """
    var_dtype = tf.as_dtype(var_dtype)
    if var_dtype in (tf.float16, tf.bfloat16):
        return tf.float32
    return var_dtype


def as_dtype(value, dtype):
    """`value` in `dtype`. Python numbers convert directly: `tf.cast(0.9,
    tf.float64)` would round through float32 first."""
    if isinstance(value, (int, float)):
        return tf.constant(value, dtype)
    return tf.cast(value, dtype)


def adamax_rows(w, m, u, g, hyper: Hyper):
    """The pure Adamax update of a block of rows (or a whole variable).

    Args:
      w: current variable values (any float dtype).
      m: current first moment, in `compute_dtype(w.dtype)`.
      u: current infinity norm, in `compute_dtype(w.dtype)`.
      g: gradient for these rows, duplicates already summed; any float dtype.
      hyper: the step's `Hyper`.

    Returns:
      `(new_w, new_m, new_u)`: new_w in w's dtype, the slots in their dtype.
    """
    dtype = m.dtype
    lr = as_dtype(hyper.learning_rate, dtype)
    beta_1 = as_dtype(hyper.beta_1, dtype)
    beta_2 = as_dtype(hyper.beta_2, dtype)
    epsilon = as_dtype(hyper.epsilon, dtype)
    step = as_dtype(hyper.step, dtype)
    g = tf.cast(g, dtype)
    w_c = tf.cast(w, dtype)

    new_m = beta_1 * m + (1 - beta_1) * g
    new_u = tf.maximum(beta_2 * u, tf.abs(g))
    if hyper.weight_decay is not None:
        w_c = w_c - w_c * as_dtype(hyper.weight_decay, dtype) * lr
    bias_correction = 1 - tf.pow(beta_1, step)
    new_w = w_c - lr * new_m / (bias_correction * (new_u + epsilon))
    return tf.cast(new_w, w.dtype), new_m, new_u


def dense_step(var, m, u, grad, hyper: Hyper):
    """Applies a dense gradient to `var` and its slots `m`, `u` in place.

    Like every `*_step` here it returns nothing: inside `tf.function` TF's
    automatic control dependencies run and order the assignments.
    """
    new_w, new_m, new_u = adamax_rows(
        var.read_value(), m.read_value(), u.read_value(), grad, hyper
    )
    # read_value=False: returning the new value would read (copy) it.
    m.assign(new_m, read_value=False)
    u.assign(new_u, read_value=False)
    var.assign(new_w, read_value=False)


def _first_of_runs(sorted_indices):
    """Marks the first entry of each run of equal (sorted) indices."""
    n = tf.size(sorted_indices)
    return tf.concat([tf.ones([tf.minimum(n, 1)], tf.bool),
                      sorted_indices[1:] != sorted_indices[:-1]], axis=0)


def sum_duplicates(indices, values):
    """Sums the rows of an IndexedSlices that name the same index.

    The result keeps one entry per input entry (static shape, so XLA compiles
    it), sorted by index: `indices[i]` and `values[i]`, where `values[i]` is the
    sum of all input rows with that index. Entries that repeat an index repeat
    the same summed row, so an update computed per entry is the same for every
    copy and a scatter of it is well defined.

    Args:
      indices: int32/int64 vector, may hold duplicates in any order.
      values: tensor whose first dimension matches `indices`.

    Returns:
      `(sorted_indices, per_entry_sums, segment_sums, is_first)` where
      `segment_sums[k]` is the k-th distinct row's sum (zero-padded to the
      input length) and `is_first[i]` marks the first entry of each distinct
      index. Norms over `segment_sums` equal norms of the densified gradient.
    """
    n = tf.shape(indices)[0]
    order = tf.argsort(indices, stable=True)
    sorted_indices = tf.gather(indices, order)
    sorted_values = tf.gather(values, order)
    is_first = _first_of_runs(sorted_indices)
    segment_ids = tf.cumsum(tf.cast(is_first, tf.int32)) - 1
    segment_sums = tf.math.unsorted_segment_sum(sorted_values, segment_ids, n)
    per_entry = tf.gather(segment_sums, segment_ids)
    return sorted_indices, per_entry, segment_sums, is_first


def first_copies(values, is_first):
    """`values` with every repeated entry zeroed (each row counted once)."""
    mask = tf.cast(is_first, values.dtype)
    return values * tf.reshape(mask, [-1] + [1] * (values.shape.rank - 1))


def merge_duplicates(slices):
    """An IndexedSlices with the same densified value, each index once.

    Each distinct index keeps its summed row once; the other copies become
    zero rows (static shape, for XLA). Row-wise transforms (clipping by
    value, norms) then see the densified gradient, not each copy.
    """
    indices, sums, _, is_first = sum_duplicates(slices.indices, slices.values)
    return tf.IndexedSlices(first_copies(sums, is_first), indices,
                            slices.dense_shape)


def num_rows(var):
    """Rows of `var` without reading it (`tf.shape(var)` copies a variable)."""
    static = var.shape[0]
    return static if static is not None else tf.shape(var.read_value())[0]


def densify(indices, values, num_rows):
    """The dense gradient of an IndexedSlices: duplicate rows summed.

    Indices outside `[0, num_rows)` are dropped (XLA's scatter semantics; the
    optimizer validates indices before this where asserts can run).
    """
    return tf.math.unsorted_segment_sum(values, indices, num_rows)


def exact_rows_step(var, m, u, rows, row_grads, hyper: Hyper):
    """Applies summed gradient rows exactly as their densified gradient.

    Rows not named have g = 0 and still decay their moments and move, as
    with a dense zero gradient. The gradient is densified (each distinct row
    once) and fed to `dense_step`: on XLA:CPU an elementwise pass over a
    materialized gradient runs 3-4x faster than the same pass with an
    implicit zero gradient plus a scatter of the named rows (measured in
    benchmarks/), so densifying is the faster exact path.

    Args:
      var, m, u: the variable and its slots.
      rows: sorted row indices; may repeat, each copy carrying the same
        summed row (as `sum_duplicates` returns them).
      row_grads: the full gradient of each named row.
      hyper: the step's `Hyper`.
    """
    grad = densify(rows, first_copies(row_grads, _first_of_runs(rows)),
                   num_rows(var))
    dense_step(var, m, u, grad, hyper)


def _scatter_rows(var, m, u, rows, new_w, new_m, new_u):
    # Repeated rows carry identical results, so the scatter is well defined
    # whichever copy lands last. The return values (lazy reads of the whole
    # variable) are dropped on purpose: using them would copy the table.
    m.scatter_update(tf.IndexedSlices(new_m, rows))
    u.scatter_update(tf.IndexedSlices(new_u, rows))
    var.scatter_update(tf.IndexedSlices(new_w, rows))


def lazy_rows_step(var, m, u, rows, row_grads, hyper: Hyper):
    """Updates only `rows` of var, m, u; O(len(rows) * row size).

    `row_grads[i]` must be the full (duplicates summed) gradient of row
    `rows[i]`; a row may repeat, carrying the same gradient each time (as
    `sum_duplicates` returns it). Only these rows are gathered and scattered:
    nothing reads, copies or rewrites the whole variable.
    """
    new_w, new_m, new_u = adamax_rows(
        tf.gather(var, rows), tf.gather(m, rows), tf.gather(u, rows),
        row_grads, hyper,
    )
    _scatter_rows(var, m, u, rows, new_w, new_m, new_u)


def rows_step(sparse_mode):
    """The kernel for summed sparse rows: `lazy_rows_step` or
    `exact_rows_step`."""
    return lazy_rows_step if sparse_mode == "lazy" else exact_rows_step


def apply_gradient(var, m, u, grad, hyper: Hyper, sparse_mode):
    """Applies a dense or `tf.IndexedSlices` gradient to `var`, `m`, `u`.

    Sparse gradients have their duplicate indices summed first (before |g|
    and max: max is not linear, |g1| + |g2| != |g1 + g2| for opposite
    signs), then take the `sparse_mode` kernel. The entry point for callers
    that apply one gradient at a time (the Keras adapters).
    """
    if isinstance(grad, tf.IndexedSlices):
        rows, row_grads, _, _ = sum_duplicates(grad.indices, grad.values)
        rows_step(sparse_mode)(var, m, u, rows, row_grads, hyper)
    else:
        dense_step(var, m, u, grad, hyper)
