"""Adamax for tf-keras (Keras 2, `tf_keras.Model.compile`), on the tf_adamax kernels.

This module imports tf-keras (`import tf_keras`) and nothing of Keras 3. It
serves Keras 2 code and `TF_USE_LEGACY_KERAS=1` users. The Adamax math lives
in `tf_adamax._math`; this adapter only translates tf-keras's (non-legacy)
optimizer protocol (`build` / `update_step`) to it. Learning-rate schedules,
clipping, weight decay, EMA, mixed-precision loss scaling and
`tf.distribute` are tf-keras's own base-class machinery.
"""

from __future__ import annotations

import json
import os
import re

import tensorflow as tf

try:
    import tf_keras
except ImportError as error:
    raise ImportError(
        f"tf_adamax.tf_keras needs tf-keras 2.21 (import tf_keras failed: "
        f'{error}). Install it with: pip install "tf-keras>=2.21,<2.22". '
        "tf_adamax.Adamax (no Keras) and tf_adamax.keras (Keras 3) work "
        "without it.") from error

from tf_adamax import _adapter
from tf_adamax import _checks
from tf_adamax import _distribute
from tf_adamax import _hyper
from tf_adamax import _math
from tf_adamax import _private

__all__ = ["Adamax", "load_model"]


@tf_keras.saving.register_keras_serializable(package="tf_adamax")
class Adamax(_adapter.KernelUpdates, tf_keras.optimizers.Optimizer):
    """Adamax (Kingma & Ba 2014, section 7.1) for tf-keras, with a lazy sparse mode.

    A drop-in replacement for `tf_keras.optimizers.Adamax` (same arguments,
    defaults, slot names and checkpoint layout) that runs the shared
    `tf_adamax` kernels.

    Update rule, for a variable `w` with gradient `g` and step
    `t = iterations + 1` (slots kept in float32 for float16/bfloat16
    variables):

    ```
    m = beta_1 * m + (1 - beta_1) * g
    u = max(beta_2 * u, |g|)
    w = w - learning_rate * m / ((1 - beta_1 ** t) * (u + epsilon))
    ```

    `epsilon` is added outside the max, as in Keras; PyTorch and optax put
    it inside (`max(beta_2 * u, |g| + eps)`) with a default of 1e-8.

    Sparse gradients (`tf.IndexedSlices`, e.g. from `tf_keras.layers.Embedding`)
    have their duplicate indices summed before `|g|` and the max (`max` is
    not linear: `+g` and `-g` for one token must give `|g - g| = 0`). Then:

    * `sparse_mode="exact"` (default): the update equals applying the
      densified gradient -- rows not in the batch still decay `m` and `u`
      and move, exactly as with a dense zero gradient.
    * `sparse_mode="lazy"`: only the rows in the batch change (their update
      is exactly the dense update of those rows, with the global step `t`);
      every other row of the variable and its slots is left untouched. Cost
      is O(rows in the batch), independent of the vocabulary size.

    Clipping of a sparse gradient sees each repeated index once, as for the
    densified gradient. In lazy mode weight decay reaches only the rows a
    sparse gradient names (the kernel applies it; tf-keras's whole-variable
    pass skips that variable).

    Args:
      learning_rate: A float, a
        `tf_keras.optimizers.schedules.LearningRateSchedule`, or a
        zero-argument callable returning the learning rate.
      beta_1: Decay rate of the first moment `m`, in [0, 1).
      beta_2: Decay rate of the infinity norm `u`, in [0, 1).
      epsilon: Small constant added to `u` for numerical stability, >= 0
        (0 warns: a weight whose gradients were all zero gets 0 / 0 = NaN).
      weight_decay: If set, decoupled weight decay `w -= w * weight_decay * lr`
        before the step (see `exclude_from_weight_decay`).
      clipnorm: If set, each gradient is clipped to this L2 norm.
      clipvalue: If set, each gradient is clipped elementwise to
        `[-clipvalue, clipvalue]`.
      global_clipnorm: If set, all gradients are clipped together to this
        global L2 norm.
      use_ema: Whether to keep an exponential moving average of the weights.
      ema_momentum: Momentum of the weight EMA.
      ema_overwrite_frequency: If set with `use_ema`, overwrite the weights
        with their EMA every this many steps.
      jit_compile: Compile the update of all variables as one XLA program
        (on any device; on CPU, a list of 64 or more variables as one
        program per core). Under a `tf.distribute` strategy or with `use_ema`,
        tf-keras's per-variable update runs instead, compiled per variable
        only when a GPU is present, as in tf-keras. (`model.compile(
        jit_compile=True)` compiles the whole train step regardless.) The
        `jit_compile` attribute reads this argument; setting it switches
        the one program, and tf-keras's per-variable compilation, as tf-keras
        switches its own.
      name: Name of the optimizer.
      sparse_mode: `"exact"` or `"lazy"`, see above.
      **kwargs: Other `tf_keras.optimizers.Optimizer` arguments; unknown
        names raise, as in tf-keras.

    Raises:
      ValueError: For an unknown `sparse_mode`; an out-of-range `beta_1`,
        `beta_2`, `epsilon`, `ema_momentum` or `ema_overwrite_frequency`; a
        negative or non-finite learning rate, weight decay or clip value, or
        more than one clip option (tf-keras would silently apply only the
        norm clip; `from_config` keeps loading such configs, see there);
        and for whatever else tf-keras rejects.

    Example:

    >>> import numpy as np, tf_keras
    >>> import tf_adamax.tf_keras
    >>> model = tf_keras.Sequential([tf_keras.layers.Dense(1, input_shape=(4,))])
    >>> model.compile(optimizer=tf_adamax.tf_keras.Adamax(1e-2), loss="mse")
    >>> history = model.fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0)

    References:
      Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2014,
      section 7.1. https://arxiv.org/abs/1412.6980
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        jit_compile=True,
        name="Adamax",
        sparse_mode="exact",
        **kwargs,
    ):
        # Validate before any variable exists: a typo leaves nothing behind.
        _hyper.check_adamax(beta_1, beta_2, epsilon, sparse_mode)
        # Zero clips (Python or constant tensor) reach Keras as None: Keras
        # would count them toward its one-clip rule, and test a tensor one
        # as a Python bool in the traced step.
        clipnorm, clipvalue, global_clipnorm = _hyper.check_update_options(
            learning_rate, weight_decay, clipnorm, clipvalue, global_clipnorm)
        ema_overwrite_frequency, _ = _hyper.check_keras_options(
            ema_momentum, ema_overwrite_frequency)
        super().__init__(
            name=name,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            jit_compile=jit_compile,
            **kwargs,
        )
        self._learning_rate = self._build_learning_rate(learning_rate)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.sparse_mode = sparse_mode
        # tf-keras set `jit_compile` (the property below) to its GPU-only
        # flag; the update of all variables is compiled as one program on
        # any device, as the argument says.
        self._jit_all = jit_compile

    # `opt.jit_compile = True` where it reads True (the default) must still
    # switch tf-keras's per-variable compilation on, as it does for tf-keras's
    # own Adamax, where it reads False without a GPU: tf-keras would skip the
    # assignment of the value the attribute holds, setter and all.
    _always_set = frozenset({"jit_compile"})

    @property
    def jit_compile(self):
        """Whether the update of all variables is compiled as one XLA
        program (the constructor's argument, as `get_config` gives it).
        Setting it switches that program on or off, and tf-keras's
        per-variable compilation (`_update_step_xla`) as it would for its
        own Adamax."""
        return self._jit_all

    @jit_compile.setter
    def jit_compile(self, jit_compile):
        # Also tf-keras's own assignment in its constructor, of its GPU-only
        # flag, which `__init__` then replaces by the argument as given.
        self._jit_all = self._keras_jit_compile = jit_compile

    def _update_step_xla(self, gradient, variable, key):
        # tf-keras's per-variable path (under a strategy, or with EMA) calls
        # this when `jit_compile` is set; it compiles where tf-keras's own
        # flag would (on a GPU, or once set by the user).
        if self._keras_jit_compile:
            return super()._update_step_xla(gradient, variable, key)
        return self._update_step(gradient, variable)

    def build(self, var_list):
        """Creates the slots `m` and `u` of each variable.

        Slots are float32 for float16/bfloat16 variables. They are created in
        the same order and under the same names (`_m`, `_u`; `m/...`,
        `u/...`) as `tf_keras.optimizers.Adamax`'s, so its checkpoints and
        saved models restore here.

        Args:
          var_list: the model variables this optimizer will update.
        """
        var_list = self._buildable(var_list)
        super().build(var_list)
        if getattr(self, "_built", False):
            return
        self._built = True
        self._m, self._u = [], []
        for variable in var_list:
            self._m.append(self._add_slot(variable, "m"))
            self._u.append(self._add_slot(variable, "u"))

    def _add_slot(self, variable, slot_name):
        # Under a mixed precision policy, variables report their cast dtype.
        true_dtype = getattr(variable, "true_dtype", variable.dtype)
        dtype = _math.compute_dtype(true_dtype)
        if dtype == true_dtype:
            return self.add_variable_from_reference(variable, slot_name)
        # add_variable_from_reference copies the variable's dtype; half
        # precision needs float32 slots, so repeat its naming and placement.
        strategy = tf.distribute.get_strategy()
        with strategy.extended.colocate_vars_with(variable):
            return self.add_variable(
                shape=variable.shape, dtype=dtype, initializer="zeros",
                name=f"{slot_name}/{variable.name.split(':')[0]}")

    def update_step(self, gradient, variable):
        """Applies one gradient to one variable with the tf_adamax kernels.

        tf-keras calls this per variable after aggregation, clipping,
        deduplication of sparse indices and weight decay; the kernels apply
        weight decay only to the named rows of a lazy sparse step, which
        tf-keras's whole-variable decay leaves out (`_apply_weight_decay`).

        Args:
          gradient: a dense tensor or a `tf.IndexedSlices`.
          variable: the model variable.
        """
        self._apply_one(gradient, variable, self.learning_rate,
                        self.iterations + 1,
                        _hyper.run_time_decay(self.weight_decay))

    def _slots_of(self, variable):
        index = self._index_dict[self._var_key(variable)]
        return variable, self._m[index], self._u[index]

    def _distributed_apply_gradients_fn(self, distribution, grads_and_vars,
                                        **kwargs):
        """Runs `update_step` for every variable in ONE XLA program (one per
        core for a long list on CPU, `_distribute.CompiledParts`).

        tf-keras (private hook) updates variable by variable, compiling each
        with XLA only when a GPU is present. With `jit_compile=True`, no
        `tf.distribute` strategy and no EMA, the updates are compiled
        together here; otherwise tf-keras's own path runs (under a strategy
        it places each update on every copy of a mirrored variable).
        """
        grads_and_vars = list(grads_and_vars)
        # The gradients were checked in `apply_gradients`, before anything
        # changed.
        if (tf.distribute.has_strategy() or not self._jit_all
                or self.use_ema):
            return super()._distributed_apply_gradients_fn(
                distribution, grads_and_vars, **kwargs)
        self._update_compiled(grads_and_vars,
                              tf.convert_to_tensor(self.learning_rate),
                              self.iterations + 1)
        # With no pairs left, tf-keras only increments `iterations` (ordered
        # after the update's read of it by TF's automatic control deps).
        return super()._distributed_apply_gradients_fn(distribution, [],
                                                       **kwargs)

    def apply_gradients(self, grads_and_vars, *args, **kwargs):
        """Applies gradients (see `tf_keras.optimizers.Optimizer`).

        Bad gradients raise naming their variable before tf-keras changes
        anything (its weight decay comes before the update); out-of-range
        sparse indices raise as with tf-keras's own optimizers, where inside
        XLA they would be dropped silently.
        """
        grads_and_vars = [(_checks.tensor_slices(g, v), v)
                          for g, v in grads_and_vars]
        grads = [g for g, _ in grads_and_vars]
        variables = [v for _, v in grads_and_vars]
        # Mirrored variables outside `strategy.run`: tf-keras would update
        # each copy with the one gradient (or fail inside XLA, or in the
        # strategy's scope on a missing merge_call) instead.
        _distribute.check_replica_context(variables)
        checks = _checks.checked_before_keras(grads, variables)
        grads = _checks.for_keras(grads, variables)  # as Keras 3's
        grads_and_vars = list(zip(grads, variables))
        self._check_known([v for g, v in grads_and_vars if g is not None])
        self._lazy_decay = _hyper.lazy_decay_keys(
            self.sparse_mode, False, grads, variables, self._var_key,
            self._use_weight_decay)
        with tf.control_dependencies(checks):
            return super().apply_gradients(grads_and_vars, *args, **kwargs)

    def _check_known(self, variables):
        """Once built, tf-keras updates only the variables it was built with;
        another one raises here, naming it, before anything changes."""
        if not getattr(self, "_built", False):
            return
        for variable in variables:
            if self._var_key(variable) not in self._index_dict:
                raise KeyError(
                    f"The optimizer cannot recognize variable "
                    f"{variable.name}: it was built for the variables of its "
                    "first step (tf-keras optimizers cannot add variables "
                    "later). Call `optimizer.build(variables)` with the full "
                    "list of trainable variables before the first step (e.g. "
                    "before freezing layers), or create a new optimizer when "
                    "the trainable variables change.")

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Creates the optimizer from `get_config()`'s output.

        A config with a norm clip and `clipvalue` (written for tf-keras, or
        saved by tf_adamax before it refused the pair) loads as tf-keras
        runs it, with the norm clip only, and a warning: a saved model must
        not become unloadable.
        """
        config = dict(config)
        if config.get("clipvalue") and (config.get("clipnorm")
                                        or config.get("global_clipnorm")):
            _hyper.warn_user(
                f"Adamax config has clipvalue={config['clipvalue']} with a "
                "norm clip; tf-keras applies only the norm clip, and so does "
                "this optimizer (clipvalue dropped).")
            config["clipvalue"] = None
        return super().from_config(config, custom_objects=custom_objects)

    def _update_model_variables_moving_average(self, var_list):
        # tf-keras's hook (private) for its weight EMA, with the average
        # taken as `_math.moving_average` does: tf-keras's two-product form
        # moved the rows a lazy step never named by a rounding each step.
        if not self.use_ema:
            return

        def update_average(average, var):
            average.assign(_math.moving_average(
                average, var, _math.as_dtype(self.ema_momentum,
                                             average.dtype)))

        for var in var_list:
            average = self._model_variables_moving_average[
                self._index_dict[self._var_key(var)]]
            self._distribution_strategy.extended.update(
                average, update_average, args=(var,), group=False)

    def aggregate_gradients(self, grads_and_vars):
        """Sums the gradients over replicas, one sum per gradient dtype
        (tf-keras packs them all into one buffer, which fails when a model
        mixes float16 and float32 variables)."""
        return _distribute.sum_pairs_per_dtype(
            super().aggregate_gradients, grads_and_vars)

    def _clip_gradients(self, grads):
        # tf-keras's hook between gradient aggregation and clipping (private,
        # but the only point where aggregated sparse gradients can be
        # prepared before tf-keras clips their rows one by one).
        if (self.clipnorm is not None or self.clipvalue is not None
                or self.global_clipnorm is not None):
            grads = [_math.merge_duplicates(g) if isinstance(g, tf.IndexedSlices)
                     else g for g in grads]
        return super()._clip_gradients(grads)

    def _deduplicate_sparse_grad(self, grads):
        # tf-keras's hook (private) that sums repeated sparse indices with
        # tf.unique before update_step. The kernels sum them themselves with
        # static shapes; tf.unique's data-dependent shape is padded under
        # XLA (`compile(jit_compile=True)`), and the lazy kernel then
        # scatters wrong rows. So pass the gradients through unchanged.
        return list(grads)

    def get_config(self):
        """Returns every constructor argument (serializable)."""
        config = super().get_config()
        config.update({
            "learning_rate": self._serialize_hyperparameter(
                self._learning_rate),
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "sparse_mode": self.sparse_mode,
            # The argument as given (tf-keras stores its GPU-only flag).
            "jit_compile": self._jit_all,
        })
        return config


