"""`tf_adamax.keras.Adamax`: the Keras 3 adapter, through `compile` / `fit`.

Oracles: `keras.optimizers.Adamax` where it is right (dense gradients, and all
of Keras 3's base-class features), the NumPy float64 `reference.AdamaxReference`
where it is not (sparse gradients that repeat an index).
"""

import copy
import inspect
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_adamax.keras
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

Adamax = tf_adamax.keras.Adamax

# compile() modes: eager, graph (tf.function), XLA.
RUN_MODES = {
    "eager": dict(run_eagerly=True, jit_compile=False),
    "graph": dict(run_eagerly=False, jit_compile=False),
    "jit": dict(run_eagerly=False, jit_compile=True),
}


# ----------------------------------------------------------------------------
# Dense model: identical to keras.optimizers.Adamax.
# ----------------------------------------------------------------------------


def dense_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(8, activation="tanh", name="hidden"),
        keras.layers.Dense(1, name="out"),
    ])


def fit_dense(optimizer, mode="graph", epochs=1, callbacks=(), n=80,
              batch_size=4):
    model = dense_model()
    model.compile(optimizer=optimizer, loss="mse", **RUN_MODES[mode])
    x, y = dense_data(n)
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs,
                        shuffle=False, verbose=0, callbacks=list(callbacks))
    return model, history


def assert_same_weights(a, b, atol=1e-6):
    assert len(a.weights) == len(b.weights)
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_allclose(wa.numpy(), wb.numpy(), rtol=0, atol=atol,
                                   err_msg=wa.path)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_dense_fit_matches_keras_adamax(mode):
    # 80 samples / batch 4 = 20 steps.
    ours, _ = fit_dense(Adamax(learning_rate=0.01), mode)
    theirs, _ = fit_dense(keras.optimizers.Adamax(learning_rate=0.01), mode)
    assert int(ours.optimizer.iterations.numpy()) == 20
    # Without a strategy the updates of all variables are one XLA program,
    # traced once.
    fns = ours.optimizer._update_all_fn.fn.fns
    assert [f.experimental_get_tracing_count() for f in fns] == [1]
    assert_same_weights(ours, theirs)
    # Slots: same values, same order as Keras's (drop-in checkpoints).
    for va, vb in zip(ours.optimizer.variables, theirs.optimizer.variables):
        assert (va.name.replace(ours.name, "model")
                == vb.name.replace(theirs.name, "model"))
        np.testing.assert_allclose(va.numpy(), vb.numpy(), atol=1e-6,
                                   err_msg=va.path)
    moved = [not np.allclose(w.numpy(), w0.numpy())
             for w, w0 in zip(ours.weights, dense_model().weights)]
    assert all(moved)


def halve_lr(epoch, lr):
    return lr * 0.5


def test_lr_callback_reads_and_sets_learning_rate():
    def fit(cls):
        callback = keras.callbacks.LearningRateScheduler(halve_lr)
        return fit_dense(cls(learning_rate=0.05), epochs=3, n=16,
                         callbacks=[callback])[0]

    ours, theirs = fit(Adamax), fit(keras.optimizers.Adamax)
    # Halved at the start of each of the 3 epochs.
    np.testing.assert_allclose(float(ours.optimizer.learning_rate), 0.05 / 8,
                               rtol=1e-6)
    assert_same_weights(ours, theirs)


# Everything Keras 3's base class does around update_step must keep working.
FEATURES = {
    "schedule": dict(learning_rate=keras.optimizers.schedules.ExponentialDecay(
        0.05, decay_steps=4, decay_rate=0.5)),
    "callable_lr": dict(learning_rate=lambda: 0.02),
    "weight_decay_exclude": dict(weight_decay=0.5, learning_rate=0.05),
    "clipnorm": dict(clipnorm=0.5),
    "clipvalue": dict(clipvalue=0.3),
    "global_clipnorm": dict(global_clipnorm=0.5),
    "ema": dict(use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3),
    "gradient_accumulation": dict(gradient_accumulation_steps=3,
                                  learning_rate=0.05),
    "loss_scale_factor": dict(loss_scale_factor=64.0),
}


