"""Validation and resolution of Adamax hyperparameters.

Every check runs in the constructor, before any state exists, so a bad value
never leaves a half-built optimizer behind. Messages name the argument, the
value and the fix.
"""

from __future__ import annotations

import difflib
import importlib
import math
import numbers
import os
import sys
import warnings

import numpy as np
import tensorflow as tf

SPARSE_MODES = ("exact", "lazy")


def _is_number(value):
    """A Python or NumPy real number, or a 0-d NumPy array of one (what
    `np.float32(x)`, `np.array(x)` and `array.mean()` give)."""
    if isinstance(value, np.ndarray):
        return value.ndim == 0 and value.dtype.kind in "fiu"
    return isinstance(value, numbers.Real) and not isinstance(
        value, (bool, np.bool_))


def _constant_value(value):
    """The Python/NumPy value of a float or a constant scalar tensor, else None."""
    if _is_number(value):
        return float(value)
    if isinstance(value, tf.Variable):
        return None  # its value can change later: trusted as given
    if tf.is_tensor(value):
        static = tf.get_static_value(value)
        if static is not None and np.ndim(static) == 0:
            return float(static)
    return None


def _is_scalar_like(value):
    if _is_number(value):
        return True
    if tf.is_tensor(value) or isinstance(value, tf.Variable):
        return value.shape.rank == 0
    return False


def check_scalar(name, value, low=None, high=None, low_open=False,
                 high_open=True, allow_none=False):
    """Checks a scalar hyperparameter; raises ValueError naming it.

    Args:
      name: the argument name, for the message.
      value: a Python number or scalar tensor (or None if allowed).
      low, high: bounds; `low_open`/`high_open` make them strict.
      allow_none: whether None is accepted.

    Returns:
      `value` unchanged.
    """
    if value is None:
        if allow_none:
            return value
        raise ValueError(f"Invalid {name}: None. Pass a float.")
    if not _is_scalar_like(value):
        raise ValueError(
            f"Invalid {name}: {value!r}. Expected a float or a scalar tensor."
        )
    v = _constant_value(value)
    if v is None:
        return value  # a variable or non-constant tensor: trusted as given
    if not math.isfinite(v):
        raise ValueError(f"Invalid {name}: {v}. It must be a finite number.")
    interval = (
        f"{'(' if low_open else '['}{low if low is not None else '-inf'}, "
        f"{high if high is not None else 'inf'}{')' if high_open else ']'}"
    )
    if (low is not None and (v < low or (low_open and v == low))) or (
            high is not None and (v > high or (high_open and v == high))):
        raise ValueError(f"Invalid {name}: {v}. It must lie in {interval}.")
    return value


def is_schedule(learning_rate):
    """True for a Keras 3 or tf-keras `LearningRateSchedule` (duck-typed).

    Both generations' schedules are callables of the step with `get_config`;
    checking the duck type avoids importing either Keras here.
    """
    cls_names = {c.__name__ for c in type(learning_rate).__mro__}
    return "LearningRateSchedule" in cls_names


def check_learning_rate(learning_rate):
    """Validates `learning_rate`: float, scalar tensor, schedule or callable."""
    if is_schedule(learning_rate):
        return learning_rate
    if callable(learning_rate) and not (
        tf.is_tensor(learning_rate) or isinstance(learning_rate, tf.Variable)
    ):
        return learning_rate  # a zero-argument callable, read at each step
    return check_scalar("learning_rate", learning_rate, low=0.0,
                        high=None, high_open=False)


def check_sparse_mode(sparse_mode):
    if sparse_mode in SPARSE_MODES:
        return sparse_mode
    hint = difflib.get_close_matches(str(sparse_mode), SPARSE_MODES, n=1)
    did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
    raise ValueError(
        f"Invalid sparse_mode: {sparse_mode!r}. Expected one of "
        f"{', '.join(repr(m) for m in SPARSE_MODES)}.{did_you_mean}"
    )


def check_adamax(beta_1, beta_2, epsilon, sparse_mode, warn=True):
    """The checks every Adamax front end (core and adapters) shares;
    `warn=False` for re-checks that do not set `epsilon`."""
    check_sparse_mode(sparse_mode)
    check_scalar("beta_1", beta_1, low=0.0, high=1.0)
    check_scalar("beta_2", beta_2, low=0.0, high=1.0)
    check_scalar("epsilon", epsilon, low=0.0, high=None, high_open=False)
    if warn and _constant_value(epsilon) == 0:
        # Allowed, as in Keras (with nonzero gradients it is the textbook
        # update), but an all-zero gradient entry gives 0 / 0.
        warn_user(
            "epsilon=0: a weight whose gradients have all been zero so far "
            "(a row an exact sparse step does not name, a dead unit) gets "
            "0 / 0 = NaN. Use a small positive epsilon such as 1e-7 unless "
            "every gradient entry is nonzero.")


