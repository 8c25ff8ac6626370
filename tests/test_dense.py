"""Dense gradients: every path against the NumPy reference, and against each other."""

import numpy as np
import pytest
import tensorflow as tf
import tf_adamax

from conftest import (DTYPES, MODES, SLOTS, AdamaxReference,
                      assert_allclose_according_to_type, check_against_reference,
                      compiled_update_functions, make_optimizer, make_step,
                      np_dtype, random_sparse, to_numpy, tracing_counts)

LR = 0.01
SHAPES = ((5, 3), (3,))


def _make_vars(rng, dtype, shapes=SHAPES, prefix="dense"):
    values = [rng.standard_normal(s).astype(np_dtype(dtype)) for s in shapes]
    variables = [tf.Variable(v, dtype=dtype, name=f"{prefix}{i}")
                 for i, v in enumerate(values)]
    return variables, values


def _grads(rng, dtype, shapes=SHAPES, scale=1.0):
    """Random gradients already rounded to ``dtype`` (as numpy arrays)."""
    out = []
    for s in shapes:
        g = scale * rng.standard_normal(s)
        g[rng.random(s) < 0.1] = 0.0  # some exact zeros: u must decay there
        out.append(g.astype(np_dtype(dtype)))
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_matches_reference_20_steps(dtype, mode, rng):
    variables, values = _make_vars(rng, dtype)
    opt = make_optimizer(mode, learning_rate=LR)
    step = make_step(opt, mode, variables)
    ref = AdamaxReference(learning_rate=LR)
    for i, v in enumerate(values):
        ref.add_variable(i, v, np_dtype(dtype))
    for t in range(1, 22):
        grads = _grads(rng, dtype)
        step([tf.constant(g, dtype=dtype) for g in grads])
        ref.apply(dict(enumerate(grads)))
        check_against_reference(opt, variables, ref, range(len(variables)),
                                err_msg=f"step {t}")
    assert int(opt.iterations.numpy()) == 21
    for var in variables:
        want = tf.float32 if dtype in ("float16", "bfloat16") else tf.as_dtype(dtype)
        for slot in SLOTS:
            s = opt.get_slot(var, slot)
            assert isinstance(s, tf.Variable)
            assert s.dtype == want, (slot, s.dtype)
            assert s.shape == var.shape


@pytest.mark.parametrize("sparse_mode", ("exact", "lazy"))
@pytest.mark.parametrize("dtype", ("float32", "float64"))
def test_jit_compile_true_equals_false(dtype, sparse_mode, rng):
    """The compiled and the uncompiled update agree (dense and sparse grads)."""
    steps = []
    for _ in range(8):
        (dense,) = _grads(rng, dtype, shapes=[(5, 3)])
        sparse, _ = random_sparse(rng, 8, (3,), 6, dtype)
        steps.append([tf.constant(dense), sparse])
    init = [rng.standard_normal((5, 3)), rng.standard_normal((8, 3))]
    results = {}
    for jit in (True, False):
        variables = [tf.Variable(v, dtype=dtype) for v in init]
        opt = tf_adamax.Adamax(learning_rate=LR, jit_compile=jit,
                               sparse_mode=sparse_mode)
        for grads in steps:
            opt.apply_gradients(zip(grads, variables))
        results[jit] = [[to_numpy(v), to_numpy(opt.get_slot(v, "momentum")),
                         to_numpy(opt.get_slot(v, "norm"))] for v in variables]
    for a, b in zip(results[True], results[False]):
        for x, y in zip(a, b):
            assert_allclose_according_to_type(x, y, dtype)


@pytest.mark.parametrize("lr_form", ("float", "schedule"))
@pytest.mark.parametrize("jit_compile", (True, False))
def test_no_retrace_after_warmup(jit_compile, lr_form, rng):
    import keras

    lr = LR if lr_form == "float" else keras.optimizers.schedules.ExponentialDecay(
        LR, decay_steps=3, decay_rate=0.5)
    variables, _ = _make_vars(rng, "float32")
    opt = tf_adamax.Adamax(learning_rate=lr, jit_compile=jit_compile)

    @tf.function
    def train_step(g0, g1):
        return opt.apply_gradients([(g0, variables[0]), (g1, variables[1])])

    def run(n):
        for _ in range(n):
            train_step(*[tf.constant(g) for g in _grads(rng, "float32")])

    run(2)
    outer = train_step.experimental_get_tracing_count()
    inner_fns = compiled_update_functions(opt)
    # With jit_compile=False the update is traced into train_step itself.
    assert bool(inner_fns) == jit_compile, inner_fns
    inner = tracing_counts(inner_fns)
    run(10)
    assert train_step.experimental_get_tracing_count() == outer
    assert tracing_counts(inner_fns) == inner
    assert int(opt.iterations.numpy()) == 12


