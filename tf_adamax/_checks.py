"""Validation of (gradient, variable) pairs, shared by every entry point.

Static checks raise `TypeError`/`ValueError` naming the variable while
tracing; what is only known at run time (sparse indices, dynamic shapes)
becomes assert ops that the caller makes its update depend on. Either way a
bad pair fails before any state changes.
"""

from __future__ import annotations

import tensorflow as tf

from tf_adamax import _distribute
from tf_adamax import _math
from tf_adamax import _private


def check_variable(var):
    """Raises TypeError, naming it, for what is not a float tf.Variable."""
    if _private.is_sharded(var):
        raise TypeError(
            f"Variable {var.name!r} is a ShardedVariable: pass one gradient "
            "per shard, e.g. zip(tape.gradient(loss, var.variables), "
            "var.variables). Its slots are sharded like it.")
    check_skippable(var)
    check_shape_known(var)


def check_skippable(var):
    """The checks of a variable whose gradient is None (skipped): raises
    TypeError, naming it, for what is not a float variable."""
    unwrapped = _distribute.unwrap(var)
    if not _private.is_sharded(var) and (
            not hasattr(unwrapped, "dtype")
            or not hasattr(unwrapped, "assign")):
        raise TypeError(
            f"Expected a tf.Variable to update, got "
            f"{type(unwrapped).__name__}: {unwrapped!r}. Pass the variables "
            "themselves (e.g. model.trainable_variables), not their values.")
    check_float(unwrapped)


def check_shape_known(var):
    """Raises ValueError, naming it, for a variable whose shape is not fully
    defined (also for the adapters' `build`, before Keras creates slots)."""
    var = _distribute.unwrap(var)
    if not var.shape.is_fully_defined():
        raise ValueError(
            f"Variable {var.name!r} has shape {var.shape}, which is not "
            "fully defined; Adamax creates slots of its variables' shape. "
            "Create the variable with its full shape (drop `shape=` with "
            "None dimensions).")


def check_float(var):
    """Raises TypeError, naming it, for a variable of a non-float dtype."""
    dtype = getattr(_distribute.unwrap(var), "dtype", None)
    if dtype is not None and not tf.as_dtype(dtype).is_floating:
        raise TypeError(
            f"Variable {var.name!r} has dtype {tf.as_dtype(dtype).name}; "
            "Adamax can only update floating-point variables. Make it "
            "float32 (or exclude it from the variables passed to the "
            "optimizer).")


def tensor_slices(grad, var=None):
    """`grad` with tensor parts, if it is an IndexedSlices built by hand
    from NumPy arrays or lists (as `tf.convert_to_tensor` and the Keras
    optimizers accept it), a NumPy array, a (nested) list or a number, or
    the value of a Keras 3 variable passed as a gradient (as Keras's own
    optimizers accept all of them); any other gradient (None too) as is.
    What cannot
    be converted raises, naming `var` when given."""
    if isinstance(getattr(grad, "value", None), tf.Variable) and \
            not isinstance(grad, tf.Variable):
        return tf.convert_to_tensor(grad)
    if not (grad is None or tf.is_tensor(grad) or isinstance(
            grad, (tf.IndexedSlices, tf.SparseTensor, tf.Variable))):
        try:
            return tf.convert_to_tensor(grad)
        except (TypeError, ValueError) as e:
            of = "" if var is None else \
                f" for variable {_distribute.name(var)!r}"
            raise type(e)(
                f"Gradient{of} is a {type(grad).__name__} that is not a "
                f"tensor and cannot be made one ({e}). Pass a tf.Tensor, a "
                "NumPy array or a nested list of the variable's shape, or "
                "a tf.IndexedSlices.") from e
    if not isinstance(grad, tf.IndexedSlices):
        return grad
    shape = grad.dense_shape
    indices = _vector(tf.convert_to_tensor(grad.indices), var)
    if (tf.is_tensor(grad.values) and indices is grad.indices
            and (shape is None or tf.is_tensor(shape))):
        return grad
    return tf.IndexedSlices(
        tf.convert_to_tensor(grad.values), indices,
        None if shape is None else tf.convert_to_tensor(shape))


