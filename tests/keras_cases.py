"""Helpers shared by the Keras 3 and tf-keras adapter tests.

Data, the embedding scenario with opposite-sign duplicates and its NumPy
reference, and the child-process environment: nothing here imports either
Keras, so each test module keeps to its own.
"""

import itertools
import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from reference import AdamaxReference, SparseGrad

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env():
    """Environment for a child Python that imports this checkout."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
            "PYTHONPATH": REPO_ROOT + (os.pathsep + path if path else "")}


def dense_data(n=80):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 5)).astype("float32")
    y = (np.sin(x[:, :1]) + 0.1 * x[:, 1:2]).astype("float32")
    return x, y


VOCAB, DIM, TOKENS, BATCH, STEPS = 8, 3, 3, 4, 12


EMB_LR = 0.05


def embedding_batches():
    """Token ids and per-token loss coefficients (the gradients, up to 1/B).

    Token 0 and 1 of every example are the same id, with coefficients of
    opposite sign (partial cancellation). Rows 6 and 7 never occur; others
    are missing from some batches, which tells exact from lazy. All values
    are multiples of 1/16 and BATCH a power of two: float32 sums are exact.
    """
    rng = np.random.default_rng(7)
    n = BATCH * STEPS
    ids = rng.integers(0, VOCAB - 2, size=(n, TOKENS))
    ids[:, 1] = ids[:, 0]
    coef = rng.integers(-8, 9, size=(n, TOKENS, DIM)) / 8.0
    coef[:, 0] = np.where(coef[:, 0] == 0, 0.5, coef[:, 0])
    coef[:, 1] = -0.5 * coef[:, 0]
    return ids.astype("int32"), coef.astype("float32")


def embedding_init():
    rng = np.random.default_rng(3)
    return rng.normal(size=(VOCAB, DIM)).astype("float32")


def embedding_reference(sparse_mode):
    ref = AdamaxReference(learning_rate=EMB_LR, sparse_mode=sparse_mode)
    ref.add_variable("emb", embedding_init(), np.float32)
    ids, coef = embedding_batches()
    for s in range(STEPS):
        batch = slice(s * BATCH, (s + 1) * BATCH)
        # Keras averages the per-example loss over the batch.
        ref.apply({"emb": SparseGrad(ids[batch].ravel(),
                                     coef[batch].reshape(-1, DIM) / BATCH)})
    return ref


def assert_matches_reference(var, opt, ref):
    np.testing.assert_allclose(var.numpy(), ref.w["table"], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(opt._m[0].numpy(), ref.m["table"], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(opt._u[0].numpy(), ref.u["table"], rtol=1e-5,
                               atol=1e-6)


def token_regression_data(n=48):
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 20, size=(n, 4)).astype("int32")
    y = (ids % 3 == 0).mean(axis=1, keepdims=True).astype("float32")
    return ids, y


BAD_PAIR_CASES = pytest.mark.parametrize(
    "sparse_mode,graph",
    [(mode, graph) for mode in ("exact", "lazy") for graph in (False, True)],
    ids=lambda v: {False: "eager", True: "function"}.get(v, v))

# Keras changes state before its update hook: weight decay is applied, and
# gradients accumulated, first. The checks must come before those too.
BAD_PAIR_OPTIONS = pytest.mark.parametrize(
    "options", [{}, {"weight_decay": 0.5}, {"gradient_accumulation_steps": 2}],
    ids=["plain", "weight_decay", "accumulation"])


def check_bad_pairs_change_nothing(optimizer_class, variable_class, sparse_mode,
                                   graph, options=None):
    """An out-of-range sparse index and a misshapen gradient each raise,
    naming the variable, before either variable or any slot changes."""
    table = variable_class(np.ones((4, 2), "float32"), name="oob_table")
    bias = variable_class(np.ones((3,), "float32"), name="odd_bias")
    try:
        opt = optimizer_class(learning_rate=0.1, sparse_mode=sparse_mode,
                              **(options or {}))
    except TypeError:  # tf-keras has no gradient_accumulation_steps
        pytest.skip(f"{optimizer_class.__module__} does not take {options}")
    opt.build([table, bias])
    opt.apply_gradients([(tf.ones((4, 2)), table), (tf.ones((3,)), bias)])
    before = [np.array(v) for v in [table, bias] + list(opt.variables)]

    def apply(pairs):
        if graph:
            return tf.function(lambda: opt.apply_gradients(pairs))()
        return opt.apply_gradients(pairs)

    out_of_range = tf.IndexedSlices(tf.ones((2, 2)), tf.constant([1, 7]),
                                    tf.constant([4, 2]))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="oob_table.*out of range"):
        apply([(tf.ones((3,)), bias), (out_of_range, table)])
    with pytest.raises(ValueError, match="odd_bias.*shape"):
        apply([(tf.ones((4, 2)), table), (tf.ones((5,)), bias)])
    after = [np.array(v) for v in [table, bias] + list(opt.variables)]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)


def check_zero_clip_is_off(optimizer_class, arg):
    """Keras reads a clip value of 0 as "off" (and its saved configs may
    hold it): the adapter accepts it and does not clip."""
    var = tf.Variable([1.0, -2.0])
    other = tf.Variable([1.0, -2.0])
    ours = optimizer_class(learning_rate=0.1, **{arg: 0.0})
    plain = optimizer_class(learning_rate=0.1)
    ours.apply_gradients([(tf.constant([30.0, -40.0]), var)])
    plain.apply_gradients([(tf.constant([30.0, -40.0]), other)])
    np.testing.assert_array_equal(var.numpy(), other.numpy())
    config = ours.get_config()
    assert optimizer_class.from_config(config).get_config() == config


def check_no_retracing_warning(optimizer_class):
    """Each optimizer compiles its own update; TF counts traces per Python
    function, so a shared function or bound method warned after five
    optimizers (any optimizer class: the core's test uses it too)."""
    records = []
    handler = type("H", (logging.Handler,), {
        "emit": lambda self, r: records.append(r.getMessage())})()
    tf.get_logger().addHandler(handler)
    try:
        var = tf.Variable([1.0, 2.0])
        for _ in range(7):
            optimizer_class(learning_rate=0.1).apply_gradients(
                [(tf.ones_like(var), var)])
    finally:
        tf.get_logger().removeHandler(handler)
    assert not [r for r in records if "retracing" in r], records


def check_many_variables_split_match_builtin(optimizer_class, builtin_class,
                                            variable_class, monkeypatch):
    """Without a strategy, the adapter cuts a long CPU variable list into one
    XLA program per core, like the core (forced here at 6 variables); the
    weights equal the built-in Adamax's, and each program is traced once."""
    import tf_adamax._distribute as distribute

    monkeypatch.setattr(distribute, "_MIN_VARIABLES_PER_PROGRAM", 2)
    monkeypatch.setattr(distribute, "cores", lambda: 2)
    rng = np.random.default_rng(5)
    shapes = [(5, 3), (7,), (4, 2), (6, 3), (3,), (2, 5)]
    init = [rng.normal(size=s).astype("float32") for s in shapes]
    grads = [[rng.normal(size=s).astype("float32") for s in shapes]
             for _ in range(3)]
    def step_fn(opt, var_list):  # captured, not tf.function arguments
        return tf.function(lambda gs: opt.apply_gradients(zip(gs, var_list)))

    results = []
    for cls in (optimizer_class, builtin_class):
        var_list = [variable_class(x) for x in init]
        opt = cls(learning_rate=0.05)
        step = step_fn(opt, var_list)
        for gs in grads:
            step([tf.constant(g) for g in gs])
        results.append([np.array(v) for v in var_list])
        if cls is optimizer_class:
            fns = opt._update_all_fn.fn.fns
            assert [f.experimental_get_tracing_count() for f in fns] == [1, 1]
    for ours, theirs in zip(*results):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)


