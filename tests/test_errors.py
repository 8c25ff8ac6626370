"""Bad input: clear errors naming what is wrong, and no state changed."""

import functools
import logging
import math
import re
import warnings

import numpy as np
import pytest
import tensorflow as tf
import tf_adamax

from conftest import (AdamaxReference, SparseGrad, assert_same_state,
                      check_against_reference, make_optimizer, snapshot)

ROWS = 8


def _mentions(*words):
    """A regex matching a message that contains every word, in any order."""
    return "(?s)" + "".join(f"(?=.*{re.escape(w)})" for w in words)


# --------------------------------------------------------------------------
# Constructor validation.
# --------------------------------------------------------------------------
BAD_HYPERPARAMETERS = [
    (dict(learning_rate=-0.1), ("learning_rate", "-0.1")),
    (dict(learning_rate=math.nan), ("learning_rate", "nan")),
    (dict(learning_rate=math.inf), ("learning_rate", "inf")),
    (dict(learning_rate=-math.inf), ("learning_rate", "inf")),
    (dict(beta_1=1.0), ("beta_1", "1.0")),
    (dict(beta_1=-0.1), ("beta_1", "-0.1")),
    (dict(beta_1=math.nan), ("beta_1", "nan")),
    (dict(beta_2=1.0), ("beta_2", "1.0")),
    (dict(beta_2=1.5), ("beta_2", "1.5")),
    (dict(beta_2=-0.5), ("beta_2", "-0.5")),
    (dict(epsilon=-1e-7), ("epsilon", "-1e-07")),
    (dict(sparse_mode="lazzy"), ("sparse_mode", "lazzy")),
    (dict(sparse_mode="Exact"), ("sparse_mode", "Exact")),
    (dict(clipnorm=1.0, global_clipnorm=1.0), ("clipnorm", "global_clipnorm")),
]


@pytest.mark.parametrize("kwargs,words", BAD_HYPERPARAMETERS,
                         ids=[repr(k) for k, _ in BAD_HYPERPARAMETERS])
def test_invalid_hyperparameter_raises(kwargs, words):
    with pytest.raises(ValueError, match=_mentions(*words)):
        tf_adamax.Adamax(**kwargs)


@pytest.mark.parametrize("kwargs,word", [
    (dict(learning_rate=tf.constant(-0.1)), "learning_rate"),
    (dict(beta_1=tf.constant(1.0)), "beta_1"),
    (dict(beta_2=tf.constant(-0.5)), "beta_2"),
    (dict(epsilon=tf.constant(-1.0)), "epsilon"),
], ids=["lr", "beta_1", "beta_2", "epsilon"])
def test_invalid_scalar_tensor_hyperparameter_raises(kwargs, word):
    with pytest.raises(ValueError, match=word):
        tf_adamax.Adamax(**kwargs)


def _front(name):
    import tf_adamax.keras
    import tf_adamax.tf_keras
    return {"core": tf_adamax.Adamax, "keras3": tf_adamax.keras.Adamax,
            "tf_keras": tf_adamax.tf_keras.Adamax}[name]


KERAS_OPTIONS = [
    (dict(loss_scale_factor=0.0), ("loss_scale_factor", "0.0")),
    (dict(loss_scale_factor=-2.0), ("loss_scale_factor", "-2.0")),
    (dict(gradient_accumulation_steps=2.5), ("gradient_accumulation_steps", "2.5")),
    (dict(gradient_accumulation_steps=1), ("gradient_accumulation_steps", "1")),
    (dict(ema_momentum=1.5), ("ema_momentum", "1.5")),
    (dict(use_ema=True, ema_overwrite_frequency=-1),
     ("ema_overwrite_frequency", "-1")),
]


# tf-keras has no loss_scale_factor or gradient accumulation.
_KERAS_OPTION_CASES = [
    (front, kwargs, words) for kwargs, words in KERAS_OPTIONS
    for front in ("core", "keras3", "tf_keras")
    if front != "tf_keras" or "ema_momentum" in words[0]
    or "ema_overwrite" in words[0]]


@pytest.mark.parametrize("front,kwargs,words", _KERAS_OPTION_CASES,
                         ids=[f"{f}-{k!r}" for f, k, _ in _KERAS_OPTION_CASES])
def test_keras_options_are_checked_by_every_front_end(front, kwargs, words):
    # Keras 3 lets a zero loss scale (NaN weights) or 2.5 accumulation steps
    # (an error naming nothing at the first step) through; none of ours do.
    with pytest.raises(ValueError, match=_mentions(*words)):
        _front(front)(**kwargs)


@pytest.mark.parametrize("front", ("core", "keras3", "tf_keras"))
def test_ema_momentum_bounds_are_closed_as_in_keras(front):
    # Keras accepts ema_momentum in [0, 1] (1 freezes the average).
    for momentum in (0.0, 1.0):
        opt = _front(front)(use_ema=True, ema_momentum=momentum)
        assert opt.get_config()["ema_momentum"] == momentum


@pytest.mark.parametrize("front", ("core", "keras3", "tf_keras"))
@pytest.mark.parametrize("zero", (0, 0.0, False))
def test_an_ema_overwrite_frequency_of_zero_is_off(front, zero):
    # As Keras reads it (it checks only a truthy value; configs Keras saved
    # may hold 0); the core refused a zero before.
    opt = _front(front)(use_ema=True, ema_overwrite_frequency=zero)
    assert opt.get_config()["ema_overwrite_frequency"] is None
    with pytest.raises(ValueError, match="ema_overwrite_frequency"):
        _front(front)(use_ema=True, ema_overwrite_frequency=-1)