def _vector(indices, var):
    """Indices of unknown rank (a `tf.function` traced with an unknown
    shape) as a vector, once an assert has checked that they are one: the
    kernels need it while tracing, and a matrix would otherwise meet the
    updates as an error naming no variable (or none, flattened)."""
    if indices.shape.rank is not None:
        return indices
    of = "" if var is None else f" for variable {_distribute.name(var)!r}"
    rank_ok = tf.debugging.Assert(tf.equal(tf.rank(indices), 1), [
        f"IndexedSlices gradient{of} has indices of shape",
        tf.shape(indices), "; expected a vector of row indices."])
    if _private.in_xla_context():
        # Asserts do not run inside a user's XLA function: there a matrix
        # fails to compile instead of being flattened into rows. (Not
        # elsewhere: TF's graph optimizer evaluates `ensure_shape` with the
        # call's shapes before the assert can name the variable.)
        return tf.ensure_shape(indices, [None])
    with tf.control_dependencies([rank_ok]):
        return tf.reshape(indices, [-1])


def with_dense_shape(grads, variables):
    """Sparse gradients without a `dense_shape` get their variable's shape
    (for the adapters, whose Keras hooks see gradients without their
    variables: the clip norms must leave out rows past the table, and Keras
    3 densifies accumulated gradients); other gradients as they are."""
    return [tf.IndexedSlices(g.values, g.indices, tf.shape(
        _distribute.unwrap(v), out_type=g.indices.dtype))
            if isinstance(g, tf.IndexedSlices) and g.dense_shape is None
            else g for g, v in zip(grads, variables)]


def for_keras(grads, variables):
    """The gradients an adapter hands Keras: `with_dense_shape`, and inside
    a user's XLA function each one's shape pinned to its variable's
    (`static_shape`), since the run-time asserts cannot run there and Keras
    would broadcast a mismatched gradient."""
    return [None if g is None else static_shape(g, _distribute.unwrap(v))
            for g, v in zip(with_dense_shape(grads, variables), variables)]


def check_pair(grad, var):
    """Static checks of one (gradient, variable) pair; raises naming var."""
    check_variable(var)
    name = _distribute.name(var)
    if isinstance(grad, tf.SparseTensor):
        raise TypeError(
            f"Gradient for variable {name!r} is a tf.SparseTensor; expected "
            "a dense tensor or a tf.IndexedSlices of rows of the variable. "
            "Pass tf.sparse.to_dense(grad), or tf.IndexedSlices(values, "
            "row_indices, dense_shape) for a sparse update.")
    if isinstance(grad, tf.IndexedSlices):
        if var.shape.rank == 0:
            raise ValueError(
                f"IndexedSlices gradient for variable {name!r}, a scalar: "
                "sparse gradients name rows, and a scalar has none. Pass a "
                "dense gradient (tf.convert_to_tensor(grad)).")
        values_shape = grad.values.shape
        if not values_shape[1:].is_compatible_with(var.shape[1:]):
            raise ValueError(
                f"IndexedSlices gradient for variable {name!r} has rows of "
                f"shape {values_shape[1:]}, but the variable's rows have "
                f"shape {var.shape[1:]}: pass gradients in the same order as "
                "their variables.")
        if grad.indices.dtype not in (tf.int32, tf.int64):
            raise TypeError(
                f"IndexedSlices gradient for variable {name!r} has indices "
                f"of dtype {grad.indices.dtype.name}; expected int32 or "
                "int64 row indices.")
        if grad.indices.shape.rank not in (None, 1):
            raise ValueError(
                f"IndexedSlices gradient for variable {name!r} has indices "
                f"of shape {grad.indices.shape}; expected a vector.")
        dense_shape = _static_dense_shape(grad)
        if dense_shape is not None and dense_shape != var.shape:
            raise ValueError(
                f"IndexedSlices gradient for variable {name!r} has "
                f"dense_shape {dense_shape}, but the variable has shape "
                f"{var.shape}: pass gradients in the same order as their "
                "variables.")
        if not grad.indices.shape[:1].is_compatible_with(values_shape[:1]):
            raise ValueError(
                f"IndexedSlices gradient for variable {name!r} has "
                f"{grad.indices.shape[0]} indices but {values_shape[0]} rows "
                "of values; expected one index per row.")
        values_dtype = grad.values.dtype
    else:
        grad = tf.convert_to_tensor(grad) if not tf.is_tensor(grad) else grad
        if not grad.shape.is_compatible_with(var.shape):
            raise ValueError(
                f"Gradient for variable {name!r} has shape {grad.shape}, but "
                f"the variable has shape {var.shape}: pass gradients in the "
                "same order as their variables.")
        values_dtype = grad.dtype
    if not values_dtype.is_floating:
        raise TypeError(
            f"Gradient for variable {name!r} has dtype {values_dtype.name}; "
            "expected a floating-point gradient.")