def load_model(filepath, **kwargs):
    """`tf_keras.models.load_model` that also restores optimizer state.

    For `.keras` files this is `tf_keras.models.load_model` itself. For a
    SavedModel directory, tf-keras re-creates the optimizer from its config
    but restores none of its state (for every optimizer, its own Adamax
    included); the state is in the SavedModel's checkpoint, keyed by object,
    and is read back here, the optimizer built first so that its slots are
    in place at once (a model saved again before training keeps them).

    An HDF5 file whose optimizer is this Adamax inside a `LossScaleOptimizer`
    (as `compile` wraps it under a `mixed_float16` policy) loads here, where
    `tf_keras.models.load_model` fails: its HDF5 loader finds the wrapped
    optimizer by class name, lower-cased, which is the built-in Adamax's
    ("adamax"), and ignores the registered name that tells them apart. As
    with the built-in Adamax in that wrapper, tf-keras then restores the
    model but not the optimizer's state (it logs "Error in loading the
    saved optimizer state"); save `.keras` files to keep it.

    Args:
      filepath: a `.keras` or `.h5` file (a path or an open `h5py.File`),
        or a SavedModel directory.
      **kwargs: passed to `tf_keras.models.load_model`.

    Returns:
      The model, its optimizer's iterations and slots restored (but from an
      HDF5 file with a `LossScaleOptimizer`, see above).
    """
    if _wraps_this_adamax_in_hdf5(filepath):
        with tf_keras.utils.custom_object_scope({"adamax": Adamax}):
            return tf_keras.models.load_model(filepath, **kwargs)
    model = tf_keras.models.load_model(filepath, **kwargs)
    path = _path_of(filepath)
    if path is None:
        return model
    checkpoint = os.path.join(path, "variables", "variables")
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and tf.io.gfile.exists(checkpoint + ".index"):
        # Built first, so the slots are read into place now: tf-keras only
        # queues the values of slots that do not exist yet, and a model saved
        # again before training would hold none of them.
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        if not getattr(inner, "_built", False):
            inner.build(model.trainable_variables)
        mismatch = _slots_for_other_variables(
            _private.saved_optimizer_variable_names(path),
            [v.name for v in inner.variables])
        if mismatch:
            # tf-keras restores slots by position: read into the slots of
            # other variables they would fail on a shape, or worse, load.
            _hyper.warn_user(
                f"Skipping the optimizer state of {path}: it was saved for "
                f"other trainable variables ({mismatch}; layers frozen or "
                "unfrozen after the optimizer was built?), and tf-keras "
                "restores slots by position. The model's weights are "
                "loaded; the optimizer starts afresh. To keep its state, "
                "save with the layers' `trainable` as it was when the "
                "optimizer was built.")
        else:
            tf.train.Checkpoint(model).read(checkpoint).expect_partial()
    return model