@pytest.mark.parametrize("front", ("core", "keras3"))
def test_gradient_accumulation_steps_of_zero_is_off(front):
    # Keras 3 reads 0 as off (its saved configs may hold it); both front
    # ends that accumulate refused it.
    var = tf.Variable([1.0, 2.0])
    opt = _front(front)(learning_rate=0.1, gradient_accumulation_steps=0)
    assert opt.get_config()["gradient_accumulation_steps"] is None
    opt.apply_gradients([(tf.constant([1.0, -1.0]), var)])  # no waiting
    np.testing.assert_allclose(var.numpy(), [0.9, 2.1], rtol=1e-6)


@pytest.mark.parametrize("arg", ("clipnorm", "clipvalue", "global_clipnorm"))
def test_the_core_reads_a_clip_of_zero_as_off(arg):
    # Keras 3's meaning, which DESIGN's keyword arguments follow (and what
    # both adapters do, `check_zero_clip_is_off` in their tests).
    from keras_cases import check_zero_clip_is_off
    check_zero_clip_is_off(tf_adamax.Adamax, arg)
    assert tf_adamax.Adamax(**{arg: 0}).get_config()[arg] is None
    other = "clipvalue" if arg != "clipvalue" else "clipnorm"
    for front in ("core", "keras3", "tf_keras"):
        # A constant tensor zero too, as the Keras built-ins take it; the
        # adapters stepped it into a traced `x > 0` on a tensor.
        opt = _front(front)(learning_rate=0.1, **{arg: tf.constant(0.0)})
        assert opt.get_config()[arg] is None
        var = tf.Variable([1.0, 2.0])
        tf.function(lambda opt=opt, var=var: opt.apply_gradients(
            [(tf.constant([30.0, -40.0]), var)]))()
        np.testing.assert_allclose(var.numpy(), [0.9, 2.1], rtol=1e-6)
        # Zero is not a second clip option (Keras counted it).
        _front(front)(**{arg: 0.0, other: 1.0})


@pytest.mark.parametrize("front", ("core", "keras3", "tf_keras"))
def test_zero_epsilon_is_accepted_with_a_warning(front):
    with pytest.warns(UserWarning, match="epsilon=0.*NaN"):
        opt = _front(front)(epsilon=0.0)
    assert opt.epsilon == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _front(front)(epsilon=1e-7)  # no warning otherwise


def _pair_kinds(front):
    """A plain variable for `front` (Keras 3 variables for its adapter)."""
    import keras
    return (lambda v: keras.Variable(v)) if front == "keras3" else tf.Variable


# The Keras 3 adapter takes no jit_compile (Keras compiles the train step).
_FRONT_JIT = [("core", True), ("core", False), ("keras3", None),
              ("tf_keras", True), ("tf_keras", False)]


@pytest.mark.parametrize("front,jit", _FRONT_JIT,
                         ids=[f"{f}-jit={j}" for f, j in _FRONT_JIT])
@pytest.mark.parametrize("case", ("sparse_tensor", "slices_of_a_scalar"))
def test_gradients_of_the_wrong_kind_name_the_fix_and_change_nothing(
        front, jit, case):
    # A tf.SparseTensor (not IndexedSlices) failed in the middle of a
    # jit_compile=False step, after other variables were updated; an
    # IndexedSlices for a scalar variable raised a bare IndexError.
    make = _pair_kinds(front)
    other = make(np.array([5.0, 5.0], np.float32))
    if case == "sparse_tensor":
        var = make(np.array([1.0, 2.0], np.float32))
        grad = tf.sparse.from_dense(tf.constant([1.0, 0.0]))
        error, words = TypeError, ("SparseTensor", "tf.sparse.to_dense")
    else:
        var = make(np.float32(3.0))
        grad = tf.IndexedSlices(tf.constant([1.0]), tf.constant([0]))
        error, words = ValueError, ("scalar", "dense gradient")
    opt = _front(front)(learning_rate=0.1, **(
        {} if jit is None else {"jit_compile": jit}))
    with pytest.raises(error, match=_mentions(*words)):
        opt.apply_gradients([(tf.constant([1.0, 1.0]), other), (grad, var)])
    np.testing.assert_array_equal(np.asarray(other.numpy()), [5.0, 5.0])
    assert int(opt.iterations.numpy()) == 0


@pytest.mark.parametrize("front", ("core", "keras3", "tf_keras"))
def test_a_keras_variable_as_the_gradient_is_its_value(front):
    # As Keras's own optimizers take it (it raised an AttributeError).
    import keras
    make = _pair_kinds(front)
    var = make(np.array([1.0, 2.0], np.float32))
    opt = _front(front)(learning_rate=0.1)
    opt.apply_gradients([(keras.Variable([1.0, -1.0]), var)])
    np.testing.assert_allclose(np.asarray(var.numpy()), [0.9, 2.1], rtol=1e-6)


def test_a_value_instead_of_a_variable_names_the_fix():
    var = tf.Variable([1.0, 2.0], name="w")
    with pytest.raises(TypeError, match=_mentions(
            "Expected a tf.Variable", "EagerTensor", "model.trainable_variables")):
        tf_adamax.Adamax().apply_gradients([(tf.ones([2]), var.value())])


# --------------------------------------------------------------------------
# apply_gradients validation: a trained optimizer must be left untouched.
# --------------------------------------------------------------------------
def _trained(mode, sparse_mode="exact"):
    rng = np.random.default_rng(11)
    a = tf.Variable(rng.standard_normal((5, 3)).astype(np.float32), name="weights_a")
    b = tf.Variable(rng.standard_normal((4,)).astype(np.float32), name="bias_b")
    emb = tf.Variable(rng.standard_normal((ROWS, 3)).astype(np.float32),
                      name="table_e")
    opt = make_optimizer(mode, learning_rate=0.01, sparse_mode=sparse_mode)
    for _ in range(2):
        grads = [tf.constant(rng.standard_normal(v.shape).astype(np.float32))
                 for v in (a, b, emb)]
        opt.apply_gradients(zip(grads, (a, b, emb)))
    return opt, [a, b, emb]


