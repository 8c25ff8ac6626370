"""What the two Keras adapters share around the kernels.

Each adapter subclasses its Keras generation's optimizer and this mixin
(first, so its `_apply_weight_decay` wraps Keras's). The adapter provides
`_slots_of(variable)` (its `tf.Variable`, `m` and `u`); Keras provides
`_var_key`, `weight_decay` and `_apply_weight_decay`. The mixin's
properties check the hyperparameters on every assignment.
"""

from __future__ import annotations

import typing

from tf_adamax import _checks
from tf_adamax import _distribute
from tf_adamax import _hyper
from tf_adamax import _math
from tf_adamax._untracked import Untracked


def _checked(name):
    """A property `name` that `_hyper.check_option` validates on every
    assignment (Keras's own in its constructor included), so that a refused
    value leaves the old one. The value is kept in the instance `__dict__`
    under `name`, which the property shadows: Keras's attribute tracking
    sees an accepted assignment as before (a refused one it never sees,
    `KernelUpdates.__setattr__`). (An `epsilon` of 0 warns when it
    changes one, as the constructor's argument warns.)"""

    def get(self):
        try:
            return vars(self)[name]
        except KeyError:
            raise AttributeError(name) from None

    def set(self, value):
        vars(self)[name] = _hyper.check_option(
            name, value, vars(self), warn=name in vars(self))

    return _CheckedOption(get, set)


class _CheckedOption(property):
    """A property made by `_checked`."""


_UNSET = object()


class _Betas(typing.NamedTuple):
    """The hyperparameters `_math.Hyper.of` reads besides the rate."""

    beta_1: typing.Any
    beta_2: typing.Any
    epsilon: typing.Any


class KernelUpdates:
    """One gradient per variable through `_math.apply_gradient`, and all of
    a step's variables in compiled programs (`_distribute.CompiledParts`).

    `_lazy_decay` holds the keys of the variables whose weight decay the
    kernel applies to a lazy step's named rows instead of Keras
    (`_hyper.lazy_decay_keys`, set by the adapter before each step).
    """

    _lazy_decay = frozenset()
    _update_all_fn = None

    # Assignments are checked as the constructor's arguments are: the
    # adapters refuse the same values after construction (`__setattr__`).
    beta_1 = _checked("beta_1")
    beta_2 = _checked("beta_2")
    epsilon = _checked("epsilon")
    sparse_mode = _checked("sparse_mode")
    weight_decay = _checked("weight_decay")
    clipnorm = _checked("clipnorm")
    clipvalue = _checked("clipvalue")
    global_clipnorm = _checked("global_clipnorm")
    ema_momentum = _checked("ema_momentum")
    ema_overwrite_frequency = _checked("ema_overwrite_frequency")
    loss_scale_factor = _checked("loss_scale_factor")

    # Properties besides the checked options whose setter runs on every
    # assignment, also of the value the attribute already holds.
    _always_set = frozenset()

    def __setattr__(self, name, value):
        # Keras (both generations) tracks a variable assigned to any
        # attribute before the attribute's property setter runs: a value the
        # setter then refused stayed in Keras 3's variables (a saved model's
        # optimizer state no longer loaded: one variable more than the
        # optimizer it is loaded into) and became a tf-keras checkpoint
        # child. So the setters' checks run here first, before Keras sees
        # the value (without the `epsilon` warning, which the setter gives).
        checked = isinstance(getattr(type(self), name, None), _CheckedOption)
        if checked:
            _hyper.check_option(name, value, vars(self), warn=False)
        elif name in ("learning_rate", "lr"):  # tf-keras's alias too
            _hyper.check_learning_rate(value)
        # Keras also skips the assignment of the value an attribute already
        # holds (`getattr(self, name) is value`), setter and all; Keras has
        # tracked it already.
        if ((checked or name in self._always_set)
                and getattr(self, name, _UNSET) is value):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def learning_rate(self):
        """Keras's `learning_rate`; a new one is checked as the
        constructor's, then set by Keras (a refused one leaves the old)."""
        return super().learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        _hyper.check_learning_rate(learning_rate)
        super(KernelUpdates, type(self)).learning_rate.fset(self,
                                                           learning_rate)

    @staticmethod
    def _buildable(var_list):
        """`var_list` as a list, once no variable in it has an unknown shape
        (refused naming it, before Keras creates any slot)."""
        var_list = list(var_list)
        for variable in var_list:
            _checks.check_shape_known(variable)
        return var_list

    def _slots_of(self, variable):
        """`(var, m, u)` as `tf.Variable`s for a model variable."""
        raise NotImplementedError

    def _apply_one(self, gradient, variable, learning_rate, step, decay):
        """One variable's update, its slots and weight decay looked up
        here (Keras's per-variable `update_step`)."""
        self._apply_to(gradient, self._slots_of(variable),
                       self._decays_in_kernel(variable), learning_rate, step,
                       decay, self)

    def _decays_in_kernel(self, variable):
        # Keras applied the decay before the update, except to the named
        # rows of a lazy sparse step.
        return self._var_key(variable) in self._lazy_decay

    def _apply_to(self, gradient, slots, decay_here, learning_rate, step,
                  decay, betas):
        var, m, u = slots
        hyper = _math.Hyper.of(betas, learning_rate, step,
                               weight_decay=decay if decay_here else None)
        _math.apply_gradient(var, m, u, gradient, hyper, self.sparse_mode)

    def _update_all(self, grads, per_variable, learning_rate, step, decay,
                    betas):
        for grad, (slots, decay_here) in zip(grads, per_variable):
            self._apply_to(grad, slots, decay_here, learning_rate, step, decay,
                           betas)

    def _update_compiled(self, grads_and_vars, learning_rate, step):
        """Every pair in one XLA program per device (one per core for a long
        list on CPU, as in the core optimizer). The rate, step and decay are
        read here and passed in: the programs run on the variables'
        devices, and a trace must not freeze them. So are `beta_1`,
        `beta_2` and `epsilon`, as tensors: a value set after the first
        step is used wherever Keras's own Adamax would read it (in a step
        traced after the change, or eagerly) instead of the first trace's,
        without a new trace. And so are each variable's slots (and whether
        the kernel decays it): a program reused for another list of
        variables of the same shapes (a custom loop alternating two heads)
        would otherwise update them with the first list's slots."""
        if self._update_all_fn is None:
            # Kept out of Keras's attribute tracking (and SavedModel).
            self._update_all_fn = Untracked(
                fn=_distribute.CompiledParts(self._update_all))
        grads, variables = zip(*grads_and_vars)
        self._update_all_fn.fn(
            list(grads), list(variables),
            [(self._slots_of(v), self._decays_in_kernel(v)) for v in variables],
            learning_rate, step, _hyper.run_time_decay(self.weight_decay),
            _Betas(*[_hyper.run_time_scalar(x) for x in (
                self.beta_1, self.beta_2, self.epsilon)]))

    def _apply_weight_decay(self, variables):
        # Keras's hook (private, in both generations): lazy sparse steps
        # decay their named rows in the kernel instead.
        return super()._apply_weight_decay(
            [v for v in variables if self._var_key(v) not in self._lazy_decay])
