"""Shared helpers for the tf_adamax core test suite.

Paths under test ("modes"):
  eager     Adamax(jit_compile=False), apply_gradients called eagerly.
  function  Adamax(jit_compile=False) inside a user tf.function.
  jit       Adamax(jit_compile=True) (the default), called eagerly: the
            optimizer compiles its own update.
  xla       Adamax(jit_compile=True) inside a user tf.function(jit_compile=True).
"""

import os
import zlib

# Quiet TF's C++ logging; must happen before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from reference import AdamaxReference, SparseGrad, slot_dtype  # noqa: E402,F401

DTYPES = ("float64", "float32", "float16", "bfloat16")
MODES = ("eager", "function", "jit", "xla")
SLOTS = ("momentum", "norm")

# (rtol, atol) per dtype, in the spirit of TF Addons
# `assert_allclose_according_to_type`.
_TOLERANCE = {
    "float64": (1e-12, 1e-12),
    "float32": (1e-6, 1e-6),
    "float16": (1e-3, 1e-3),
    "bfloat16": (1e-2, 1e-2),
}


def dtype_name(dtype) -> str:
    return tf.as_dtype(dtype).name


def np_dtype(dtype) -> np.dtype:
    """NumPy storage dtype for a TF dtype name (bfloat16 via ml_dtypes)."""
    name = dtype_name(dtype)
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def tolerance(dtype):
    return _TOLERANCE[dtype_name(dtype)]


def to_numpy(x) -> np.ndarray:
    """Any tensor / variable / array (incl. bfloat16) as a float64 array."""
    if isinstance(x, (tf.Tensor, tf.Variable)):
        x = x.numpy()
    return np.asarray(x).astype(np.float64)


def assert_allclose_according_to_type(actual, expected, dtype, err_msg=""):
    """Compares with the tolerance of ``dtype`` (the dtype values are stored in)."""
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(to_numpy(actual), to_numpy(expected), rtol=rtol,
                               atol=atol, err_msg=err_msg)


def make_optimizer(mode="jit", **kwargs):
    import tf_adamax

    return tf_adamax.Adamax(jit_compile=mode in ("jit", "xla"), **kwargs)


def make_step(opt, mode, var_list):
    """Returns ``step(grads)`` applying ``zip(grads, var_list)`` in ``mode``.

    In "xla" mode the optimizer is built first: TF cannot lift variable
    creation out of an XLA cluster, and this test is about the update.
    """
    var_list = list(var_list)

    def step(grads):
        return opt.apply_gradients(zip(grads, var_list))

    if mode == "function":
        return tf.function(step)
    if mode == "xla":
        opt.build(var_list)
        return tf.function(step, jit_compile=True)
    return step


def compiled_update_functions(opt):
    """The optimizer's own tf.functions (its compiled update), if discoverable.

    ``opt._update_fn`` when the optimizer exposes it; otherwise any attribute
    (or attribute of a plain holder object one level down) that has
    ``experimental_get_tracing_count``. Returns a list, possibly empty.
    """
    fn = getattr(opt, "_update_fn", None)
    if hasattr(fn, "experimental_get_tracing_count"):
        return [fn]
    found = []
    for value in vars(opt).values():
        candidates = [value]
        if not isinstance(value, tf.Module) and hasattr(value, "__dict__"):
            candidates += list(vars(value).values())
        found += [c for c in candidates
                  if hasattr(c, "experimental_get_tracing_count")]
    return found


def tracing_counts(functions):
    return [f.experimental_get_tracing_count() for f in functions]


def check_against_reference(opt, var_list, ref, keys, err_msg=""):
    """var, momentum and norm of every variable vs the reference."""
    for key, var in zip(keys, var_list):
        vd = dtype_name(var.dtype)
        sd = slot_dtype(np_dtype(vd)).name
        msg = f"{err_msg} var={key}"
        assert_allclose_according_to_type(var, ref.w[key], vd, msg + " (value)")
        assert_allclose_according_to_type(opt.get_slot(var, "momentum"), ref.m[key],
                                          sd, msg + " (momentum)")
        assert_allclose_according_to_type(opt.get_slot(var, "norm"), ref.u[key], sd,
                                          msg + " (norm)")


def snapshot(opt, var_list):
    """Copies of iterations, variables and slots, for bit-exact comparison."""
    state = {"iterations": int(opt.iterations.numpy())}
    for i, var in enumerate(var_list):
        state[f"var{i}"] = var.numpy().copy()
        for slot in SLOTS:
            try:
                state[f"var{i}/{slot}"] = opt.get_slot(var, slot).numpy().copy()
            except (KeyError, ValueError, AttributeError):
                state[f"var{i}/{slot}"] = None
    return state


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    for key in before:
        if before[key] is None or after[key] is None:
            assert before[key] is None and after[key] is None, key
        else:
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def random_sparse(rng, num_rows, row_shape, nnz, dtype, *, opposite_duplicates=True):
    """Indices with duplicates (opposite signs when asked) and their values.

    Returns (tf.IndexedSlices, SparseGrad) holding identical (dtype-rounded)
    numbers.
    """
    indices = rng.integers(0, num_rows, size=nnz)
    if opposite_duplicates and nnz >= 2:
        indices[1] = indices[0]
    values = rng.standard_normal((nnz,) + tuple(row_shape))
    if opposite_duplicates and nnz >= 2:
        # Same row, opposite signs, partial cancellation: |sum| < sum |g|.
        values[1] = -0.6 * values[0]
    values = values.astype(np_dtype(dtype))
    slices = tf.IndexedSlices(
        tf.constant(values, dtype=dtype), tf.constant(indices, tf.int64),
        dense_shape=tf.constant((num_rows,) + tuple(row_shape), tf.int64))
    return slices, SparseGrad(indices, values.astype(np.float64))


@pytest.fixture
def rng(request):
    """A deterministic generator seeded from the test's node id."""
    # hash() of str is salted per process; crc32 is stable across runs.
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def _function_graphs(graph):
    """`graph` and every function graph nested in it (the compiled update)."""
    yield graph
    for function in getattr(graph, "_functions", {}).values():
        inner = getattr(function, "graph", None)
        if inner is not None:
            yield from _function_graphs(inner)


def table_sized_outputs(step, rows):
    """Ops of `step`'s traced graphs whose output has `rows` leading rows."""
    found, count = [], 0
    for graph in _function_graphs(step.get_concrete_function().graph):
        for op in graph.get_operations():
            count += 1
            found += [f"{op.type} {op.name} {out.shape}" for out in op.outputs
                      if out.shape.rank and out.shape[0] == rows]
    return found, count
