"""`tf_adamax.tf_keras.Adamax`: the tf-keras (Keras 2) adapter.

Oracles: `tf_keras.optimizers.Adamax` for dense gradients and tf-keras's
base-class features, the NumPy float64 `reference.AdamaxReference` for sparse
gradients that repeat an index.

Unlike Keras 3's, tf-keras's built-in Adamax gets repeated sparse indices
right without clipping: its base class deduplicates IndexedSlices (sums the
repeated rows) before `update_step`. It clips before deduplicating, though,
so with `clipnorm` a repeated token is clipped per copy; the adapter sums
first (`test_sparse_clipping_*`).
"""

import ast
import copy
import inspect
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_adamax.tf_keras
from reference import AdamaxReference, SparseGrad
from keras_cases import (
    BAD_PAIR_CASES, BAD_PAIR_OPTIONS, BATCH, DIM, EMB_LR, REPO_ROOT, TOKENS, VOCAB,
    assert_matches_reference, check_adamax_options_set_after_a_step_match_builtin,
    check_bad_pairs_change_nothing, check_float64_variables_are_exact,
    check_nan_gradient_makes_the_norm_nan,
    check_dropped_rows_do_not_count_in_clip_norms,
    check_many_variables_split_match_builtin, check_no_retracing_warning,
    check_lazy_weight_decay_is_read_at_each_step,
    check_lazy_weight_decay_respects_exclusion,
    check_zero_clip_is_off, child_env, dense_data,
    embedding_batches, embedding_init, embedding_reference, token_regression_data)

Adamax = tf_adamax.tf_keras.Adamax

RUN_MODES = {
    "eager": dict(run_eagerly=True),
    "graph": dict(run_eagerly=False, jit_compile=False),
    "jit": dict(run_eagerly=False, jit_compile=True),
}


# ----------------------------------------------------------------------------
# Dense model: identical to tf_keras.optimizers.Adamax.
# ----------------------------------------------------------------------------


def dense_model():
    tf_keras.utils.set_random_seed(0)
    return tf_keras.Sequential([
        tf_keras.layers.Dense(8, activation="tanh", input_shape=(5,),
                              name="hidden"),
        tf_keras.layers.Dense(1, name="out"),
    ])


def fit_dense(optimizer, mode="graph", epochs=1, n=80, batch_size=4):
    model = dense_model()
    model.compile(optimizer=optimizer, loss="mse", **RUN_MODES[mode])
    x, y = dense_data(n)
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs,
                        shuffle=False, verbose=0)
    return model, history


def assert_same_weights(a, b, atol=1e-6):
    assert len(a.weights) == len(b.weights)
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_allclose(wa.numpy(), wb.numpy(), rtol=0, atol=atol,
                                   err_msg=wa.name)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_dense_fit_matches_tf_keras_adamax(mode):
    # 80 samples / batch 4 = 20 steps.
    ours, _ = fit_dense(Adamax(learning_rate=0.01), mode)
    theirs, _ = fit_dense(tf_keras.optimizers.Adamax(learning_rate=0.01), mode)
    assert int(ours.optimizer.iterations.numpy()) == 20
    # Without a strategy the updates of all variables are one XLA program,
    # traced once.
    fns = ours.optimizer._update_all_fn.fn.fns
    assert [f.experimental_get_tracing_count() for f in fns] == [1]
    assert_same_weights(ours, theirs)
    for va, vb in zip(ours.optimizer.variables, theirs.optimizer.variables):
        assert va.name == vb.name  # same slot names: drop-in checkpoints
        np.testing.assert_allclose(va.numpy(), vb.numpy(), atol=1e-6)
    for w, w0 in zip(ours.weights, dense_model().weights):
        assert not np.allclose(w.numpy(), w0.numpy())


FEATURES = {
    "schedule": dict(
        learning_rate=tf_keras.optimizers.schedules.ExponentialDecay(
            0.05, decay_steps=4, decay_rate=0.5)),
    "weight_decay_exclude": dict(weight_decay=0.5, learning_rate=0.05),
    "clipnorm": dict(clipnorm=0.5),
    "clipvalue": dict(clipvalue=0.3),
    "global_clipnorm": dict(global_clipnorm=0.5),
    "ema": dict(use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3),
}