def run_time_checks(grads_and_vars):
    """Assert ops for what static shapes cannot tell: every sparse index lies
    in [0, rows of its variable), and gradient shapes known only at run time
    match their variable's.

    Callers make the update (and the step counter) depend on them, so they
    raise, eagerly and in graphs, before any state changes. Inside a user's
    XLA-compiled function asserts cannot run; there an out-of-range row is
    dropped by the scatters (never clamped onto another row), and shapes are
    static when XLA compiles (`static_shape`).
    """
    checks = []
    for g, v in grads_and_vars:
        checks += _shape_checks(g, v)
        if not isinstance(g, tf.IndexedSlices):
            continue
        rows = tf.cast(_math.num_rows(_distribute.unwrap(v)), g.indices.dtype)
        ok = (g.indices >= 0) & (g.indices < rows)
        message = (
            f"IndexedSlices gradient for variable {_distribute.name(v)!r} "
            "has indices out of range [0, rows): pass row indices of that "
            "variable (e.g. ids below an embedding's input_dim).")
        if tf.executing_eagerly():
            if not bool(tf.reduce_all(ok)):
                bad = tf.boolean_mask(g.indices, ~ok)[:20].numpy().tolist()
                raise tf.errors.InvalidArgumentError(
                    None, None,
                    f"{message} rows = {int(rows)}; out of range: {bad}")
            continue
        checks.append(tf.debugging.Assert(tf.reduce_all(ok), [
            message, "rows =", rows, "indices:", g.indices], summarize=20))
    return checks


def after(checks, grads):
    """`grads`, computed only once `checks` passed (for ops that consume
    the gradients in another context, like a cross-replica sum)."""
    if not checks:
        return grads
    with tf.control_dependencies(checks):
        return [tf.IndexedSlices(tf.identity(g.values), tf.identity(g.indices),
                                 g.dense_shape)
                if isinstance(g, tf.IndexedSlices) else tf.identity(g)
                for g in grads]


def one_device(strategy, grads_and_vars):
    """The pairs with each aggregated gradient as one device holds it.

    In the cross-replica context a gradient summed over replicas holds one
    value per device, all of one shape and (after the sum) one content, so
    the first stands for all. Without a strategy (the default one) each
    gradient is its own value.
    """
    return [(_distribute.local(strategy, g)[0], v) for g, v in grads_and_vars]


def checked(strategy, grads_and_vars):
    """`check_pair` for every pair, then their `run_time_checks`; for the
    Keras adapters' hooks, which get the aggregated gradients in the
    cross-replica context."""
    pairs = one_device(strategy, grads_and_vars)
    for grad, var in pairs:  # a bad pair raises before any update
        check_pair(grad, var)
    return run_time_checks(pairs)