def test_no_retrace_eager_calls_of_compiled_update(rng):
    """Eager apply_gradients with jit_compile=True reuses one compiled program."""
    variables, _ = _make_vars(rng, "float32")
    lr = tf.Variable(LR)
    opt = tf_adamax.Adamax(learning_rate=lambda: lr, jit_compile=True)
    for _ in range(2):
        opt.apply_gradients(zip([tf.constant(g) for g in _grads(rng, "float32")],
                                variables))
    inner_fns = compiled_update_functions(opt)
    if not inner_fns:
        pytest.skip("the optimizer's compiled update is not discoverable")
    counts = tracing_counts(inner_fns)
    assert sum(counts) >= 1  # it really is the function that ran
    for i in range(10):
        lr.assign(LR / (i + 2))  # a changing learning rate must not retrace
        opt.apply_gradients(zip([tf.constant(g) for g in _grads(rng, "float32")],
                                variables))
    assert tracing_counts(inner_fns) == counts


@pytest.mark.parametrize("kwargs", [{}, dict(loss_scale_factor=8.0, clipvalue=0.5)],
                         ids=["plain", "loss_scale_factor"])
def test_minimize_callable_and_tape_match_reference(rng, kwargs):
    """minimize(callable) and minimize(tensor, tape=...) against the reference.

    With `loss_scale_factor` both forms multiply the loss (for the tensor
    form, on the user's tape) and divide the gradients; the clip makes a
    missing multiplication visible (Adamax itself barely sees a uniform
    scale)."""
    target = rng.standard_normal((5, 3))
    init = rng.standard_normal((5, 3))
    scale = kwargs.get("loss_scale_factor", 1.0)
    for form in ("callable", "tape"):
        var = tf.Variable(init, dtype=tf.float64)
        opt = tf_adamax.Adamax(learning_rate=LR, **kwargs)
        ref = AdamaxReference(learning_rate=LR, **kwargs)
        ref.add_variable(0, init)
        for _ in range(5):
            # loss = 0.5 * |w - target|^2  =>  grad = w - target
            grad = ref.w[0] - target
            loss_fn = lambda: 0.5 * tf.reduce_sum(tf.square(var - target))  # noqa
            if form == "callable":
                opt.minimize(loss_fn, [var])
            else:
                with tf.GradientTape() as tape:
                    loss = loss_fn()
                opt.minimize(loss, [var], tape=tape)
            ref.apply({0: grad * scale})  # the gradient of the scaled loss
            check_against_reference(opt, [var], ref, [0], err_msg=form)


def test_build_then_apply_and_state_accessors(rng):
    variables, values = _make_vars(rng, "float32")
    opt = make_optimizer("jit", learning_rate=LR)
    opt.build(variables)
    assert opt.iterations.dtype == tf.int64
    assert isinstance(opt.iterations, tf.Variable)
    assert int(opt.iterations.numpy()) == 0
    assert float(np.asarray(opt.learning_rate)) == pytest.approx(LR)
    state_refs = {v.ref() for v in opt.variables}
    assert opt.iterations.ref() in state_refs
    for var in variables:
        for slot in SLOTS:
            s = opt.get_slot(var, slot)
            np.testing.assert_array_equal(s.numpy(), np.zeros(var.shape))
            assert s.ref() in state_refs
        assert var.ref() not in state_refs  # model variables are not optimizer state
    grads = _grads(rng, "float32")
    result = opt.apply_gradients(zip([tf.constant(g) for g in grads], variables))
    assert int(np.asarray(result)) == 1
    ref = AdamaxReference(learning_rate=LR)
    for i, v in enumerate(values):
        ref.add_variable(i, v, np.float32)
    ref.apply(dict(enumerate(grads)))
    check_against_reference(opt, variables, ref, range(2))