def _call(opt, mode, grads_and_vars):
    if mode == "function":
        return tf.function(lambda: opt.apply_gradients(grads_and_vars))()
    if mode == "xla":
        return tf.function(lambda: opt.apply_gradients(grads_and_vars),
                           jit_compile=True)()
    return opt.apply_gradients(grads_and_vars)


def _slices(indices, values):
    values = np.asarray(values, np.float32)
    return tf.IndexedSlices(tf.constant(values), tf.constant(indices, tf.int64),
                            dense_shape=tf.constant([ROWS] + list(values.shape[1:]),
                                                    tf.int64))


@pytest.mark.parametrize("mode", ("eager", "function", "jit"))
def test_dense_shape_mismatch_names_variable(mode):
    opt, (a, b, emb) = _trained(mode)
    before = snapshot(opt, [a, b, emb])
    with pytest.raises(ValueError, match=_mentions("bias_b", "shape")):
        _call(opt, mode, [(tf.ones((5, 3)), a), (tf.ones((5,)), b)])
    assert_same_state(before, snapshot(opt, [a, b, emb]))


@pytest.mark.parametrize("dense_shape", (True, False))
@pytest.mark.parametrize("mode", ("eager", "jit"))
def test_sparse_row_shape_mismatch_names_variable(mode, dense_shape):
    # Without a dense_shape only the rows' shape can tell.
    opt, (a, b, emb) = _trained(mode)
    before = snapshot(opt, [a, b, emb])
    bad = _slices([1, 2], np.ones((2, 4)))
    if not dense_shape:
        bad = tf.IndexedSlices(bad.values, bad.indices)
    with pytest.raises(ValueError, match=_mentions("table_e", "shape")):
        _call(opt, mode, [(tf.ones((5, 3)), a), (bad, emb)])
    assert_same_state(before, snapshot(opt, [a, b, emb]))


@pytest.mark.parametrize("mode", ("eager", "jit"))
def test_integer_variable_names_variable(mode):
    opt, (a, b, emb) = _trained(mode)
    counter = tf.Variable([1, 2, 3], dtype=tf.int32, name="int_counter")
    before = snapshot(opt, [a, b, emb])
    with pytest.raises((TypeError, ValueError), match="int_counter"):
        _call(opt, mode, [(tf.ones((5, 3)), a), (tf.constant([1, 1, 1]), counter)])
    assert_same_state(before, snapshot(opt, [a, b, emb]))
    np.testing.assert_array_equal(counter.numpy(), [1, 2, 3])


@pytest.mark.parametrize("sparse", (False, True))
@pytest.mark.parametrize("shape", ([None, 3], None))
@pytest.mark.parametrize("mode", ("eager", "function"))
def test_variable_of_unknown_shape_names_variable(mode, shape, sparse):
    """Slots take their variable's shape: one not fully defined is refused
    up front, before a new variable listed first gets slots."""
    opt, (a, b, emb) = _trained(mode)
    fresh = tf.Variable(tf.ones((2, 3)), name="fresh_w")
    partial = tf.Variable(tf.ones((4, 3)), shape=tf.TensorShape(shape),
                          name="partial_w")
    grad = (_slices([1, 1], np.ones((2, 3))) if sparse else tf.ones((4, 3)))
    before = snapshot(opt, [a, b, emb])
    count = len(opt.variables)
    with pytest.raises(ValueError, match=_mentions("partial_w", "shape")):
        _call(opt, mode, [(tf.ones((2, 3)), fresh), (grad, partial)])
    assert_same_state(before, snapshot(opt, [a, b, emb]))
    assert len(opt.variables) == count
    np.testing.assert_array_equal(fresh.numpy(), np.ones((2, 3)))
    with pytest.raises(ValueError, match="partial_w"):
        opt.build([partial])


@pytest.mark.parametrize("mode", ("eager", "function"))
def test_float_sparse_indices_name_variable(mode):
    opt, (a, b, emb) = _trained(mode)
    before = snapshot(opt, [a, b, emb])
    bad = tf.IndexedSlices(tf.ones((2, 3)), tf.constant([0.0, 1.0]))
    with pytest.raises(TypeError, match=_mentions("table_e", "indices",
                                                  "float32")):
        _call(opt, mode, [(tf.ones((5, 3)), a), (bad, emb)])
    assert_same_state(before, snapshot(opt, [a, b, emb]))


@pytest.mark.parametrize("mode", ("eager", "function"))
def test_integer_variable_without_gradient_names_variable(mode):
    # tape.gradient gives None for an integer variable: it must not be
    # skipped as an ordinary "no gradient" variable.
    opt = tf_adamax.Adamax(learning_rate=0.1)
    w = tf.Variable([1.0, 2.0], name="float_w")
    counter = tf.Variable([1, 2], dtype=tf.int32, name="int_counter")

    def minimize():
        return opt.minimize(
            lambda: tf.reduce_sum(w * tf.cast(counter, tf.float32)),
            [w, counter])

    with pytest.raises(TypeError, match=_mentions("int_counter", "float")):
        (tf.function(minimize) if mode == "function" else minimize)()
    assert int(opt.iterations.numpy()) == 0
    np.testing.assert_array_equal(w.numpy(), [1.0, 2.0])
    assert not opt.variables[2:], opt.variables  # no slots


def _unknown_shape_step(opt, var, user_jit):
    """A user's tf.function whose gradient shape is only known at run time."""
    return tf.function(lambda g: opt.apply_gradients([(g, var)]),
                       input_signature=[tf.TensorSpec(None, tf.float32)],
                       jit_compile=user_jit)