def check_adamax_options_set_after_a_step_match_builtin(optimizer_class,
                                                       builtin_class,
                                                       variable_class):
    """`beta_1`, `beta_2` and `epsilon` set after the compiled update was
    traced are used where the built-in reads them: eagerly at once, and in
    a tf.function made after the change (they were frozen in the first
    trace)."""
    def new_step(opt, var):  # captured, not tf.function arguments
        return tf.function(lambda g: opt.apply_gradients([(g, var)]))

    rng = np.random.default_rng(9)
    init = rng.normal(size=(3, 2)).astype("float32")
    grads = [rng.normal(size=(3, 2)).astype("float32") for _ in range(5)]
    results = []
    for cls in (optimizer_class, builtin_class):
        var = variable_class(init)
        opt = cls(learning_rate=0.1)
        opt.apply_gradients([(tf.constant(grads[0]), var)])
        opt.beta_1, opt.epsilon = 0.5, 0.5
        opt.apply_gradients([(tf.constant(grads[1]), var)])
        opt.beta_2 = 0.6
        opt.apply_gradients([(tf.constant(grads[2]), var)])
        new_step(opt, var)(tf.constant(grads[3]))
        opt.epsilon = 0.25
        new_step(opt, var)(tf.constant(grads[4]))
        results.append([np.array(var)] + [np.array(v) for v in opt.variables[1:]])
        if cls is optimizer_class:
            adapter = opt
    assert len(results[0]) == len(results[1])
    for ours, theirs in zip(*results):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    # The compiled update took every value as an argument: one trace.
    assert [f.experimental_get_tracing_count()
            for f in adapter._update_all_fn.fn.fns] == [1]
    # A variable beta: read at each step, in a traced step too.
    results = []
    for cls in (optimizer_class, builtin_class):
        var = variable_class(init)
        beta_1 = variable_class(np.float32(0.9))
        opt = cls(learning_rate=0.1, beta_1=beta_1)
        step = new_step(opt, var)
        for g, b in zip(grads[:3], (0.9, 0.5, 0.7)):
            beta_1.assign(b)
            step(tf.constant(g))
        results.append([np.array(var)] + [np.array(v) for v in opt.variables[1:]])
    for ours, theirs in zip(*results):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)