def apply_fixed_gradients(opt, steps=10, exclude_bias=False):
    """10 apply_gradients calls with the same pseudo-random dense gradients."""
    rng = np.random.default_rng(4)
    kernel = keras.Variable(rng.normal(size=(3, 2)).astype("float32"),
                            name="kernel")
    bias = keras.Variable(np.zeros(2, "float32"), name="bias")
    if exclude_bias:
        opt.exclude_from_weight_decay(var_names=["bias"])
    for _ in range(steps):
        grads = [tf.constant(rng.normal(size=v.shape), "float32")
                 for v in (kernel, bias)]
        opt.apply_gradients(zip(grads, [kernel, bias]))
    opt.finalize_variable_values([kernel, bias])
    return [kernel.numpy(), bias.numpy()] + [v.numpy() for v in opt.variables]


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_keras_features_match_keras_adamax(feature):
    exclude = feature == "weight_decay_exclude"
    ours = apply_fixed_gradients(Adamax(**FEATURES[feature]), exclude_bias=exclude)
    theirs = apply_fixed_gradients(keras.optimizers.Adamax(**FEATURES[feature]),
                                   exclude_bias=exclude)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    if exclude:
        # The exclusion mattered: a decayed bias ends elsewhere.
        decayed = apply_fixed_gradients(Adamax(**FEATURES[feature]))
        assert not np.allclose(decayed[1], ours[1])


# ----------------------------------------------------------------------------
# Embedding with repeated tokens of opposite gradient sign: the bug we fix.
# ----------------------------------------------------------------------------


def linear_token_loss(y_true, y_pred):
    # d loss / d embedding[id] = sum of the coefficients of id's occurrences.
    return keras.ops.sum(y_true * y_pred, axis=(1, 2))


def fit_embedding(optimizer, mode):
    model = keras.Sequential([
        keras.Input((TOKENS,), dtype="int32"),
        keras.layers.Embedding(VOCAB, DIM, name="emb"),
    ])
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
    # The test can tell the modes apart: rows absent from a batch move in
    # exact mode only. Never-seen rows 6, 7 are untouched either way.
    other = embedding_reference("lazy" if sparse_mode == "exact" else "exact")
    assert np.abs(other.w["emb"] - ref.w["emb"]).max() > 1e-3
    np.testing.assert_array_equal(emb.numpy()[6:], embedding_init()[6:])


def test_keras_builtin_adamax_is_wrong_on_repeated_tokens():
    """Documents the bug: Keras 3 takes |g| per repeated row, not of their sum.

    With +g and -g/2 for one token, the densified gradient is g/2 but
    keras.optimizers.Adamax puts max(beta_2 * u, |g| + |g|/2) into its norm.
    """
    builtin = fit_embedding(
        keras.optimizers.Adamax(learning_rate=EMB_LR), "eager")
    ours = fit_embedding(Adamax(learning_rate=EMB_LR), "eager")
    ref = embedding_reference("exact").w["emb"]
    builtin_error = np.abs(builtin.get_layer("emb").embeddings.numpy() - ref)
    our_error = np.abs(ours.get_layer("emb").embeddings.numpy() - ref)
    assert our_error.max() < 1e-5
    assert builtin_error.max() > 1e-2, (
        "keras.optimizers.Adamax now matches the densified reference on "
        "repeated sparse indices; the upstream bug may be fixed")


# ----------------------------------------------------------------------------
# Sparse gradients through Keras 3's machinery (clipping, accumulation, ...).
# ----------------------------------------------------------------------------
def sparse_indices(step):
    return np.array([1, 4, 1, 1, 3] if step % 2 == 0 else [1, 1, 1, 1, 1],
                    "int32")


