"""Every hyperparameter form and keyword argument against the reference."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_adamax
import tf_keras

from conftest import (AdamaxReference, assert_allclose_according_to_type,
                      check_against_reference, make_optimizer, make_step, to_numpy)

SHAPES = ((5, 3), (4,))
STEPS = 7


def _vars(rng):
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    return [tf.Variable(x) for x in init], init


def _grads(rng):
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _f32(x):
    return float(np.float32(x))


def _exp_decay(step, initial=0.02, decay_steps=2, rate=0.5):
    return initial * rate ** (step / decay_steps)


def _lr_form(form):
    """(optimizer kwargs, reference kwargs, per-step hook) for a form."""
    if form == "float":
        return dict(learning_rate=0.02), dict(learning_rate=0.02), None
    if form == "keras3_schedule":
        sched = keras.optimizers.schedules.ExponentialDecay(0.02, 2, 0.5)
        return dict(learning_rate=sched), dict(learning_rate=_exp_decay), None
    if form == "tf_keras_schedule":
        sched = tf_keras.optimizers.schedules.ExponentialDecay(0.02, 2, 0.5)
        return dict(learning_rate=sched), dict(learning_rate=_exp_decay), None
    if form == "callable":
        # A zero-argument callable must be re-evaluated at every step.
        values = [0.03 / (k + 1) for k in range(STEPS)]
        lr_var = tf.Variable(values[0])

        def hook(step):
            lr_var.assign(values[step])

        return (dict(learning_rate=lambda: lr_var),
                dict(learning_rate=lambda step: _f32(values[step])), hook)
    if form == "tensors":
        opt_kw = dict(learning_rate=tf.constant(0.02), beta_1=tf.constant(0.8),
                      beta_2=tf.constant(0.99), epsilon=tf.constant(1e-3))
        ref_kw = {k: _f32(v.numpy()) for k, v in opt_kw.items()}
        return opt_kw, ref_kw, None
    if form == "numpy":
        # 0-d arrays (what `np.array(x)` and `array.mean()` give) and NumPy
        # scalars: 0-d arrays were refused ("Expected a float").
        opt_kw = dict(learning_rate=np.array(0.02), beta_1=np.array(0.8),
                      beta_2=np.float32(0.99), epsilon=np.array(1e-3),
                      weight_decay=np.array(0.1), clipnorm=np.array(2.0),
                      loss_scale_factor=np.float64(4.0))
        return opt_kw, {k: float(v) for k, v in opt_kw.items()}, None
    raise AssertionError(form)


def _setup(mode, opt_kw, ref_kw, rng):
    """Fresh variables, the optimizer and its step, and the reference."""
    variables, init = _vars(rng)
    opt = make_optimizer(mode, **opt_kw)
    step = make_step(opt, mode, variables)
    ref = AdamaxReference(**ref_kw)
    for i, x in enumerate(init):
        ref.add_variable(i, x, np.float32)
    return variables, opt, step, ref


@pytest.mark.parametrize("mode", ("function", "jit"))
@pytest.mark.parametrize("form", ("float", "keras3_schedule", "tf_keras_schedule",
                                  "callable", "tensors", "numpy"))
def test_learning_rate_and_hyperparameter_forms(form, mode, rng):
    opt_kw, ref_kw, hook = _lr_form(form)
    variables, opt, step, ref = _setup(mode, opt_kw, ref_kw, rng)
    for k in range(STEPS):
        if hook:
            hook(k)
        np.testing.assert_allclose(to_numpy(opt.learning_rate),
                                   ref.current_learning_rate, rtol=1e-6,
                                   err_msg=f"learning_rate before step {k}")
        grads = _grads(rng)
        step([tf.constant(g) for g in grads])
        ref.apply(dict(enumerate(grads)))
        check_against_reference(opt, variables, ref, [0, 1], err_msg=f"step {k}")


KWARGS = {
    "betas_eps": dict(beta_1=0.5, beta_2=0.9, epsilon=1e-3),
    "betas_zero": dict(beta_1=0.0, beta_2=0.0),
    "weight_decay": dict(weight_decay=0.05),
    "weight_decay_schedule": dict(weight_decay=0.05, learning_rate="schedule"),
    "clipnorm": dict(clipnorm=0.8),
    "clipvalue": dict(clipvalue=0.3),
    "global_clipnorm": dict(global_clipnorm=1.1),
    "loss_scale_factor": dict(loss_scale_factor=8.0),
    "accumulation": dict(gradient_accumulation_steps=3, learning_rate="schedule"),
    "ema": dict(use_ema=True, ema_momentum=0.9),
    "ema_overwrite": dict(use_ema=True, ema_momentum=0.7, ema_overwrite_frequency=3),
    # The EMA counts updates (calls // N), as Keras 3: its first call copies.
    "ema_accumulation": dict(use_ema=True, ema_momentum=0.9,
                             gradient_accumulation_steps=2),
}
# Conditional logic (accumulation, EMA overwrite) also runs in a user graph.
GRAPH_SENSITIVE = ("accumulation", "ema_overwrite", "ema_accumulation")


def _kwargs_cases():
    for name in KWARGS:
        modes = ("eager", "function", "jit") if name in GRAPH_SENSITIVE else (
            "eager", "jit")
        for mode in modes:
            yield pytest.param(name, mode, id=f"{name}-{mode}")


@pytest.mark.parametrize("name,mode", list(_kwargs_cases()))
def test_keyword_arguments_match_reference(name, mode, rng):
    kwargs = dict(KWARGS[name])
    opt_kw, ref_kw = dict(kwargs), dict(kwargs)
    opt_kw.setdefault("learning_rate", 0.02)
    ref_kw.setdefault("learning_rate", 0.02)
    if kwargs.get("learning_rate") == "schedule":
        opt_kw["learning_rate"] = keras.optimizers.schedules.ExponentialDecay(
            0.02, 2, 0.5)
        ref_kw["learning_rate"] = _exp_decay
    variables, opt, step, ref = _setup(mode, opt_kw, ref_kw, rng)
    for k in range(STEPS):
        grads = _grads(rng)
        if name == "betas_zero" and k == 2:
            grads[0][0] = 0.0  # m = u = 0 on this row: the update is 0 / epsilon
        step([tf.constant(g) for g in grads])
        ref.apply(dict(enumerate(grads)))
        check_against_reference(opt, variables, ref, [0, 1], err_msg=f"step {k}")
        # As Keras 3 reports it: calls, or updates (calls // N) with
        # accumulation, so that t = iterations + 1 for the next update.
        assert int(opt.iterations.numpy()) == ref.updates, name
        assert int(opt._iterations.numpy()) == k + 1
    if opt_kw.get("use_ema"):
        raw = to_numpy(variables[0])
        opt.finalize_variable_values(variables)
        ref.finalize_variable_values()
        for i, var in enumerate(variables):
            assert_allclose_according_to_type(var, ref.w[i], "float32",
                                              err_msg="after finalize")
        # The averages really differ from the raw weights at this point.
        assert not np.allclose(to_numpy(variables[0]), raw, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("clip", [dict(clipnorm=1.0), dict(global_clipnorm=1.0)],
                         ids=["clipnorm", "global_clipnorm"])
@pytest.mark.parametrize("mode", ("eager", "jit"))
@pytest.mark.parametrize("dtype", (np.float16, "bfloat16"))
def test_half_precision_gradients_are_clipped_by_a_float32_norm(dtype, mode,
                                                                clip):
    # 300 squared is past float16's largest finite value (65504): a norm
    # taken in float16 would be inf, and the step 0 or NaN.
    import ml_dtypes

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    init = np.array([1.0, -1.0, 0.5, 2.0], np_dtype)
    var = tf.Variable(init)
    opt = make_optimizer(mode, learning_rate=0.1, **clip)
    ref = AdamaxReference(learning_rate=0.1, **clip)
    ref.add_variable(0, init, np_dtype)
    step = make_step(opt, mode, [var])
    for g in ([300.0, 1.0, -1.0, 1.0], [-2.0, 400.0, 1.0, 0.0]):
        grad = np.array(g, np_dtype)
        step([tf.constant(grad)])
        ref.apply({0: grad.astype(np.float64)})
        # The clipped gradient is rounded to its own dtype (as in Keras)
        # before the float32 slots take it: half-precision tolerance.
        name = "bfloat16" if dtype == "bfloat16" else "float16"
        assert_allclose_according_to_type(var, ref.w[0], name)
        for slot, expected in (("momentum", ref.m[0]), ("norm", ref.u[0])):
            assert_allclose_according_to_type(opt.get_slot(var, slot),
                                              expected, name, slot)
    assert np.all(np.isfinite(var.numpy().astype(np.float32)))


@pytest.mark.parametrize("front", ("core", "keras3", "tf_keras"))
@pytest.mark.parametrize("clips", [dict(clipnorm=1.0, clipvalue=0.5),
                                   dict(clipvalue=0.5, global_clipnorm=1.0)],
                         ids=["clipnorm+clipvalue", "clipvalue+global_clipnorm"])
def test_only_one_clip_option_as_in_keras3(front, clips):
    # The step clips one way only: a second option would be ignored silently
    # (tf-keras's own optimizers accept clipnorm with clipvalue and ignore
    # clipvalue).
    import tf_adamax.keras
    import tf_adamax.tf_keras

    cls = {"core": tf_adamax.Adamax, "keras3": tf_adamax.keras.Adamax,
           "tf_keras": tf_adamax.tf_keras.Adamax}[front]
    with pytest.raises(ValueError, match="Only one of clipnorm, clipvalue"):
        cls(**clips)
    with pytest.raises(ValueError):  # and Keras 3's own optimizer agrees
        keras.optimizers.Adamax(**clips)


@pytest.mark.parametrize("front", ("core", "keras3", "tf_keras"))
def test_numpy_scalars_are_accepted_as_floats(front):
    # A 0-d NumPy array given to the constructor or set later was refused
    # ("Expected a float or a scalar tensor"); it steps as the float does.
    import tf_adamax.keras
    import tf_adamax.tf_keras

    cls = {"core": tf_adamax.Adamax, "keras3": tf_adamax.keras.Adamax,
           "tf_keras": tf_adamax.tf_keras.Adamax}[front]
    values = dict(beta_1=0.8, epsilon=1e-3, weight_decay=0.1, clipnorm=2.0)
    results = []
    for convert in (float, np.array):
        opt = cls(0.05, **{k: convert(v) for k, v in values.items()})
        var = tf.Variable([1.0, -2.0, 3.0])
        opt.apply_gradients([(tf.constant([0.5, -4.0, 0.0]), var)])
        opt.beta_2 = convert(0.9)
        opt.ema_momentum = convert(0.5)
        opt.apply_gradients([(tf.constant([-1.0, 1.0, 2.0]), var)])
        results.append(var.numpy())
    np.testing.assert_array_equal(results[1], results[0])


@pytest.mark.parametrize("kw", [dict(beta_1=False), dict(epsilon=True),
                                dict(beta_1=np.array(False)),
                                dict(epsilon=np.array(True)),
                                dict(beta_2=np.array(0.5 + 0j))])
def test_bools_and_complex_are_not_floats(kw):
    # NumPy scalars are floats (above); bools and complex numbers are not.
    (name, _), = kw.items()
    with pytest.raises(ValueError, match=name):
        tf_adamax.Adamax(0.1, **kw)


def test_numpy_beta_values_do_not_recompile():
    # A NumPy scalar set between eager steps is passed as a float64 tensor,
    # as a float is: no new program for each value or NumPy type.
    from conftest import compiled_update_functions

    var = tf.Variable([1.0, -2.0])
    opt = tf_adamax.Adamax(0.1)
    for beta in (0.9, np.float32(0.8), np.array(0.7, np.float32),
                 np.array(1e-3)):
        opt.beta_1 = beta
        opt.apply_gradients([(tf.constant([0.5, -1.0]), var)])
    traces = [f.experimental_get_tracing_count()
              for f in compiled_update_functions(opt)]
    assert sum(traces) == 1, traces


@pytest.mark.parametrize("mode", ("eager", "jit"))
def test_ema_of_a_variable_first_updated_later_matches_keras3(mode):
    # Keras 3 copies every built variable into its average at the first step
    # and moves each average at every call, so a variable frozen at first
    # averages from its weights. The core's average started from zeros:
    # finalize_variable_values then set such a variable near 0.
    values = {"a": [1.0, -2.0], "b": [5.0, 3.0]}
    grads = [{"a": [0.5, -1.0], "b": None}, {"a": [0.2, 0.1], "b": [1.0, -2.0]},
             {"a": [-0.3, 0.4], "b": [0.5, 0.5]}]

    def run(opt, make_var):
        variables = {k: make_var(v, k) for k, v in values.items()}
        opt.build(list(variables.values()))
        step = opt.apply_gradients
        if mode == "jit" and isinstance(opt, tf_adamax.Adamax):
            step = tf.function(step, jit_compile=True)
        for g in grads:
            step([(None if g[k] is None else tf.constant(g[k]), v)
                  for k, v in variables.items()])
        opt.finalize_variable_values(list(variables.values()))
        return {k: np.asarray(v.numpy()) for k, v in variables.items()}

    ours = run(tf_adamax.Adamax(0.1, use_ema=True, ema_momentum=0.9),
               lambda v, k: tf.Variable(v, name=k))
    theirs = run(keras.optimizers.Adamax(0.1, use_ema=True, ema_momentum=0.9),
                 lambda v, k: keras.Variable(v, name=k))
    for k in values:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-6, err_msg=k)
    # A variable the optimizer first meets at a later step (no build):
    # its average starts at its weights too.
    opt = tf_adamax.Adamax(0.1, use_ema=True, ema_momentum=0.9)
    a, late = tf.Variable([1.0]), tf.Variable([4.0])
    opt.apply_gradients([(tf.constant([1.0]), a)])
    opt.apply_gradients([(tf.constant([1.0]), late)])
    np.testing.assert_allclose(opt.get_slot(late, "average").numpy(),
                               0.9 * 4.0 + 0.1 * late.numpy(), rtol=1e-6)


@pytest.mark.parametrize("jit", (True, False), ids=("jit", "nojit"))
@pytest.mark.parametrize("how,overwrite", [
    ("function", None), ("function", 2), ("jit_function", None),
    ("concrete_first", None), ("concrete_late", None), ("nested", None)])
def test_ema_of_a_variable_created_in_a_later_tf_function(jit, how, overwrite):
    # A variable created inside a tf.function (a head built lazily) after
    # training started: TF gives it its value only after tracing, so its
    # average was created as zeros and moved from there (0.1x the weights,
    # which finalize_variable_values or an overwrite then put in the model).
    # It starts at the weights, as for a variable created eagerly, also when
    # the user's step is compiled with XLA, traced before its first call,
    # or calls apply_gradients through a tf.function of its own.
    lr, momentum = 0.1, 0.9
    opt = tf_adamax.Adamax(lr, use_ema=True, ema_momentum=momentum,
                           ema_overwrite_frequency=overwrite, jit_compile=jit)
    a = tf.Variable([1.0, 2.0], dtype=tf.float64)
    opt.apply_gradients([(tf.constant([0.5, -0.5], tf.float64), a)])
    holder = []
    apply = (tf.function(opt.apply_gradients) if how == "nested"
             else opt.apply_gradients)

    @tf.function(jit_compile=how == "jit_function")
    def step():
        if not holder:
            holder.append(tf.Variable(tf.constant([3.0, -4.0], tf.float64)))
        apply([(tf.constant([1.0, 2.0], tf.float64), holder[0])])

    if how.startswith("concrete"):
        step = step.get_concrete_function()
    ref = AdamaxReference(learning_rate=lr, use_ema=True,
                          ema_momentum=momentum,
                          ema_overwrite_frequency=overwrite)
    ref.add_variable("a", np.array([1.0, 2.0]))
    ref.apply({"a": np.array([0.5, -0.5])})
    if how == "concrete_late":  # traced at one call count, first run later
        opt.apply_gradients([(tf.constant([0.5, -0.5], tf.float64), a)])
        ref.apply({"a": np.array([0.5, -0.5])})
    for _ in range(3):
        step()
        if "b" not in ref.w:
            ref.add_variable("b", np.array([3.0, -4.0]))
        ref.apply({"b": np.array([1.0, 2.0])})
        np.testing.assert_allclose(
            opt.get_slot(holder[0], "average").numpy(), ref.average["b"],
            rtol=1e-12)
        np.testing.assert_allclose(holder[0].numpy(), ref.w["b"], rtol=1e-12)
    opt.finalize_variable_values([holder[0]])
    np.testing.assert_allclose(holder[0].numpy(), ref.average["b"],
                               rtol=1e-12)


def test_ema_of_a_new_variable_waits_for_a_step_that_passes_its_checks():
    # The copy into the average of a variable created in the function is
    # part of the step: a call refused by its run-time checks (an index out
    # of range) leaves the average as created, and the next valid call
    # copies the weights, once.
    opt = tf_adamax.Adamax(0.1, use_ema=True, ema_momentum=0.9,
                           jit_compile=False)
    a = tf.Variable([1.0, 2.0])
    opt.apply_gradients([(tf.constant([0.5, -0.5]), a)])
    holder = []

    @tf.function
    def step(index):
        if not holder:
            holder.append(tf.Variable(tf.constant([[3.0, -4.0], [1.0, 2.0]])))
        opt.apply_gradients([(tf.IndexedSlices(
            tf.constant([[1.0, 2.0]]), tf.reshape(index, [1]),
            tf.constant([2, 2])), holder[0])])

    with pytest.raises(tf.errors.InvalidArgumentError):
        step(tf.constant(5))
    table = holder[0]
    np.testing.assert_array_equal(opt.get_slot(table, "average").numpy(), 0)
    np.testing.assert_array_equal(table.numpy(), [[3.0, -4.0], [1.0, 2.0]])
    before = table.numpy().copy()
    step(tf.constant(0))
    np.testing.assert_allclose(
        opt.get_slot(table, "average").numpy(),
        0.9 * before + 0.1 * table.numpy(), rtol=1e-6)
    step(tf.constant(1))  # no second copy: the average keeps moving
    assert not np.allclose(opt.get_slot(table, "average").numpy(),
                           table.numpy())


def test_tf_keras_config_with_a_norm_clip_and_clipvalue_still_loads():
    # Refused in the constructor, but a saved model's config holding both
    # (tf-keras accepts the pair and applies only the norm clip) must load.
    import tf_adamax.tf_keras

    config = tf_adamax.tf_keras.Adamax(0.1, clipnorm=1.0).get_config()
    config["clipvalue"] = 0.5
    with pytest.warns(UserWarning, match="clipvalue dropped") as w:
        opt = tf_adamax.tf_keras.Adamax.from_config(config)
    assert {x.filename for x in w if "clipvalue" in str(x.message)} == {
        __file__}  # the user's line
    assert (opt.clipnorm, opt.clipvalue) == (1.0, None)


@pytest.mark.parametrize("front", ("core", "keras3", "tf_keras"))
@pytest.mark.parametrize("overwrite", (None, 2))
def test_lazy_rows_never_named_keep_their_weights_through_the_ema(
        front, overwrite):
    # A lazy step leaves unnamed rows bit for bit; so must the weight EMA
    # swapped in by finalize_variable_values or ema_overwrite_frequency.
    # tf-keras's `m * avg + (1 - m) * w` moved such rows by a rounding.
    import tf_adamax.keras
    import tf_adamax.tf_keras
    cls, make = {"core": (tf_adamax.Adamax, tf.Variable),
                 "keras3": (tf_adamax.keras.Adamax, keras.Variable),
                 "tf_keras": (tf_adamax.tf_keras.Adamax, tf.Variable)}[front]
    w0 = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    table = make(w0)
    opt = cls(0.1, sparse_mode="lazy", use_ema=True, ema_momentum=0.99,
              ema_overwrite_frequency=overwrite)
    grad = tf.IndexedSlices(tf.ones([2, 3]), tf.constant([1, 3]),
                            tf.constant([50, 3]))
    for _ in range(5):
        opt.apply_gradients([(grad, table)])
    opt.finalize_variable_values([table])
    after = np.asarray(table.numpy())
    untouched = [i for i in range(50) if i not in (1, 3)]
    np.testing.assert_array_equal(after[untouched], w0[untouched])
    assert not np.array_equal(after[[1, 3]], w0[[1, 3]])


def test_finalize_without_ema_is_a_no_op(rng):
    variables, _ = _vars(rng)
    opt = make_optimizer("eager", learning_rate=0.02)
    opt.apply_gradients(zip([tf.constant(g) for g in _grads(rng)], variables))
    before = [v.numpy().copy() for v in variables]
    opt.finalize_variable_values(variables)
    for v, b in zip(variables, before):
        np.testing.assert_array_equal(v.numpy(), b)


def test_boundary_hyperparameters_are_accepted():
    # lr = 0, beta = 0, epsilon = 0 are all inside the documented domains
    # (epsilon = 0 with a warning: an all-zero gradient entry gives 0 / 0).
    with pytest.warns(UserWarning, match="epsilon=0"):
        make_optimizer("eager", learning_rate=0.0, beta_1=0.0, beta_2=0.0,
                       epsilon=0.0)


def _traced_step(opt, var):
    step = tf.function(lambda: opt.apply_gradients([(tf.ones_like(var), var)]))
    step()
    return step


def test_setting_a_float_rate_after_tracing_is_seen_by_the_function():
    var = tf.Variable([1.0, -1.0])
    opt = make_optimizer("eager", learning_rate=0.1)
    step = _traced_step(opt, var)
    opt.learning_rate = 0.0
    before = var.numpy().copy()
    step()
    np.testing.assert_array_equal(var.numpy(), before)  # lr 0: no move
    opt.learning_rate = tf.constant(0.05)
    step()
    assert not np.array_equal(var.numpy(), before)


@pytest.mark.parametrize("start,new", [
    ("schedule", "float"), ("float", "callable"), ("float", "schedule"),
    ("callable", "float"), ("variable", "float"), ("float", "variable"),
])
def test_replacing_the_rate_after_tracing_raises_and_changes_nothing(start, new):
    # The traced function keeps reading the old rate object, so a new one
    # would be silently ignored: refuse it (eagerly it is fine).
    def rate(kind):
        return {"float": 0.1, "callable": lambda: 0.1,
                "variable": tf.Variable(0.1, dtype=tf.float64),
                "schedule": keras.optimizers.schedules.ExponentialDecay(
                    0.1, 1, 0.5)}[kind]

    var = tf.Variable([1.0, -1.0])
    opt = make_optimizer("eager", learning_rate=rate(start))
    step = _traced_step(opt, var)
    lr_before = float(opt.learning_rate)
    with pytest.raises(TypeError, match="learning_rate"):
        opt.learning_rate = rate(new)
    assert float(opt.learning_rate) == lr_before
    step()  # still the old rate, as reported
    eager = make_optimizer("eager", learning_rate=rate(start))
    eager.apply_gradients([(tf.ones_like(var), var)])
    eager.learning_rate = rate(new)  # no tf.function traced a step
    expected = 0.05 if new == "schedule" else 0.1  # the schedule at step 1
    assert float(eager.learning_rate) == pytest.approx(expected)


def test_setting_the_same_rate_object_after_tracing_is_allowed():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 1, 0.5)
    var = tf.Variable([1.0, -1.0])
    opt = make_optimizer("eager", learning_rate=schedule)
    _traced_step(opt, var)
    opt.learning_rate = schedule  # nothing changes: no error


@pytest.mark.parametrize("jit", (False, True))
@pytest.mark.parametrize("traced", (False, True))
def test_keras_variable_rate_is_read_at_each_step(jit, traced):
    # A Keras 3 variable as the rate is its tf.Variable, read at each step,
    # as a tf.Variable rate is (it was copied once, so assigning 0 later
    # changed nothing).
    rate = keras.Variable(0.1, dtype="float64")
    var = tf.Variable([0.0, 0.0])
    opt = make_optimizer("jit" if jit else "eager", learning_rate=rate)
    step = lambda: opt.apply_gradients([(tf.constant([1.0, -1.0]), var)])
    step = tf.function(step) if traced else step
    step()
    np.testing.assert_allclose(var.numpy(), [-0.1, 0.1], rtol=1e-6)
    rate.assign(0.0)
    step()
    np.testing.assert_allclose(var.numpy(), [-0.1, 0.1], rtol=1e-6)
    assert opt.learning_rate == 0.0


def test_user_rate_variable_error_says_to_assign_it():
    rate = tf.Variable(0.1, dtype=tf.float64)
    var = tf.Variable([1.0, -1.0])
    opt = make_optimizer("eager", learning_rate=rate)
    step = _traced_step(opt, var)
    with pytest.raises(TypeError, match=r"assign"):
        opt.learning_rate = 0.0
    rate.assign(0.0)  # the advised fix, seen by the traced step
    before = var.numpy().copy()
    step()
    np.testing.assert_array_equal(var.numpy(), before)


def test_many_optimizers_do_not_warn_of_retracing():
    # Each optimizer traces its update once; TF counts traces per Python
    # function, so a shared one warned after five optimizers.
    import tf_adamax
    from keras_cases import check_no_retracing_warning

    check_no_retracing_warning(tf_adamax.Adamax)  # jit_compile=True default


DESIGN_DEFAULTS = dict(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                       weight_decay=None, clipnorm=None, clipvalue=None,
                       global_clipnorm=None, use_ema=False, ema_momentum=0.99,
                       ema_overwrite_frequency=None, sparse_mode="exact")


@pytest.mark.parametrize("front", ("core", "keras3", "tf_keras"))
def test_defaults_are_designs(front):
    import tf_adamax.keras
    import tf_adamax.tf_keras

    cls = {"core": tf_adamax.Adamax, "keras3": tf_adamax.keras.Adamax,
           "tf_keras": tf_adamax.tf_keras.Adamax}[front]
    config = cls().get_config()
    for key, value in DESIGN_DEFAULTS.items():
        assert config[key] == pytest.approx(value) if isinstance(value, float) \
            else config[key] == value, (key, config[key])
    if front != "keras3":  # Keras 3 has no jit_compile argument on optimizers
        assert config["jit_compile"] is True
    if front == "core":
        assert config["loss_scale_factor"] is None
        assert config["gradient_accumulation_steps"] is None
        assert config["name"] == "adamax"


def test_default_optimizer_takes_the_exact_step():
    """`Adamax()` with no argument: exact sparse mode and the default rate,
    on a step where a row named before is not named now (lazy would leave
    it alone)."""
    import tf_adamax
    from conftest import SparseGrad

    ref_init = np.array([[1.0, -1.0], [0.5, 2.0], [0.0, 3.0]])
    steps = (([0, 1, 0], [[1.0, 2.0], [0.5, -1.0], [-0.5, 1.0]]),
             ([2], [[0.25, -0.5]]))
    table = tf.Variable(ref_init)
    opt = tf_adamax.Adamax()
    ref = AdamaxReference()
    ref.add_variable(0, ref_init, np.float64)
    for indices, values in steps:
        opt.apply_gradients([(tf.IndexedSlices(
            tf.constant(values, tf.float64), tf.constant(indices)), table)])
        ref.apply({0: SparseGrad(np.array(indices), np.array(values))})
    np.testing.assert_allclose(table.numpy(), ref.w[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(opt.get_slot(table, "momentum").numpy(), ref.m[0],
                               rtol=1e-12, atol=1e-12)
    lazy = AdamaxReference(sparse_mode="lazy")
    lazy.add_variable(0, ref_init, np.float64)
    for indices, values in steps:
        lazy.apply({0: SparseGrad(np.array(indices), np.array(values))})
    assert np.all(np.abs(lazy.w[0][:2] - ref.w[0][:2]) > 1e-6), \
        "the steps cannot tell exact from lazy"


@pytest.mark.parametrize("mode", ("eager", "function", "jit", "xla"))
def test_exclude_from_weight_decay_by_variable_and_pattern(mode):
    """Core: `var_list` excludes by object, `var_names` by `re.search` on the
    tf.Variable name (as Keras); the others decay, also in lazy mode."""
    from conftest import SparseGrad

    rng = np.random.default_rng(5)
    init = {k: rng.standard_normal(s).astype(np.float32)
            for k, s in (("kernel", (3, 2)), ("bias", (2,)), ("table", (4, 2)),
                         ("other", (4, 2)))}
    names = {"kernel": "dense/kernel", "bias": "dense/bias", "table": "table",
             "other": "other"}
    variables = {k: tf.Variable(v, name=names[k]) for k, v in init.items()}
    opt = make_optimizer(mode, learning_rate=0.05, weight_decay=0.5,
                         sparse_mode="lazy")
    # "^dense/b" is a regex: as a plain substring it would match nothing.
    opt.exclude_from_weight_decay(var_list=[variables["table"]],
                                  var_names=["^dense/b"])
    order = ["kernel", "bias", "table", "other"]
    step = make_step(opt, mode, [variables[k] for k in order])
    refs = {True: AdamaxReference(learning_rate=0.05, weight_decay=0.5,
                                  sparse_mode="lazy"),
            False: AdamaxReference(learning_rate=0.05, sparse_mode="lazy")}
    decays = {"kernel": True, "bias": False, "table": False, "other": True}
    for k in order:
        refs[decays[k]].add_variable(k, init[k], np.float32)
    for _ in range(3):
        grads = {k: rng.standard_normal(init[k].shape).astype(np.float32)
                 for k in ("kernel", "bias")}
        rows = np.array([1, 2, 1])
        values = {k: rng.standard_normal((3, 2)).astype(np.float32)
                  for k in ("table", "other")}
        step([tf.constant(grads["kernel"]), tf.constant(grads["bias"])]
             + [tf.IndexedSlices(tf.constant(values[k]), tf.constant(rows),
                                 tf.constant([4, 2])) for k in ("table", "other")])
        for decayed in (True, False):
            refs[decayed].apply(
                {k: (grads[k] if k in grads else
                     SparseGrad(rows, values[k].astype(np.float64)))
                 for k in order if decays[k] == decayed})
    for k in order:
        np.testing.assert_allclose(variables[k].numpy(), refs[decays[k]].w[k],
                                   rtol=1e-6, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("bad", ("inf", "overflow"))
@pytest.mark.parametrize("mode", ("eager", "jit"))
def test_global_clipnorm_with_non_finite_norm_poisons_every_variable(mode, bad):
    """As Keras (`tf.clip_by_global_norm`): an inf gradient, or finite ones
    whose squared sum overflows, gives a NaN norm and NaN everywhere, not a
    silently clipped or skipped update of the other variables."""
    big = np.float32(np.inf) if bad == "inf" else np.float32(3e19)
    grads = [np.array([1.0, big], np.float32), np.array([0.5, -0.5], np.float32)]
    results = []
    for make in (lambda: make_optimizer(mode, learning_rate=0.1, global_clipnorm=1.0),
                 lambda: keras.optimizers.Adamax(learning_rate=0.1,
                                                 global_clipnorm=1.0)):
        variables = [tf.Variable([1.0, 2.0]), tf.Variable([3.0, 4.0])]
        make().apply_gradients(zip([tf.constant(g) for g in grads], variables))
        results.append([np.isnan(v.numpy()) for v in variables])
    assert all(r.all() for r in results[1]), results[1]  # Keras: NaN everywhere
    for ours, theirs in zip(*results):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("jit", [True, False])
def test_adamax_options_can_be_set_until_a_traced_step(jit):
    # As Keras: beta_1, beta_2 and epsilon are attributes, and a new value is
    # used from the next eager step on (the compiled update retraces). After a
    # tf.function applied a step, a change that function would ignore raises.
    from reference import dense_step

    rng = np.random.default_rng(4)
    w0 = rng.normal(size=(3,))
    grads = rng.normal(size=(3, 3))
    var = tf.Variable(w0, dtype=tf.float64)
    opt = make_optimizer("jit" if jit else "eager", learning_rate=0.1)
    assert (opt.beta_1, opt.beta_2, opt.epsilon) == (0.9, 0.999, 1e-7)
    w, m, u = w0, np.zeros(3), np.zeros(3)
    settings = [(0.9, 0.999, 1e-7), (0.5, 0.999, 0.5), (0.5, 0.6, 0.5)]
    for t, (g, (b1, b2, eps)) in enumerate(zip(grads, settings)):
        opt.beta_1, opt.beta_2, opt.epsilon = b1, b2, eps
        opt.apply_gradients([(tf.constant(g), var)])
        w, m, u = dense_step(w, m, u, g, 0.1, b1, b2, eps, t + 1)
    np.testing.assert_allclose(var.numpy(), w, rtol=1e-12)
    np.testing.assert_allclose(opt.get_slot(var, "momentum").numpy(), m,
                               rtol=1e-12)
    np.testing.assert_allclose(opt.get_slot(var, "norm").numpy(), u, rtol=1e-12)
    assert opt.get_config()["beta_2"] == 0.6

    with pytest.raises(ValueError, match="beta_2"):
        opt.beta_2 = 1.0
    assert opt.beta_2 == 0.6

    tf.function(lambda: opt.apply_gradients([(tf.constant(grads[0]), var)]))()
    # The value the function was traced with, as an equal float (not the
    # same object, which tf.Module's setattr would skip).
    opt.epsilon = float("0.5")
    with pytest.raises(TypeError, match="Cannot set beta_1 .* tf.function"):
        opt.beta_1 = 0.3
    assert opt.beta_1 == 0.5


@pytest.mark.parametrize("jit", [True, False])
def test_variable_betas_are_read_at_each_traced_step(jit):
    # tf.Variable and Keras 3 variable betas: read by the traced step when
    # they change (a Keras variable failed to trace as part of the config).
    from reference import dense_step

    g = np.array([1.0, -2.0, 0.5])
    results = []
    for make, set_later in ((tf.Variable, False), (keras.Variable, False),
                            (keras.Variable, True)):
        beta_1 = make(0.9, dtype="float64")
        var = tf.Variable(np.ones(3))
        if set_later:  # through the attribute, before any step
            opt = make_optimizer("jit" if jit else "eager", learning_rate=0.1)
            opt.beta_1 = beta_1
        else:
            opt = make_optimizer("jit" if jit else "eager", learning_rate=0.1,
                                 beta_1=beta_1)
        assert isinstance(opt.beta_1, tf.Variable)
        step = tf.function(lambda: opt.apply_gradients([(tf.constant(g), var)]))
        w, m, u = np.ones(3), np.zeros(3), np.zeros(3)
        for t, b in enumerate((0.9, 0.5, 0.7)):
            beta_1.assign(b)
            step()
            w, m, u = dense_step(w, m, u, g, 0.1, b, 0.999, 1e-7, t + 1)
        np.testing.assert_allclose(var.numpy(), w, rtol=1e-12)
        results.append(var.numpy())
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


def test_iterations_with_accumulation_count_updates_as_keras3():
    # DESIGN: t = iterations + 1, and Keras 3's meaning of
    # gradient_accumulation_steps: `iterations` reports updates (calls // N),
    # an int64 variable; apply_gradients returns it.
    var = tf.Variable([1.0, -2.0])
    theirs_var = tf.Variable([1.0, -2.0])
    ours = make_optimizer("jit", learning_rate=0.1, gradient_accumulation_steps=3)
    theirs = keras.optimizers.Adamax(learning_rate=0.1,
                                     gradient_accumulation_steps=3)
    for call in range(7):
        g = tf.constant([1.0 + call, -0.5 * call])
        returned = ours.apply_gradients([(g, var)])
        theirs.apply_gradients([(g, theirs_var)])
        assert returned is ours.iterations
        assert isinstance(ours.iterations, tf.Variable)
        assert ours.iterations.dtype == tf.int64
        assert int(ours.iterations.numpy()) == int(theirs.iterations) == (call + 1) // 3
        np.testing.assert_allclose(var.numpy(), theirs_var.numpy(), rtol=1e-6)


class _LazyHead(tf.Module):
    """A module whose variable its own train step creates."""

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        self.b = None

    @tf.function
    def step(self, g):
        if self.b is None:
            self.b = tf.Variable([3.0, -4.0], name="b")
        return self.opt.apply_gradients([(g, self.b)])


def test_ema_restored_after_the_step_was_traced_is_kept(tmp_path):
    # The step traced first (a warm-up or export), then a checkpoint
    # restored, then the first run: the restored average must be kept (a
    # flag-driven copy overwrote it with the weights).
    g = tf.constant([1.0, 2.0])
    head = _LazyHead(tf_adamax.Adamax(0.1, use_ema=True, ema_momentum=0.9))
    for _ in range(3):
        head.step(g)
    path = tf.train.Checkpoint(head=head).write(str(tmp_path / "c"))
    head.step(g)
    expected = head.opt.get_slot(head.b, "average").numpy()
    again = _LazyHead(tf_adamax.Adamax(0.1, use_ema=True, ema_momentum=0.9))
    traced = again.step.get_concrete_function(tf.TensorSpec([2], tf.float32))
    tf.train.Checkpoint(head=again).restore(path)
    traced(g)
    np.testing.assert_allclose(again.opt.get_slot(again.b, "average").numpy(),
                               expected, rtol=1e-6)


def test_saved_model_of_a_step_that_created_its_variable_with_ema(tmp_path):
    # Its trace must capture only tracked state (an untracked flag made
    # tf.saved_model.save refuse the signature).
    head = _LazyHead(tf_adamax.Adamax(0.1, use_ema=True, ema_momentum=0.9))
    head.step(tf.constant([1.0, 2.0]))
    head.step(tf.constant([1.0, 2.0]))
    tf.saved_model.save(head, str(tmp_path / "sm"), signatures=(
        head.step.get_concrete_function(tf.TensorSpec([2], tf.float32))))
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    loaded.step(tf.constant([1.0, 2.0]))
    head.step(tf.constant([1.0, 2.0]))
    np.testing.assert_allclose(loaded.b.numpy(), head.b.numpy(), rtol=1e-6)


@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
@pytest.mark.parametrize("jit", [True, False])
def test_setting_keras_options_between_eager_steps(jit, sparse_mode):
    # Keras 3 users set `optimizer.weight_decay = ...` or a clip on the
    # optimizer: the core used to accept such a set as a plain attribute,
    # read it back, and step without it. Now each is the step's option,
    # validated like the constructor's, used from the next eager step on.
    from reference import SparseGrad

    rng = np.random.default_rng(9)
    table0, vec0 = rng.normal(size=(6, 2)), rng.normal(size=(3,))
    table, vec = tf.Variable(table0), tf.Variable(vec0)
    opt = make_optimizer("jit" if jit else "eager", learning_rate=0.1,
                         sparse_mode=sparse_mode)
    ref = AdamaxReference(learning_rate=0.1, sparse_mode=sparse_mode)
    ref.add_variable("t", table0)
    ref.add_variable("v", vec0)
    settings = [{}, {"weight_decay": 0.1, "clipnorm": 0.5},
                {"clipnorm": None, "global_clipnorm": 0.3,
                 "loss_scale_factor": 4.0},
                {"global_clipnorm": 0, "clipvalue": 0.2, "weight_decay": None}]
    for change in settings:
        for name, value in change.items():
            setattr(opt, name, value)
            setattr(ref, name, value or None)  # a zero clip is no clip
        idx = np.array([1, 4, 1, 1])  # row 1 three times, opposite signs
        vals = rng.normal(size=(4, 2))
        vals[2] = -vals[0] - 0.25
        g_vec = rng.normal(size=(3,))
        opt.apply_gradients([
            (tf.IndexedSlices(tf.constant(vals), tf.constant(idx),
                              tf.constant([6, 2])), table),
            (tf.constant(g_vec), vec)])
        ref.apply({"t": SparseGrad(idx, vals), "v": g_vec})
    np.testing.assert_allclose(table.numpy(), ref.w["t"], rtol=1e-12)
    np.testing.assert_allclose(vec.numpy(), ref.w["v"], rtol=1e-12)
    np.testing.assert_allclose(opt.get_slot(table, "norm").numpy(),
                               ref.u["t"], rtol=1e-12)
    config = opt.get_config()
    assert (config["clipvalue"], config["global_clipnorm"],
            config["weight_decay"], config["loss_scale_factor"]) == (
                0.2, None, None, 4.0)
    assert (opt.clipvalue, opt.global_clipnorm) == (0.2, None)


def test_option_setters_refuse_what_the_constructor_refuses():
    var = tf.Variable([1.0, 2.0])
    opt = tf_adamax.Adamax(0.1, clipnorm=1.0, jit_compile=False)
    opt.apply_gradients([(tf.constant([0.5, -0.5]), var)])
    before = [v.numpy().copy() for v in opt.variables]
    for name, value, match in [
            ("weight_decay", -1.0, "weight_decay"),
            ("clipnorm", -2.0, "clipnorm"),
            ("global_clipnorm", 1.0, "global_clipnorm"),  # with clipnorm
            ("clipvalue", float("nan"), "clipvalue"),
            ("loss_scale_factor", 0.0, "loss_scale_factor"),
            ("ema_momentum", 1.5, "ema_momentum"),
            ("ema_overwrite_frequency", 0.5, "ema_overwrite_frequency")]:
        old = getattr(opt, name)
        with pytest.raises(ValueError, match=match):
            setattr(opt, name, value)
        assert getattr(opt, name) == old or (old is None and
                                             getattr(opt, name) is None)
    for name, value in [("use_ema", True), ("gradient_accumulation_steps", 2),
                        ("sparse_mode", "lazy"), ("jit_compile", True)]:
        with pytest.raises(AttributeError, match=f"{name} is fixed.*from_config"):
            setattr(opt, name, value)
    assert (opt.use_ema, opt.gradient_accumulation_steps, opt.sparse_mode,
            opt.jit_compile) == (False, None, "exact", False)
    for v, b in zip(opt.variables, before):
        np.testing.assert_array_equal(v.numpy(), b)

    # After a tf.function applied a step, a change it would ignore raises.
    tf.function(lambda: opt.apply_gradients(
        [(tf.constant([0.5, -0.5]), var)]))()
    opt.clipnorm = 1.0  # the value it was traced with
    with pytest.raises(TypeError, match="Cannot set weight_decay"):
        opt.weight_decay = 0.1
    assert opt.weight_decay is None and opt.get_config()["weight_decay"] is None


def test_option_setters_normalise_and_warn_as_the_constructor():
    opt = tf_adamax.Adamax(0.1, use_ema=True, ema_overwrite_frequency=3)
    opt.ema_overwrite_frequency = 0  # "off", as the constructor reads it
    assert opt.ema_overwrite_frequency is None
    assert opt.get_config()["ema_overwrite_frequency"] is None
    with pytest.warns(UserWarning, match="epsilon=0"):
        opt.epsilon = 0.0


def test_refused_and_accepted_variable_options_add_no_checkpoint_child():
    # tf.Module tracked a tf.Variable set as an option as a checkpoint child
    # before the setter ran, also one the setter refused.
    var = tf.Variable([1.0, 2.0])
    opt = tf_adamax.Adamax(0.1)
    opt.apply_gradients([(tf.constant([0.5, -0.5]), var)])
    children = sorted(opt._trackable_children())  # pylint: disable=protected-access
    tf.function(lambda: opt.apply_gradients(
        [(tf.constant([0.5, -0.5]), var)]))()
    with pytest.raises(TypeError, match="Cannot set clipnorm"):
        opt.clipnorm = tf.Variable(1.0)
    opt2 = tf_adamax.Adamax(0.1)
    opt2.weight_decay = tf.Variable(0.01)  # read at each step, not saved
    assert sorted(opt._trackable_children()) == children  # pylint: disable=protected-access
    assert "weight_decay" not in opt2._trackable_children()  # pylint: disable=protected-access
    assert opt.clipnorm is None


@pytest.mark.parametrize("name,values", [
    ("weight_decay", (0.1, 0.2, 0.3)), ("clipnorm", (0.5, 0.25, 1.0)),
    ("clipvalue", (0.3, 0.2, 0.1)), ("global_clipnorm", (0.4, 0.3, 2.0)),
    ("loss_scale_factor", (2.0, 4.0, 8.0)),
    ("ema_momentum", (0.5, 0.9, 0.7))])
def test_setting_options_eagerly_does_not_recompile(name, values):
    # Like the betas, a new value of a scalar option between eager steps is
    # a run-time argument of the compiled update, not a new program.
    from conftest import compiled_update_functions

    var = tf.Variable(np.array([1.0, -2.0, 0.5]))
    ema = dict(use_ema=True) if name == "ema_momentum" else {}
    opt = tf_adamax.Adamax(0.1, **{name: values[0]}, **ema)
    ref = AdamaxReference(learning_rate=0.1, **{name: values[0]}, **ema)
    ref.add_variable("v", var.numpy())
    for t, value in enumerate(values, start=1):
        setattr(opt, name, value)
        setattr(ref, name, value)
        g = np.array([0.5, -1.0, 2.0]) * t
        opt.apply_gradients([(tf.constant(g), var)])
        ref.apply({"v": g})
        np.testing.assert_allclose(var.numpy(), ref.w["v"], rtol=1e-12)
        if ema:
            np.testing.assert_allclose(opt.get_slot(var, "average").numpy(),
                                       ref.average["v"], rtol=1e-12)
    traces = [f.experimental_get_tracing_count()
              for f in compiled_update_functions(opt)]
    assert sum(traces) == 1, traces