def check_float64_variables_are_exact(optimizer_class, variable_class,
                                      ema_from_initial=False):
    """float64 variables: the compiled update's betas and epsilon are exact
    float64 (a float32 beta_1 is off by ~1e-8 relative), as Python floats
    are for the built-in Adamax. `ema_from_initial`: the average starts at
    the initial weights (tf-keras), not at the first step's (Keras 3)."""
    from reference import dense_step

    rng = np.random.default_rng(12)
    w = rng.normal(size=(4,))
    grads = rng.normal(size=(3, 4))
    var = variable_class(w.copy(), dtype="float64")
    # And the weight EMA's momentum (a float32 0.99 is off by ~1e-8).
    opt = optimizer_class(learning_rate=0.5,  # exact in float32 too
                          use_ema=True, ema_momentum=0.99)
    m, u = np.zeros(4), np.zeros(4)
    average = w.copy() if ema_from_initial else None
    for t, g in enumerate(grads):
        opt.apply_gradients([(tf.constant(g), var)])
        w, m, u = dense_step(w, m, u, g, 0.5, 0.9, 0.999, 1e-7, t + 1)
        average = w if average is None else 0.99 * average + 0.01 * w
    np.testing.assert_allclose(np.array(var), w, rtol=1e-13, atol=0)
    ema, = [v for v in opt.variables if "average" in v.name]
    np.testing.assert_allclose(np.array(ema), average, rtol=1e-13, atol=0)


def check_lazy_weight_decay_is_read_at_each_step(optimizer_class, variable_class):
    """Lazy mode: the kernel decays the named rows with the `weight_decay` of
    each call (a compiled update traced before a change still follows it, as
    Keras's own decay does), and only those rows."""
    table = variable_class(np.ones((4, 2), "float32"), name="wd_table")
    opt = optimizer_class(learning_rate=0.1, weight_decay=None, sparse_mode="lazy")
    opt.build([table])

    def step():  # zero gradient: only the decay can move a row
        opt.apply_gradients([(tf.IndexedSlices(
            tf.zeros((1, 2)), tf.constant([1]), tf.constant([4, 2])), table)])

    expected = np.ones((4, 2))
    for decay in (None, 0.5, 0.5, None, 0.25):
        opt.weight_decay = decay
        step()
        if decay is not None:
            expected[1] *= np.float32(1.0 - decay * 0.1)
        np.testing.assert_allclose(np.array(table), expected, rtol=1e-6,
                                   err_msg=f"weight_decay={decay}")