@pytest.mark.parametrize("accumulation", (None, 2))
@pytest.mark.parametrize("opt_jit", (True, False))
@pytest.mark.parametrize("shape", ((1, 3), (6, 3), (0, 3), (5,), (5, 3, 1)))
def test_dense_shape_known_at_run_time_is_checked(opt_jit, shape,
                                                  accumulation):
    # A [1, 3] gradient must not broadcast over the [5, 3] variable. With
    # accumulation and no XLA, TF's graph optimizer once folded the check
    # away (the accumulator's assign_add told it the shape) and the step
    # failed in that assign, after other variables had accumulated.
    a = tf.Variable(tf.zeros((5, 3)), name="weights_a")
    b = tf.Variable(tf.zeros((2,)), name="weights_b")
    opt = tf_adamax.Adamax(learning_rate=0.01, jit_compile=opt_jit,
                           gradient_accumulation_steps=accumulation)
    opt.build([b, a])
    before = snapshot(opt, [a, b])
    state = [v.numpy().copy() for v in opt.variables]  # accumulators too
    step = tf.function(
        lambda g: opt.apply_gradients([(tf.ones((2,)), b), (g, a)]),
        input_signature=[tf.TensorSpec(None, tf.float32)])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=_mentions("weights_a", "shape")):
        step(tf.ones(shape))
    assert_same_state(before, snapshot(opt, [a, b]))
    for old, new in zip(state, opt.variables):
        np.testing.assert_array_equal(new.numpy(), old, err_msg=new.name)
    step(tf.ones((5, 3)))  # the right shape still works
    assert int(opt._iterations.numpy()) == 1  # calls


@pytest.mark.parametrize("shape", ((1, 3), (6, 3)))
def test_dense_shape_mismatch_inside_user_xla_fails_to_compile(shape):
    # Asserts do not run inside XLA; the mismatch stops compilation instead.
    opt, (a, b, emb) = _trained("eager")
    before = snapshot(opt, [a])
    step = _unknown_shape_step(opt, a, user_jit=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="shape"):
        step(tf.ones(shape))
    assert_same_state(before, snapshot(opt, [a]))


@pytest.mark.parametrize("front", ("core", "keras3", "tf_keras"))
@pytest.mark.parametrize("case", ("dense", "sparse_rows"))
def test_shape_mismatch_inside_user_xla_fails_in_every_front_end(front, case):
    # Inside a function the user compiles with XLA the run-time asserts do
    # not run; a gradient whose shape is only known then was broadcast over
    # its variable and applied (the adapters' dense gradients, and every
    # front end's sparse rows). Its shape is now pinned to the variable's
    # there, so XLA refuses to compile the step and nothing changes.
    import tf_adamax.keras
    import tf_adamax.tf_keras

    cls = {"core": tf_adamax.Adamax, "keras3": tf_adamax.keras.Adamax,
           "tf_keras": tf_adamax.tf_keras.Adamax}[front]
    opt = cls(0.1)
    var = tf.Variable(tf.ones((5, 3)), name="pinned_w")
    opt.apply_gradients([(tf.ones((5, 3)), var)])  # built, one step taken
    before = (var.numpy().copy(), int(opt.iterations.numpy()))
    if case == "dense":
        step = tf.function(
            lambda g: opt.apply_gradients([(g, var)]), jit_compile=True,
            input_signature=[tf.TensorSpec(None, tf.float32)])
        args = (tf.ones((1, 3)),)
    else:
        step = tf.function(
            lambda values: opt.apply_gradients([(tf.IndexedSlices(
                values, tf.constant([0, 2, 4]), tf.constant([5, 3])), var)]),
            jit_compile=True,
            input_signature=[tf.TensorSpec([3, None], tf.float32)])
        args = (tf.ones((3, 1)),)
    with pytest.raises(tf.errors.InvalidArgumentError, match="shape"):
        step(*args)
    np.testing.assert_array_equal(var.numpy(), before[0])
    assert int(opt.iterations.numpy()) == before[1]


@pytest.mark.parametrize("front", ("keras3", "tf_keras"))
def test_adapter_build_refuses_a_variable_of_unknown_shape_first(front):
    # Keras created the slots of the variables before it (and marked itself
    # built) before failing with an error naming no variable.
    import tf_adamax.keras
    import tf_adamax.tf_keras

    opt = {"keras3": tf_adamax.keras.Adamax,
           "tf_keras": tf_adamax.tf_keras.Adamax}[front]()
    good = tf.Variable([1.0, 2.0], name="good_w")
    bad = tf.Variable(tf.ones((3, 2)), shape=tf.TensorShape([None, 2]),
                      name="unknown_w")
    count = len(opt.variables)
    with pytest.raises(ValueError, match="unknown_w"):
        opt.build([good, bad])
    assert len(opt.variables) == count
    opt.build([good])  # still buildable
    assert len(opt.variables) > count


@pytest.mark.parametrize("values_shape,indices", [((2, 4), [0, 1]),
                                                  ((2, 3), [0]),
                                                  ((2, 3), [0, 1, 2])])