def _slots_for_other_variables(saved, built):
    """A description of where the saved optimizer variable names differ
    from the built optimizer's (saved names may carry the optimizer's name
    scope), or "" when they agree or the saved ones are unknown."""
    if saved is None or len(saved) <= 1:
        return ""  # unknown, or saved before the first step: no slots
    built = [re.sub(r":\d+$", "", name) for name in built]
    if len(saved) != len(built):
        return f"{len(saved)} variables saved, {len(built)} now"
    for old, new in zip(saved, built):
        if old != new and not old.endswith("/" + new):
            return f"saved {old!r} where the optimizer now has {new!r}"
    return ""


def _path_of(filepath):
    """`filepath` as a str path, or None for what is not a path (an open
    `h5py.File`, which tf-keras loads as it is)."""
    try:
        path = os.fspath(filepath)
    except TypeError:
        return None
    return path if isinstance(path, str) else None


def _wraps_this_adamax_in_hdf5(filepath):
    """Whether `filepath` is an HDF5 model whose optimizer config holds this
    Adamax below its top level (inside a `LossScaleOptimizer`)."""
    import h5py  # a tf-keras dependency

    if isinstance(filepath, h5py.File):  # tf-keras loads an open file too
        config = filepath.attrs.get("training_config")
    else:
        path = _path_of(filepath)
        if not (path is not None and tf.io.gfile.exists(path)
                and not tf.io.gfile.isdir(path) and h5py.is_hdf5(path)):
            return False
        with h5py.File(path, "r") as f:
            config = f.attrs.get("training_config")
    if config is None:
        return False
    if isinstance(config, bytes):
        config = config.decode("utf-8")
    optimizer = json.loads(config).get("optimizer_config") or {}
    name = tf_keras.saving.get_registered_name(Adamax)
    return any(_names(value, name)
               for value in (optimizer.get("config") or {}).values())


def _names(config, registered_name):
    """Whether a (nested) config holds an object of `registered_name`."""
    if not isinstance(config, dict):
        return False
    return config.get("registered_name") == registered_name or any(
        _names(value, registered_name) for value in config.values())
