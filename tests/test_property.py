"""Hypothesis: random shapes, dtypes, steps and index patterns; every path agrees
with the reference."""

import numpy as np
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (AdamaxReference, SparseGrad, check_against_reference,
                      make_optimizer, make_step, np_dtype)

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


@st.composite
def scenarios(draw):
    dtype = draw(st.sampled_from(["float32", "float64"]))
    rows = draw(st.integers(1, 6))
    row_shape = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    steps = draw(st.integers(1, 4))
    nnz = draw(st.integers(1, 2 * rows + 1))  # fixed per example: no retracing
    plan = []
    for _ in range(steps):
        sparse = draw(st.booleans()) or steps == 1
        # Index patterns with duplicates: sampled with replacement.
        indices = draw(st.lists(st.integers(0, rows - 1), min_size=nnz,
                                max_size=nnz))
        plan.append((sparse, indices))
    return dict(
        dtype=dtype, rows=rows, row_shape=row_shape, plan=plan,
        mode=draw(st.sampled_from(["eager", "function", "jit"])),
        sparse_mode=draw(st.sampled_from(["exact", "lazy"])),
        learning_rate=draw(st.sampled_from([0.001, 0.1])),
        beta_1=draw(st.sampled_from([0.0, 0.9])),
        beta_2=draw(st.sampled_from([0.5, 0.999])),
        seed=draw(st.integers(0, 2**16)),
    )


@SETTINGS
@given(scenarios())
def test_every_path_agrees_with_reference(s):
    rng = np.random.default_rng(s["seed"])
    dtype, shape = s["dtype"], (s["rows"],) + s["row_shape"]
    init = rng.standard_normal(shape).astype(np_dtype(dtype))
    var = tf.Variable(init)
    hyper = {k: s[k] for k in ("learning_rate", "beta_1", "beta_2", "sparse_mode")}
    opt = make_optimizer(s["mode"], **hyper)
    step = make_step(opt, s["mode"], [var])
    ref = AdamaxReference(**hyper)
    ref.add_variable(0, init, np_dtype(dtype))
    for t, (sparse, indices) in enumerate(s["plan"], start=1):
        values = rng.standard_normal((len(indices),) + s["row_shape"])
        # Repeated rows get opposite-signed values half of the time.
        seen = {}
        for i, row in enumerate(indices):
            if row in seen and rng.random() < 0.5:
                values[i] = -0.7 * values[seen[row]]
            seen.setdefault(row, i)
        values = values.astype(np_dtype(dtype))
        if sparse:
            grad = tf.IndexedSlices(tf.constant(values),
                                    tf.constant(indices, tf.int64),
                                    dense_shape=tf.constant(shape, tf.int64))
            ref_grad = SparseGrad(np.asarray(indices), values.astype(np.float64))
        else:
            dense = rng.standard_normal(shape).astype(np_dtype(dtype))
            grad, ref_grad = tf.constant(dense), dense.astype(np.float64)
        before = [var.numpy().copy()] + (
            [opt.get_slot(var, n).numpy().copy() for n in ("momentum", "norm")]
            if t > 1 else [])
        step([grad])
        ref.apply({0: ref_grad})
        check_against_reference(opt, [var], ref, [0], err_msg=f"{s} step {t}")
        if sparse and s["sparse_mode"] == "lazy":
            untouched = np.setdiff1d(np.arange(s["rows"]), indices)
            after = [var.numpy()] + [opt.get_slot(var, n).numpy()
                                     for n in ("momentum", "norm")]
            for old, new in zip(before, after):
                np.testing.assert_array_equal(new[untouched], old[untouched])