def test_sparse_shape_known_at_run_time_is_checked(values_shape, indices):
    opt, (a, b, emb) = _trained("eager")
    before = snapshot(opt, [emb])
    step = tf.function(
        lambda values, idx: opt.apply_gradients([(tf.IndexedSlices(
            values, idx, tf.constant([ROWS, 3], tf.int64)), emb)]),
        input_signature=[tf.TensorSpec(None, tf.float32),
                         tf.TensorSpec(None, tf.int64)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="table_e"):
        step(tf.ones(values_shape), tf.constant(indices, tf.int64))
    assert_same_state(before, snapshot(opt, [emb]))


@pytest.mark.parametrize("sparse_mode", ("exact", "lazy"))
@pytest.mark.parametrize("mode", ("eager", "function", "jit"))
def test_sparse_dense_shape_mismatch_names_variable(mode, sparse_mode):
    # The densified gradient (tf.convert_to_tensor of the slices) would have
    # ROWS + 1 rows: a gradient of another variable. It was applied.
    opt, (a, b, emb) = _trained(mode, sparse_mode)
    before = snapshot(opt, [a, b, emb])
    bad = tf.IndexedSlices(tf.ones((2, 3)), tf.constant([0, 1], tf.int64),
                           tf.constant([ROWS + 1, 3], tf.int64))
    with pytest.raises(ValueError, match=_mentions("table_e", "dense_shape")):
        _call(opt, mode, [(tf.ones((5, 3)), a), (bad, emb)])
    assert_same_state(before, snapshot(opt, [a, b, emb]))


@pytest.mark.parametrize("sparse_mode", ("exact", "lazy"))
@pytest.mark.parametrize("jit", (False, True))
def test_sparse_indices_of_unknown_rank(jit, sparse_mode):
    # Indices traced with an unknown rank: a vector at run time is a normal
    # step (the lazy kernel failed to trace); a matrix raises naming the
    # variable before anything changes (TF's concat error, naming nothing,
    # came from inside the update, and the counter had advanced).
    rng = np.random.default_rng(5)
    init = rng.standard_normal((ROWS, 3)).astype(np.float32)
    emb = tf.Variable(init, name="table_e")
    opt = tf_adamax.Adamax(0.1, jit_compile=jit, sparse_mode=sparse_mode)
    step = tf.function(
        lambda values, idx: opt.apply_gradients([(tf.IndexedSlices(
            values, idx, tf.constant([ROWS, 3], tf.int64)), emb)]),
        input_signature=[tf.TensorSpec(None, tf.float32),
                         tf.TensorSpec(None, tf.int64)])
    values = np.array([[1.0, -2.0, 0.5], [-1.0, 2.0, 0.25], [3.0, 0.0, 1.0]],
                      np.float32)
    indices = np.array([4, 4, 1])  # a duplicate of opposite signs
    ref = AdamaxReference(learning_rate=0.1, sparse_mode=sparse_mode)
    ref.add_variable("e", init, np.float32)
    step(tf.constant(values), tf.constant(indices))
    ref.apply({"e": SparseGrad(indices, values)})
    check_against_reference(opt, [emb], ref, ["e"])
    before = snapshot(opt, [emb])
    with pytest.raises(tf.errors.InvalidArgumentError, match=_mentions(
            "table_e", "expected a vector")):
        step(tf.constant(values[:2]), tf.constant([[1], [2]], tf.int64))
    assert_same_state(before, snapshot(opt, [emb]))


@pytest.mark.parametrize("opt_jit", (False, True))
def test_sparse_indices_of_unknown_rank_inside_user_xla(opt_jit):
    # Asserts do not run inside a function the user compiles: a matrix of
    # indices was flattened into rows and applied. Now it fails to compile.
    emb = tf.Variable(np.ones((ROWS, 2), np.float32), name="table_e")
    opt = tf_adamax.Adamax(0.1, jit_compile=opt_jit)
    opt.build([emb])
    step = tf.function(
        lambda values, idx: opt.apply_gradients([(tf.IndexedSlices(
            values, idx, tf.constant([ROWS, 2], tf.int64)), emb)]),
        input_signature=[tf.TensorSpec(None, tf.float32),
                         tf.TensorSpec(None, tf.int64)], jit_compile=True)
    before = snapshot(opt, [emb])
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        step(tf.ones((2, 2)), tf.constant([[1, 3]], tf.int64))
    assert_same_state(before, snapshot(opt, [emb]))
    step(tf.ones((2, 2)), tf.constant([1, 3], tf.int64))  # a vector steps
    assert int(opt.iterations) == 1


@pytest.mark.parametrize("sparse_mode", ("exact", "lazy"))
@pytest.mark.parametrize("front", ("keras3", "tf_keras"))
def test_adapters_take_sparse_indices_of_unknown_rank(front, sparse_mode):
    # As the core (above): the step of the core's numbers, and a matrix
    # refused before anything changes.
    results = []
    for cls in (tf_adamax.Adamax, _front(front)):  # the adapter's last
        var = tf.Variable(np.arange(12.0, dtype=np.float32).reshape(4, 3))
        opt = cls(0.1, sparse_mode=sparse_mode)
        step = tf.function(
            lambda values, idx, opt=opt, var=var: opt.apply_gradients([(
                tf.IndexedSlices(values, idx, tf.constant([4, 3])), var)]),
            input_signature=[tf.TensorSpec(None, tf.float32),
                             tf.TensorSpec(None, tf.int32)])
        step(tf.constant([[1.0, -2.0, 0.5], [-1.0, 2.0, 0.5],
                          [3.0, 0.0, 1.0]]), tf.constant([2, 2, 0]))
        results.append(var.numpy())
    np.testing.assert_allclose(results[1], results[0], rtol=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="expected a vector"):
        step(tf.ones((2, 3)), tf.constant([[1], [2]]))
    np.testing.assert_array_equal(var.numpy(), results[1])
    assert int(opt.iterations) == 1


def test_gradients_given_as_lists():
    # A nested list is a gradient, as for tf.convert_to_tensor and Keras's
    # own optimizers (AttributeError: 'list' object has no attribute
    # 'dtype'); one that is no tensor names its variable.
    var = tf.Variable([[1.0, 2.0], [3.0, 4.0]], name="w_list")
    opt = tf_adamax.Adamax(0.1, jit_compile=False)
    opt.apply_gradients([([[0.5, -0.5], [1.0, 0.0]], var)])
    expected = AdamaxReference(learning_rate=0.1)
    expected.add_variable("w", [[1.0, 2.0], [3.0, 4.0]], np.float32)
    expected.apply({"w": np.array([[0.5, -0.5], [1.0, 0.0]])})
    check_against_reference(opt, [var], expected, ["w"])
    before = snapshot(opt, [var])
    with pytest.raises(ValueError, match=_mentions("w_list", "tf.Tensor")):
        opt.apply_gradients([([[0.5], [1.0, 0.0]], var)])
    assert_same_state(before, snapshot(opt, [var]))


def test_a_value_without_a_gradient_names_the_fix():
    # A None gradient paired with a value, not a variable: the check of a
    # skipped pair failed with AttributeError (Tensor.name).
    var = tf.Variable([1.0, 2.0], name="w")
    opt = tf_adamax.Adamax()
    with pytest.raises(TypeError, match=_mentions(
            "Expected a tf.Variable", "model.trainable_variables")):
        opt.apply_gradients([(None, tf.constant([1.0])), (tf.ones([2]), var)])
    assert int(opt.iterations) == 0 and opt.variables[2:] == []


def test_sparse_dense_shape_known_at_run_time_is_checked():
    opt, (a, b, emb) = _trained("eager")
    before = snapshot(opt, [emb])
    step = tf.function(
        lambda shape: opt.apply_gradients([(tf.IndexedSlices(
            tf.ones((2, 3)), tf.constant([0, 1], tf.int64), shape), emb)]),
        input_signature=[tf.TensorSpec([2], tf.int64)])
    step(tf.constant([ROWS, 3], tf.int64))  # the right shape runs
    before = snapshot(opt, [emb])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="table_e.*dense_shape"):
        step(tf.constant([ROWS + 1, 3], tf.int64))
    assert_same_state(before, snapshot(opt, [emb]))