def apply_fixed_gradients(opt, steps=10, exclude_bias=False):
    """10 apply_gradients calls with the same pseudo-random dense gradients."""
    rng = np.random.default_rng(4)
    kernel = tf.Variable(rng.normal(size=(3, 2)).astype("float32"),
                         name="kernel")
    bias = tf.Variable(np.zeros(2, "float32"), name="bias")
    if exclude_bias:
        opt.exclude_from_weight_decay(var_names=["bias"])
    for _ in range(steps):
        grads = [tf.constant(rng.normal(size=v.shape), "float32")
                 for v in (kernel, bias)]
        opt.apply_gradients(zip(grads, [kernel, bias]))
    opt.finalize_variable_values([kernel, bias])
    return [kernel.numpy(), bias.numpy()] + [v.numpy() for v in opt.variables]


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_tf_keras_features_match_tf_keras_adamax(feature):
    exclude = feature == "weight_decay_exclude"
    ours = apply_fixed_gradients(Adamax(**FEATURES[feature]),
                                 exclude_bias=exclude)
    theirs = apply_fixed_gradients(
        tf_keras.optimizers.Adamax(**FEATURES[feature]), exclude_bias=exclude)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    if exclude:
        decayed = apply_fixed_gradients(Adamax(**FEATURES[feature]))
        assert not np.allclose(decayed[1], ours[1])


def test_lr_callback_reads_and_sets_learning_rate():
    def fit(cls):
        model = dense_model()
        model.compile(optimizer=cls(learning_rate=0.05), loss="mse")
        x, y = dense_data(16)
        model.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0,
                  callbacks=[tf_keras.callbacks.LearningRateScheduler(
                      lambda epoch, lr: lr * 0.5)])
        return model

    ours, theirs = fit(Adamax), fit(tf_keras.optimizers.Adamax)
    np.testing.assert_allclose(float(ours.optimizer.learning_rate), 0.05 / 8,
                               rtol=1e-6)
    assert_same_weights(ours, theirs)


# ----------------------------------------------------------------------------
# Embedding with repeated tokens of opposite gradient sign.
# ----------------------------------------------------------------------------


def linear_token_loss(y_true, y_pred):
    # d loss / d embedding[id] = sum of the coefficients of id's occurrences.
    return tf.reduce_sum(y_true * y_pred, axis=[1, 2])