def sparse_run(sparse_mode, jit, steps=4, **kwargs):
    """`steps` IndexedSlices updates of a 6x2 table, ours and the reference.

    Row 1 is named three times per step, twice with opposite signs; rows 3
    and 4 only in every other step (lazy mode must leave them alone in the
    others); rows 0, 2 and 5 are never named.
    """
    rng = np.random.default_rng(11)
    init = rng.normal(size=(6, 2)).astype("float32")
    var = keras.Variable(init, name="table")
    kwargs = {"learning_rate": 0.1, **kwargs}
    opt = Adamax(sparse_mode=sparse_mode, **kwargs)
    ref_kwargs = dict(kwargs)
    if isinstance(kwargs.get("learning_rate"),
                  keras.optimizers.schedules.LearningRateSchedule):
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
        indices = sparse_indices(k)
        values = rng.normal(size=(5, 2)).astype("float32")
        values[2] = -0.7 * values[0]  # opposite-sign duplicates of row 1
        step(tf.constant(values), tf.constant(indices))
        ref.apply({"table": SparseGrad(indices, values)})
    opt.finalize_variable_values([var])
    ref.finalize_variable_values()
    return var, opt, ref


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "xla"])
@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
@pytest.mark.parametrize("clip", [dict(clipnorm=0.5), dict(clipvalue=0.3),
                                  dict(global_clipnorm=0.5)],
                         ids=["clipnorm", "clipvalue", "global_clipnorm"])
def test_sparse_clipping_sums_duplicates_first(clip, sparse_mode, jit):
    assert_matches_reference(*sparse_run(sparse_mode, jit, **clip))


SPARSE_FEATURES = {
    # Keras 3's `Optimizer.apply` cannot divide an IndexedSlices (TypeError
    # for its built-in optimizers); the adapter's sparse gradients can.
    "loss_scale_factor": dict(loss_scale_factor=8.0),
    "weight_decay": dict(weight_decay=0.2),
    "ema": dict(use_ema=True, ema_momentum=0.5, ema_overwrite_frequency=3),
    "schedule": dict(learning_rate=keras.optimizers.schedules.ExponentialDecay(
        0.1, decay_steps=1, decay_rate=0.5)),
}


@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
@pytest.mark.parametrize("feature", sorted(SPARSE_FEATURES))
def test_sparse_with_keras_features_matches_reference(feature, sparse_mode):
    # Eager: these features are Keras code around the kernels; the kernels'
    # XLA path is covered by the clipping and embedding tests.
    assert_matches_reference(
        *sparse_run(sparse_mode, False, **SPARSE_FEATURES[feature]))


@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
def test_sparse_gradient_accumulation_equals_dense(sparse_mode):
    """Keras 3 accumulates into dense buffers: sparse == densified.

    (So with gradient_accumulation_steps every update is dense, lazy or
    not. `t` counts updates, not calls, as in keras.optimizers.Adamax,
    whose dense path `test_keras_features_match_keras_adamax` compares.)
    """
    var_sparse, _, _ = sparse_run(sparse_mode, False, steps=6,
                                  gradient_accumulation_steps=3)
    rng = np.random.default_rng(11)
    var = keras.Variable(rng.normal(size=(6, 2)).astype("float32"))
    opt = Adamax(learning_rate=0.1, gradient_accumulation_steps=3)
    for k in range(6):
        indices = sparse_indices(k)
        values = rng.normal(size=(5, 2)).astype("float32")
        values[2] = -0.7 * values[0]
        dense = tf.math.unsorted_segment_sum(values, indices, 6)
        opt.apply_gradients([(dense, var)])
    np.testing.assert_allclose(var_sparse.numpy(), var.numpy(), rtol=1e-6,
                               atol=1e-7)
    assert int(opt.iterations.numpy()) == 2


@BAD_PAIR_CASES
@BAD_PAIR_OPTIONS
def test_bad_gradients_raise_naming_variable_and_change_nothing(sparse_mode,
                                                                graph,
                                                                options):
    # As keras.optimizers.Adamax raises for out-of-range rows; the adapter's
    # compiled update would otherwise drop them silently.
    check_bad_pairs_change_nothing(Adamax, keras.Variable, sparse_mode, graph,
                                   options)


# ----------------------------------------------------------------------------
# Saving: .keras round trip keeps the optimizer state.
# ----------------------------------------------------------------------------


def token_model():
    keras.utils.set_random_seed(2)
    return keras.Sequential([
        keras.Input((4,), dtype="int32"),
        keras.layers.Embedding(20, 4),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(1),
    ])