@pytest.mark.parametrize("mode", ("eager", "jit", "function"))
def test_variable_added_after_first_steps(mode, rng):
    """A late variable gets fresh slots on first use and the global step t."""
    (v0,), (x0,) = _make_vars(rng, "float32", shapes=[(5, 3)])
    (v1,), (x1,) = _make_vars(rng, "float32", shapes=[(4,)], prefix="late")
    opt = make_optimizer(mode, learning_rate=LR)
    ref = AdamaxReference(learning_rate=LR)
    ref.add_variable(0, x0, np.float32)
    first = make_step(opt, mode, [v0])
    for _ in range(3):
        (g,) = _grads(rng, "float32", shapes=[(5, 3)])
        first([tf.constant(g)])
        ref.apply({0: g})
    # A new tf.function for the new variable list, as a user would write it.
    second = make_step(opt, mode, [v0, v1])
    ref.add_variable(1, x1, np.float32)
    for _ in range(4):
        grads = _grads(rng, "float32", shapes=[(5, 3), (4,)])
        second([tf.constant(g) for g in grads])
        ref.apply(dict(enumerate(grads)))
        check_against_reference(opt, [v0, v1], ref, [0, 1])
    assert int(opt.iterations.numpy()) == 7


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("holder", ("tf.Variable", "keras3 layer"))
def test_variable_constraint_projects_after_each_update(holder, mode, rng):
    """As every Keras optimizer: `var.constraint` is assigned after the
    update (here a clip to [0, 0.5] after steps that move weights by ~lr)."""
    import keras

    from reference import dense_step

    lo, hi, lr = 0.0, 0.5, 0.3
    w0 = rng.uniform(0.1, 0.9, (3, 2)).astype(np.float32)
    if holder == "tf.Variable":
        var = tf.Variable(w0, constraint=lambda x: tf.clip_by_value(x, lo, hi))
    else:
        class Clip(keras.constraints.Constraint):
            def __call__(self, w):
                return keras.ops.clip(w, lo, hi)

        layer = keras.layers.Dense(2, kernel_constraint=Clip(), use_bias=False)
        layer.build((None, 3))
        layer.kernel.assign(w0)
        var = layer.kernel
    opt = make_optimizer(mode, learning_rate=lr)
    step = make_step(opt, mode, [var])
    w, m, u = w0.astype(np.float64), np.zeros((3, 2)), np.zeros((3, 2))
    for t in range(1, 4):
        g = rng.standard_normal((3, 2)).astype(np.float32)
        step([tf.constant(g)])
        w, m, u = dense_step(w, m, u, g.astype(np.float64), lr, 0.9, 0.999,
                             1e-7, t)
        w = np.clip(w, lo, hi).astype(np.float32).astype(np.float64)
        m, u = (x.astype(np.float32).astype(np.float64) for x in (m, u))
        np.testing.assert_allclose(to_numpy(var), w, rtol=1e-6, atol=1e-6,
                                   err_msg=f"step {t}")
        np.testing.assert_allclose(to_numpy(opt.get_slot(var, "momentum")), m,
                                   rtol=1e-6, atol=1e-6)
    assert (to_numpy(var) == lo).any() or (to_numpy(var) == hi).any(), \
        "the test's steps never reached the constraint's bounds"


@pytest.mark.parametrize("grad_form", ("dense", "exact", "lazy"))
@pytest.mark.parametrize("mode", MODES)
def test_float16_gradients_are_unscaled_in_float32(mode, grad_form):
    """A float16 gradient divided by a loss scale of 2**15 or 2**16 trains as
    the float64 reference does, dense or sparse: in float16 2**-12 / 2**15
    flushes to zero and 2**16 is inf (every gradient became 0)."""
    for factor in (2.0**15, 2.0**16):
        var = tf.Variable(np.full((2, 2), 0.25, np.float16))
        opt = make_optimizer(mode, learning_rate=LR, loss_scale_factor=factor,
                             sparse_mode="lazy" if grad_form == "lazy" else "exact")
        step = make_step(opt, mode, [var])
        scaled = np.full((2, 2), 2.0**-12, np.float16)
        if grad_form == "dense":
            grad = tf.constant(scaled)
        else:
            grad = tf.IndexedSlices(tf.constant(scaled), tf.constant([0, 1]),
                                    tf.constant([2, 2]))
        step([grad])
        ref = AdamaxReference(learning_rate=LR, loss_scale_factor=factor)
        ref.add_variable("v", np.full((2, 2), 0.25), np.float16)
        ref.apply({"v": scaled.astype(np.float64)})
        check_against_reference(opt, [var], ref, ["v"], f"factor={factor}")
        assert to_numpy(opt.get_slot(var, "momentum")).min() > 0, factor


