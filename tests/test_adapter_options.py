"""Options of both Keras adapters set after construction: checked, normalised
and warned about as the constructor's arguments, and a refused value leaves
the optimizer as it was (for Keras's attribute tracking too)."""

import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_adamax.keras
import tf_adamax.tf_keras

FRONTS = {
    "keras3": (tf_adamax.keras.Adamax, keras.optimizers.Adamax, keras.Variable),
    "tf_keras": (tf_adamax.tf_keras.Adamax, tf_keras.optimizers.Adamax,
                 tf.Variable),
}


def one_step(opt, variable_type):
    var = variable_type(np.array([1.0, -2.0], "float32"))
    grad = tf.constant([0.5, -0.25])
    if isinstance(opt, keras.optimizers.Optimizer):
        opt.apply([grad], [var])
    else:
        opt.apply_gradients([(grad, var)])
    return var


def checkpoint_keys(opt, directory):
    path = tf.train.Checkpoint(opt=opt).write(os.path.join(directory, "ckpt"))
    return sorted(name for name, _ in tf.train.list_variables(path))


# Values each setter refuses, as variables (Keras tracks variables).
REFUSED = [("beta_1", [0.5, 0.5]), ("epsilon", [1e-7, 1e-7]),
           ("clipnorm", [1.0, 1.0]), ("learning_rate", [0.1, 0.1])]


@pytest.mark.parametrize("front", sorted(FRONTS))
def test_refused_variable_option_leaves_variables_and_checkpoint(front,
                                                                 tmp_path):
    # Keras tracked a variable assigned to an option before the option's
    # setter refused it: Keras 3 added it to the optimizer's variables (a
    # saved model's optimizer state then no longer loaded), tf-keras made
    # it a checkpoint child.
    cls, _, variable_type = FRONTS[front]
    opt, twin = cls(0.1), cls(0.1)
    one_step(opt, variable_type)
    one_step(twin, variable_type)
    before = list(opt.variables)
    # tf-keras's `lr` is an alias of `learning_rate` (its setter ran after
    # tf tracked the variable as a child `lr`).
    aliases = [("lr", [0.1, 0.1])] if front == "tf_keras" else []
    for name, value in REFUSED + aliases:
        old = getattr(opt, name)
        with pytest.raises(ValueError, match="learning_rate" if name == "lr"
                           else name):
            setattr(opt, name, variable_type(value))
        assert getattr(opt, name) is old
    assert len(opt.variables) == len(before)
    assert all(a is b for a, b in zip(opt.variables, before))
    assert checkpoint_keys(opt, tmp_path / "opt") == checkpoint_keys(
        twin, tmp_path / "twin")


@pytest.mark.parametrize("front", sorted(FRONTS))
def test_accepted_variable_option_is_tracked_as_by_keras_adamax(front):
    # The checks run before Keras sees the value; an accepted one Keras
    # still tracks, as it tracks one given to its own Adamax.
    ours, builtin, variable_type = FRONTS[front]
    counts = []
    for cls in (ours, builtin):
        opt = cls(0.1)
        one_step(opt, variable_type)
        before = len(opt.variables)
        beta_1 = variable_type(0.5)
        opt.beta_1 = beta_1
        assert opt.beta_1 is beta_1
        counts.append((before, len(opt.variables)))
    assert counts[0] == counts[1]


def epsilon_zero_warnings(record):
    return [w for w in record if "epsilon=0" in str(w.message)]


@pytest.mark.parametrize("front", sorted(FRONTS))
def test_epsilon_set_to_zero_warns_as_the_constructor(front):
    cls = FRONTS[front][0]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt = cls(0.1, epsilon=0.0)
    assert len(epsilon_zero_warnings(record)) == 1  # once, not per check
    assert opt.epsilon == 0.0

    opt = cls(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.epsilon = 1e-3  # nonzero: no warning
    zero = 0.0
    for _ in range(2):  # also when it already is 0 (Keras skips that set)
        with pytest.warns(UserWarning, match="epsilon=0"):
            opt.epsilon = zero
        assert opt.epsilon == 0.0


@pytest.mark.parametrize("front", sorted(FRONTS))
def test_ema_overwrite_frequency_set_to_zero_is_off(front):
    # 0 means "off" (Keras tests the value's truth), and reads back as the
    # constructor keeps it, as the core optimizer's: None.
    ours, builtin, variable_type = FRONTS[front]
    assert ours(0.1, use_ema=True,
                ema_overwrite_frequency=0).ema_overwrite_frequency is None
    results = []
    for cls in (ours, builtin):
        opt = cls(0.1, use_ema=True, ema_momentum=0.5,
                  ema_overwrite_frequency=1)
        opt.ema_overwrite_frequency = 0
        if cls is ours:
            assert opt.ema_overwrite_frequency is None
            assert opt.get_config()["ema_overwrite_frequency"] is None
            assert type(opt).from_config(
                opt.get_config()).ema_overwrite_frequency is None
        var = one_step(opt, variable_type)
        results.append(np.asarray(var))
    # Not overwritten by the average, as with Keras's Adamax.
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6)
    assert not np.allclose(results[0], [1.0, -2.0])
