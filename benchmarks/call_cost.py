"""Why an optimizer step in a jit `tf.function` beats the same step in a plain one.

Run from the repository root:

    python benchmarks/call_cost.py               # sizes 4096, 262144, 4194304
    python benchmarks/call_cost.py --sizes 4096 --reps 21

bench_step.py's `+xla` context rows (an optimizer's step inside
`tf.function(jit_compile=True)`) run faster on `big` than the same optimizer in a
plain `tf.function`, and than the legacy fused kernel, although their XLA program
is the same three loops. This measures the fixed cost of each way of calling a
step, with an empty step (one `assign_add` of a scalar) and a real one:

  graph_call   plain tf.function (TF's graph executor runs its ops)
  jit_call     tf.function(jit_compile=True): one XLA program, called eagerly
  nested_call  plain tf.function calling a jit one (how tf_adamax's compiled
               update runs inside a user's plain tf.function)
  legacy       tf_keras.optimizers.legacy.Adamax() step, plain tf.function
  core         tf_adamax.Adamax() step, plain tf.function
  core+xla     tf_adamax.Adamax() step, jit tf.function

for one float32 variable per size. Prints microseconds per call (medians of
interleaved reps) and writes benchmarks/results/call_cost.json. A benchmark, not a
test.
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
import tf_keras  # noqa: E402

import tf_adamax  # noqa: E402
from launch_cost import parse_args, round_robin, save  # noqa: E402


def empty_steps():
    """The three ways of calling a step, with nothing in the step."""
    counter = tf.Variable(0, dtype=tf.int64)

    def bump():
        counter.assign_add(1)

    jit = tf.function(bump, jit_compile=True)
    return {"graph_call": tf.function(bump), "jit_call": jit,
            "nested_call": tf.function(lambda: jit())}


def optimizer_steps(n):
    rng = np.random.default_rng(0)
    var = tf.Variable(rng.normal(0, 0.05, n).astype(np.float32))
    grad = tf.constant(rng.normal(0, 0.01, n).astype(np.float32))
    out = {}
    for name, opt, jit in (("legacy", tf_keras.optimizers.legacy.Adamax(), False),
                           ("core", tf_adamax.Adamax(), False),
                           ("core+xla", tf_adamax.Adamax(), True)):
        def step(opt=opt):
            opt.apply_gradients([(grad, var)])
        out[name] = tf.function(step, jit_compile=jit)
    return out


def main(argv=None):
    args = parse_args(argv, __doc__, "--sizes", "4096,262144,4194304", 15)
    started = time.time()
    rows = []
    for n in args.sizes:
        fns = {**empty_steps(), **optimizer_steps(n)}
        steps = max(3, min(200, 2_000_000 // n))
        samples = round_robin(fns, args.reps, steps)
        med = {name: statistics.median(s) for name, s in samples.items()}
        rows.append({"floats": n, "steps_per_rep": steps, "us_per_call": med,
                     "samples_us": samples})
        print(f"n={n:8d}  " + "  ".join(f"{k} {v:8.1f}" for k, v in med.items())
              + f"   core/legacy {med['core'] / med['legacy']:.3f}"
              + f"  core+xla/legacy {med['core+xla'] / med['legacy']:.3f}", flush=True)
    save(args.out, "call_cost", argv, started, {
        "unit": "microseconds per call (median over interleaved reps)",
        "rows": rows,
    })


if __name__ == "__main__":
    main()