@pytest.mark.parametrize("grad_form", ("dense", "exact", "lazy"))
@pytest.mark.parametrize("mode", MODES)
def test_a_nan_gradient_makes_the_norm_nan_on_every_path(mode, grad_form):
    """XLA:CPU's max drops a NaN operand; the norm slot must still turn NaN
    where |g| is NaN (as NumPy, eager TF and the built-ins), and stay NaN at
    the next finite step, so the state does not depend on jit_compile."""
    var = tf.Variable(np.ones((3, 2), np.float32))
    opt = make_optimizer(mode, learning_rate=LR,
                         sparse_mode="lazy" if grad_form == "lazy" else "exact")
    step = make_step(opt, mode, [var])
    grads = [np.array([[np.nan, 1.0], [0.5, -0.5], [0.0, 0.0]], np.float32),
             np.full((3, 2), 0.25, np.float32)]
    for g in grads:
        if grad_form == "dense":
            step([tf.constant(g)])
        else:
            step([tf.IndexedSlices(tf.constant(g), tf.constant([0, 1, 2]),
                                   tf.constant([3, 2]))])
    norm = to_numpy(opt.get_slot(var, "norm"))
    assert np.isnan(norm[0, 0]) and np.isnan(to_numpy(var)[0, 0]), norm
    assert np.isfinite(np.delete(norm.ravel(), 0)).all(), norm
    np.testing.assert_allclose(norm[1:], [[0.4995, 0.4995], [0.25, 0.25]],
                               rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_float16_accumulated_mean_is_kept_in_float32(mode):
    """With gradient accumulation the mean of loss-scaled float16 gradients
    reaches the update in float32 (the slots' and accumulator's dtype), not
    rounded back to float16, where ~1e-8 flushed to zero and nothing
    trained."""
    from reference import dense_step

    factor = 2.0**15
    var = tf.Variable(np.full((2, 2), 0.25, np.float16))
    opt = make_optimizer(mode, learning_rate=LR, loss_scale_factor=factor,
                         gradient_accumulation_steps=2)
    step = make_step(opt, mode, [var])
    w, m, u = np.full((2, 2), 0.25), np.zeros((2, 2)), np.zeros((2, 2))
    scaled = (2.0**-12, 2.0**-11, 2.0**-12, 2.0**-10)
    for t, pair in enumerate((scaled[:2], scaled[2:]), start=1):
        for g in pair:
            step([tf.constant(np.full((2, 2), g, np.float16))])
        mean = np.full((2, 2), sum(pair) / factor / 2)
        w, m, u = dense_step(w, m, u, mean, LR, 0.9, 0.999, 1e-7, t)
    np.testing.assert_allclose(to_numpy(opt.get_slot(var, "momentum")), m,
                               rtol=1e-6)
    np.testing.assert_allclose(to_numpy(opt.get_slot(var, "norm")), u,
                               rtol=1e-6)
    assert_allclose_according_to_type(var, w, "float16")
    assert to_numpy(var)[0, 0] < 0.25


@pytest.mark.parametrize("jit", [True, False])
def test_autocast_variable_and_the_variable_it_wraps_share_slots(jit):
    # A tf-keras mixed-precision layer hands out AutoCastVariables wrapping
    # its float32 variables. The wrapper and the variable are one model
    # variable: steps through either update one set of slots (tf-keras's own
    # optimizers key them alike), from the float32 value.
    tf_keras = pytest.importorskip("tf_keras")
    from reference import dense_step
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = tf_keras.layers.Dense(2, use_bias=False,
                                      kernel_initializer="ones")
        layer.build((None, 2))
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    wrapper, inner = layer.kernel, layer.kernel._variable
    assert wrapper is not inner and inner.dtype == tf.float32
    opt = tf_adamax.Adamax(0.1, jit_compile=jit)
    grads = [np.array([[0.5, -1.0], [2.0, 0.25]]),
             np.array([[-0.25, 3.0], [1.0, -0.5]]),
             np.array([[1.0, 1.0], [-2.0, 0.125]])]
    w, m, u = np.ones((2, 2)), np.zeros((2, 2)), np.zeros((2, 2))
    for t, (g, var) in enumerate(zip(grads, [wrapper, inner, wrapper]), 1):
        opt.apply_gradients([(tf.constant(g, tf.float32), var)])
        w, m, u = dense_step(w, m, u, g, 0.1, 0.9, 0.999, 1e-7, t)
    np.testing.assert_allclose(inner.numpy(), w, rtol=1e-6)
    for v in (wrapper, inner):
        np.testing.assert_allclose(opt.get_slot(v, "momentum").numpy(), m,
                                   rtol=1e-6)
        np.testing.assert_allclose(opt.get_slot(v, "norm").numpy(), u,
                                   rtol=1e-6)
    assert len(opt.variables) == 4  # iterations, rate, one m, one u
