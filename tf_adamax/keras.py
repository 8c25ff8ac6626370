"""Adamax for Keras 3 (`keras.Model.compile`), on the tf_adamax kernels.

This module imports Keras 3 (`import keras`, TensorFlow backend) and nothing
of tf-keras. The Adamax math lives in `tf_adamax._math`; this adapter only
translates Keras 3's optimizer protocol (`build` / `update_step`) to it.
Everything else Keras 3 users rely on -- learning-rate schedules, clipping,
decoupled weight decay, EMA, gradient accumulation, `loss_scale_factor`,
the `LossScaleOptimizer` that mixed precision adds, `tf.distribute` -- is
Keras 3's own base-class machinery, used as is; the adapter only prepares
sparse gradients for it (`Adamax.apply`).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_adamax import _adapter
from tf_adamax import _checks
from tf_adamax import _distribute
from tf_adamax import _hyper
from tf_adamax import _math

__all__ = ["Adamax"]


def _tf_variable(variable):
    """The `tf.Variable` behind a Keras 3 variable (or `variable` itself)."""
    if isinstance(variable, keras.Variable):
        return variable.value
    return variable


class _DivisibleSlices(tf.IndexedSlices):
    """An IndexedSlices that Keras 3 can unscale.

    `Optimizer.apply` divides every gradient by `loss_scale_factor` with `/`,
    which `tf.IndexedSlices` does not support (a TypeError for any Keras 3
    optimizer). Dividing the values keeps the gradient sparse.
    """

    def __truediv__(self, scale):
        return tf.IndexedSlices(self.values / tf.cast(scale, self.values.dtype),
                                self.indices, self.dense_shape)


@keras.saving.register_keras_serializable(package="tf_adamax")
class Adamax(_adapter.KernelUpdates, keras.optimizers.Optimizer):
    """Adamax (Kingma & Ba 2014, section 7.1) for Keras 3, with exact sparse updates.

    A drop-in replacement for `keras.optimizers.Adamax` (same arguments,
    defaults, slot names and saved-variable order) that runs the shared
    `tf_adamax` kernels and treats sparse gradients correctly.

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

    Sparse gradients (`tf.IndexedSlices`, e.g. from `keras.layers.Embedding`)
    always have their duplicate indices summed before `|g|` and the max:
    `max` is not linear, so a token seen twice in a batch with gradients
    `+g` and `-g` must contribute `|g - g| = 0`, not `|g| + |g|`.
    (`keras.optimizers.Adamax` takes `|g|` per repeated row.) Then:

    * `sparse_mode="exact"` (default): the update equals applying the
      densified gradient -- rows not in the batch still decay `m` and `u`
      and move, exactly as with a dense zero gradient.
    * `sparse_mode="lazy"`: only the rows in the batch change (their update
      is exactly the dense update of those rows, with the global step `t`);
      every other row of the variable and its slots is left untouched. Cost
      is O(rows in the batch), independent of the vocabulary size.

    Clipping, weight decay, EMA, gradient accumulation and loss scaling are
    Keras 3's and behave as for any Keras 3 optimizer, with sparse gradients
    too: clipping sees each repeated index once, as for the densified
    gradient, and `loss_scale_factor` divides them (which Keras 3's own
    optimizers fail to do). In lazy mode weight decay reaches only the rows
    a sparse gradient names (the kernel applies it; Keras's whole-variable
    pass skips that variable). Keras accumulates gradients in dense
    buffers, so with `gradient_accumulation_steps` every update is dense,
    and decays every row (`t` then counts updates, not calls, as in
    `keras.optimizers.Adamax`).

    Without a `tf.distribute` strategy the updates of all variables run as
    one XLA program (on CPU, a list of 64 or more as one program per core),
    also when `fit` itself is not compiled; under a strategy Keras's
    per-variable updates run.

    Args:
      learning_rate: A float, a `keras.optimizers.schedules.LearningRateSchedule`,
        or a zero-argument callable returning the learning rate.
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
      loss_scale_factor: If set, the loss is multiplied and the gradients
        divided by it.
      gradient_accumulation_steps: If an int >= 2, update every this many
        steps with the mean of the accumulated gradients (0 or None: off).
      name: Name of the optimizer (prefix of its variables' names); by
        default "adamax", numbered ("adamax_1", ...) as Keras numbers the
        built-in's.
      sparse_mode: `"exact"` or `"lazy"`, see above.
      **kwargs: Other `keras.optimizers.Optimizer` arguments; unknown
        names raise, as in Keras.

    Raises:
      ValueError: For an unknown `sparse_mode`; an out-of-range `beta_1`,
        `beta_2`, `epsilon`, `ema_momentum` or `ema_overwrite_frequency`; a
        negative or non-finite learning rate, weight decay or clip value, or
        more than one clip option; a `loss_scale_factor` <= 0; a
        `gradient_accumulation_steps` that is not 0, None or an integer >= 2
        (and for whatever else Keras 3 rejects).

    Example:

    >>> import keras, numpy as np
    >>> import tf_adamax.keras
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer=tf_adamax.keras.Adamax(1e-2), loss="mse")
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
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name=None,
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
        ema_overwrite_frequency, gradient_accumulation_steps = (
            _hyper.check_keras_options(
                ema_momentum, ema_overwrite_frequency, loss_scale_factor,
                gradient_accumulation_steps))
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            name=name,
            **kwargs,
        )
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.sparse_mode = sparse_mode

    def build(self, var_list):
        """Creates the slots `momentum` (m) and `norm` (u) of each variable.

        Slots are float32 for float16/bfloat16 variables. They are created in
        the same order and under the same attribute names (`_m`, `_u`) as
        `keras.optimizers.Adamax`'s, so its saved optimizer state loads here.

        Args:
          var_list: the model variables this optimizer will update.
        """
        if self.built:
            return
        var_list = self._buildable(var_list)
        super().build(var_list)
        self._m, self._u = [], []
        for variable in var_list:
            if getattr(variable, "overwrite_with_gradient", False):
                # Keras assigns these variables their gradient; no slots.
                self._m.append(None)
                self._u.append(None)
                continue
            self._m.append(self._add_slot(variable, "momentum"))
            self._u.append(self._add_slot(variable, "norm"))

    def _add_slot(self, variable, slot_name):
        if tf.distribute.has_strategy():
            return self._new_slot(variable, slot_name)
        # Without a strategy Keras's colocation is lost when the slot is
        # created inside a tf.function (the first train step): on the
        # variable's device, the compiled update can reach both.
        with tf.device(_tf_variable(variable).device or None):
            return self._new_slot(variable, slot_name)

    def _new_slot(self, variable, slot_name):
        dtype = _math.compute_dtype(variable.dtype)
        if dtype == tf.as_dtype(variable.dtype):
            return self.add_variable_from_reference(variable, name=slot_name)
        # add_variable_from_reference copies the variable's dtype; half
        # precision needs float32 slots, so repeat its naming and placement.
        # `_distribution_strategy` is the strategy Keras 3's TF optimizer
        # captured at construction (and colocates its own slots under).
        path = getattr(variable, "path", variable.name)
        name = f"{str(path).replace('/', '_').replace(':', '_')}_{slot_name}"
        with self._distribution_strategy.extended.colocate_vars_with(
                _tf_variable(variable)):
            return self.add_variable(shape=variable.shape, dtype=dtype.name,
                                     name=name)

    def update_step(self, gradient, variable, learning_rate):
        """Applies one gradient to one variable with the tf_adamax kernels.

        Keras 3 calls this per variable (through `strategy.extended.update`
        under `tf.distribute`) after loss-scale division, gradient
        accumulation, clipping and weight decay; the kernels apply weight
        decay only to the named rows of a lazy sparse step, which Keras's
        whole-variable decay leaves out (`_apply_weight_decay`).

        Args:
          gradient: a dense tensor or a `tf.IndexedSlices`.
          variable: the model variable (`tf.Variable` or `keras.Variable`).
          learning_rate: this step's learning rate.
        """
        self._apply_one(gradient, variable, learning_rate,
                        tf.cast(self.iterations, tf.int64) + 1,
                        _hyper.run_time_decay(self.weight_decay))

    def _slots_of(self, variable):
        index = self._get_variable_index(variable)
        return (_tf_variable(variable), _tf_variable(self._m[index]),
                _tf_variable(self._u[index]))

    def _distributed_tf_update_step(self, distribution, grads_and_vars,
                                    learning_rate):
        """Runs `update_step` for every variable in ONE XLA program (one per
        core for a long list on CPU, `_distribute.CompiledParts`).

        Keras 3 (private hook of its TensorFlow optimizer) runs the updates
        variable by variable, as separate TF ops unless the whole train step
        is compiled. Without a `tf.distribute` strategy they are compiled
        together here instead; under a strategy Keras's own per-variable
        `extended.update` path is kept (it places each update on every copy
        of a mirrored variable).
        """
        # The gradients were checked in `apply`, before anything changed.
        if tf.distribute.has_strategy():
            return super()._distributed_tf_update_step(
                distribution, grads_and_vars, learning_rate)
        self._update_compiled(grads_and_vars,
                              tf.convert_to_tensor(_tf_variable(learning_rate)),
                              tf.cast(self.iterations, tf.int64) + 1)

    def apply(self, grads, trainable_variables=None):
        """Applies gradients (see `keras.optimizers.Optimizer.apply`).

        Bad gradients raise naming their variable before Keras changes
        anything (its weight decay and gradient accumulation come before
        the update); out-of-range sparse indices raise as with Keras's own
        optimizers, where inside XLA they would be dropped silently. With
        `loss_scale_factor`, sparse gradients are made divisible for Keras
        3's unscaling; one without `dense_shape` gets its variable's.
        """
        grads = [_checks.tensor_slices(g) for g in grads]
        if not grads:
            # Keras returns at once, building nothing (a step with every
            # layer frozen must leave the optimizer buildable).
            return super().apply(grads, trainable_variables)
        if trainable_variables is not None:
            variables = trainable_variables = list(trainable_variables)
        elif self.built and len(grads) == len(
                self._trainable_variables_indices):
            variables = self._trainable_variables
        else:
            # Gradients alone before `build`, or not one per built
            # variable: Keras's own ValueError, on Keras's own test.
            return super().apply(grads)
        _distribute.check_replica_context(variables)
        checks = _checks.checked_before_keras(grads, variables)
        if not self.built:
            # As Keras's `apply` would, but outside the checks' control
            # dependencies: slots created under them could not be lifted
            # out of the train function (XLA refuses such a function).
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
        grads = _checks.for_keras(grads, variables)
        self._lazy_decay = _hyper.lazy_decay_keys(
            self.sparse_mode, bool(self.gradient_accumulation_steps), grads,
            variables, self._var_key,
            lambda v: self._use_weight_decay(_tf_variable(v)))
        if self.loss_scale_factor is not None:
            grads = [_DivisibleSlices(g.values, g.indices, g.dense_shape)
                     if isinstance(g, tf.IndexedSlices) else g for g in grads]
        with tf.control_dependencies(checks):
            return super().apply(grads, trainable_variables)

    def _update_model_variables_moving_average(self, trainable_variables):
        # Keras 3's hook (private) for its weight EMA, with the average
        # taken as `_math.moving_average` does: Keras's two-product form
        # moves the rows a lazy step never named by a rounding now and then.
        if not self.use_ema:
            return
        for var, average in zip(trainable_variables,
                                self._model_variables_moving_average):
            if average is None:
                continue
            dtype = tf.as_dtype(average.dtype)
            average.assign(_math.moving_average(
                tf.convert_to_tensor(average), tf.cast(var, dtype),
                _math.ema_momentum(self.ema_momentum, self.iterations,
                                   dtype)))

    def _clips(self):
        # Zero clips reach Keras as None, and negative ones are refused (the
        # constructor and the setters, `_adapter.KernelUpdates`).
        return any(x is not None for x in (
            self.clipnorm, self.clipvalue, self.global_clipnorm))

    def _sums_before_clipping(self):
        """In a replica context of a strategy, with clipping: Keras 3 clips
        each replica's gradients and then sums them, so a replica's share
        is clipped instead of the summed gradient (its built-in optimizers
        too). Here the gradients are summed over replicas first, as tf-keras
        and the core do, and Keras's own sum is skipped."""
        return (self._clips() and tf.distribute.has_strategy()
                and tf.distribute.get_replica_context() is not None)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        # Keras 3's hook (private): the sum over replicas before the update.
        if self._sums_before_clipping():  # already summed, before clipping
            return list(grads_and_vars)
        # One sum per gradient dtype (`_distribute.sum_per_dtype`).
        return _distribute.sum_pairs_per_dtype(
            super()._all_reduce_sum_gradients, grads_and_vars)

    def _sum_over_replicas(self, grads):
        def sum_fn(part):
            present = [g for g in part if g is not None]
            summed = iter(tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, present) if present else [])
            return [None if g is None else next(summed) for g in part]
        return _distribute.sum_per_dtype(sum_fn, list(grads),
                                         _distribute.dtype_or_none)

    def _clip_gradients(self, grads):
        # Keras 3's hook (private) for clipping. Its global-norm clipping
        # multiplies each gradient by a scale, which turns an IndexedSlices
        # into a dense table-sized tensor (and lazy updates into dense
        # ones). Its clipping is applied to the sparse gradients' values
        # instead, once repeated indices are summed (those of every replica
        # under a strategy), so norms and elementwise clips over the values
        # equal those of the densified gradient.
        if self._sums_before_clipping():
            grads = self._sum_over_replicas(grads)
        sparse = [isinstance(g, tf.IndexedSlices) for g in grads]
        if not self._clips() or not any(sparse):
            return super()._clip_gradients(grads)
        grads = [_math.merge_duplicates(g) if s else g
                 for g, s in zip(grads, sparse)]
        clipped = super()._clip_gradients(
            [g.values if s else g for g, s in zip(grads, sparse)])
        return [tf.IndexedSlices(c, g.indices, g.dense_shape) if s else c
                for c, g, s in zip(clipped, grads, sparse)]

    def get_config(self):
        """Returns every constructor argument (serializable)."""
        config = super().get_config()
        config.update({
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "sparse_mode": self.sparse_mode,
        })
        return config
