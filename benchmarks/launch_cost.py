"""Where the `many` case's time goes: per-variable cost of one step vs list length.

Run from the repository root:

    python benchmarks/launch_cost.py            # N = 25,50,100,200,400 variables
    python benchmarks/launch_cost.py --counts 50,200 --reps 9

For each N (variables of 64x64 float32, gradients precomputed), four competitors,
each inside its own `tf.function`, timed round-robin like bench_step.py:

  legacy      tf_keras.optimizers.legacy.Adamax(): one fused C++ op per variable
  core        tf_adamax.Adamax() with default settings (CPU: long lists are split
              into one XLA program per core)
  one_program the same update (`tf_adamax._math.dense_step`) for all N variables in
              ONE XLA program, the step count read and incremented as the core does
  floor       one XLA program that only does `var.assign_add(grad)` and reads the
              two slots of each variable: XLA:CPU's launch cost for 3N resource
              variables, with the least work a step can do

It reports microseconds per variable (median over reps); the ratio core / legacy is
the `many` target's. The point: XLA:CPU's cost per resource variable at each launch
does not shrink with the work, and the legacy kernel (one TF op per variable) does not
pay it. Writes benchmarks/results/launch_cost.json. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

import tf_adamax  # noqa: E402
from tf_adamax import _math  # noqa: E402

SHAPE = (64, 64)


def _variables(n, seed):
    rng = np.random.default_rng(seed)
    return [tf.Variable(rng.normal(0, 0.05, SHAPE).astype(np.float32))
            for _ in range(n)]


def competitors(n):
    """name -> zero-argument tf.function running one step on n variables."""
    rng = np.random.default_rng(0)
    grads = [tf.constant(rng.normal(0, 0.01, SHAPE).astype(np.float32))
             for _ in range(n)]
    def optimizer_step(opt):
        var_list = _variables(n, 1)

        @tf.function  # opt and var_list are captured, not arguments
        def step():
            opt.apply_gradients(zip(grads, var_list))

        return step

    out = {"legacy": optimizer_step(tf_keras.optimizers.legacy.Adamax()),
           "core": optimizer_step(tf_adamax.Adamax())}

    def with_slots(seed):
        return [(v, tf.Variable(tf.zeros(SHAPE)), tf.Variable(tf.zeros(SHAPE)))
                for v in _variables(n, seed)]

    slots, floor_slots = with_slots(2), with_slots(3)  # state of their own
    iterations = tf.Variable(0, dtype=tf.int64)

    @tf.function(jit_compile=True)
    def one_program(iteration):
        # As the core's program: the step count arrives as a tensor.
        hyper = _math.Hyper(learning_rate=1e-3, beta_1=0.9, beta_2=0.999,
                            epsilon=1e-7, step=iteration + 1,
                            weight_decay=None)
        for (v, m, u), g in zip(slots, grads):
            _math.dense_step(v, m, u, g, hyper)

    @tf.function
    def one_program_step():
        one_program(iterations.read_value())
        iterations.assign_add(1, read_value=False)

    @tf.function(jit_compile=True)
    def floor():
        for (v, m, u), g in zip(floor_slots, grads):
            v.assign_add(g + m.read_value() + u.read_value(), read_value=False)

    out["one_program"] = one_program_step
    out["floor"] = tf.function(lambda: floor())
    return out


def round_robin(fns, reps, steps, per=1):
    """Warms up each zero-argument function, then times `reps` rounds of
    `steps` calls of each, in turn (load hits all alike), the order rotated
    each round (no function always runs first). Returns name -> samples,
    microseconds per call divided by `per`."""
    for fn in fns.values():  # trace, compile, warm up
        for _ in range(3):
            fn()
    samples = {name: [] for name in fns}
    order = list(fns.items())
    for r in range(reps):
        shift = r % max(1, len(order))
        for name, fn in order[shift:] + order[:shift]:
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            samples[name].append((time.perf_counter() - t) / steps / per * 1e6)
    return samples


def save(out_dir, name, argv, started, fields):
    """Writes `fields` and the run's command, date, duration, load and versions
    to `out_dir`/`name`.json."""
    record = {
        "command": f"python benchmarks/{name}.py " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "wall_seconds": round(time.time() - started, 1),
        "load_avg_end": list(os.getloadavg()),
        "versions": {"tensorflow": tf.__version__,
                     "tf_keras": tf_keras.__version__},
        **fields,
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    print("wrote", path)


def parse_args(argv, doc, sizes_flag, sizes, reps):
    """The options these small benchmarks share: a comma-separated list of
    sizes (returned as ints in `args.sizes`), `--reps` and `--out`."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument(sizes_flag, dest="sizes", default=sizes,
                        metavar=sizes_flag[2:].upper())
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--out", default=os.path.join(_HERE, "results"))
    args = parser.parse_args(argv)
    args.sizes = [int(c) for c in args.sizes.split(",")]
    return args


def main(argv=None):
    args = parse_args(argv, __doc__, "--counts", "25,50,100,200,400", 11)
    counts = args.sizes
    started = time.time()
    rows = []
    for n in counts:
        steps = max(5, 4000 // n)
        samples = round_robin(competitors(n), args.reps, steps, per=n)
        med = {name: statistics.median(s) for name, s in samples.items()}
        rows.append({"variables": n, "steps_per_rep": steps,
                     "us_per_variable": med, "samples_us": samples,
                     "core_over_legacy": med["core"] / med["legacy"]})
        print(f"N={n:4d}  " + "  ".join(
            f"{k} {v:6.2f}" for k, v in med.items())
            + f"   core/legacy {med['core'] / med['legacy']:.3f}", flush=True)
    save(args.out, "launch_cost", argv, started, {
        "unit": "microseconds per variable per step (median over reps)",
        "shape": list(SHAPE),
        "rows": rows,
    })


if __name__ == "__main__":
    main()