def fit_embedding(optimizer, mode):
    inputs = tf_keras.Input((TOKENS,), dtype="int32")
    outputs = tf_keras.layers.Embedding(VOCAB, DIM, name="emb")(inputs)
    model = tf_keras.Model(inputs, outputs)
    model.set_weights([embedding_init()])
    model.compile(optimizer=optimizer, loss=linear_token_loss,
                  **RUN_MODES[mode])
    ids, coef = embedding_batches()
    model.fit(ids, coef, batch_size=BATCH, shuffle=False, verbose=0)
    return model


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
def test_embedding_duplicates_match_reference(sparse_mode, mode):
    opt = Adamax(learning_rate=EMB_LR, sparse_mode=sparse_mode)
    model = fit_embedding(opt, mode)
    ref = embedding_reference(sparse_mode)
    emb = model.get_layer("emb").embeddings
    np.testing.assert_allclose(emb.numpy(), ref.w["emb"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(opt._m[0].numpy(), ref.m["emb"], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(opt._u[0].numpy(), ref.u["emb"], rtol=1e-5,
                               atol=1e-6)
    other = embedding_reference("lazy" if sparse_mode == "exact" else "exact")
    assert np.abs(other.w["emb"] - ref.w["emb"]).max() > 1e-3
    np.testing.assert_array_equal(emb.numpy()[6:], embedding_init()[6:])


def test_tf_keras_builtin_adamax_is_right_on_repeated_tokens():
    """What is true: tf-keras dedups IndexedSlices before update_step.

    So its built-in Adamax equals the densified reference here (unlike
    Keras 3's). Its sparse update is always exact-mode (no lazy option).
    """
    builtin = fit_embedding(
        tf_keras.optimizers.Adamax(learning_rate=EMB_LR), "eager")
    ref = embedding_reference("exact").w["emb"]
    np.testing.assert_allclose(builtin.get_layer("emb").embeddings.numpy(),
                               ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Sparse gradients through tf-keras's machinery (clipping, decay, ...).
# ----------------------------------------------------------------------------
def sparse_run(optimizer_class, sparse_mode, jit, steps=3, **kwargs):
    """`steps` IndexedSlices updates of a 6x2 table, and the reference's.

    Row 1 is named three times per step, twice with opposite signs; rows 3
    and 4 only in every other step (lazy mode must leave them alone in the
    others); rows 0, 2 and 5 are never named.
    """
    rng = np.random.default_rng(11)
    init = rng.normal(size=(6, 2)).astype("float32")
    var = tf.Variable(init, name="table")
    kwargs = {"learning_rate": 0.1, **kwargs}
    extra = {"sparse_mode": sparse_mode} if optimizer_class is Adamax else {}
    opt = optimizer_class(**kwargs, **extra)
    ref_kwargs = dict(kwargs)
    if isinstance(kwargs["learning_rate"],
                  tf_keras.optimizers.schedules.LearningRateSchedule):
        schedule = kwargs["learning_rate"]
        ref_kwargs["learning_rate"] = lambda step: float(schedule(step))
    ref = AdamaxReference(sparse_mode=sparse_mode, **ref_kwargs)
    ref.add_variable("table", init, np.float32)
    opt.build([var])

    def step(values, indices):
        opt.apply_gradients([(tf.IndexedSlices(values, indices,
                                               tf.constant([6, 2])), var)])

    if jit:
        step = tf.function(step, jit_compile=True)
    for k in range(steps):
        indices = np.array([1, 4, 1, 1, 3] if k % 2 == 0 else [1, 1, 1, 1, 1],
                           "int32")
        values = rng.normal(size=(5, 2)).astype("float32")
        values[2] = -0.7 * values[0]  # opposite-sign duplicates of row 1
        step(tf.constant(values), tf.constant(indices))
        ref.apply({"table": SparseGrad(indices, values)})
    return var, opt, ref


SPARSE_OPTIONS = {
    "clipnorm": dict(clipnorm=0.5),
    "clipvalue": dict(clipvalue=0.3),
    "global_clipnorm": dict(global_clipnorm=0.5),
    "weight_decay": dict(weight_decay=0.2),
    "schedule": dict(
        learning_rate=tf_keras.optimizers.schedules.ExponentialDecay(
            0.1, decay_steps=1, decay_rate=0.5)),
}


@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
@pytest.mark.parametrize("option", sorted(SPARSE_OPTIONS))
def test_sparse_with_tf_keras_options_matches_reference(option, sparse_mode):
    """Includes clipping: each repeated index is clipped once (summed)."""
    assert_matches_reference(
        *sparse_run(Adamax, sparse_mode, False, **SPARSE_OPTIONS[option]))


@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
def test_sparse_clipping_under_xla_matches_reference(sparse_mode):
    # tf.function(jit_compile=True) around apply_gradients: the summing of
    # repeated indices before clipping, and the kernels, compile.
    assert_matches_reference(
        *sparse_run(Adamax, sparse_mode, True, clipnorm=0.5))


def test_tf_keras_builtin_clips_repeated_rows_per_copy():
    """Documents why the adapter sums before clipping: the built-in doesn't."""
    var, _, ref = sparse_run(tf_keras.optimizers.Adamax, "exact", False,
                             clipnorm=0.5)
    assert np.abs(var.numpy() - ref.w["table"]).max() > 1e-3


@BAD_PAIR_CASES
@BAD_PAIR_OPTIONS
def test_bad_gradients_raise_naming_variable_and_change_nothing(sparse_mode,
                                                                graph,
                                                                options):
    # As tf_keras.optimizers.Adamax raises for out-of-range rows; the
    # adapter's compiled update would otherwise drop them silently.
    check_bad_pairs_change_nothing(Adamax, tf.Variable, sparse_mode, graph,
                                   options)


# ----------------------------------------------------------------------------
# Saving: .keras and SavedModel round trips keep the optimizer state.
# ----------------------------------------------------------------------------


def token_model():
    tf_keras.utils.set_random_seed(2)
    inputs = tf_keras.Input((4,), dtype="int32")
    hidden = tf_keras.layers.GlobalAveragePooling1D()(
        tf_keras.layers.Embedding(20, 4)(inputs))
    return tf_keras.Model(inputs, tf_keras.layers.Dense(1)(hidden))


@pytest.mark.parametrize("save_format", ["keras", "tf"])
def test_save_and_load_restores_optimizer_state(tmp_path, save_format):
    ids, y = token_regression_data()
    first, second = slice(0, 24), slice(24, 48)
    fit = dict(batch_size=4, shuffle=False, verbose=0)

    model = token_model()
    model.compile(optimizer=Adamax(0.02, sparse_mode="lazy"), loss="mse")
    model.fit(ids[first], y[first], **fit)
    if save_format == "keras":
        path = str(tmp_path / "model.keras")
        model.save(path)
    else:
        path = str(tmp_path / "saved_model")
        model.save(path, save_format="tf")
    saved_state = [v.numpy().copy() for v in model.optimizer.variables]
    model.fit(ids[second], y[second], **fit)  # uninterrupted

    # No custom_objects: importing tf_adamax.tf_keras registered the class.
    if save_format == "tf":
        # tf-keras's SavedModel loader re-creates the optimizer from its
        # config but never restores its state (for any optimizer, the
        # built-in Adamax included): tf_adamax.tf_keras.load_model reads it
        # from the SavedModel's checkpoint.
        assert int(tf_keras.models.load_model(
            path).optimizer.iterations.numpy()) == 0
        restored = tf_adamax.tf_keras.load_model(path)
        # In place at once, not queued for the first step: a model saved
        # again before training held no slots.
        assert len(restored.optimizer.variables) == len(saved_state)
        for saved, now in zip(saved_state, restored.optimizer.variables):
            np.testing.assert_array_equal(now.numpy(), saved)
        resaved = str(tmp_path / "resaved.keras")
        restored.save(resaved)
        again = tf_keras.models.load_model(resaved).optimizer.variables
        for saved, now in zip(saved_state, again):
            np.testing.assert_array_equal(now.numpy(), saved)
    else:
        restored = tf_keras.models.load_model(path)
    opt = restored.optimizer
    assert type(opt) is Adamax
    assert opt.sparse_mode == "lazy"
    assert int(opt.iterations.numpy()) == 6
    restored.fit(ids[second], y[second], **fit)
    assert_same_weights(model, restored, atol=1e-7)
    for va, vb in zip(model.optimizer.variables, opt.variables):
        np.testing.assert_allclose(va.numpy(), vb.numpy(), atol=1e-7)


# ----------------------------------------------------------------------------
# Config and serialization.
# ----------------------------------------------------------------------------
def full_optimizer(**overrides):
    kwargs = dict(learning_rate=0.02, beta_1=0.8, beta_2=0.99, epsilon=1e-6,
                  weight_decay=0.01, clipnorm=1.0, use_ema=True,
                  ema_momentum=0.9, ema_overwrite_frequency=5,
                  jit_compile=False, name="my_adamax", sparse_mode="lazy")
    kwargs.update(overrides)
    return Adamax(**kwargs)


def test_get_config_has_every_constructor_argument():
    config = full_optimizer().get_config()
    params = set(inspect.signature(Adamax.__init__).parameters)
    assert params - {"self", "kwargs"} <= set(config)
    assert config["sparse_mode"] == "lazy"
    assert config["name"] == "my_adamax"
    json.dumps({k: float(v) if isinstance(v, np.floating) else v
                for k, v in config.items()})
    assert Adamax().get_config()["name"] == "Adamax"


@pytest.mark.parametrize("lr", ["float", "schedule"])
def test_serialization_round_trip(lr):
    overrides = {}
    if lr == "schedule":
        overrides["learning_rate"] = (
            tf_keras.optimizers.schedules.CosineDecay(0.1, decay_steps=100))
    opt = full_optimizer(**overrides)
    config = opt.get_config()
    # from_config replaces a schedule's dict by the object: pass a copy.
    via_get = tf_keras.optimizers.get({"class_name": "tf_adamax>Adamax",
                                       "config": copy.deepcopy(config)})
    via_deserialize = tf_keras.optimizers.deserialize(
        tf_keras.optimizers.serialize(opt))
    for restored in (via_get, via_deserialize):
        assert type(restored) is Adamax
        assert restored.get_config() == config


def test_invalid_sparse_mode_names_value_and_choices():
    with pytest.raises(ValueError, match=r"sparse_mode.*'Lazy'.*'exact', 'lazy'"):
        Adamax(sparse_mode="Lazy")


@pytest.mark.parametrize("arg,value", [
    ("beta_1", 1.0), ("beta_2", -0.1), ("epsilon", -1e-7),
    # Accepted by Keras's own base class; the core rejects them too.
    ("learning_rate", -1.0), ("learning_rate", float("nan")),
    ("weight_decay", -0.5), ("clipvalue", -1.0), ("global_clipnorm", -2.0)])
def test_invalid_hyperparameter_names_argument_and_value(arg, value):
    with pytest.raises(ValueError, match=rf"{arg}.*{value}"):
        Adamax(**{arg: value})


@pytest.mark.parametrize("arg", ["clipnorm", "clipvalue", "global_clipnorm"])
def test_zero_clip_value_means_no_clipping_as_in_keras(arg):
    check_zero_clip_is_off(Adamax, arg)


def test_many_adapters_do_not_warn_of_retracing():
    check_no_retracing_warning(Adamax)


# ----------------------------------------------------------------------------
# Mixed precision.
# ----------------------------------------------------------------------------
@pytest.fixture
def policy():
    yield tf_keras.mixed_precision.set_global_policy
    tf_keras.mixed_precision.set_global_policy("float32")


def test_h5_file_of_a_loss_scaled_adamax_loads(policy, tmp_path):
    # tf-keras's HDF5 loader finds the optimizer inside a LossScaleOptimizer
    # by its lower-cased class name, the built-in's "adamax", and then fails
    # (TypeError: sparse_mode); tf_adamax.tf_keras.load_model loads it.
    policy("mixed_float16")
    x, y = dense_data(16)
    model = dense_model()
    model.compile(optimizer=Adamax(0.01, sparse_mode="lazy", beta_2=0.99),
                  loss="mse")
    model.fit(x, y, batch_size=8, verbose=0)
    path = str(tmp_path / "model.h5")
    model.save(path)
    import h5py

    with h5py.File(path, "r") as f:  # an open file too, as tf-keras takes it
        assert type(tf_adamax.tf_keras.load_model(
            f).optimizer.inner_optimizer) is Adamax
    restored = tf_adamax.tf_keras.load_model(path)
    opt = restored.optimizer
    assert isinstance(opt, tf_keras.mixed_precision.LossScaleOptimizer)
    assert type(opt.inner_optimizer) is Adamax
    assert (opt.inner_optimizer.sparse_mode, opt.inner_optimizer.beta_2) == (
        "lazy", 0.99)
    assert_same_weights(model, restored, atol=0)
    restored.fit(x, y, batch_size=8, verbose=0)  # and it trains
    # The scope is only for such files: the built-in's loads as before.
    other = dense_model()
    other.compile(optimizer=tf_keras.optimizers.Adamax(0.01), loss="mse")
    other.save(path)
    assert type(tf_adamax.tf_keras.load_model(
        path).optimizer.inner_optimizer) is tf_keras.optimizers.Adamax
    with h5py.File(path, "r") as f:
        assert type(tf_adamax.tf_keras.load_model(
            f).optimizer.inner_optimizer) is tf_keras.optimizers.Adamax


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_like_tf_keras_adamax(policy, name):
    policy(name)
    ours, history = fit_dense(Adamax(learning_rate=0.02), epochs=3, n=64,
                              batch_size=8)
    theirs, _ = fit_dense(tf_keras.optimizers.Adamax(learning_rate=0.02),
                          epochs=3, n=64, batch_size=8)
    if name == "mixed_float16":
        # compile() wrapped ours in the dynamic loss-scaling optimizer.
        assert isinstance(ours.optimizer,
                          tf_keras.mixed_precision.LossScaleOptimizer)
        assert type(ours.optimizer.inner_optimizer) is Adamax
        assert np.isfinite(float(ours.optimizer.loss_scale))
    else:
        assert type(ours.optimizer) is Adamax
    losses = history.history["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0]
    for w in ours.weights:
        assert w.dtype == tf.float32 and np.all(np.isfinite(w.numpy()))
    # Same gradients in, same float32 update out (last-bit differences:
    # the update is written differently; half-precision passes may amplify).
    assert_same_weights(ours, theirs, atol=1e-5)


def test_half_precision_variables_get_float32_slots():
    var = tf.Variable(np.full((3, 2), 0.5), dtype=tf.float16)
    opt = Adamax(learning_rate=0.01)
    for _ in range(3):
        opt.apply_gradients([(tf.constant(np.full((3, 2), 1e-3), tf.float16),
                              var)])
    assert opt._m[0].dtype == tf.float32 and opt._u[0].dtype == tf.float32
    ref = AdamaxReference(learning_rate=0.01)
    ref.add_variable("v", np.full((3, 2), 0.5), np.float16)
    for _ in range(3):
        ref.apply({"v": np.full((3, 2), np.float16(1e-3), np.float64)})
    np.testing.assert_allclose(var.numpy(), ref.w["v"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(opt._m[0].numpy(), ref.m["v"], rtol=1e-6)


# ----------------------------------------------------------------------------
# The example, and which Keras each adapter imports.
# ----------------------------------------------------------------------------
def test_example_runs_and_loss_falls():
    proc = subprocess.run(
        [sys.executable,
         os.path.join(REPO_ROOT, "examples", "tf_keras_fit.py")],
        env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("classifier", "embedding"):
        losses = [float(line.split(" loss ")[1].split()[0])
                  for line in proc.stdout.splitlines()
                  if line.startswith(name + " epoch")]
        assert len(losses) == 5, proc.stdout
        assert losses[-1] < 0.6 * losses[0], (name, losses)


def imported_top_level_modules(module):
    """Top-level names a module's source imports (TensorFlow itself imports
    Keras 3, so sys.modules cannot tell which Keras an adapter uses)."""
    tree = ast.parse(inspect.getsource(module))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_each_adapter_imports_only_its_own_keras():
    tf_keras_adapter = imported_top_level_modules(tf_adamax.tf_keras)
    assert "tf_keras" in tf_keras_adapter and "keras" not in tf_keras_adapter
    import tf_adamax.keras as keras3_adapter_module
    keras3_adapter = imported_top_level_modules(keras3_adapter_module)
    assert "keras" in keras3_adapter and "tf_keras" not in keras3_adapter


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(tf_adamax.tf_keras, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_many_variables_split_over_cores_match_builtin(monkeypatch):
    check_many_variables_split_match_builtin(Adamax, tf_keras.optimizers.Adamax, tf.Variable,
                                             monkeypatch)


def test_unknown_variable_with_split_update_changes_nothing(monkeypatch):
    # tf-keras raises for a variable the optimizer was not built with while
    # tracing the part that holds it; no other part may have run before.
    import tf_adamax._distribute as distribute

    monkeypatch.setattr(distribute, "_MIN_VARIABLES_PER_PROGRAM", 2)
    monkeypatch.setattr(distribute, "cores", lambda: 2)
    known = [tf.Variable(np.full((3,), i + 1.0, "float32")) for i in range(4)]
    unknown = tf.Variable(np.ones((3,), "float32"), name="unbuilt_w")
    opt = Adamax(learning_rate=0.1)
    # Past the up-front check, so the error comes from tracing the parts.
    monkeypatch.setattr(opt, "_check_known", lambda variables: None)
    opt.build(known)
    before = [v.numpy().copy() for v in known + opt.variables]
    with pytest.raises(KeyError):
        opt.apply_gradients([(tf.ones((3,)), v) for v in known + [unknown]])
    for b, v in zip(before, known + opt.variables):
        np.testing.assert_array_equal(v.numpy(), b)


@pytest.mark.parametrize("weight_decay", (None, 0.1))
def test_variable_unfrozen_after_first_fit_is_named_and_changes_nothing(weight_decay):
    # tf-keras optimizers update only the variables of their first step; the
    # built-in's KeyError names the variable only on its per-variable path
    # (its weight decay has run by then). Ours names it before anything.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 4)).astype("float32")
    y = rng.standard_normal((8, 1)).astype("float32")
    model = tf_keras.Sequential([
        tf_keras.layers.Dense(3, input_shape=(4,), name="base"),
        tf_keras.layers.Dense(1, name="head")])
    model.layers[0].trainable = False
    opt = Adamax(learning_rate=0.01, weight_decay=weight_decay)
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, verbose=0, batch_size=8)
    model.layers[0].trainable = True
    model.compile(optimizer=opt, loss="mse")
    before = [v.numpy().copy() for v in model.variables + opt.variables]
    with pytest.raises(KeyError, match="cannot recognize variable base/kernel"):
        model.fit(x, y, verbose=0, batch_size=8)
    for b, v in zip(before, model.variables + opt.variables):
        np.testing.assert_array_equal(v.numpy(), b)


def test_lazy_weight_decay_is_read_at_each_step():
    check_lazy_weight_decay_is_read_at_each_step(Adamax, tf.Variable)


def test_adamax_options_set_after_a_step_match_builtin():
    check_adamax_options_set_after_a_step_match_builtin(
        Adamax, tf_keras.optimizers.Adamax, tf.Variable)


def test_lazy_weight_decay_respects_exclusion_by_name():
    check_lazy_weight_decay_respects_exclusion(Adamax, tf.Variable)


def test_float64_variables_are_exact():
    check_float64_variables_are_exact(Adamax, tf.Variable,
                                      ema_from_initial=True)


def test_a_nan_gradient_makes_the_norm_nan():
    check_nan_gradient_makes_the_norm_nan(Adamax, tf.Variable)


@pytest.mark.parametrize("units", (4, 6))
@pytest.mark.parametrize("change", ("unfrozen", "frozen", "swapped"))
def test_load_model_skips_slots_saved_for_other_trainable_variables(
        tmp_path, change, units):
    # tf-keras restores slots by position: a SavedModel saved after layers
    # were unfrozen (or frozen) since the optimizer was built failed to load
    # (shapes differ) or put one layer's moments into another's (shapes
    # equal). Now the model loads and the optimizer starts afresh, with a
    # warning, as tf-keras's own `.keras` loader does.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    base = tf_keras.Sequential(
        [tf_keras.layers.Dense(units, input_shape=(4,), name="b")])
    head = tf_keras.layers.Dense(units, name="h")
    model = tf_keras.Sequential([base, head])
    # "swapped": as many variables of the same shapes before and after
    # (with 4 units), so only their names tell the slots apart.
    base.trainable = change == "frozen"
    model.compile(optimizer=Adamax(0.05), loss="mse")
    model.fit(x, x[:, :1], batch_size=8, verbose=0)
    base.trainable = not base.trainable
    if change == "swapped":
        head.trainable = False
    path = str(tmp_path / "saved_model")
    model.save(path, save_format="tf")
    with pytest.warns(UserWarning, match="Skipping the optimizer state") as w:
        restored = tf_adamax.tf_keras.load_model(path)
    assert {x.filename for x in w if "Skipping" in str(x.message)} == {
        __file__}  # the user's line
    for saved, now in zip(model.weights, restored.weights):
        np.testing.assert_array_equal(now.numpy(), saved.numpy())
    opt = restored.optimizer
    assert int(opt.iterations.numpy()) == 0
    assert len(opt._m) == len(restored.trainable_variables)
    for slot in opt._m + opt._u:
        assert not np.any(slot.numpy()), slot.name
    restored.fit(x, x[:, :1], batch_size=8, verbose=0)
    assert int(opt.iterations.numpy()) == 2


def test_rows_dropped_in_xla_do_not_count_in_clip_norms():
    check_dropped_rows_do_not_count_in_clip_norms(Adamax, tf.Variable)


def test_load_model_of_a_model_saved_before_training(tmp_path):
    # Its optimizer saved only its step counter: nothing to skip, no warning.
    model = token_model()
    model.compile(optimizer=Adamax(0.02), loss="mse")
    path = str(tmp_path / "saved_model")
    model.save(path, save_format="tf")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        restored = tf_adamax.tf_keras.load_model(path)
    ids, y = token_regression_data()
    restored.fit(ids[:8], y[:8], batch_size=4, verbose=0)
    assert int(restored.optimizer.iterations.numpy()) == 2


def test_jit_compile_set_after_construction_is_used_and_saved():
    # The attribute read back False while the update stayed one XLA program
    # and get_config still said True (the adapter kept its own flag).
    rng = np.random.default_rng(5)
    init = rng.normal(size=(3, 2)).astype("float32")
    grads = [tf.constant(rng.normal(size=(3, 2)).astype("float32"))
             for _ in range(3)]
    results = []
    for cls in (Adamax, tf_keras.optimizers.Adamax):
        var = tf.Variable(init)
        opt = cls(learning_rate=0.1)
        calls = []
        if cls is Adamax:
            compiled = opt._update_compiled
            opt._update_compiled = lambda *a: (calls.append(1), compiled(*a))
        opt.apply_gradients([(grads[0], var)])
        opt.jit_compile = False
        assert opt.jit_compile is False
        assert opt.get_config()["jit_compile"] is False
        opt.apply_gradients([(grads[1], var)])
        if cls is Adamax:
            assert len(calls) == 1  # the first step only
            opt.jit_compile = True  # and back on
            assert opt.get_config()["jit_compile"] is True
        opt.apply_gradients([(grads[2], var)])
        if cls is Adamax:
            assert len(calls) == 2
            assert type(opt).from_config(opt.get_config()).jit_compile is True
        results.append([var.numpy()] + [v.numpy() for v in opt.variables[1:]])
    for ours, builtin in zip(*results):
        np.testing.assert_allclose(ours, builtin, rtol=1e-6, atol=1e-7)


def per_variable_xla_traces(opt):
    """Traces of tf-keras's per-variable update compiled with XLA for `opt`
    (its `_update_step_xla`, a `tf.function(jit_compile=True)`)."""
    compiled = tf_keras.optimizers.Optimizer._update_step_xla.__get__(
        opt, type(opt))
    return compiled.experimental_get_tracing_count()


def all_variables_programs(opt):
    """The adapter's one-program update of all variables, if it ran."""
    holder = opt._update_all_fn
    return [] if holder is None else holder.fn.fns


def run_against_reference(opt, steps=3):
    rng = np.random.default_rng(11)
    init = rng.normal(size=(3, 2)).astype("float32")
    var = tf.Variable(init)
    ref = AdamaxReference(learning_rate=0.1)
    ref.add_variable("v", init, np.float32)
    for _ in range(steps):
        g = rng.normal(size=(3, 2)).astype("float32")
        opt.apply_gradients([(tf.constant(g), var)])
        ref.apply({"v": g})
    np.testing.assert_allclose(var.numpy(), ref.w["v"], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")),
                    reason="tf-keras compiles per variable on a GPU anyway")
@pytest.mark.parametrize("set_jit", [False, True], ids=["default", "set_true"])
def test_jit_compile_set_true_compiles_per_variable_updates_as_tf_keras(
        set_jit):
    # With EMA (or under a strategy) tf-keras updates variable by variable,
    # compiled with XLA only when its flag is set: on a GPU, or by the user.
    # `opt.jit_compile = True` was skipped by tf's attribute tracking where
    # the adapter's already read True (the default), and the updates stayed
    # uncompiled where tf-keras's own Adamax compiles them.
    traces = {}
    for cls in (Adamax, tf_keras.optimizers.Adamax):
        opt = cls(learning_rate=0.1, use_ema=True)
        if set_jit:
            opt.jit_compile = True
        assert opt.jit_compile is (True if cls is Adamax else set_jit)
        run_against_reference(opt)
        traces[cls] = per_variable_xla_traces(opt)
        if cls is Adamax:
            assert not all_variables_programs(opt)  # the per-variable path
    assert traces[Adamax] == traces[tf_keras.optimizers.Adamax]
    assert (traces[Adamax] > 0) is set_jit


@pytest.mark.parametrize("jit_compile", [False, True])
def test_jit_compile_argument_switches_the_one_program(jit_compile):
    # jit_compile=True (no strategy, no EMA): the update of all variables
    # runs as the adapter's one XLA program, on CPU too; False: tf-keras's
    # per-variable update, uncompiled without a GPU. Both as the reference.
    opt = Adamax(learning_rate=0.1, jit_compile=jit_compile)
    run_against_reference(opt)
    programs = all_variables_programs(opt)
    assert [p.experimental_get_tracing_count() for p in programs] == (
        [1] if jit_compile else [])
    if not tf.config.list_physical_devices("GPU"):
        assert per_variable_xla_traces(opt) == 0


def test_import_without_tf_keras_says_what_to_install():
    # It failed with a bare "No module named 'tf_keras'".
    script = (
        "import sys\n"
        "sys.modules['tf_keras'] = None  # as if tf-keras were not installed\n"
        "import tf_adamax, tf_adamax.keras\n"
        "tf_adamax.Adamax(0.1); tf_adamax.keras.Adamax(0.1)\n"
        "try:\n"
        "    import tf_adamax.tf_keras\n"
        "except ImportError as error:\n"
        "    assert error.__cause__ is not None\n"
        "    print(error)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    message = proc.stdout
    for words in ("tf_adamax.tf_keras needs tf-keras 2.21",
                  'pip install "tf-keras>=2.21,<2.22"',
                  "tf_adamax.Adamax", "tf_adamax.keras"):
        assert words in message, message