def test_static_indices_and_values_length_mismatch_names_variable():
    opt, (a, b, emb) = _trained("eager")
    before = snapshot(opt, [a, b, emb])
    bad = tf.IndexedSlices(tf.ones((3, 3)), tf.constant([0, 1], tf.int64),
                           tf.constant([ROWS, 3], tf.int64))
    with pytest.raises(ValueError, match=_mentions("table_e", "indices")):
        opt.apply_gradients([(bad, emb)])
    assert_same_state(before, snapshot(opt, [a, b, emb]))


OUT_OF_RANGE = "(?i)out of range|out-of-range|outside|not in \\[0"


@pytest.mark.parametrize("sparse_mode", ("exact", "lazy"))
@pytest.mark.parametrize("mode,bad", [("eager", ROWS), ("eager", -1),
                                      ("function", ROWS)])
def test_out_of_range_indices_raise_and_change_nothing(mode, bad, sparse_mode):
    opt, (a, b, emb) = _trained(mode, sparse_mode)
    before = snapshot(opt, [a, b, emb])
    bad_grad = _slices([1, bad, 3], np.ones((3, 3)))
    with pytest.raises(tf.errors.InvalidArgumentError, match=OUT_OF_RANGE) as err:
        _call(opt, mode, [(tf.ones((5, 3)), a), (tf.ones((4,)), b), (bad_grad, emb)])
    assert_same_state(before, snapshot(opt, [a, b, emb]))
    # The message names the variable and the fix; eagerly also the bad index.
    assert re.search(_mentions("table_e", "pass row indices"), str(err.value))
    if mode == "eager":
        assert f"rows = {ROWS}; out of range: [{bad}]" in str(err.value)


def test_eager_out_of_range_message_lists_every_bad_index():
    opt, (a, b, emb) = _trained("eager")
    bad_grad = _slices([ROWS, 2, -1, ROWS + 1], np.ones((4, 3)))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=re.escape(f"out of range: [{ROWS}, -1, {ROWS + 1}]")):
        opt.apply_gradients([(bad_grad, emb)])


def _expect_dropped(opt, emb, emb_before, slots_before, indices, values, bad,
                    sparse_mode):
    """The reference run of the same step without the out-of-range row."""
    ref = AdamaxReference(learning_rate=0.01, sparse_mode=sparse_mode)
    ref.iterations = int(opt.iterations.numpy()) - 1
    ref.add_variable(0, emb_before, np.float32)
    ref.m[0], ref.u[0] = slots_before
    keep = np.asarray(indices) != bad
    ref.apply({0: SparseGrad(np.asarray(indices)[keep], values[keep])})
    check_against_reference(opt, [emb], ref, [0], err_msg="dropped row")


@pytest.mark.parametrize("sparse_mode", ("exact", "lazy"))
@pytest.mark.parametrize("opt_jit,bad", [(True, ROWS), (True, -1), (False, ROWS)])
def test_out_of_range_row_is_dropped_inside_xla(opt_jit, bad, sparse_mode):
    """XLA cannot assert: the bad row is dropped, never clamped onto a row."""
    opt, (a, b, emb) = _trained("jit" if opt_jit else "eager", sparse_mode)
    emb_before = emb.numpy().astype(np.float64)
    slots_before = [opt.get_slot(emb, s).numpy().astype(np.float64)
                    for s in ("momentum", "norm")]
    # The first and last rows are named too: a bad row clamped into range
    # (XLA gathers clamp) would land on one of them.
    indices = [0, bad, 3, 0, ROWS - 1]
    values = np.array([[0.5, -0.5, 0.25], [50.0, -50.0, 50.0],
                       [0.1, 0.2, 0.3], [-0.2, 0.1, 0.05], [0.3, -0.1, 0.2]])
    step = tf.function(lambda g: opt.apply_gradients([(g, emb)]), jit_compile=True)
    step(_slices(indices, values))
    _expect_dropped(opt, emb, emb_before, slots_before, indices, values, bad,
                    sparse_mode)


@pytest.mark.parametrize("jit_compile", (True, False))
def test_rows_dropped_in_xla_do_not_count_in_clip_norms(jit_compile):
    from keras_cases import check_dropped_rows_do_not_count_in_clip_norms

    check_dropped_rows_do_not_count_in_clip_norms(
        functools.partial(tf_adamax.Adamax, jit_compile=jit_compile),
        tf.Variable, lambda opt, var: opt.get_slot(var, "momentum").numpy())