def checked_before_keras(grads, variables):
    """`checked` for the pairs a Keras adapter's `apply`/`apply_gradients`
    receives, before Keras does anything with them (its weight decay and
    gradient accumulation run before the update hook). `None` gradients
    are Keras's to skip. Returns the run-time asserts, for control deps."""
    pairs = [(g, _distribute.unwrap(v)) for g, v in zip(grads, variables)
             if g is not None]
    return checked(tf.distribute.get_strategy(), pairs)


def _shape_checks(grad, var):
    """Asserts for the parts of a gradient's shape unknown when tracing."""
    if isinstance(grad, tf.IndexedSlices):
        checks = []
        if not (grad.values.shape[:1].is_fully_defined()
                and grad.indices.shape.is_fully_defined()):
            checks.append(tf.debugging.Assert(
                tf.equal(tf.shape(grad.indices)[0], tf.shape(grad.values)[0]),
                [f"IndexedSlices gradient for variable "
                 f"{_distribute.name(var)!r} has "
                 "a different number of indices and rows of values:",
                 tf.shape(grad.indices), tf.shape(grad.values)]))
        if not grad.values.shape[1:].is_fully_defined():
            checks.append(_assert_shape(
                tf.shape(grad.values)[1:], var.shape[1:],
                f"IndexedSlices gradient for variable "
                f"{_distribute.name(var)!r} has "
                "rows of the wrong shape; expected"))
        if grad.dense_shape is not None and _static_dense_shape(grad) is None:
            checks.append(_assert_shape(
                tf.cast(grad.dense_shape, tf.int32), var.shape,
                f"IndexedSlices gradient for variable "
                f"{_distribute.name(var)!r} has the wrong dense_shape; "
                "expected"))
        return checks
    if not tf.is_tensor(grad) or grad.shape.is_fully_defined():
        return []
    return [_assert_shape(
        tf.shape(grad), var.shape,
        f"Gradient for variable {_distribute.name(var)!r} has the wrong "
        "shape (pass "
        "gradients in the same order as their variables); expected")]


def _static_dense_shape(grad):
    """An IndexedSlices' `dense_shape` as a TensorShape when it is known
    while tracing, else None."""
    if grad.dense_shape is None:
        return None
    value = tf.get_static_value(grad.dense_shape)
    return None if value is None else tf.TensorShape(value.tolist())


def _assert_shape(actual, expected, message):
    """Asserts that the shape vector `actual` equals the static `expected`
    (fully defined: `check_variable` refuses other variables)."""
    rank = expected.rank
    # Padded, so a gradient of lower rank is compared without an index error.
    padded = tf.concat([actual, tf.fill([rank], -1)], 0)
    ok = [tf.equal(tf.size(actual), rank)] + [
        tf.equal(padded[i], d) for i, d in enumerate(expected.as_list())]
    return tf.debugging.Assert(tf.reduce_all(tf.stack(ok)), [
        message, str(expected), "got", actual])


def static_shape(grad, var):
    """Inside a user's XLA function, a gradient with its variable's static
    shape (a sparse one's rows with the variable's row shape).

    Asserts do not run there, but shapes are static when XLA compiles:
    `ensure_shape` then fails compilation instead of letting a [1, n]
    gradient broadcast over a [k, n] variable. Elsewhere the asserts of
    `run_time_checks` run first and name the variable (an `ensure_shape`
    in a graph may be evaluated before them).
    """
    if not _private.in_xla_context():
        return grad
    if isinstance(grad, tf.IndexedSlices):
        # The rows' shape; their number is the indices' (a mismatch there
        # fails compilation too).
        if grad.values.shape[1:].is_fully_defined():
            return grad
        return tf.IndexedSlices(
            tf.ensure_shape(grad.values, [None] + var.shape[1:]),
            grad.indices, grad.dense_shape)
    if not tf.is_tensor(grad) or grad.shape.is_fully_defined():
        return grad
    return tf.ensure_shape(grad, var.shape)