def test_keras_file_round_trip_restores_optimizer_state(tmp_path):
    ids, y = token_regression_data()
    first, second = slice(0, 24), slice(24, 48)
    fit = dict(batch_size=4, shuffle=False, verbose=0)

    model = token_model()
    model.compile(optimizer=Adamax(0.02, sparse_mode="lazy"), loss="mse",
                  jit_compile=False)
    model.fit(ids[first], y[first], **fit)
    path = str(tmp_path / "model.keras")
    model.save(path)
    model.fit(ids[second], y[second], **fit)  # uninterrupted

    # No custom_objects: importing tf_adamax.keras registered the class.
    restored = keras.models.load_model(path)
    opt = restored.optimizer
    assert type(opt) is Adamax
    assert opt.sparse_mode == "lazy"
    assert int(opt.iterations.numpy()) == 6
    restored.fit(ids[second], y[second], **fit)
    assert_same_weights(model, restored, atol=1e-7)
    for va, vb in zip(model.optimizer.variables, opt.variables):
        np.testing.assert_allclose(va.numpy(), vb.numpy(), atol=1e-7)


def test_refused_variable_option_keeps_the_saved_state_loadable(tmp_path):
    # A refused Keras variable stayed in the optimizer's variables: the
    # saved model then held one more optimizer variable than the loaded
    # optimizer has, and Keras skipped loading all of them ("Skipping
    # variable loading for optimizer"; iterations and slots started afresh).
    model, _ = fit_dense(Adamax(0.01), n=16)
    opt = model.optimizer
    with pytest.raises(ValueError, match="epsilon"):
        opt.epsilon = keras.Variable([1e-7, 1e-7])
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path).optimizer
    assert int(restored.iterations.numpy()) == int(opt.iterations.numpy()) == 4
    assert len(restored.variables) == len(opt.variables)
    for va, vb in zip(opt.variables, restored.variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())


def test_loads_keras_builtin_adamax_state(tmp_path):
    """Same slot order as keras.optimizers.Adamax: its weights load here."""
    model, _ = fit_dense(keras.optimizers.Adamax(0.01), n=16)
    path = str(tmp_path / "builtin.weights.h5")
    model.save_weights(path)
    ours = dense_model()
    ours.compile(optimizer=Adamax(0.01), loss="mse")
    ours.optimizer.build(ours.trainable_variables)
    ours.load_weights(path)
    for va, vb in zip(model.optimizer.variables, ours.optimizer.variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())


# ----------------------------------------------------------------------------
# Config and serialization.
# ----------------------------------------------------------------------------
def full_optimizer(**overrides):
    kwargs = dict(learning_rate=0.02, beta_1=0.8, beta_2=0.99, epsilon=1e-6,
                  weight_decay=0.01, clipnorm=1.0, use_ema=True,
                  ema_momentum=0.9, ema_overwrite_frequency=5,
                  loss_scale_factor=2.0, gradient_accumulation_steps=2,
                  name="my_adamax", sparse_mode="lazy")
    kwargs.update(overrides)
    return Adamax(**kwargs)


def test_get_config_has_every_constructor_argument():
    config = full_optimizer().get_config()
    params = set(inspect.signature(Adamax.__init__).parameters)
    assert params - {"self", "kwargs"} <= set(config)
    assert config["sparse_mode"] == "lazy"
    assert config["name"] == "my_adamax"
    json.dumps(config)
    # Numbered as Keras numbers its built-in's ("adamax", "adamax_1", ...):
    # two default instances (a GAN's) get distinct names and paths.
    first, second = Adamax(), Adamax()
    assert first.get_config()["name"].startswith("adamax")
    assert first.name != second.name


@pytest.mark.parametrize("lr", ["float", "schedule"])
def test_serialization_round_trip(lr):
    overrides = {}
    if lr == "schedule":
        overrides["learning_rate"] = keras.optimizers.schedules.CosineDecay(
            0.1, decay_steps=100)
    opt = full_optimizer(**overrides)
    config = opt.get_config()
    # from_config replaces a schedule's dict by the object: pass a copy.
    via_get = keras.optimizers.get({"class_name": "tf_adamax>Adamax",
                                    "config": copy.deepcopy(config)})
    serialized = json.loads(json.dumps(keras.optimizers.serialize(opt)))
    via_deserialize = keras.optimizers.deserialize(serialized)
    for restored in (via_get, via_deserialize):
        assert type(restored) is Adamax
        assert restored.get_config() == config


def test_invalid_sparse_mode_names_value_and_choices():
    with pytest.raises(ValueError, match=r"sparse_mode.*'lazzy'.*'exact', 'lazy'"):
        Adamax(sparse_mode="lazzy")


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