# Where a warning is not the user's code: this package, TensorFlow (and the
# code AutoGraph generates from a user's function: the warning goes to the
# line calling that function), Keras 3 and tf-keras.
_SITE = os.path.dirname(os.path.dirname(tf.__file__))
_LIBRARY_PREFIXES = (os.path.dirname(__file__) + os.sep,) + tuple(
    os.path.join(_SITE, name) + os.sep
    for name in ("tensorflow", "keras", "tf_keras"))


def _is_library(filename):
    return (filename.startswith(_LIBRARY_PREFIXES)
            or "__autograph_generated_file" in filename)


def warn_user(message, category=UserWarning):
    """`warnings.warn` at the user's line: the first caller outside this
    package, TensorFlow and Keras (a fixed `stacklevel` pointed into them
    when the warning came through a property, Keras or a `tf.function`)."""
    frame, level = sys._getframe(1), 2  # pylint: disable=protected-access
    while frame is not None and _is_library(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def check_keras_options(ema_momentum, ema_overwrite_frequency,
                        loss_scale_factor=None,
                        gradient_accumulation_steps=None):
    """The checks of the Keras 3 keyword options every front end shares
    (Keras itself lets a zero loss scale or a fractional step count through
    to the first step). Returns `(ema_overwrite_frequency,
    gradient_accumulation_steps)` as ints or None.

    A zero `ema_overwrite_frequency` or `gradient_accumulation_steps` (0,
    0.0 or False) means "off", as in Keras (it only checks a truthy value;
    configs saved by Keras may hold one).
    """
    check_scalar("ema_momentum", ema_momentum, low=0.0, high=1.0,
                 high_open=False)
    check_scalar("loss_scale_factor", loss_scale_factor, low=0.0,
                 low_open=True, high=None, allow_none=True)
    ema_overwrite_frequency, gradient_accumulation_steps = (
        None if isinstance(x, numbers.Number) and x == 0 else x
        for x in (ema_overwrite_frequency, gradient_accumulation_steps))
    return (check_positive_int("ema_overwrite_frequency",
                               ema_overwrite_frequency, 1),
            check_positive_int("gradient_accumulation_steps",
                               gradient_accumulation_steps, 2))


def check_update_options(learning_rate, weight_decay, clipnorm, clipvalue,
                         global_clipnorm):
    """The Keras 3 keyword checks every front end shares (the Keras base
    classes themselves accept a negative or NaN rate, decay or clip).

    A clip value of 0 means "no clipping", as in Keras (configs saved by
    Keras may hold it). Returns `(clipnorm, clipvalue, global_clipnorm)`
    with such zeros as None.
    """
    check_learning_rate(learning_rate)
    return check_decay_and_clips(weight_decay, clipnorm, clipvalue,
                                 global_clipnorm)


# Valid values of every option a front end lets you set after
# construction, standing in for those `check_option` is not given.
_OPTION_DEFAULTS = dict(
    beta_1=0.9, beta_2=0.999, epsilon=1e-7, sparse_mode="exact",
    weight_decay=None, clipnorm=None, clipvalue=None, global_clipnorm=None,
    ema_momentum=0.99, ema_overwrite_frequency=None, loss_scale_factor=None)


def check_option(name, value, current, warn=True):
    """A new `value` for option `name`, set after construction (core and
    adapters alike): checked as the constructor checks it, together with
    the options it interacts with (`current`, a mapping of the other
    options' values: at most one clip), and returned as the constructor
    keeps it (a zero clip or overwrite frequency is None). `warn`: whether
    an `epsilon` of 0 warns."""
    options = dict(_OPTION_DEFAULTS)
    options.update((k, v) for k, v in current.items() if k in options)
    options[name] = value
    check_adamax(options["beta_1"], options["beta_2"], options["epsilon"],
                 options["sparse_mode"], warn=warn and name == "epsilon")
    clipnorm, clipvalue, global_clipnorm = check_decay_and_clips(
        options["weight_decay"], options["clipnorm"], options["clipvalue"],
        options["global_clipnorm"])
    frequency, _ = check_keras_options(
        options["ema_momentum"], options["ema_overwrite_frequency"],
        options["loss_scale_factor"])
    return dict(clipnorm=clipnorm, clipvalue=clipvalue,
                global_clipnorm=global_clipnorm,
                ema_overwrite_frequency=frequency).get(name, value)


def check_decay_and_clips(weight_decay, clipnorm, clipvalue, global_clipnorm):
    """`check_update_options` but for the rate (for a change of one of
    these options after construction)."""
    check_scalar("weight_decay", weight_decay, low=0.0, high=None,
                 high_open=False, allow_none=True)
    clipnorm, clipvalue, global_clipnorm = (
        None if (isinstance(x, numbers.Number) and x == 0)
        or _constant_value(x) == 0 else x
        for x in (clipnorm, clipvalue, global_clipnorm))
    check_clipping(clipnorm, clipvalue, global_clipnorm)
    return clipnorm, clipvalue, global_clipnorm


def check_positive_int(name, value, minimum):
    if value is None:
        return None
    if (not isinstance(value, numbers.Integral) or isinstance(value, bool)
            or value < minimum):
        raise ValueError(
            f"Invalid {name}: {value!r}. It must be an integer >= {minimum} "
            "(or None to disable it)."
        )
    return int(value)


def check_clipping(clipnorm, clipvalue, global_clipnorm):
    """Each clip option positive, and at most one of them, as Keras 3
    requires (tf-keras refuses only `clipnorm` with `global_clipnorm`, and
    with a norm clip silently ignores `clipvalue`)."""
    if clipnorm is not None and global_clipnorm is not None:
        raise ValueError(
            f"clipnorm ({clipnorm}) and global_clipnorm ({global_clipnorm}) "
            "are mutually exclusive: set only one of them."
        )
    clips = {"clipnorm": clipnorm, "clipvalue": clipvalue,
             "global_clipnorm": global_clipnorm}
    for name, value in clips.items():
        check_scalar(name, value, low=0.0, low_open=True, high=None,
                     allow_none=True)
    given = [f"{name}={value}" for name, value in clips.items()
             if value is not None]
    if len(given) > 1:
        raise ValueError(
            f"Only one of clipnorm, clipvalue and global_clipnorm can be set "
            f"(as in Keras 3; tf-keras would silently apply only the norm "
            f"clip); got {', '.join(given)}. Keep the one you mean.")


def lazy_decay_keys(sparse_mode, accumulating, grads, variables, key,
                    use_weight_decay):
    """Keys of the variables whose weight decay the lazy kernel applies.

    Keras decays every weight before an adapter's update runs; in lazy mode
    a variable with a sparse gradient must only change in the rows the
    gradient names (as in the core), so the adapter leaves its decay out of
    Keras's and has the kernel apply it (`Hyper.weight_decay`, given at run
    time by `run_time_decay`: a compiled update traced once must follow
    later changes of `weight_decay`, as Keras's own decay does eagerly).

    Args:
      sparse_mode: the optimizer's mode.
      accumulating: Keras accumulates gradients (the accumulated update is
        dense, and Keras decays every row).
      grads, variables: the pairs of this step.
      key: maps a variable to the adapter's key for it.
      use_weight_decay: Keras's exclusion test (`_use_weight_decay`), given
        the `tf.Variable` as Keras's own decay gives it.
    """
    if sparse_mode != "lazy" or accumulating or variables is None:
        return frozenset()
    return frozenset(key(v) for g, v in zip(grads, variables)
                     if isinstance(g, tf.IndexedSlices) and use_weight_decay(v))


def run_time_decay(weight_decay):
    """`weight_decay` as the tensor a compiled update reads at each call
    (0 when it is None: `w - w * 0 * lr` is `w`)."""
    return tf.convert_to_tensor(
        0.0 if weight_decay is None else weight_decay, tf.float32)


def run_time_scalar(value):
    """`value` (a float, tensor, `tf.Variable` or Keras variable) as a
    tensor argument of a compiled update, read at each call: a new value
    neither retraces it nor is frozen in a trace. Python numbers become
    float64, which the kernels round once to the variable's dtype, as they
    round a Python float."""
    if _is_number(value):
        return tf.constant(float(value), tf.float64)
    return tf.convert_to_tensor(value)


def serialize_schedule(learning_rate):
    """A JSON-able config for a Keras 3 / tf-keras schedule.

    The schedule's own Keras generation serializes it; which one is read off
    the class's module, so neither Keras is imported unless it is in use.
    Callables other than schedules are returned as they are.
    """
    if not is_schedule(learning_rate):
        return learning_rate
    keras_module = _keras_of(type(learning_rate))
    return {
        "tf_adamax_schedule": keras_module.__name__,
        "config": keras_module.optimizers.schedules.serialize(learning_rate),
    }


def deserialize_schedule(value):
    """Inverse of `serialize_schedule` (other values pass through)."""
    if isinstance(value, dict) and "tf_adamax_schedule" in value:
        keras_module = importlib.import_module(value["tf_adamax_schedule"])
        return keras_module.optimizers.schedules.deserialize(value["config"])
    return value


def _keras_of(cls):
    """The Keras generation whose `LearningRateSchedule` `cls` derives from
    (a user's subclass lives in the user's module)."""
    bases = [c for c in cls.__mro__ if c.__name__ == "LearningRateSchedule"]
    root = bases[0].__module__.split(".")[0] if bases else cls.__module__
    if root not in ("keras", "tf_keras"):
        raise ValueError(
            f"Cannot serialize learning-rate schedule {cls.__name__} from "
            f"module {cls.__module__}: only Keras 3 and tf-keras schedules "
            "are serializable. Pass it to from_config as an object.")
    return importlib.import_module(root)
