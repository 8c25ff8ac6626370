"""An eager training loop whose sparse batches change length every step.

Run from the repository root:

    python benchmarks/eager_lengths.py                  # 60 steps, lengths 100-400
    python benchmarks/eager_lengths.py --reps 30 --lengths 50,800   # 30 steps

A custom loop run eagerly (no `tf.function`) that applies `tf.IndexedSlices`
gradients of a new length at each step: ragged batches, `tf.unique`d ids. XLA
compiles one program per input shape, so an optimizer whose update is compiled
pays a compile for every new length unless lengths are bucketed. Competitors,
each with a table of its own, fed the same sequence of gradients, called in turn
at every step (the order rotated each step):

  core            tf_adamax.Adamax() (exact; jit_compile=True, lengths bucketed)
  core_lazy       tf_adamax.Adamax(sparse_mode="lazy")
  core_unbucketed tf_adamax.Adamax() with the bucketing switched off (an
                  ablation: how the core ran eagerly before it bucketed)
  core_nojit      tf_adamax.Adamax(jit_compile=False)
  keras3          keras.optimizers.Adamax(), `apply` called eagerly
  legacy          tf_keras.optimizers.legacy.Adamax() (the fused C++ kernel)

Reports, per competitor, the loop's total time (compiles included), the median
step over the second half (after most compiles) and the distinct lengths its
update saw; writes benchmarks/results/eager_lengths.json. A benchmark, not a test.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402
import tf_keras  # noqa: E402

import tf_adamax  # noqa: E402
from tf_adamax import _distribute  # noqa: E402
from launch_cost import parse_args, save  # noqa: E402

ROWS, DIM = 10_000, 64


def competitors(init):
    """name -> function applying one IndexedSlices to a table of its own."""
    def apply_gradients(opt):
        table = tf.Variable(init)
        return lambda grad: opt.apply_gradients([(grad, table)])

    unbucketed = apply_gradients(tf_adamax.Adamax())

    def without_bucketing(grad):
        bucketed = _distribute.bucketed
        _distribute.bucketed = lambda grads, variables: list(grads)
        try:
            unbucketed(grad)
        finally:
            _distribute.bucketed = bucketed

    keras_table = tf.Variable(init)
    keras_opt = keras.optimizers.Adamax()
    return {
        "core": apply_gradients(tf_adamax.Adamax()),
        "core_lazy": apply_gradients(tf_adamax.Adamax(sparse_mode="lazy")),
        "core_unbucketed": without_bucketing,
        "core_nojit": apply_gradients(tf_adamax.Adamax(jit_compile=False)),
        "keras3": lambda grad: keras_opt.apply([grad], [keras_table]),
        "legacy": apply_gradients(tf_keras.optimizers.legacy.Adamax()),
    }


def main(argv=None):
    args = parse_args(argv, __doc__, "--lengths", "100,400", 60)
    (lo, hi), steps = args.sizes, args.reps  # --reps: steps of the loop
    started = time.time()
    rng = np.random.default_rng(0)
    init = rng.normal(0, 0.05, (ROWS, DIM)).astype(np.float32)
    grads = []
    for n in rng.integers(lo, hi + 1, size=steps):
        ids = rng.integers(0, ROWS, size=n).astype(np.int32)
        ids[: n // 4] = ids[0]  # duplicates
        grads.append(tf.IndexedSlices(
            tf.constant(rng.normal(0, 0.01, (n, DIM)).astype(np.float32)),
            tf.constant(ids), tf.constant([ROWS, DIM])))
    fns = competitors(init)
    times = {name: [] for name in fns}
    order = list(fns.items())
    for i, grad in enumerate(grads):
        shift = i % len(order)
        for name, fn in order[shift:] + order[:shift]:
            t = time.perf_counter()
            fn(grad)
            times[name].append(time.perf_counter() - t)
    lengths = len({int(g.indices.shape[0]) for g in grads})
    rows = {}
    print(f"eager loop: {steps} steps, lengths {lo}-{hi} ({lengths} distinct), "
          f"table {ROWS}x{DIM}")
    print(f"{'competitor':18s} {'total s':>9s} {'median ms (2nd half)':>22s}"
          f" {'slowest ms':>11s}")
    for name, t in times.items():
        half = t[len(t) // 2:]
        rows[name] = {"total_s": sum(t), "median_ms_second_half":
                      statistics.median(half) * 1e3,
                      "max_ms": max(t) * 1e3, "step_ms": [x * 1e3 for x in t]}
        print(f"{name:18s} {sum(t):9.2f} {statistics.median(half) * 1e3:22.2f}"
              f" {max(t) * 1e3:11.1f}")
    save(args.out, "eager_lengths", argv, started, {
        "steps": steps, "lengths": [lo, hi], "distinct_lengths": lengths,
        "table": [ROWS, DIM], "rows": rows})


if __name__ == "__main__":
    main()
