"""tf.IndexedSlices gradients: sparse_mode="exact" and sparse_mode="lazy"."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import (MODES, AdamaxReference, SparseGrad,
                      assert_allclose_according_to_type, check_against_reference,
                      make_optimizer, make_step, np_dtype, random_sparse, snapshot,
                      table_sized_outputs, to_numpy)

LR = 0.01
ROWS, ROW_SHAPE = 8, (3,)
SPARSE_DTYPES = ("float32", "float64")


def _setup(rng, dtype, sparse_mode, mode, **kwargs):
    """An 8x3 embedding (sparse grads) and a (3,) bias (dense grads)."""
    emb0 = rng.standard_normal((ROWS,) + ROW_SHAPE).astype(np_dtype(dtype))
    bias0 = rng.standard_normal(ROW_SHAPE).astype(np_dtype(dtype))
    emb = tf.Variable(emb0, name="embedding")
    bias = tf.Variable(bias0, name="bias")
    opt = make_optimizer(mode, learning_rate=LR, sparse_mode=sparse_mode, **kwargs)
    step = make_step(opt, mode, [emb, bias])
    ref = AdamaxReference(learning_rate=LR, sparse_mode=sparse_mode, **kwargs)
    ref.add_variable(0, emb0, np_dtype(dtype))
    ref.add_variable(1, bias0, np_dtype(dtype))
    return emb, bias, opt, step, ref


def _dense_bias_grad(rng, dtype):
    return rng.standard_normal(ROW_SHAPE).astype(np_dtype(dtype))


def _random_step(rng, dtype, setup, t):
    """One step of `_setup`'s optimizer: random sparse embedding gradients
    with opposite-sign duplicates and a dense bias gradient, checked against
    the reference. Returns the gradients it applied."""
    emb, bias, opt, step, ref = setup
    slices, sg = random_sparse(rng, ROWS, ROW_SHAPE, 6, dtype)
    gb = _dense_bias_grad(rng, dtype)
    step([slices, tf.constant(gb)])
    ref.apply({0: sg, 1: gb})
    check_against_reference(opt, [emb, bias], ref, [0, 1], err_msg=f"step {t}")
    return slices, gb


def _slices(indices, values, dtype):
    indices = np.asarray(indices)
    values = np.asarray(values).astype(np_dtype(dtype))
    return (tf.IndexedSlices(tf.constant(values, dtype=dtype),
                             tf.constant(indices, tf.int64),
                             dense_shape=tf.constant((ROWS,) + ROW_SHAPE, tf.int64)),
            SparseGrad(indices, values.astype(np.float64)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", SPARSE_DTYPES)
def test_exact_sparse_equals_densified_gradient(dtype, mode, rng):
    setup = _setup(rng, dtype, "exact", mode)
    emb, bias, opt, step, ref = setup
    # The same optimizer path fed tf.convert_to_tensor(slices) (two paths are
    # enough here: every mode is compared with the reference anyway).
    twin = mode in ("eager", "jit")
    if twin:
        emb_d, bias_d = tf.Variable(emb.numpy()), tf.Variable(bias.numpy())
        opt_d = make_optimizer(mode, learning_rate=LR)
        step_d = make_step(opt_d, mode, [emb_d, bias_d])
    for t in range(1, 13):
        slices, gb = _random_step(rng, dtype, setup, t)
        if not twin:
            continue
        step_d([tf.convert_to_tensor(slices), tf.constant(gb)])
        for a, b in ((emb, emb_d), (bias, bias_d)):
            assert_allclose_according_to_type(a, b, dtype)
            for slot in ("momentum", "norm"):
                assert_allclose_according_to_type(opt.get_slot(a, slot),
                                                  opt_d.get_slot(b, slot), dtype,
                                                  err_msg=f"step {t} {slot}")


@pytest.mark.parametrize("mode", ("eager", "jit"))
def test_exact_duplicates_that_cancel_leave_row_untouched(mode):
    """+g and -g on one row sum to zero: |sum| = 0, not max(|g|, |-g|)."""
    emb = tf.Variable(np.ones((ROWS,) + ROW_SHAPE), dtype=tf.float64)
    opt = make_optimizer(mode, learning_rate=LR)
    values = np.array([[1.0, -2.0, 3.0], [-1.0, 2.0, -3.0], [0.5, 0.5, 0.5]])
    slices, _ = _slices([4, 4, 1], values, "float64")
    opt.apply_gradients([(slices, emb)])
    u = opt.get_slot(emb, "norm").numpy()
    m = opt.get_slot(emb, "momentum").numpy()
    np.testing.assert_array_equal(u[4], np.zeros(3))
    np.testing.assert_array_equal(m[4], np.zeros(3))
    np.testing.assert_array_equal(emb.numpy()[4], np.ones(3))
    np.testing.assert_allclose(u[1], np.full(3, 0.5), rtol=1e-12)
    assert np.all(emb.numpy()[1] < 1.0)


# Fixed nnz per step (no retracing); every row is named in step 1 so that
# the "untouched" rows carry non-zero state afterwards.
LAZY_PATTERNS = (
    [0, 1, 2, 3, 4, 5, 6, 7],
    [2, 5, 2, 5, 2, 5, 2, 2],
    [7, 0, 7, 7, 0, 7, 7, 7],
    [3, 3, 3, 3, 3, 3, 3, 3],
    [1, 6, 1, 4, 6, 6, 1, 4],
    [6, 5, 4, 3, 2, 1, 0, 0],
    [4, 4, 2, 2, 4, 4, 2, 2],
    [0, 0, 0, 0, 0, 0, 0, 7],
    [5, 1, 5, 1, 5, 1, 5, 1],
    [2, 3, 2, 3, 6, 6, 6, 6],
)


def _lazy_values(rng, indices):
    """Duplicates get partially cancelling values of opposite sign."""
    values = rng.standard_normal((len(indices),) + ROW_SHAPE)
    seen = {}
    for i, row in enumerate(indices):
        if row in seen:
            values[i] = -0.6 * values[seen[row]]
        seen.setdefault(row, i)
    return values


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", SPARSE_DTYPES)
def test_lazy_sparse_touches_only_named_rows(dtype, mode, rng):
    emb, bias, opt, step, ref = _setup(rng, dtype, "lazy", mode)
    for t, indices in enumerate(LAZY_PATTERNS, start=1):
        slices, sg = _slices(indices, _lazy_values(rng, indices), dtype)
        gb = _dense_bias_grad(rng, dtype)
        before = {"var": emb.numpy().copy()}
        if t > 1:
            for slot in ("momentum", "norm"):
                before[slot] = opt.get_slot(emb, slot).numpy().copy()
        step([slices, tf.constant(gb)])
        ref.apply({0: sg, 1: gb})
        named = np.unique(indices)
        unnamed = np.setdiff1d(np.arange(ROWS), named)
        after = {"var": emb.numpy(), "momentum": opt.get_slot(emb, "momentum").numpy(),
                 "norm": opt.get_slot(emb, "norm").numpy()}
        for key, old in before.items():
            np.testing.assert_array_equal(after[key][unnamed], old[unnamed],
                                          err_msg=f"step {t}: unnamed rows of {key}")
        # Named rows (and the dense bias) follow the lazy reference.
        check_against_reference(opt, [emb, bias], ref, [0, 1], err_msg=f"step {t}")
    assert int(opt.iterations.numpy()) == len(LAZY_PATTERNS)


@pytest.mark.parametrize("sparse_mode", ("exact", "lazy"))
@pytest.mark.parametrize("kwargs", [dict(clipnorm=0.5), dict(global_clipnorm=0.7),
                                    dict(clipvalue=0.3), dict(loss_scale_factor=4.0)],
                         ids=["clipnorm", "global_clipnorm", "clipvalue",
                              "loss_scale_factor"])
def test_sparse_gradient_transforms_use_summed_gradient(sparse_mode, kwargs, rng):
    """Clipping sees the densified (duplicates summed) gradient."""
    setup = _setup(rng, "float32", sparse_mode, "jit", **kwargs)
    for t in range(1, 6):
        _random_step(rng, "float32", setup, t)


@pytest.mark.parametrize("sparse_mode", ("exact", "lazy"))
@pytest.mark.parametrize("mode", ("eager", "jit"))
def test_sparse_gradient_with_no_indices(mode, sparse_mode, rng):
    emb, bias, opt, step, ref = _setup(rng, "float64", sparse_mode, mode)
    slices, sg = random_sparse(rng, ROWS, ROW_SHAPE, 5, "float64")
    gb = _dense_bias_grad(rng, "float64")
    step([slices, tf.constant(gb)])
    ref.apply({0: sg, 1: gb})
    empty, empty_ref = _slices(np.zeros([0], np.int64), np.zeros((0,) + ROW_SHAPE),
                               "float64")
    before = snapshot(opt, [emb])
    step([empty, tf.constant(gb)])
    ref.apply({0: empty_ref, 1: gb})
    check_against_reference(opt, [emb, bias], ref, [0, 1])
    if sparse_mode == "lazy":
        after = snapshot(opt, [emb])
        after["iterations"] = before["iterations"]
        for key in before:
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)


@pytest.mark.parametrize("sparse_mode", ("exact", "lazy"))
def test_embedding_lookup_gradient_from_tape(sparse_mode, rng):
    """Real tf.gather gradients (int32 indices, repeated ids) in a custom loop."""
    emb0 = rng.standard_normal((ROWS, 4)).astype(np.float32)
    w0 = rng.standard_normal((4,)).astype(np.float32)
    emb, w = tf.Variable(emb0), tf.Variable(w0)
    opt = make_optimizer("jit", learning_rate=LR, sparse_mode=sparse_mode)
    ref = AdamaxReference(learning_rate=LR, sparse_mode=sparse_mode)
    ref.add_variable(0, emb0, np.float32)
    ref.add_variable(1, w0, np.float32)

    @tf.function
    def train_step(ids, y):
        with tf.GradientTape() as tape:
            pred = tf.linalg.matvec(tf.gather(emb, ids), w)
            loss = tf.reduce_sum(tf.square(pred - y))
        grads = tape.gradient(loss, [emb, w])
        opt.apply_gradients(zip(grads, [emb, w]))
        return grads

    for t in range(5):
        ids = rng.integers(0, ROWS, size=6).astype(np.int32)
        ids[1] = ids[0]
        y = rng.standard_normal(6).astype(np.float32)
        g_emb_ref, g_w_ref = _lookup_grads(ref.w[0], ref.w[1], ids, y)
        g_emb, g_w = train_step(tf.constant(ids), tf.constant(y))
        assert isinstance(g_emb, tf.IndexedSlices)
        # Sanity-check the tape's gradient, then feed the reference exactly it.
        np.testing.assert_allclose(to_numpy(tf.convert_to_tensor(g_emb)),
                                   SparseGrad(ids, g_emb_ref).densify((ROWS, 4)),
                                   rtol=1e-4, atol=1e-4)
        ref.apply({0: SparseGrad(g_emb.indices.numpy(), to_numpy(g_emb.values)),
                   1: to_numpy(g_w)})
        check_against_reference(opt, [emb, w], ref, [0, 1], err_msg=f"step {t}")


def _lookup_grads(emb, w, ids, y):
    """Per-lookup gradient rows of sum((E[ids] @ w - y)^2), and dL/dw."""
    rows = emb[ids]
    r = 2.0 * (rows @ w - y)
    return r[:, None] * w[None, :], rows.T @ r


@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_sparse_matches_reference(dtype, sparse_mode, rng):
    """Half-precision tables (float32 slots) through every sparse kernel, XLA."""
    setup = _setup(rng, dtype, sparse_mode, "xla")
    for t in range(1, 6):
        _random_step(rng, dtype, setup, t)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sparse_mode", ("exact", "lazy"))
def test_weight_decay_with_sparse_gradients_matches_reference(sparse_mode, mode, rng):
    """Exact mode decays every row (the densified gradient's step); lazy mode
    only the named rows, and every other row of var, m and u stays
    bit-for-bit (the adapters too: tests/test_keras3.py, test_tf_keras.py)."""
    setup = _setup(rng, "float64", sparse_mode, mode, weight_decay=0.5)
    emb, _, opt, _, ref = setup
    for t in range(1, 6):
        before = snapshot(opt, [emb])
        slices, _ = _random_step(rng, "float64", setup, t)
        unnamed = np.setdiff1d(np.arange(ROWS), slices.indices.numpy())
        assert unnamed.size, "every row named: the step cannot tell the modes apart"
        after = snapshot(opt, [emb])
        for key in ("var0", "var0/momentum", "var0/norm"):
            if before[key] is None:  # no slots before the first step
                continue
            moved = np.any(before[key][unnamed] != after[key][unnamed])
            if sparse_mode == "lazy":
                assert not moved, (t, key)
            elif key == "var0":  # decayed, if nothing else
                assert moved, (t, key)


@pytest.mark.parametrize("front", ("core", "core_nojit", "keras3", "tf_keras"))
def test_lazy_step_has_no_table_sized_tensor(front):
    """DESIGN: lazy cost is O(nnz): no full-variable read, copy or `.value()`
    round trip, also with weight decay. No op of the traced step (its
    compiled update included) yields a tensor with the table's row count; in
    exact mode some must."""
    import keras

    import tf_adamax
    import tf_adamax.keras
    import tf_adamax.tf_keras

    rows = 50_021  # a row count no other dimension here has
    grad = tf.IndexedSlices(tf.ones((5, 4)), tf.constant([1, 2, 2, 7, 9]),
                            tf.constant([rows, 4]))
    counts = {}
    for mode in ("lazy", "exact"):
        if front == "keras3":
            table = keras.Variable(tf.zeros((rows, 4)))
            opt = tf_adamax.keras.Adamax(sparse_mode=mode, weight_decay=0.1)
        else:
            table = tf.Variable(tf.zeros((rows, 4)))
            opt = (tf_adamax.tf_keras.Adamax(sparse_mode=mode, weight_decay=0.1)
                   if front == "tf_keras"
                   else tf_adamax.Adamax(sparse_mode=mode, weight_decay=0.1,
                                         jit_compile=front == "core"))
        opt.build([table])
        step = tf.function(lambda: opt.apply_gradients([(grad, table)]))
        step()
        found, count = table_sized_outputs(step, rows)
        counts[mode] = (found, count)
    assert counts["lazy"][0] == [], counts["lazy"][0]
    assert counts["exact"][0], "the check cannot see table-sized tensors"
    assert counts["lazy"][1] > 20, counts["lazy"][1]  # the update was traced in


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sparse_mode", ("exact", "lazy"))
@pytest.mark.parametrize("row_shape", [(), (2, 3)], ids=["vector", "rank3"])
def test_sparse_tables_of_other_ranks_match_reference(row_shape, sparse_mode,
                                                      mode, rng):
    """The sparse kernels pad, gather and scatter whole rows: a vector
    (rows are scalars) and a rank-3 table (rows are matrices) must match
    the reference like the usual [rows, dim] table."""
    init = rng.standard_normal((ROWS,) + row_shape)
    var = tf.Variable(init)
    opt = make_optimizer(mode, learning_rate=LR, sparse_mode=sparse_mode)
    step = make_step(opt, mode, [var])
    ref = AdamaxReference(learning_rate=LR, sparse_mode=sparse_mode)
    ref.add_variable(0, init, np.float64)
    for t in range(3):
        slices, sg = random_sparse(rng, ROWS, row_shape, 6, "float64")
        step([slices])
        ref.apply({0: sg})
        check_against_reference(opt, [var], ref, [0], err_msg=f"step {t}")


@pytest.mark.parametrize("parts", ["numpy", "lists"])
@pytest.mark.parametrize("front", ["core", "keras3", "tf_keras"])
def test_indexed_slices_built_from_numpy_or_lists(front, parts):
    """A hand-built IndexedSlices may hold NumPy arrays or lists, as
    `tf.convert_to_tensor` and the Keras optimizers accept it. It must
    update as the same slices of tensors (it raised AttributeError from the
    checks, naming nothing)."""
    import tf_adamax
    import tf_adamax.keras
    import tf_adamax.tf_keras

    make = {"core": tf_adamax.Adamax, "keras3": tf_adamax.keras.Adamax,
            "tf_keras": tf_adamax.tf_keras.Adamax}[front]
    values = np.array([[1.0, -2.0], [0.5, 0.5], [-1.0, 3.0]], np.float32)
    indices = np.array([3, 1, 3], np.int32)
    if parts == "lists":
        values, indices = values.tolist(), indices.tolist()
    got = {}
    for kind, grad in (
            ("given", tf.IndexedSlices(values, indices, [5, 2])),
            ("tensors", tf.IndexedSlices(tf.constant(values, tf.float32),
                                         tf.constant(indices), [5, 2]))):
        var = tf.Variable(tf.ones([5, 2]))
        opt = make(learning_rate=0.1)
        opt.apply_gradients([(grad, var)])
        got[kind] = var.numpy()
    np.testing.assert_array_equal(got["given"], got["tensors"])
    assert not np.array_equal(got["given"][3], np.ones(2))  # it moved