def check_lazy_weight_decay_respects_exclusion(optimizer_class, variable_class):
    """`exclude_from_weight_decay(var_names=...)` matches the variable as
    Keras's own decay sees it (its full name, layer included), in lazy mode
    too, whatever the first step's gradient."""
    table = variable_class(np.ones((4, 2), "float32"), name="position_table")
    other = variable_class(np.ones((4, 2), "float32"), name="other_table")
    opt = optimizer_class(learning_rate=0.1, weight_decay=0.5, sparse_mode="lazy")
    opt.exclude_from_weight_decay(var_names=["position_table"])
    opt.build([table, other])
    sparse = tf.IndexedSlices(tf.zeros((1, 2)), tf.constant([1]),
                              tf.constant([4, 2]))
    opt.apply_gradients([(sparse, table), (sparse, other)])
    opt.apply_gradients([(tf.zeros((4, 2)), table), (tf.zeros((4, 2)), other)])
    np.testing.assert_array_equal(np.array(table), np.ones((4, 2)))
    decayed = np.ones((4, 2)) * np.float32(0.95)  # the dense step: every row
    decayed[1] *= np.float32(0.95)                # and the sparse one: row 1
    np.testing.assert_allclose(np.array(other), decayed, rtol=1e-6)


def check_nan_gradient_makes_the_norm_nan(optimizer_class, variable_class):
    """A NaN gradient element turns its norm slot NaN, eagerly and in a
    jit-compiled train function alike (XLA:CPU's max drops a NaN operand),
    as the built-in's eager update does; the other elements stay finite."""
    for jit in (False, True):
        var = variable_class(np.ones((2, 2), "float32"))
        opt = optimizer_class(learning_rate=0.01)
        opt.build([var])
        step = tf.function(lambda g: opt.apply_gradients([(g, var)]),
                           jit_compile=True) if jit else (
            lambda g: opt.apply_gradients([(g, var)]))
        step(tf.constant([[np.nan, 1.0], [0.5, -0.5]], tf.float32))
        step(tf.constant(np.full((2, 2), 0.25, np.float32)))
        norm = np.array(opt._u[0])
        assert np.isnan(norm[0, 0]), (jit, norm)
        np.testing.assert_allclose(norm.ravel()[1:], [0.999, 0.4995, 0.4995],
                                   rtol=1e-6, err_msg=f"jit={jit}")


def check_dropped_rows_do_not_count_in_clip_norms(
        optimizer_class, variable_class,
        momentum=lambda opt, var: np.array(opt._m[0])):
    """Inside the user's XLA function, where index checks cannot run, rows
    outside the table are dropped; they must not count in the clip norms
    either (they shrank the one valid row's update to a fifth), also when
    the gradient has no `dense_shape` (the variable's shape counts). Also
    used by the core's tests (`momentum` reads the slot)."""
    values = np.array([[0.3, 0.0], [4.0, 0.0], [0.0, 3.0]])
    for clip, mode, dense_shape in itertools.product(
            ("clipnorm", "global_clipnorm"), ("exact", "lazy"), ([4, 2], None)):
        var = variable_class(np.ones((4, 2)), dtype="float64")
        opt = optimizer_class(0.1, sparse_mode=mode, **{clip: 1.0})
        opt.build([var])
        step = tf.function(lambda g: opt.apply_gradients([(g, var)]),
                           jit_compile=True)
        step(tf.IndexedSlices(
            tf.constant(values), tf.constant([1, 4, -1], tf.int64),
            None if dense_shape is None
            else tf.constant(dense_shape, tf.int64)))
        # Only row 1 is in the table: its norm 0.3 is below the clip.
        want = np.zeros((4, 2))
        want[1, 0] = 0.1 * 0.3
        np.testing.assert_allclose(momentum(opt, var), want, rtol=1e-12,
                                   err_msg=f"{clip} {mode} {dense_shape}")
