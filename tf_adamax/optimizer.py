"""`tf_adamax.Adamax`: the core optimizer, a `tf.Module` with no Keras.

The class owns state (iterations, learning rate, slots), distribution and
compilation. The math lives in `_math` (kernels) and `_step` (one step over a
list of variables); the strategy glue in `_distribute`.
"""

from __future__ import annotations

import copy
import json
import re

from google.protobuf import wrappers_pb2

import tensorflow as tf

from tf_adamax import _checks
from tf_adamax import _distribute
from tf_adamax import _hyper
from tf_adamax import _math
from tf_adamax import _private
from tf_adamax import _slots
from tf_adamax import _step
from tf_adamax._untracked import Untracked


class Adamax(tf.Module):
    """Adamax (Kingma & Ba, 2014, section 7.1) for TensorFlow, Keras-free.

    With gradient `g`, step `t = iterations + 1`, first moment `m` and
    infinity norm `u` (slots "momentum" and "norm", zero-initialised):

        m = beta_1 * m + (1 - beta_1) * g
        u = max(beta_2 * u, |g|)
        w = w - learning_rate * m / ((1 - beta_1 ** t) * (u + epsilon))

    `epsilon` is added to `u` outside the max, as in Keras; PyTorch and optax
    put it inside (`max(beta_2 * u, |g| + eps)`) with a default of 1e-8.

    Sparse gradients (`tf.IndexedSlices`) follow `sparse_mode`:
      * "exact": identical to applying the densified gradient (duplicate
        indices summed before |g| and max). Every row's moments decay.
      * "lazy": only the rows named in `indices` change, each getting exactly
        the dense update of that row (duplicates summed, global t); the cost
        is O(nnz * row size), independent of the table size.

    Slots are float32 for float16/bfloat16 variables. With
    `jit_compile=True` the update of all variables in one call is a single
    XLA program (one per device under a strategy), traced once.

    Args:
      learning_rate: float, scalar tensor/variable, a Keras 3 or tf-keras
        `LearningRateSchedule` (called with the number of calls), or a
        zero-argument callable returning the rate.
      beta_1: decay of the first moment, in [0, 1).
      beta_2: decay of the infinity norm, in [0, 1).
      epsilon: added to the norm for stability, >= 0 (0 warns: a weight
        whose gradients were all zero would become 0 / 0 = NaN).
      weight_decay: decoupled weight decay `w -= w * weight_decay * lr`
        before the step (lazy mode: on the named rows only).
      clipnorm: clip each gradient to this L2 norm (0 or None: off, as in
        Keras).
      clipvalue: clip each gradient element to [-clipvalue, clipvalue] (0
        or None: off).
      global_clipnorm: clip all gradients to this joint L2 norm (0 or None:
        off).
      use_ema: keep an exponential moving average of the weights.
      ema_momentum: the EMA's momentum.
      ema_overwrite_frequency: every this many steps, copy the EMA into the
        weights; None (or 0, as in Keras) copies only in
        `finalize_variable_values`.
      loss_scale_factor: gradients are divided by it (the loss is multiplied
        by it in `minimize` / `scale_loss`).
      gradient_accumulation_steps: update every N calls with the mean of the
        N gradients (0 or None: off, as in Keras). `iterations` then
        counts updates (calls // N), as Keras 3 reports it, so that
        t = iterations + 1 still holds; a schedule is called with the
        number of calls, as in Keras 3. Sparse gradients are
        accumulated densely.
      sparse_mode: "exact" or "lazy", see above.
      jit_compile: compile the update with XLA.
      name: the module name.

    Raises:
      ValueError: for an invalid hyperparameter; the message names it.

    Example:

    >>> import tensorflow as tf, tf_adamax
    >>> w = tf.Variable([1.0, 2.0])
    >>> opt = tf_adamax.Adamax(learning_rate=0.1)
    >>> _ = opt.minimize(lambda: tf.reduce_sum(w ** 2), [w])
    >>> [round(float(x), 4) for x in w.numpy()]
    [0.9, 1.9]

    References:
      Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2014,
      https://arxiv.org/abs/1412.6980 (section 7.1, AdaMax).
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
        sparse_mode="exact",
        jit_compile=True,
        name="adamax",
    ):
        # A Keras 3 variable is read through the tf.Variable it wraps (as a
        # tf.function argument it cannot be traced).
        beta_1, beta_2, epsilon = (_distribute.unwrap(x)
                                   for x in (beta_1, beta_2, epsilon))
        _hyper.check_adamax(beta_1, beta_2, epsilon, sparse_mode)
        clipnorm, clipvalue, global_clipnorm = _hyper.check_update_options(
            learning_rate, weight_decay, clipnorm, clipvalue, global_clipnorm)
        ema_overwrite_frequency, gradient_accumulation_steps = (
            _hyper.check_keras_options(
                ema_momentum, ema_overwrite_frequency, loss_scale_factor,
                gradient_accumulation_steps))
        if not isinstance(jit_compile, bool):
            raise ValueError(
                f"Invalid jit_compile: {jit_compile!r}. Pass True or False.")
        super().__init__(name=name)

        config = _step.StepConfig(
            beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
            weight_decay=weight_decay, clipnorm=clipnorm, clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            use_ema=bool(use_ema), ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            sparse_mode=sparse_mode,
        )
        self._jit_compile = jit_compile
        # Plain Python state lives in an untracked holder: tf.Module would
        # otherwise wrap tuples and functions as checkpoint dependencies.
        self._fns = Untracked(
            shared=("strategy", "update"),
            config=config,
            strategy=_distribute.current_strategy(),
            update=_new_update(jit_compile),
            warned_none=False,
            traced=False,  # a step was traced in a tf.function
            # Weakly: an excluded variable is freed with its model.
            excluded=_slots.ExcludedVariables(),
            new_averages=set(),  # var keys; see `add_slot`
            exclude_names=(),
            sharded_slots={},  # (shard keys, slot name) -> ShardedVariable
            lr_checkpoint=None,  # see `_trackable_children`
        )
        # Calls to apply_gradients (Keras 3's `_iterations`), and with
        # accumulation the updates, calls // N: what `iterations` reports.
        self._iterations = _distribute.create_state(
            self._strategy, 0, "iteration", tf.int64)
        self._updates = None if gradient_accumulation_steps is None else \
            _distribute.create_state(self._strategy, 0, "updates", tf.int64)
        self._lr_source = None  # a schedule or callable, else None
        self._learning_rate = None  # the variable holding a constant rate
        self._set_lr(learning_rate)
        self._slots = _slots.SlotTable()

    def __setstate__(self, state):
        # A deep copy or an unpickled optimizer. No tf.function has traced a
        # step of this new object. Pickle leaves out the strategy and the
        # compiled update (`Untracked`): this process's current strategy
        # and a new update; a deep copy shares both.
        self.__dict__.update(state)
        # A shallow copy shares the holder: the original keeps its flag.
        self._fns = copy.copy(self._fns)
        self._fns.traced = False
        if not hasattr(self._fns, "strategy"):
            self._fns.strategy = _distribute.current_strategy()
            self._fns.update = _new_update(self._jit_compile)

    def __setattr__(self, name, value):
        # A property (an option, the rate) is set through its setter only:
        # tf.Module's `__setattr__` would first track a tf.Variable given to
        # it as a checkpoint child, even one the setter then refuses.
        if isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ------------------------------------------------------------------
    # Hyperparameters
    # ------------------------------------------------------------------
    def _set_lr(self, learning_rate):
        # A Keras 3 variable: its tf.Variable, read at each step (a copy of
        # its value would not see a later assign).
        learning_rate = _hyper.check_learning_rate(
            _distribute.unwrap(learning_rate))
        self._check_lr_change(learning_rate)
        if isinstance(learning_rate, tf.Variable):
            self._lr_source = None
            self._learning_rate = learning_rate  # the caller's: not ours
            self._owns_lr = False
        elif _hyper.is_schedule(learning_rate) or callable(learning_rate):
            self._lr_source = learning_rate
        elif self._learning_rate is not None and not self._user_lr_var():
            self._lr_source = None
            self._learning_rate.assign(
                _math.as_dtype(learning_rate, self._learning_rate.dtype))
        else:
            self._lr_source = None
            self._learning_rate = _distribute.create_state(
                self._strategy, _math.as_dtype(
                    learning_rate,
                    _distribute.state_float_dtype(self._strategy)),
                "learning_rate",
                _distribute.state_float_dtype(self._strategy))
            self._owns_lr = True

    def _user_lr_var(self):
        return not getattr(self, "_owns_lr", False)

    def _check_lr_change(self, learning_rate):
        """Refuses a new rate a traced step would not see.

        A tf.function that already ran a step reads the rate it was traced
        with: the optimizer's own rate variable (so assigning a float to it
        is seen), or the schedule, callable or user variable of that time.
        Replacing any of those after such a trace would be silently ignored
        by that function, so it raises instead (eagerly anything goes).
        """
        if not self._fns.traced:
            return
        current = (self._lr_source if self._lr_source is not None
                   else self._learning_rate)
        if learning_rate is current:
            return  # the same object: nothing changes
        if self._lr_source is not None:
            was = _kind(self._lr_source)
            fix = ("To change the rate during training, construct the "
                   "optimizer with a float (or your own tf.Variable) instead.")
        elif self._user_lr_var():
            was = "your tf.Variable"
            fix = ("To change it, assign to your variable "
                   "(`variable.assign(new_rate)`); the traced step reads it.")
        elif _kind(learning_rate) == "a float":
            return  # assigned to the variable the traced step reads
        else:
            was = "a float"
            fix = ("To change it during training, set another float: it is "
                   "assigned to the rate variable the traced step reads.")
        raise _ignored_after_trace(
            f"learning_rate to {_kind(learning_rate)}",
            f"reading the current rate ({was})",
            f"{fix} Or create a new optimizer (and function).")

    @property
    def learning_rate(self):
        """The learning rate of the next step (a scalar tensor)."""
        return self._lr_at(self._iterations)

    @learning_rate.setter
    def learning_rate(self, value):
        self._set_lr(value)

    def _lr_at(self, iteration, lr_var=None):
        if self._lr_source is not None:
            if _hyper.is_schedule(self._lr_source):
                return tf.convert_to_tensor(self._lr_source(iteration))
            return tf.convert_to_tensor(self._lr_source())
        var = self._learning_rate if lr_var is None else lr_var
        return var.read_value() if isinstance(var, tf.Variable) else var

    @property
    def iterations(self):
        """The number of steps so far, t - 1 of the next step (an int64
        variable): `apply_gradients` calls, or with
        `gradient_accumulation_steps=N` the updates (calls // N), as Keras 3
        reports them."""
        self._sync_updates()
        return self._counter()

    def _counter(self):
        return self._iterations if self._updates is None else self._updates

    def _sync_updates(self):
        """Eagerly, sets the update counter from the call counter, which a
        checkpoint restore may have changed (from a run with another N, or
        none) without it. Steps keep it in sync themselves."""
        if (self._updates is not None and tf.executing_eagerly()
                and not _distribute.in_replica_context()
                # Not while `tf.saved_model.load` revives the optimizer,
                # before its counters hold their values.
                and _distribute.holds_value(self._iterations)):
            self._set_updates()

    def _set_updates(self):
        self._updates.assign(
            self._iterations.read_value()
            // self._config.gradient_accumulation_steps, read_value=False)

    @property
    def _config(self):
        return self._fns.config

    @property
    def _strategy(self):
        return self._fns.strategy

    def _set_option(self, name, value):
        """Sets a settable step option (see `_option`), validated as the
        constructor validates it (`_hyper.check_option`); eagerly, or before any tf.function applied a step (a
        traced step keeps the value it was traced with). A refused value
        leaves the old one."""
        value = _hyper.check_option(name, _distribute.unwrap(value),
                                    self._config._asdict())
        config = self._config._replace(**{name: value})
        current = getattr(self._config, name)
        same = value is current or (
            isinstance(value, (int, float)) and isinstance(current, (int, float))
            and value == current)
        if self._fns.traced and not same:
            raise _ignored_after_trace(
                name, f"the value it was traced with ({current!r})",
                "Create a new optimizer (`Adamax.from_config({**optimizer."
                f"get_config(), {name!r}: {value!r}}})`) and function, or "
                "pass a tf.Variable for a value that changes during "
                "training and assign it.")
        self._fns.config = config

    def _fixed_option(self, name, value):
        raise AttributeError(
            f"{name} is fixed when the optimizer is created (it decides the "
            f"optimizer's state or program). Create a new one: "
            f"`Adamax.from_config({{**optimizer.get_config(), {name!r}: "
            f"{value!r}}})`.")

    def _option(name, doc, settable=True):  # pylint: disable=no-self-argument
        """A property reading the step config's `name`; its setter is
        `_set_option`, or refuses (`_fixed_option`)."""
        return property(
            lambda self: getattr(self._config, name),
            (lambda self, v: self._set_option(name, v)) if settable
            else (lambda self, v: self._fixed_option(name, v)),
            doc=doc)

    beta_1 = _option("beta_1", "Decay of the first moment.")
    beta_2 = _option("beta_2", "Decay of the infinity norm.")
    epsilon = _option("epsilon", "Added to the norm for stability.")
    weight_decay = _option("weight_decay", "Decoupled weight decay, or None.")
    clipnorm = _option("clipnorm", "Per-variable gradient norm clip, or None.")
    clipvalue = _option("clipvalue", "Gradient value clip, or None.")
    global_clipnorm = _option("global_clipnorm",
                              "Clip of the norm of all gradients, or None.")
    loss_scale_factor = _option("loss_scale_factor",
                                "Gradients are divided by it, or None.")
    ema_momentum = _option("ema_momentum", "Momentum of the weights' EMA.")
    ema_overwrite_frequency = _option(
        "ema_overwrite_frequency",
        "Steps between overwrites of the weights by their EMA, or None.")
    use_ema = _option("use_ema", "Whether an EMA of the weights is kept "
                      "(fixed at construction).", settable=False)
    gradient_accumulation_steps = _option(
        "gradient_accumulation_steps",
        "Calls per update, or None (fixed at construction).", settable=False)
    sparse_mode = _option("sparse_mode", '`"exact"` or `"lazy"`: how '
                          "`IndexedSlices` are applied (fixed at "
                          "construction).", settable=False)
    del _option

    @property
    def jit_compile(self):
        """Whether the update runs as one XLA program per call (fixed at
        construction)."""
        return self._jit_compile

    @jit_compile.setter
    def jit_compile(self, value):
        self._fixed_option("jit_compile", value)

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Excludes variables from weight decay: those in `var_list`, and
        those whose name (`tf.Variable.name`) a pattern of `var_names`
        matches (`re.search`, as in Keras).

        Call before the first step, as in Keras.
        """
        for v in _distribute.expand(var_list or ()):
            self._fns.excluded.add(v)
        self._fns.exclude_names = tuple(var_names or ())

    def _decays(self, var):
        if self._config.weight_decay is None:
            return False
        if var in self._fns.excluded:
            return False
        name = _distribute.name(var)
        return not any(re.search(n, name) for n in self._fns.exclude_names)

    # ------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------
    def get_slot_names(self):
        """Names of the per-variable slots (checkpoint protocol)."""
        names = ["momentum", "norm"]
        if self._config.use_ema:
            names.append("average")
        if self._config.gradient_accumulation_steps:
            names.append("accumulator")
        return names

    def get_slot(self, var, slot_name):
        """The slot variable `slot_name` of `var`.

        Raises:
          KeyError: if `var` has no such slot (yet).
        """
        if slot_name not in self.get_slot_names():
            raise KeyError(
                f"Unknown slot {slot_name!r}; this optimizer has slots "
                f"{self.get_slot_names()}.")
        if _private.is_sharded(var):
            # Slots are sharded like their variable: one per shard. The view
            # is made once, so checkpoints bind the same object every time.
            key = (tuple(_distribute.var_key(s) for s in var.variables),
                   slot_name)
            view = self._fns.sharded_slots.get(key)
            if view is None:
                view = self._fns.sharded_slots[key] = _private.make_sharded(
                    [self.get_slot(shard, slot_name)
                     for shard in var.variables],
                    name=f"{var.name}/{slot_name}")
            return view
        slot = self._slots.get(var, slot_name)
        if slot is None:
            raise KeyError(
                f"Variable {_distribute.name(var)!r} has no slot "
                f"{slot_name!r} yet: it is created by `build` or the first "
                "`apply_gradients` that updates the variable.")
        return slot

    def _create_or_restore_slot_variable(self, slot_variable_position,
                                         slot_name, variable,
                                         slot_variable_shape=None):
        """Checkpoint protocol: the slot to restore into, or None (deferred).

        A slot the checkpoint holds is made now, as TF's own optimizers make
        theirs: left pending until the first step, it would be missing from
        `get_slot`, `variables` and any checkpoint or SavedModel written
        before that step. Only that slot: one the checkpoint lacks (say, the
        EMA average of a model trained without EMA) is made by `build`, from
        the restored weights. Where it cannot be made now (inside a
        tf.function, under another strategy's scope, or for a variable
        `build` refuses), it is restored when `build` creates it.
        """
        del slot_variable_shape  # slots always have their variable's shape
        if _private.is_sharded(variable):
            # A sharded variable's slot is saved as one sharded value, which
            # only a sharded view can take back (it splits the value over the
            # shards, re-sharding if needed). A deferred restore could not
            # be matched to the per-shard slots, so the slots are made now.
            self._make_slots(variable.variables, [slot_name])
            return self.get_slot(variable, slot_name)
        if not tf.inside_function():
            try:
                self._make_slots([variable], [slot_name])
            except (TypeError, ValueError, RuntimeError):
                pass  # `build` at the first step raises it in context
        slot = self._slots.get(variable, slot_name)
        if slot is None:
            self._slots.defer(variable, slot_name, slot_variable_position)
        return slot

    @property
    def variables(self):
        """All optimizer state: the call counter (`iterations`; with
        gradient accumulation also the update counter it then reports), the
        learning-rate variable, every slot."""
        state = [self._iterations] + (
            [] if self._updates is None else [self._updates])
        if isinstance(self._learning_rate, tf.Variable) and not \
                self._user_lr_var():
            state.append(self._learning_rate)
        return state + self._slots.variables

    @property
    def trainable_variables(self):
        """None of the optimizer's state is trainable."""
        return []

    @property
    def non_trainable_variables(self):
        """All optimizer state (`variables`): a parent that sums a module's
        trainable and non-trainable variables (a tf-keras layer holding
        this optimizer as an attribute) then counts the same state as
        `variables` does (tf.Module's default walk finds no slot)."""
        return self.variables

    def _copy_trackable_to_cpu(self, object_map):
        # TF's hook for async checkpoints (like `_trackable_children`): a
        # sharded variable's slot views, what its checkpoint entry holds,
        # are copied with the rest (`_private.copy_sharded_to_cpu`), made
        # first if the checkpoint has not asked for them yet.
        containers = {id(c): c for c in map(_private.sharded_container,
                                            self._slots.slotted())
                      if c is not None}
        for container in containers.values():
            for name in self.get_slot_names():
                try:
                    self.get_slot(container, name)  # the view, made once
                except KeyError:
                    pass  # a shard without slots: nothing sharded to save
        _private.copy_sharded_to_cpu(list(self._fns.sharded_slots.values()),
                                     object_map)

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        # The rate variable is checkpointed as a float64 value, so that it
        # restores on every device (`_private.checkpoint_children`).
        self._sync_updates()  # saved as the call counter says
        value = None
        if isinstance(self._learning_rate, tf.Variable) and \
                not self._user_lr_var():
            value = self._fns.lr_checkpoint
            if value is None or value.variable is not self._learning_rate:
                value = self._fns.lr_checkpoint = _private.Float64Value(
                    self._learning_rate)
        return _private.checkpoint_children(
            super()._trackable_children(save_type, **kwargs), save_type,
            "_learning_rate", value)

    def build(self, var_list):
        """Creates the slots of every variable in `var_list` not yet built.

        Variables seen for the first time later (unfrozen layers) are built
        on their first `apply_gradients`.
        """
        self._make_slots(_distribute.expand(var_list), self.get_slot_names())

    def _make_slots(self, var_list, slot_names):
        """Checks every variable, then creates its slots `slot_names` (for
        `build`, and for a checkpoint restore, which makes only the slots it
        holds)."""
        for var in var_list:
            _checks.check_variable(var)
        for var in var_list:
            if self._slots.has(var):
                continue
            _distribute.check_same_strategy(self._strategy, var)
        for var in var_list:
            try:
                for name in slot_names:
                    self.add_slot(var, name)
            except ValueError as e:
                if not tf.inside_function():
                    raise
                raise ValueError(
                    f"Variable {_distribute.name(var)!r} is new to this "
                    "optimizer, and "
                    "its slots cannot be created inside a tf.function that "
                    "was already traced (TensorFlow creates variables only "
                    "on a function's first call). Call "
                    "`optimizer.build(new_variables)` outside the function "
                    "first, or use a new tf.function.") from e

    def add_slot(self, var, slot_name):
        """Creates (or returns) slot `slot_name` of `var`.

        `build` calls it; so does `tf.saved_model.load` when it revives the
        optimizer's slots.
        """
        # The EMA holds weights: the variable's dtype. The moments and the
        # gradient accumulator: float32 for float16/bfloat16 variables.
        dtype = var.dtype if slot_name == "average" else \
            _math.compute_dtype(var.dtype)
        # The average starts at the weights, as Keras 3's does in effect:
        # it copies every built variable at the first step and then moves
        # each average at every call. A variable whose first update comes
        # later (frozen at first, or new) would otherwise average from 0.
        if slot_name == "average" and tf.inside_function():
            with tf.init_scope():
                if not _distribute.holds_value(_distribute.unwrap(var)):
                    # Created in this trace: TF gives it its value only after
                    # tracing, so the first step that runs copies it
                    # (`_copy_new_averages`).
                    self._fns.new_averages.add(_distribute.var_key(var))
        return self._slots.create(self._strategy, var, slot_name, dtype,
                                  copy=slot_name == "average")

    def _copy_new_averages(self, variables, states):
        """The averages created as zeros for variables created in a trace
        (`add_slot`) get the weights in the first step that runs past its
        checks, whenever that is: while an average is all zeros the step
        copies the weights into it. An average of weights is all zeros only
        while they have been (the copy is then a no-op too), so a restored
        or moving average is never overwritten, and no state is added. A
        trace made once an average holds values leaves it out."""
        for var, state in zip(variables, states):
            key = _distribute.var_key(var)
            if key not in self._fns.new_averages:
                continue
            average, weights = state.average, state.var
            with tf.init_scope():
                if bool(tf.reduce_any(tf.not_equal(average, 0))):
                    self._fns.new_averages.discard(key)
                    continue

            def copy(average=average, weights=weights):
                average.assign(tf.cast(weights, average.dtype),
                               read_value=False)
                return tf.constant(True)

            tf.cond(tf.reduce_any(tf.not_equal(average.read_value(), 0)),
                    lambda: tf.constant(False), copy)

    def _states(self, variables):
        return [
            _step.VarState(
                var=_distribute.unwrap(v),
                momentum=self._slots.get(v, "momentum"),
                norm=self._slots.get(v, "norm"),
                average=self._slots.get(v, "average"),
                accumulator=self._slots.get(v, "accumulator"),
            )
            for v in variables
        ]

    # ------------------------------------------------------------------
    # Steps
    # ------------------------------------------------------------------
    @tf.autograph.experimental.do_not_convert
    def apply_gradients(self, grads_and_vars):
        """Applies gradients to variables; returns `iterations`.

        In a replica context (`strategy.run`) gradients are summed over
        replicas once, then every variable is updated in the cross-replica
        context. `None` gradients are skipped (one warning).

        Args:
          grads_and_vars: iterable of `(gradient, variable)`; gradients are
            tensors or `tf.IndexedSlices`.

        Returns:
          The `iterations` variable.

        Raises:
          TypeError: a variable is not floating point, a gradient is a
            `tf.SparseTensor` or has integer values, or sparse indices are
            not int32/int64.
          ValueError: a gradient's shape (or an `IndexedSlices`'
            `dense_shape`) does not match its variable's, an `IndexedSlices`
            is given for a scalar, a variable's shape is not fully defined
            or it belongs to another strategy, or no gradient is given.
          RuntimeError: mirrored variables are updated outside
            `strategy.run`, or inside an XLA-compiled replica function.
          tf.errors.InvalidArgumentError: sparse indices are out of range
            (or a shape known only at run time does not match).
        """
        grads, variables = self._filter(grads_and_vars)
        for g, v in zip(grads, variables):
            _checks.check_pair(g, v)
        _distribute.check_replica_context(variables)
        _distribute.check_not_in_xla_replica()
        for v in variables:
            if not self._slots.has(v):
                _distribute.check_same_strategy(self._strategy, v)
        if (_distribute.in_replica_context()
                and tf.distribute.get_strategy().num_replicas_in_sync > 1):
            # Each replica's gradients are checked before they are summed: a
            # shape known only at run time would otherwise reach the
            # collective first, which fails naming no variable and leaves
            # the strategy's collectives aborted for the process.
            grads = _checks.after(
                _checks.run_time_checks(list(zip(grads, variables))),
                [_distribute.replica_own(g) for g in grads])
        iterations = _distribute.merge(self._apply_cross_replica, grads,
                                       variables)
        if tf.inside_function():
            self._fns.traced = True  # see `_check_lr_change`
        return iterations

    def _filter(self, grads_and_vars):
        grads, variables, skipped = [], [], []
        for g, v in grads_and_vars:
            if g is None:
                # tape.gradient gives None for an integer variable, which
                # would otherwise be skipped unnoticed.
                _checks.check_skippable(v)
                skipped.append(_distribute.name(v))
                continue
            grads.append(_checks.tensor_slices(g, v))
            variables.append(v)
        if skipped and not self._fns.warned_none:
            self._fns.warned_none = True
            _hyper.warn_user(
                f"Gradients do not exist for variables {skipped} when "
                "applying Adamax; they are skipped. Check that the loss "
                "depends on them.")
        if not grads:
            raise ValueError(
                "No gradients provided for any variable"
                + (f" (all of {skipped} were None)" if skipped else "")
                + ". Check that the loss depends on the variables.")
        return grads, variables

    @tf.autograph.experimental.do_not_convert
    def _apply_cross_replica(self, strategy, grads, variables):
        """Aggregates once, then updates each device's copy in one program."""
        grads = _distribute.all_reduce(strategy, grads, variables)
        # Eagerly a failed check raises here, before any slot is created.
        checks = _checks.run_time_checks(
            _checks.one_device(strategy, zip(grads, variables)))
        # Slots are created here: variables can only be created in the
        # cross-replica context.
        self.build(variables)
        groups, replicated = _distribute.plan(strategy, variables)
        if self._jit_compile and self._config.global_clipnorm is None:
            groups = _distribute.split_for_cores(groups, variables,
                                                  _distribute.cores())
        global_norm = None
        decays = [self._decays(v) for v in variables]
        states = self._states(variables)
        if (self._config.global_clipnorm is not None and len(groups) > 1
                and not replicated):
            global_norm = _step.global_grad_norm(
                self._config,
                [_distribute.local(strategy, g)[0] for g in grads], variables,
                [s.accumulator for s in states]
                if self._config.gradient_accumulation_steps else None)
        update, pad = self._fns.update, self._jit_compile
        if (self._jit_compile and tf.executing_eagerly()
                and _distribute.is_parameter_server(self._strategy)):
            # An eager step on the coordinator (outside the strategy's
            # scope: only the optimizer knows the strategy). TF cannot run
            # an eager XLA function that writes a parameter server's
            # variables (InternalError: KernelAndDeviceOp does not support
            # EagerFunctionParams), so the same step runs op by op there.
            # Scheduled steps (tf.functions) stay compiled. Unpadded: outside
            # XLA the lazy kernel's gather refuses the padding rows' index.
            update, pad = _step.apply_step, False
        if self._fns.new_averages:
            with tf.control_dependencies(checks):
                self._copy_new_averages(variables, states)
        if groups[0].whole:
            # Inside a TPUStrategy's program, which XLA compiles whole: no
            # nested XLA function, and no float64 arguments (TPUs have no
            # float64; the betas stay trace-time constants there).
            update, pad, config = _step.apply_step, False, self._config
        else:
            config = self._run_time_config()
        with tf.control_dependencies(checks):
            for group in groups:
                with tf.device(group.device):
                    iteration = _distribute.component(
                        strategy, self._iterations, group).read_value()
                    lr = self._lr_at(iteration, _distribute.component(
                        strategy, self._learning_rate, group)
                        if isinstance(self._learning_rate, tf.Variable)
                        else None)
                    part = [_checks.static_shape(_distribute.component(
                        strategy, grads[i], group), variables[i])
                        for i in group.positions]
                    update(
                        config,
                        [_component_state(strategy, states[i], group)
                         for i in group.positions],
                        _distribute.bucketed(
                            part, [variables[i] for i in group.positions])
                        if pad else part,
                        [decays[i] for i in group.positions],
                        iteration, lr, global_norm)
                    # As every Keras optimizer: a variable's constraint
                    # projects it after each update (the whole variable,
                    # also in lazy mode).
                    for i in group.positions:
                        _apply_constraint(
                            variables[i],
                            _distribute.component(strategy, states[i].var,
                                                  group))
            # Also after the index checks: a failed check changes nothing.
            self._iterations.assign_add(1, read_value=False)
            if self._updates is not None:
                self._set_updates()
        return self._counter()

    def _run_time_config(self):
        """The step's config with its scalar options (`beta_1`, `beta_2`,
        `epsilon`, and those of `_RUN_TIME_OPTIONS` that are set) as tensor
        arguments of the update (`_hyper.run_time_scalar`, as the adapters
        pass them): as Python floats they are trace keys, and each value set
        in an eager loop (a beta warm-up, a decay changed by hand) compiled
        the update anew, its program never freed. (None or a value changes
        what the update does: that is traced once each.)"""
        config = self._config
        return config._replace(**{
            name: _hyper.run_time_scalar(getattr(config, name))
            for name in _RUN_TIME_OPTIONS
            if getattr(config, name) is not None})

    def minimize(self, loss, var_list, tape=None):
        """Computes gradients of `loss` and applies them.

        Args:
          loss: a callable taking no arguments and returning the loss, or a
            tensor (then `tape` must be the tape that recorded it).
          var_list: variables to update, or a callable returning them.
          tape: the `tf.GradientTape` for a tensor `loss`.

        Returns:
          The `iterations` variable.
        """
        if callable(var_list):
            var_list = var_list()
        var_list = _distribute.expand(var_list)
        if callable(loss):
            with tf.GradientTape() as tape:
                tape.watch([_distribute.unwrap(v) for v in var_list])
                loss = self.scale_loss(loss())
        elif tape is None:
            raise ValueError(
                "`tape` is required when `loss` is a tensor: pass the "
                "tf.GradientTape that computed it, or pass `loss` as a "
                "zero-argument callable.")
        else:
            with tape:
                loss = self.scale_loss(loss)
        grads = tape.gradient(loss, [_distribute.unwrap(v) for v in var_list])
        return self.apply_gradients(zip(grads, var_list))

    def scale_loss(self, loss):
        """Multiplies `loss` by `loss_scale_factor` (if set)."""
        if self._config.loss_scale_factor is None:
            return loss
        return loss * _math.as_dtype(self._config.loss_scale_factor,
                                     loss.dtype)

    def finalize_variable_values(self, var_list):
        """With `use_ema`, sets each variable to its moving average."""
        if not self._config.use_ema:
            return
        for var in _distribute.expand(var_list):
            average = self._slots.get(var, "average")
            if average is not None:
                _distribute.unwrap(var).assign(average)

    # ------------------------------------------------------------------
    # Serialization
    # ------------------------------------------------------------------
    def get_config(self):
        """Constructor arguments; schedules serialize via Keras when they
        can."""
        return self._config_with(self._lr_config())

    def _config_with(self, learning_rate):
        c = self._config
        return {
            "name": self.name,
            "learning_rate": learning_rate,
            "beta_1": _plain(c.beta_1),
            "beta_2": _plain(c.beta_2),
            "epsilon": _plain(c.epsilon),
            "weight_decay": _plain(c.weight_decay),
            "clipnorm": _plain(c.clipnorm),
            "clipvalue": _plain(c.clipvalue),
            "global_clipnorm": _plain(c.global_clipnorm),
            "use_ema": c.use_ema,
            "ema_momentum": _plain(c.ema_momentum),
            "ema_overwrite_frequency": c.ema_overwrite_frequency,
            "loss_scale_factor": _plain(c.loss_scale_factor),
            "gradient_accumulation_steps": c.gradient_accumulation_steps,
            "sparse_mode": c.sparse_mode,
            "jit_compile": self._jit_compile,
        }

    def _lr_config(self):
        if self._lr_source is None:
            return float(self._learning_rate.numpy()) if tf.executing_eagerly() \
                else self._learning_rate
        return _hyper.serialize_schedule(self._lr_source)

    @classmethod
    def from_config(cls, config):
        """Creates an optimizer from `get_config()` output."""
        config = dict(config)
        config["learning_rate"] = _hyper.deserialize_schedule(
            config.get("learning_rate", 0.001))
        return cls(**config)

    # SavedModel: the constructor arguments travel as JSON next to the state
    # variables, which the loader reattaches to the revived object.
    def _serialize_to_proto(self, object_proto=None, **kwargs):
        del object_proto, kwargs
        return wrappers_pb2.StringValue(value=json.dumps(self._saved_config()))

    def _saved_config(self):
        """`get_config()` with every value JSON-able, plus the learning rate
        at saving time.

        Tensor hyperparameters are stored as their current values. A
        learning-rate callable that is not a Keras schedule (or a schedule
        Keras cannot serialize) cannot be saved: the revived optimizer uses
        the rate's value at saving time instead.
        """
        try:
            learning_rate = self._lr_config()
        # A schedule Keras cannot serialize: not from Keras (ValueError), or
        # without get_config (NotImplementedError).
        except (ValueError, TypeError, NotImplementedError):
            learning_rate = None
        if learning_rate is None or callable(learning_rate):
            learning_rate = _LOST
        config = {}
        for key, value in self._config_with(learning_rate).items():
            if tf.is_tensor(value) or isinstance(value, tf.Variable):
                value = value.numpy().item()
            config[key] = value
        config[_LR_NOW] = float(self.learning_rate.numpy())
        return config

    @classmethod
    def _deserialize_from_proto(cls, proto=None, **kwargs):
        optimizer = cls._revive(proto, **kwargs)
        # The SavedModel's functions were traced with this optimizer's rate
        # and betas: changes they would ignore raise, as after a trace.
        optimizer._fns.traced = True
        return optimizer

    @classmethod
    def _revive(cls, proto=None, **kwargs):
        del kwargs
        config = {}
        if proto is not None and proto.Is(wrappers_pb2.StringValue.DESCRIPTOR):
            saved = wrappers_pb2.StringValue()
            proto.Unpack(saved)
            config = json.loads(saved.value)
        lr_now = config.pop(_LR_NOW, None)
        if config.get("learning_rate") == _LOST:
            reason = "it was not a serializable Keras schedule"
        else:
            try:
                return cls.from_config(config)
            except (ValueError, TypeError, ImportError) as e:
                reason = f"{type(e).__name__}: {e}"
        # 7 significant digits: a float32 rate of 0.3 reads 0.3.
        shown = f"{lr_now:.7g}" if isinstance(lr_now, float) else lr_now
        _hyper.warn_user(
            "The SavedModel's Adamax learning rate cannot be restored ("
            f"{reason}); the loaded optimizer uses {shown}, its value when "
            "saved, and the SavedModel's functions the rate they were traced "
            "with. To train on with another rate, restore a checkpoint of "
            "the model and optimizer into a new optimizer.")
        # A callable, like the saved optimizer's: no learning-rate variable,
        # so the saved state matches the revived one.
        config["learning_rate"] = lambda: lr_now
        return cls.from_config(config)


# Keys of the SavedModel config (`Adamax._saved_config`).
_LOST = "tf_adamax: learning rate not saved"
_LR_NOW = "tf_adamax_learning_rate_when_saved"


_private.register_for_saved_model(Adamax)


# The step options the compiled update reads as tensor arguments.
_RUN_TIME_OPTIONS = ("beta_1", "beta_2", "epsilon", "weight_decay",
                     "clipnorm", "clipvalue", "global_clipnorm",
                     "loss_scale_factor", "ema_momentum")


def _new_update(jit_compile):
    """The function that applies a step's updates: compiled, or not."""
    return (_distribute.compiled(_step.apply_step) if jit_compile
            else _step.apply_step)


def _plain(value):
    """A config value as a Python scalar when it is a constant."""
    if value is None or isinstance(value, (int, float)):
        return value
    static = tf.get_static_value(value)
    return float(static) if static is not None else value


def _apply_constraint(var, component):
    """Assigns `var`'s `constraint` (of a tf.Variable or of the Keras 3
    variable wrapping it) of `component`, this device's copy, to it."""
    constraint = getattr(var, "constraint", None) or getattr(
        _distribute.unwrap(var), "constraint", None)
    if constraint is not None:
        component.assign(constraint(component), read_value=False)


def _component_state(strategy, state, group):
    return _step.VarState(*[
        None if s is None else _distribute.component(strategy, s, group)
        for s in state
    ])


def _ignored_after_trace(setting, kept, fix):
    """The error for a change a traced step would silently ignore."""
    return TypeError(
        f"Cannot set {setting} after a tf.function applied a step with this "
        f"optimizer: that function keeps {kept}, so the new one would be "
        f"ignored there. {fix}")


def _kind(learning_rate):
    if _hyper.is_schedule(learning_rate):
        return f"a schedule ({type(learning_rate).__name__})"
    if isinstance(learning_rate, tf.Variable):
        return "a tf.Variable"
    if callable(learning_rate):
        return "a callable"
    return "a float"
