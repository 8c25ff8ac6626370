"""NumPy float64 reference implementation of Adamax, used as the test oracle.

The math is written as small pure functions (dense step, exact-sparse step,
lazy-sparse step) over explicit arrays; ``AdamaxReference`` only adds the
Keras 3 plumbing around them (loss scaling, gradient accumulation, clipping,
decoupled weight decay, EMA, the step counter) and models storage rounding:
after every assignment a value is rounded to the dtype the implementation
stores it in (the variable's dtype; float32 slots for float16/bfloat16
variables), while every computation itself runs in float64.

Update rule (Kingma & Ba 2014, section 7.1, Keras epsilon convention), with
t = iterations + 1::

    m = beta_1 * m + (1 - beta_1) * g
    u = max(beta_2 * u, |g|)
    w = w - lr * m / ((1 - beta_1 ** t) * (u + epsilon))
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Hashable, Optional, Union

import ml_dtypes
import numpy as np

LOW_PRECISION = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


@dataclasses.dataclass(frozen=True)
class SparseGrad:
    """Reference stand-in for ``tf.IndexedSlices`` (dense_shape = var shape)."""

    indices: np.ndarray
    values: np.ndarray

    def densify(self, shape) -> np.ndarray:
        return densify(self.indices, self.values, shape)


Grad = Union[np.ndarray, SparseGrad]


def slot_dtype(var_dtype) -> np.dtype:
    """Storage dtype of the momentum/norm slots for a variable dtype."""
    var_dtype = np.dtype(var_dtype)
    return np.dtype(np.float32) if var_dtype in LOW_PRECISION else var_dtype


def round_to(x, dtype) -> np.ndarray:
    """Rounds float64 values to ``dtype`` and returns them as float64."""
    return np.asarray(x, np.float64).astype(dtype).astype(np.float64)


# --------------------------------------------------------------------------
# Pure math.
# --------------------------------------------------------------------------
def dense_step(w, m, u, g, lr, beta_1, beta_2, epsilon, t):
    """One Adamax step on dense arrays; returns new (w, m, u)."""
    m = beta_1 * m + (1.0 - beta_1) * g
    u = np.maximum(beta_2 * u, np.abs(g))
    w = w - lr * m / ((1.0 - beta_1**t) * (u + epsilon))
    return w, m, u


def densify(indices, values, shape) -> np.ndarray:
    """``tf.convert_to_tensor(IndexedSlices)``: duplicate indices are summed."""
    out = np.zeros(shape, np.float64)
    np.add.at(out, np.asarray(indices, np.int64), np.asarray(values, np.float64))
    return out


def sum_duplicates(indices, values):
    """Returns (unique rows, summed values), rows in ascending order."""
    indices = np.asarray(indices, np.int64)
    values = np.asarray(values, np.float64)
    rows, inverse = np.unique(indices, return_inverse=True)
    summed = np.zeros((len(rows),) + values.shape[1:], np.float64)
    np.add.at(summed, inverse.reshape(-1), values)
    return rows, summed


def exact_sparse_step(w, m, u, indices, values, lr, beta_1, beta_2, epsilon, t):
    """``sparse_mode="exact"``: the dense step of the densified gradient."""
    return dense_step(w, m, u, densify(indices, values, w.shape), lr, beta_1,
                      beta_2, epsilon, t)


def lazy_sparse_step(w, m, u, indices, values, lr, beta_1, beta_2, epsilon, t):
    """``sparse_mode="lazy"``: only named rows change (duplicates summed first)."""
    rows, g = sum_duplicates(indices, values)
    w, m, u = w.copy(), m.copy(), u.copy()
    w[rows], m[rows], u[rows] = dense_step(w[rows], m[rows], u[rows], g, lr,
                                           beta_1, beta_2, epsilon, t)
    return w, m, u


def l2norm(g: Grad, shape) -> float:
    dense = g.densify(shape) if isinstance(g, SparseGrad) else g
    return float(np.sqrt(np.sum(np.square(dense))))


# --------------------------------------------------------------------------
# Keras 3 plumbing.
# --------------------------------------------------------------------------
class AdamaxReference:
    """Stateful reference optimizer with Keras 3 keyword-argument semantics.

    ``learning_rate`` is a float or a callable ``f(iterations) -> float``
    (a schedule is called with the call count before the increment; for a
    zero-argument callable pass ``lambda step: value()``).

    Variables are registered with ``add_variable(key, value, dtype)``; a
    variable may be added at any time (its slots start at zero and it is
    updated with the global step). ``apply({key: grad})`` runs one call of
    ``apply_gradients``; ``grad`` is an ndarray or a ``SparseGrad``.
    """

    def __init__(self, learning_rate: Union[float, Callable[[int], float]] = 0.001,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=None,
                 clipnorm=None, clipvalue=None, global_clipnorm=None,
                 use_ema=False, ema_momentum=0.99, ema_overwrite_frequency=None,
                 loss_scale_factor=None, gradient_accumulation_steps=None,
                 sparse_mode="exact"):
        self.learning_rate = learning_rate
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.weight_decay = weight_decay
        self.clipnorm = clipnorm
        self.clipvalue = clipvalue
        self.global_clipnorm = global_clipnorm
        self.use_ema = use_ema
        self.ema_momentum = float(ema_momentum)
        self.ema_overwrite_frequency = ema_overwrite_frequency
        self.loss_scale_factor = loss_scale_factor
        self.gradient_accumulation_steps = gradient_accumulation_steps
        if sparse_mode not in ("exact", "lazy"):
            raise ValueError(sparse_mode)
        self.sparse_mode = sparse_mode
        self.iterations = 0
        self.w: Dict[Hashable, np.ndarray] = {}
        self.m: Dict[Hashable, np.ndarray] = {}
        self.u: Dict[Hashable, np.ndarray] = {}
        self.average: Dict[Hashable, np.ndarray] = {}
        self.accumulator: Dict[Hashable, np.ndarray] = {}
        self.dtype: Dict[Hashable, np.dtype] = {}

    # -- state --------------------------------------------------------------
    def add_variable(self, key, value, dtype=np.float64):
        dtype = np.dtype(dtype)
        self.dtype[key] = dtype
        self.w[key] = round_to(value, dtype)
        shape = self.w[key].shape
        self.m[key] = np.zeros(shape, np.float64)
        self.u[key] = np.zeros(shape, np.float64)
        self.average[key] = self.w[key].copy()
        self.accumulator[key] = np.zeros(shape, np.float64)

    def lr_at(self, step: int) -> float:
        lr = self.learning_rate
        return float(lr(step)) if callable(lr) else float(lr)

    @property
    def updates(self) -> int:
        """Keras 3's `iterations`: calls, or calls // N with accumulation."""
        n = self.gradient_accumulation_steps
        return self.iterations // n if n else self.iterations

    @property
    def current_learning_rate(self) -> float:
        return self.lr_at(self.iterations)

    # -- one apply_gradients call -------------------------------------------
    def apply(self, grads: Dict[Hashable, Optional[Grad]]):
        grads = {k: g for k, g in grads.items() if g is not None}
        if self.loss_scale_factor is not None:
            grads = {k: self._scale(g, 1.0 / self.loss_scale_factor)
                     for k, g in grads.items()}
        n = self.gradient_accumulation_steps
        if n:
            if (self.iterations + 1) % n == 0:
                summed = {k: (self.accumulator[k] + self._dense(k, g)) / n
                          for k, g in grads.items()}
                self._update(summed)
                for k in grads:
                    self.accumulator[k] = np.zeros_like(self.accumulator[k])
            else:
                for k, g in grads.items():
                    self.accumulator[k] = round_to(
                        self.accumulator[k] + self._dense(k, g), self.dtype[k])
        else:
            self._update(grads)
        if self.use_ema:
            # Keras 3: EMA reads `iterations`, which counts updates (calls // N).
            momentum = 0.0 if self.updates == 0 else self.ema_momentum
            for k in self.w:
                self.average[k] = round_to(
                    momentum * self.average[k] + (1.0 - momentum) * self.w[k],
                    self.dtype[k])
            freq = self.ema_overwrite_frequency
            if freq and (self.updates + 1) % freq == 0:
                for k in self.w:
                    self.w[k] = self.average[k].copy()
        self.iterations += 1

    def finalize_variable_values(self):
        """Keras 3 ``finalize_variable_values``: averages replace variables."""
        if self.use_ema:
            for k in self.w:
                self.w[k] = self.average[k].copy()

    # -- helpers --------------------------------------------------------------
    def _dense(self, key, g: Grad) -> np.ndarray:
        if isinstance(g, SparseGrad):
            return g.densify(self.w[key].shape)
        return np.asarray(g, np.float64)

    @staticmethod
    def _scale(g: Grad, factor: float) -> Grad:
        if isinstance(g, SparseGrad):
            return SparseGrad(g.indices, np.asarray(g.values, np.float64) * factor)
        return np.asarray(g, np.float64) * factor

    def _clip(self, grads):
        if self.clipnorm:
            c = float(self.clipnorm)
            return {k: self._scale(g, c / max(l2norm(g, self.w[k].shape), c))
                    for k, g in grads.items()}
        if self.global_clipnorm:
            c = float(self.global_clipnorm)
            norm = np.sqrt(sum(l2norm(g, self.w[k].shape) ** 2
                               for k, g in grads.items()))
            return {k: self._scale(g, c / max(norm, c)) for k, g in grads.items()}
        if self.clipvalue:
            c = float(self.clipvalue)
            out = {}
            for k, g in grads.items():
                if isinstance(g, SparseGrad):
                    # Clip the summed gradient, not each duplicate.
                    rows, summed = sum_duplicates(g.indices, g.values)
                    out[k] = SparseGrad(rows, np.clip(summed, -c, c))
                else:
                    out[k] = np.clip(np.asarray(g, np.float64), -c, c)
            return out
        return grads

    def _update(self, grads):
        grads = self._clip(grads)
        lr = self.current_learning_rate
        # Keras 3: t counts updates (calls // N with gradient accumulation);
        # the schedule is called with the raw call count.
        t = self.updates + 1
        if self.weight_decay is not None:
            for k, g in grads.items():
                # A lazy sparse step changes only the rows it names.
                decay = np.ones(self.w[k].shape[:1], bool)
                if isinstance(g, SparseGrad) and self.sparse_mode == "lazy":
                    decay = np.isin(np.arange(len(decay)), g.indices)
                w = self.w[k]
                decayed = w - w * float(self.weight_decay) * lr
                self.w[k] = round_to(np.where(
                    decay.reshape((-1,) + (1,) * (w.ndim - 1)), decayed, w),
                    self.dtype[k])
        for k, g in grads.items():
            args = (lr, self.beta_1, self.beta_2, self.epsilon, t)
            if isinstance(g, SparseGrad) and self.sparse_mode == "lazy":
                w, m, u = lazy_sparse_step(self.w[k], self.m[k], self.u[k],
                                           g.indices, g.values, *args)
            else:
                w, m, u = dense_step(self.w[k], self.m[k], self.u[k],
                                     self._dense(k, g), *args)
            sd = slot_dtype(self.dtype[k])
            self.w[k] = round_to(w, self.dtype[k])
            self.m[k] = round_to(m, sd)
            self.u[k] = round_to(u, sd)