def test_unknown_keyword_is_rejected():
    with pytest.raises(ValueError, match="sparse_modes"):
        Adamax(sparse_modes="lazy")


# ----------------------------------------------------------------------------
# Mixed precision.
# ----------------------------------------------------------------------------
@pytest.fixture
def policy():
    def set_policy(name):
        keras.config.set_dtype_policy(name)
    yield set_policy
    keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_like_keras_adamax(policy, name):
    policy(name)
    ours, history = fit_dense(Adamax(learning_rate=0.02), epochs=3, n=64,
                              batch_size=8)
    theirs, _ = fit_dense(keras.optimizers.Adamax(learning_rate=0.02),
                          epochs=3, n=64, batch_size=8)
    if name == "mixed_float16":
        # compile() wrapped ours in the dynamic loss-scaling optimizer.
        assert isinstance(ours.optimizer, keras.optimizers.LossScaleOptimizer)
        assert type(ours.optimizer.inner_optimizer) is Adamax
        assert np.isfinite(float(ours.optimizer.dynamic_scale.numpy()))
    else:
        assert type(ours.optimizer) is Adamax
    losses = history.history["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0]
    for w in ours.weights:
        assert w.dtype == "float32" and np.all(np.isfinite(w.numpy()))
    # Same gradients in, same float32 update out (last-bit differences:
    # the update is written differently; half-precision passes may amplify).
    assert_same_weights(ours, theirs, atol=1e-5)


def test_half_precision_variables_get_float32_slots():
    var = keras.Variable(np.full((3, 2), 0.5), dtype="float16")
    opt = Adamax(learning_rate=0.01)
    for _ in range(3):
        opt.apply_gradients([(tf.constant(np.full((3, 2), 1e-3), "float16"),
                              var)])
    assert opt._m[0].dtype == "float32" and opt._u[0].dtype == "float32"
    ref = AdamaxReference(learning_rate=0.01)
    ref.add_variable("v", np.full((3, 2), 0.5), np.float16)
    for _ in range(3):
        ref.apply({"v": np.full((3, 2), np.float16(1e-3), np.float64)})
    np.testing.assert_allclose(var.numpy(), ref.w["v"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(opt._m[0].numpy(), ref.m["v"], rtol=1e-6)


# ----------------------------------------------------------------------------
# tf.distribute: MirroredStrategy on two logical CPUs equals one device.
# ----------------------------------------------------------------------------
MIRRORED_SCRIPT = """
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import tf_adamax.keras
# Checked here to spare a separate interpreter start: the Keras 3 adapter
# must not pull in tf-keras.
tf_keras_imported = "tf_keras" in sys.modules
import keras

rng = np.random.default_rng(0)
ids = rng.integers(0, 12, size=(32, 3)).astype("int32")
ids[:, 1] = ids[:, 0]  # repeated tokens
y = rng.normal(size=(32, 1)).astype("float32")

def build():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((3,), dtype="int32"),
        keras.layers.Embedding(12, 4),
        keras.layers.Flatten(),
        keras.layers.Dense(4, activation="tanh"),
        keras.layers.Dense(1),
    ])

def train(strategy, sparse_mode, **options):
    with strategy.scope():
        model = build()
        model.compile(optimizer=tf_adamax.keras.Adamax(
            0.02, sparse_mode=sparse_mode, **options), loss="mse",
            jit_compile=False)
    model.fit(ids, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return [w.numpy() for w in model.weights]

out = {"tf_keras_imported": tf_keras_imported,
       "replicas": tf.distribute.MirroredStrategy(
           ["/cpu:0", "/cpu:1"]).num_replicas_in_sync}
for mode in ("exact", "lazy"):
    mirrored = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), mode)
    single = train(tf.distribute.get_strategy(), mode)
    out[mode] = max(float(np.abs(a - b).max()) for a, b in zip(mirrored, single))
    out[mode + "_moved"] = float(np.abs(mirrored[0] - build().weights[0].numpy()).max())
# Clipping applies to the gradient summed over replicas (Keras 3's built-in
# clips each replica's share), also under mixed precision's loss scaling.
for name, options in (("clipnorm", {"clipnorm": 0.05}),
                      ("global_clipnorm", {"global_clipnorm": 0.05})):
    for policy in ("float32", "mixed_float16"):
        keras.mixed_precision.set_global_policy(policy)
        mirrored = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
                         "lazy", **options)
        single = train(tf.distribute.get_strategy(), "lazy", **options)
        out[f"{name}-{policy}"] = max(
            float(np.abs(a.astype("float64") - b.astype("float64")).max())
            for a, b in zip(mirrored, single))
keras.mixed_precision.set_global_policy("float32")
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def mirrored_result(tmp_path_factory):
    """Runs MIRRORED_SCRIPT once in a fresh interpreter (2 logical CPUs)."""
    script = tmp_path_factory.mktemp("mirrored") / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_mirrored_strategy_matches_single_device(mirrored_result):
    assert mirrored_result["replicas"] == 2
    for mode in ("exact", "lazy"):
        assert mirrored_result[mode + "_moved"] > 1e-3
        assert mirrored_result[mode] < 1e-5, mirrored_result


@pytest.mark.parametrize("clip", ["clipnorm", "global_clipnorm"])
@pytest.mark.parametrize("policy,tol", [("float32", 1e-5),
                                        ("mixed_float16", 1e-3)])
def test_mirrored_fit_clips_the_summed_gradient(mirrored_result, clip, policy,
                                                tol):
    assert mirrored_result[f"{clip}-{policy}"] < tol, mirrored_result


def test_importing_the_keras3_adapter_does_not_import_tf_keras(
        mirrored_result):
    assert not mirrored_result["tf_keras_imported"]


# ----------------------------------------------------------------------------
# Fault tolerance: BackupAndRestore after SIGKILL mid-epoch.
# ----------------------------------------------------------------------------
FT_SCRIPT = '''
import os, sys, time
import numpy as np
import keras
import tf_adamax.keras

EPOCHS, BATCH = 3, 8


def train(backup_dir, stall_at=None, marker=None, first_epoch_file=None):
    """Fits 3 epochs with BackupAndRestore; returns weights + optimizer state.

    stall_at="E:B" blocks after batch B of epoch E (after writing `marker`),
    waiting to be killed.
    """
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 16, size=(64, 3)).astype("int32")
    x = rng.normal(size=(64, 3)).astype("float32")
    y = (x.sum(axis=1, keepdims=True) + (ids[:, :1] % 4)).astype("float32")
    keras.utils.set_random_seed(0)
    tokens = keras.Input((3,), dtype="int32")
    feats = keras.Input((3,))
    emb = keras.layers.Flatten()(keras.layers.Embedding(16, 2)(tokens))
    hidden = keras.layers.Dense(8, activation="tanh")(
        keras.layers.Concatenate()([emb, feats]))
    model = keras.Model([tokens, feats], keras.layers.Dense(1)(hidden))
    model.compile(optimizer=tf_adamax.keras.Adamax(0.02, sparse_mode="lazy"),
                  loss="mse", jit_compile=False)

    class Probe(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            if first_epoch_file and not os.path.exists(first_epoch_file):
                with open(first_epoch_file, "w") as f:
                    f.write(str(epoch))

        def on_train_batch_end(self, batch, logs=None):
            if stall_at == f"{self.epoch}:{batch}":
                with open(marker, "w") as f:
                    f.write("stalled")
                time.sleep(600)  # killed here

    model.fit([ids, x], y, batch_size=BATCH, epochs=EPOCHS, shuffle=False,
              verbose=0, callbacks=[
                  keras.callbacks.BackupAndRestore(backup_dir), Probe()])
    state = [w.numpy() for w in model.weights]
    state += [v.numpy() for v in model.optimizer.variables]
    return state


if __name__ == "__main__":
    backup_dir, out, stall_at, marker, first_epoch_file = sys.argv[1:6]
    state = train(backup_dir, None if stall_at == "-" else stall_at, marker,
                  first_epoch_file)
    np.savez(out, *state)
'''


def test_backup_and_restore_after_sigkill_mid_epoch(tmp_path):
    script = tmp_path / "ft_train.py"
    script.write_text(FT_SCRIPT)
    backup = tmp_path / "backup"
    marker = tmp_path / "stalled"

    def launch(stall_at, out, first_epoch_file):
        return subprocess.Popen(
            [sys.executable, str(script), str(backup), str(out), stall_at,
             str(marker), str(first_epoch_file)],
            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)

    # Run 1: killed during epoch 1 (0-based), after one completed epoch.
    proc = launch("1:3", tmp_path / "unused.npz", tmp_path / "first1")
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training never reached 1:3"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (backup / "latest.weights.h5").exists()

    # Run 2: same command, resumes from the backup and finishes.
    out = tmp_path / "resumed.npz"
    proc = launch("-", out, tmp_path / "first2")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    # It resumed at epoch 1 (a restart from scratch would also end equal).
    assert (tmp_path / "first2").read_text() == "1"
    resumed = np.load(out)
    resumed = [resumed[f"arr_{i}"] for i in range(len(resumed.files))]

    # Uninterrupted run, in this process, same code.
    namespace = {"__name__": "ft_train"}
    exec(compile(FT_SCRIPT, str(script), "exec"), namespace)
    uninterrupted = namespace["train"](str(tmp_path / "backup_clean"))
    assert len(resumed) == len(uninterrupted)
    for a, b in zip(resumed, uninterrupted):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------
# The example and import isolation.
# ----------------------------------------------------------------------------
def test_example_runs_and_loss_falls():
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "examples", "keras_fit.py")],
        env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("classifier", "embedding"):
        losses = [float(line.split(" loss ")[1].split()[0])
                  for line in proc.stdout.splitlines()
                  if line.startswith(name + " epoch")]
        assert len(losses) == 5, proc.stdout
        assert losses[-1] < 0.6 * losses[0], (name, losses)


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(tf_adamax.keras, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_apply_takes_variables_from_a_generator():
    # The adapter reads the variable list twice (checks, then Keras).
    var = keras.Variable(np.ones((2,), "float32"), name="gen_w")
    opt = Adamax(learning_rate=0.1)
    opt.build([var])
    opt.apply([tf.ones((2,))], (v for v in [var]))
    assert int(opt.iterations.numpy()) == 1
    np.testing.assert_allclose(np.array(var), [0.9, 0.9], rtol=1e-6)


def test_many_variables_split_over_cores_match_builtin(monkeypatch):
    check_many_variables_split_match_builtin(Adamax, keras.optimizers.Adamax, keras.Variable,
                                             monkeypatch)


def test_lazy_weight_decay_is_read_at_each_step():
    check_lazy_weight_decay_is_read_at_each_step(Adamax, keras.Variable)


def test_adamax_options_set_after_a_step_match_builtin():
    check_adamax_options_set_after_a_step_match_builtin(
        Adamax, keras.optimizers.Adamax, keras.Variable)


def test_lazy_weight_decay_respects_exclusion_by_name():
    # A layer's weight: Keras's own decay matches the pattern against the
    # tf.Variable's name ("position_table/w:0"), not the Keras name ("w").
    def in_layer(value, name):
        layer = keras.layers.Layer(name=name)
        weight = layer.add_weight(shape=value.shape, initializer="zeros", name="w")
        weight.assign(value)
        return weight

    check_lazy_weight_decay_respects_exclusion(Adamax, in_layer)


def test_float64_variables_are_exact():
    check_float64_variables_are_exact(Adamax, keras.Variable)


def test_ema_with_a_variable_keras_overwrites_with_its_gradient():
    # Such a variable has no EMA slot (None); the adapter's EMA skips it,
    # as Keras's does, and the results equal the built-in's.
    results = []
    for cls in (keras.optimizers.Adamax, Adamax):
        w = keras.Variable(np.ones(2, "float32"))
        s = keras.Variable(np.zeros(2, "float32"))
        s.overwrite_with_gradient = True
        opt = cls(0.1, use_ema=True, ema_momentum=0.5)
        for _ in range(3):
            opt.apply_gradients([(tf.constant([1.0, -1.0]), w),
                                 (tf.constant([5.0, 6.0]), s)])
        average, none = opt._model_variables_moving_average
        assert none is None
        results.append([np.asarray(v.numpy()) for v in (w, s, average)])
    np.testing.assert_array_equal(results[1][1], [5.0, 6.0])
    for ours, builtin in zip(results[1], results[0]):
        np.testing.assert_allclose(ours, builtin, rtol=1e-6)


@pytest.mark.parametrize("case", ("unknown_shape", "shape_mismatch"))
def test_a_failed_first_step_builds_nothing(case):
    # The checks ran after Keras built the slots: a failed first step left
    # the optimizer built (zeroed slots, or none for a variable of unknown
    # shape, after Keras's own error), and a variable of unknown shape made
    # it unusable ("Unknown variable" at the next step).
    good = keras.Variable(np.ones(2, "float32"), name="good_w")
    if case == "unknown_shape":
        bad = tf.Variable(tf.zeros([3, 4]), shape=tf.TensorShape([None, 4]),
                          name="bad_w")
        grad = tf.ones([3, 4])
    else:
        bad = keras.Variable(np.ones((3, 4), "float32"), name="bad_w")
        grad = tf.ones([1, 4])  # would broadcast
    opt = Adamax(0.1)
    with pytest.raises(ValueError, match="bad_w"):
        opt.apply_gradients([(tf.ones([2]), good), (grad, bad)])
    assert not opt.built
    assert len(opt.variables) == 2  # iterations and learning rate only
    np.testing.assert_array_equal(np.asarray(good.numpy()), [1.0, 1.0])
    opt.apply_gradients([(tf.constant([1.0, -1.0]), good)])
    np.testing.assert_allclose(np.asarray(good.numpy()), [0.9, 1.1], rtol=1e-6)


def test_accumulated_sparse_gradient_without_dense_shape():
    # Keras 3 densifies accumulated sparse gradients, which needs a
    # dense_shape; its own optimizers then fail with an error naming no
    # variable. The adapter gives the gradient its variable's shape.
    results = []
    for dense_shape in (None, tf.constant([3, 2])):
        var = keras.Variable(np.ones((3, 2), np.float32))
        opt = Adamax(0.1, gradient_accumulation_steps=2)
        for values in ([[1.0, 2.0]], [[-3.0, 0.5]]):
            opt.apply_gradients([(tf.IndexedSlices(
                tf.constant(values), tf.constant([1]), dense_shape), var)])
        results.append(np.asarray(var.numpy()))
    assert not np.array_equal(results[0], np.ones((3, 2)))
    np.testing.assert_array_equal(results[0], results[1])


def test_a_nan_gradient_makes_the_norm_nan():
    check_nan_gradient_makes_the_norm_nan(Adamax, keras.Variable)


def test_rows_dropped_in_xla_do_not_count_in_clip_norms():
    check_dropped_rows_do_not_count_in_clip_norms(Adamax, keras.Variable)


def _apply_outcome(cls, case):
    """What `apply` does in a misuse case: its ValueError's first words, or
    the state after it (built, iterations, weights, optimizer variables)."""
    a = keras.Variable(np.ones(2, "float32"), name="apply_a")
    b = keras.Variable(np.ones(3, "float32"), name="apply_b")
    opt = cls(learning_rate=0.1)
    try:
        if case == "unbuilt":  # gradients alone, never built
            opt.apply([tf.ones(2)])
        elif case == "extra_gradients":  # more gradients than variables
            opt.build([a])
            opt.apply([tf.ones(2), tf.ones(3)])
        else:  # a first step with every layer frozen, then a real one
            opt.apply([], [])
            opt.apply([tf.ones(2), tf.ones(3)], [a, b])
    except ValueError as error:
        return str(error)[:60]
    return (opt.built, int(opt.iterations.numpy()), len(opt.variables),
            np.asarray(a.numpy()).tolist(), np.asarray(b.numpy()).tolist())


@pytest.mark.parametrize("case", ("unbuilt", "extra_gradients", "empty_first"))
def test_apply_misuse_behaves_as_keras_adamax(case):
    # The adapter took the variables as `[]` before `build` (gradients alone
    # did nothing), zipped extra gradients away (and stepped), and built on
    # an empty step (the next real one failed with "Unknown variable").
    ours = _apply_outcome(Adamax, case)
    assert ours == _apply_outcome(keras.optimizers.Adamax, case)
    if case == "empty_first":
        assert ours[:3] == (True, 1, 6)
    else:
        assert ours.startswith("When passing `grads`")