@pytest.mark.parametrize("sparse_mode", ("exact", "lazy"))
def test_out_of_range_with_compiled_optimizer_called_eagerly(sparse_mode):
    """jit_compile=True, eager call: a clear error with no state change, or the
    documented XLA behaviour (row dropped) — never a clamped update."""
    opt, (a, b, emb) = _trained("jit", sparse_mode)
    before = snapshot(opt, [a, b, emb])
    emb_before = emb.numpy().astype(np.float64)
    slots_before = [opt.get_slot(emb, s).numpy().astype(np.float64)
                    for s in ("momentum", "norm")]
    indices = [1, ROWS, 3]
    values = np.array([[0.5, -0.5, 0.25], [50.0, -50.0, 50.0], [0.1, 0.2, 0.3]])
    try:
        opt.apply_gradients([(_slices(indices, values), emb)])
    except tf.errors.InvalidArgumentError as e:
        assert re.search(OUT_OF_RANGE, str(e)), str(e)
        assert_same_state(before, snapshot(opt, [a, b, emb]))
    else:
        _expect_dropped(opt, emb, emb_before, slots_before, indices, values, ROWS,
                        sparse_mode)


def _warned_at(fn, match):
    """The files that warnings matching `match` raised by `fn` point at."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    files = [w.filename for w in caught if re.search(match, str(w.message))]
    assert files, f"no warning matching {match!r}"
    return set(files)


@pytest.mark.parametrize("front", ("core", "keras3", "tf_keras"))
def test_warnings_point_at_the_users_line(front):
    # A fixed stacklevel pointed into tf_adamax, Keras or TensorFlow when a
    # warning came through a property setter, Keras or a tf.function.
    cls = _front(front)
    assert _warned_at(lambda: cls(epsilon=0.0), "epsilon=0") == {__file__}
    opt = cls(0.1)

    def set_epsilon():
        opt.epsilon = 0.0

    assert _warned_at(set_epsilon, "epsilon=0") == {__file__}
    if front != "core":
        return
    var, unused = tf.Variable([1.0]), tf.Variable([2.0])
    for jit in (False, True):
        opt = tf_adamax.Adamax(0.1, jit_compile=jit)
        assert _warned_at(lambda: opt.apply_gradients(
            [(tf.ones([1]), var), (None, unused)]), "Gradients do not") == {
                __file__}
        opt = tf_adamax.Adamax(0.1, jit_compile=jit)
        step = tf.function(lambda: opt.apply_gradients(
            [(tf.ones([1]), var), (None, unused)]))
        assert _warned_at(step, "Gradients do not") == {__file__}


# --------------------------------------------------------------------------
# None gradients.
# --------------------------------------------------------------------------
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records = {}

    def emit(self, record):
        # A record may reach several of the hooked loggers; count it once.
        self.records[id(record)] = record.getMessage()


def _count_none_warnings(fn):
    """Runs fn; counts gradient warnings from `warnings` and from logging."""
    handler = _Records()
    loggers = [logging.getLogger(), logging.getLogger("tensorflow"),
               logging.getLogger("tf_adamax")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    texts = [str(w.message) for w in caught] + list(handler.records.values())
    return [t for t in texts if re.search("(?i)gradient", t)]


@pytest.mark.parametrize("mode", ("eager", "jit", "function"))
def test_none_gradients_skipped_with_one_warning(mode):
    rng = np.random.default_rng(2)
    x0 = rng.standard_normal((5, 3)).astype(np.float32)
    y0 = rng.standard_normal((4,)).astype(np.float32)
    frozen = tf.Variable(x0, name="frozen_w")
    live = tf.Variable(y0, name="live_b")
    opt = make_optimizer(mode, learning_rate=0.01)
    ref = AdamaxReference(learning_rate=0.01)
    ref.add_variable(0, y0, np.float32)
    grads = [rng.standard_normal((4,)).astype(np.float32) for _ in range(3)]

    def call(g):
        _call(opt, mode, [(None, frozen), (tf.constant(g), live)])
        ref.apply({0: g})

    first = _count_none_warnings(lambda: call(grads[0]))
    assert len(first) == 1, first
    later = _count_none_warnings(lambda: (call(grads[1]), call(grads[2])))
    assert later == [], later  # once per optimizer
    np.testing.assert_array_equal(frozen.numpy(), x0)
    check_against_reference(opt, [live], ref, [0])
    # A new optimizer warns again.
    other = make_optimizer("eager", learning_rate=0.01)
    again = _count_none_warnings(
        lambda: other.apply_gradients([(None, frozen), (tf.ones((4,)), live)]))
    assert len(again) == 1, again


def test_failed_step_creates_no_slots_for_a_new_variable():
    opt, (a, b, emb) = _trained("eager")
    state = list(opt.variables)
    fresh = tf.Variable(tf.ones((ROWS, 3)), name="fresh_table")
    with pytest.raises(tf.errors.InvalidArgumentError, match=OUT_OF_RANGE):
        opt.apply_gradients([(_slices([ROWS + 3], np.ones((1, 3))), fresh)])
    assert [id(v) for v in opt.variables] == [id(v) for v in state]
    with pytest.raises(KeyError):
        opt.get_slot(fresh, "momentum")


def _one_step_from(w, t, lr=0.1, g=1.0):
    """w after one Adamax step at step t from zero slots (float64)."""
    m, u = (1 - 0.9) * g, abs(g)
    return w - lr * m / ((1 - 0.9 ** t) * (u + 1e-7))


@pytest.mark.parametrize("built_before", [False, True])
def test_new_variable_in_retraced_function_gets_its_slots(built_before):
    # The slots are created eagerly (not lifted out of the trace), so a
    # variable first seen in a later trace of the same tf.function gets its
    # slots there, whether the first call created the others' slots or
    # `build` did before it.
    opt = tf_adamax.Adamax(learning_rate=0.1)
    old = tf.Variable([1.0], name="old_w")
    new = tf.Variable([2.0], name="unfrozen_w")
    if built_before:
        opt.build([old])
    step = tf.function(
        lambda vs: opt.apply_gradients([(tf.ones_like(v), v) for v in vs]))
    step([old])
    step([old, new])
    assert int(opt.iterations.numpy()) == 2
    np.testing.assert_allclose(new.numpy(), [_one_step_from(2.0, t=2)],
                               rtol=1e-6)
    np.testing.assert_allclose(opt.get_slot(new, "momentum").numpy(), [0.1],
                               rtol=1e-6)
    step([old, new])  # and the new trace is reused
    assert int(opt.iterations.numpy()) == 3


def test_new_variable_in_retrace_after_user_variables_gets_a_clear_error():
    # A function whose first call created variables of its own (a layer
    # built lazily) may create none in later traces: TF refuses, and the
    # error names the variable and the fix, before anything changes.
    opt = tf_adamax.Adamax(learning_rate=0.1)
    old = tf.Variable([1.0], name="old_w")
    new = tf.Variable([2.0], name="unfrozen_w")
    own = []

    @tf.function
    def step(vs):
        if not own:
            own.append(tf.Variable(0.0, name="lazy_layer_state"))
        return opt.apply_gradients([(tf.ones_like(v), v) for v in vs])

    step([old])
    w_old = old.numpy().copy()
    with pytest.raises(ValueError, match=_mentions("unfrozen_w", "build")):
        step([old, new])
    assert int(opt.iterations.numpy()) == 1
    np.testing.assert_array_equal(new.numpy(), [2.0])
    np.testing.assert_array_equal(old.numpy(), w_old)
    opt.build([new])
    step([old, new])
    assert int(opt.iterations.numpy()) == 2
    np.testing.assert_allclose(new.numpy(), [_one_step_from(2.0, t=2)],
                               rtol=1e-6)


# --------------------------------------------------------------------------
# The adapters check assignments as their constructors check arguments.
# --------------------------------------------------------------------------
# (option, refused value, message words, a valid value)
ADAPTER_SETTER_CASES = [
    ("beta_1", 1.5, ("beta_1", "1.5"), 0.5),
    ("beta_2", -0.1, ("beta_2", "-0.1"), 0.9),
    ("epsilon", -1.0, ("epsilon", "-1.0"), 1e-3),
    ("learning_rate", -1.0, ("learning_rate", "-1.0"), 0.05),
    ("learning_rate", math.nan, ("learning_rate", "nan"), 0.05),
    ("weight_decay", -1.0, ("weight_decay", "-1.0"), 0.01),
    ("clipnorm", -1.0, ("clipnorm", "-1.0"), 2.0),
    ("clipvalue", math.inf, ("clipvalue", "inf"), 0.5),
    ("global_clipnorm", -2.0, ("global_clipnorm", "-2.0"), 3.0),
    ("sparse_mode", "lazzy", ("sparse_mode", "'lazzy'", "Did you mean 'lazy'"),
     "lazy"),
    ("ema_momentum", 1.5, ("ema_momentum", "1.5"), 0.9),
    ("ema_overwrite_frequency", 0.5, ("ema_overwrite_frequency", "0.5"), 3),
    ("loss_scale_factor", 0.0, ("loss_scale_factor", "0.0"), 8.0),
]


def _option(opt, name):
    value = getattr(opt, name)
    return float(value) if name == "learning_rate" else value


@pytest.mark.parametrize("front,name,bad,words,good", [
    (front, *case) for front in ("keras3", "tf_keras")
    for case in ADAPTER_SETTER_CASES
    # tf-keras optimizers have no loss_scale_factor
    if not (front == "tf_keras" and case[0] == "loss_scale_factor")],
    ids=lambda x: str(x) if isinstance(x, (str, float, int)) else "")
def test_adapter_setters_refuse_what_the_constructor_refuses(front, name, bad,
                                                             words, good):
    # Set after construction, each was accepted (training then ran with it,
    # or, for a sparse_mode typo, exact, and the saved model failed to load).
    opt = _front(front)(learning_rate=0.01)
    old = _option(opt, name)
    with pytest.raises(ValueError, match=_mentions(*words)):
        setattr(opt, name, bad)
    assert _option(opt, name) == old
    setattr(opt, name, good)
    assert _option(opt, name) == pytest.approx(good)


@pytest.mark.parametrize("front", ("keras3", "tf_keras"))
def test_adapter_clip_setters_keep_the_constructors_one_clip_rule(front):
    opt = _front(front)(clipnorm=1.0)
    with pytest.raises(ValueError, match=_mentions("clipnorm",
                                                   "global_clipnorm")):
        opt.global_clipnorm = 2.0
    with pytest.raises(ValueError, match=_mentions("clipnorm", "clipvalue")):
        opt.clipvalue = 0.5
    assert (opt.clipnorm, opt.clipvalue, opt.global_clipnorm) == (1.0, None,
                                                                  None)
    opt.clipnorm = 0  # "no clipping", as the constructor reads it
    assert opt.clipnorm is None
    opt.global_clipnorm = 2.0
    assert opt.get_config()["global_clipnorm"] == 2.0


@pytest.mark.parametrize("front", ("keras3", "tf_keras"))
def test_adapter_options_set_after_construction_save_and_load(front, tmp_path):
    # A refused typo left nothing behind (it was kept, and the saved model
    # then failed to load with the constructor's error); valid values set
    # after construction are used, saved and loaded.
    if front == "keras3":
        import keras as K
    else:
        import tf_keras as K
    opt = _front(front)(learning_rate=0.01)
    with pytest.raises(ValueError, match="sparse_mode"):
        opt.sparse_mode = "lazzy"
    opt.sparse_mode, opt.beta_1, opt.learning_rate = "lazy", 0.8, 0.05
    opt.weight_decay, opt.clipnorm = 0.01, 1.0
    model = K.Sequential([K.Input((2,)), K.layers.Dense(1)])
    model.compile(optimizer=opt, loss="mse")
    model.fit(np.ones((4, 2)), np.ones((4, 1)), verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    config = K.models.load_model(path).optimizer.get_config()
    assert config["sparse_mode"] == "lazy"
    assert (config["beta_1"], config["weight_decay"], config["clipnorm"]) == (
        0.8, 0.01, 1.0)
    assert config["learning_rate"] == pytest.approx(0.05)
