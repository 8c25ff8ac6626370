"""Shared harness for the tf.distribute tests of `tf_adamax.Adamax`.

Why subprocesses: a strategy test needs two logical CPU devices (or a cluster), and
TensorFlow only accepts a device configuration before its runtime starts. The pytest
process may have started it already (other tests), so every scenario runs in a FRESH
interpreter started by this module, and hands its results back as files.

Two halves, kept apart:

* Parent side (used by pytest; never imports TensorFlow): free loopback ports,
  `run_child` / `run_workers` that start children in their own process group with a
  deadline and always kill them, `load_results`, and NumPy assertion helpers.
* Child side (runs in the fresh interpreter; imports TensorFlow lazily): the toy model
  (an embedding looked up with duplicate ids + two dense layers), deterministic
  per-replica batches, the optimizer factory, strategy and reference train steps,
  recorders for weights and slots; the single-device reference is itself checked
  against the suite's NumPy float64 oracle (`tests/reference.py`).

A child runs ``python -c "import dist_helpers; dist_helpers.child_main()" MODULE:FUNC
OUT_PREFIX KWARGS_JSON``; ``FUNC(**kwargs)`` returns ``{record: {key: value}}`` which is
written to ``OUT_PREFIX.npz`` (arrays) and ``OUT_PREFIX.json`` (everything else).
A record holding ``"error"`` carries the traceback of a scenario that raised; the test
that owns it fails with that traceback, the other records are still checked.

``TF_ADAMAX_DIST_OPTIMIZER=legacy_adam`` swaps in `tf_keras.optimizers.legacy.Adam` for
`tf_adamax.Adamax`. It exists only to prove this plumbing (processes, ports, TF_CONFIG,
cleanup) against an optimizer known to work under every strategy; the Adamax-specific
checks (NumPy oracle, lazy rows) are then skipped.
"""

import contextlib
import faulthandler
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

import numpy as np

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
LOOPBACK = "127.0.0.1"

# --------------------------------------------------------------------------------------
# Model, data and hyperparameters shared by every scenario.
# --------------------------------------------------------------------------------------
VOCAB, DIM, HIDDEN = 10, 4, 3
BATCH, IDS_PER_EXAMPLE = 2, 3
# Rows 3, 4, 8 and 9 are never looked up: lazy updates must leave them (and their
# slots) untouched. With two shards of 5 rows each, both shards have such rows.
HOT_ROWS = (0, 1, 2, 5, 6, 7)
VAR_NAMES = ("emb", "k1", "b1", "k2")
SLOTS = ("momentum", "norm")
LEARNING_RATE = 0.01
BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-7
# Distributed result vs. the single-device reference (float32, same optimizer class).
RTOL = ATOL = 1e-6
# Single-device reference vs. the NumPy float64 Adamax (float32 rounding over N steps).
NUMPY_RTOL, NUMPY_ATOL = 1e-5, 1e-5
OPTIMIZER_ENV = "TF_ADAMAX_DIST_OPTIMIZER"


def optimizer_kind():
    """Which optimizer the children train: "adamax" (default) or "legacy_adam"."""
    kind = os.environ.get(OPTIMIZER_ENV, "adamax")
    if kind not in ("adamax", "legacy_adam"):
        raise ValueError(f"{OPTIMIZER_ENV}={kind!r}; expected 'adamax' or 'legacy_adam'")
    return kind


def config_name(cfg):
    """Stable test id of a config dict, e.g. "lazy-jit1-xla"."""
    parts = [cfg["sparse_mode"], f"jit{int(cfg['jit_compile'])}"]
    if cfg.get("replica_fn", "plain") != "plain":
        parts.append(cfg["replica_fn"])
    if cfg.get("build", "implicit") != "implicit":
        parts.append(f"build-{cfg['build']}")
    return "-".join(parts)


def make_batches(num_steps, num_replicas, seed=0):
    """Deterministic ids [S, R, B, K] (int32) and targets [S, R, B, 1] (float32).

    Every replica batch repeats an id inside one example (duplicate within a replica)
    and every replica of a step shares one id (duplicate across replicas), so the
    aggregated IndexedSlices always carry duplicate indices.
    """
    rng = np.random.default_rng(seed)
    shape = (num_steps, num_replicas, BATCH, IDS_PER_EXAMPLE)
    ids = rng.choice(np.asarray(HOT_ROWS), size=shape).astype(np.int32)
    ids[:, :, 0, 1] = ids[:, :, 0, 0]
    for s in range(num_steps):
        ids[s, :, 1, 0] = HOT_ROWS[s % len(HOT_ROWS)]
    y = rng.normal(size=(num_steps, num_replicas, BATCH, 1)).astype(np.float32)
    return ids, y


def make_shard_balanced_batches(num_steps, num_shards=2, seed=0):
    """Like `make_batches(num_steps, 1)`, but every step looks up the same number of
    ids in each of `num_shards` equal row ranges of the table, duplicates included.

    Why: an embedding sharded over parameter servers receives one IndexedSlices per
    shard whose length (nnz) is the number of ids that fell into it. XLA compiles one
    program per distinct nnz, so random ids would recompile the jit_compile=True
    update on most steps and dominate the test's run time (see the ParameterServer
    test module).
    """
    rng = np.random.default_rng(seed)
    rows_per_shard = VOCAB // num_shards
    n = BATCH * IDS_PER_EXAMPLE
    assert n % num_shards == 0
    ids = np.empty((num_steps, 1, n), np.int32)
    for s in range(num_steps):
        parts = []
        for k in range(num_shards):
            hot = [r for r in HOT_ROWS if k * rows_per_shard <= r < (k + 1) * rows_per_shard]
            part = rng.choice(np.asarray(hot), size=n // num_shards)
            part[1] = part[0]  # a duplicate inside every shard's slice
            parts.append(part)
        ids[s, 0] = rng.permutation(np.concatenate(parts))
    y = rng.normal(size=(num_steps, 1, BATCH, 1)).astype(np.float32)
    return ids.reshape(num_steps, 1, BATCH, IDS_PER_EXAMPLE), y


def initial_values(seed=1):
    """Initial weights as float32 NumPy arrays keyed by VAR_NAMES."""
    rng = np.random.default_rng(seed)
    shapes = {"emb": (VOCAB, DIM), "k1": (DIM, HIDDEN), "b1": (HIDDEN,), "k2": (HIDDEN, 1)}
    return {n: (0.5 * rng.normal(size=shapes[n])).astype(np.float32) for n in VAR_NAMES}


# --------------------------------------------------------------------------------------
# NumPy float64 oracle: the test suite's reference implementation (tests/reference.py).
# --------------------------------------------------------------------------------------
def numpy_adamax(init, grads_per_step, sparse_mode):
    """Runs `reference.AdamaxReference` over `grads_per_step` ([{name: grad}] per step).

    A grad is a dense array or an ``(indices, values)`` pair (IndexedSlices, duplicates
    allowed). Returns ``(weights, {"momentum": m, "norm": u})`` keyed by name.
    """
    import reference

    mode = "exact" if sparse_mode == "dense" else sparse_mode
    ref = reference.AdamaxReference(learning_rate=LEARNING_RATE, beta_1=BETA_1,
                                    beta_2=BETA_2, epsilon=EPSILON, sparse_mode=mode)
    for name, value in init.items():
        ref.add_variable(name, value, np.float32)
    for grads in grads_per_step:
        ref.apply({k: reference.SparseGrad(*g) if isinstance(g, tuple) else g
                   for k, g in grads.items()})
    return dict(ref.w), {"momentum": dict(ref.m), "norm": dict(ref.u)}


# --------------------------------------------------------------------------------------
# Parent side: ports, processes, results. No TensorFlow here.
# --------------------------------------------------------------------------------------
def free_ports(n):
    """`n` distinct free TCP ports on 127.0.0.1 (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def child_env(extra=None):
    """Environment of a child: this checkout importable, no inherited TF_CONFIG."""
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    path = [REPO_ROOT, TESTS_DIR]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Child:
    """A started child process (own process group), its log and its result prefix."""

    def __init__(self, name, target, kwargs, workdir, timeout, env_extra=None):
        self.name = name
        self.out_prefix = os.path.join(str(workdir), name)
        self.log_path = self.out_prefix + ".log"
        env = child_env(env_extra)
        # The child dumps its stacks and exits a little before the parent gives up, so
        # a hang shows where it hung.
        env["DIST_HELPERS_CHILD_TIMEOUT"] = str(max(5.0, timeout - 10.0))
        cmd = [sys.executable, "-c", "import dist_helpers; dist_helpers.child_main()",
               target, self.out_prefix, json.dumps(kwargs)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=REPO_ROOT, start_new_session=True)

    def log_tail(self, chars=6000):
        try:
            with open(self.log_path, "r", errors="replace") as f:
                text = f.read()
        except OSError:
            return "<no log>"
        return text[-chars:]

    def stop(self):
        """Kill the child's whole process group (it is the group leader)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=5)
                if sig == signal.SIGTERM:
                    # Leader gone; make sure nothing it spawned lingers in its group.
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                return
            except subprocess.TimeoutExpired:
                continue
        self.proc.wait(timeout=5)


class ChildFailed(AssertionError):
    """A child exited non-zero or did not finish in time."""


def _describe(children, headline):
    parts = [headline]
    for c in children:
        parts.append(f"--- {c.name} (exit {c.proc.returncode}) log tail ---\n{c.log_tail()}")
    return "\n".join(parts)


def wait_children(children, timeout):
    """Waits for all children; raises ChildFailed on a failure or at the deadline.

    As soon as one child fails the others are not waited for (a worker whose peer died
    would block in a collective until its own timeout).
    """
    deadline = time.monotonic() + timeout
    while True:
        codes = [c.proc.poll() for c in children]
        bad = [c for c, rc in zip(children, codes) if rc not in (None, 0)]
        if bad:
            raise ChildFailed(_describe(children, f"child {bad[0].name} failed"))
        if all(rc == 0 for rc in codes):
            return
        if time.monotonic() > deadline:
            raise ChildFailed(_describe(children, f"children did not finish in {timeout}s"))
        time.sleep(0.2)


def run_children(specs, workdir, timeout):
    """Starts children from ``specs`` [(name, target, kwargs, env_extra)], waits, stops.

    Returns ``{name: results}``. Every child is killed (process group) on any exit.
    """
    children = []
    try:
        for name, target, kwargs, env_extra in specs:
            children.append(Child(name, target, kwargs, workdir, timeout, env_extra))
        wait_children(children, timeout)
        return {c.name: load_results(c.out_prefix) for c in children}
    finally:
        for c in children:
            c.stop()


def run_child(target, kwargs, workdir, timeout, name="child"):
    """Runs one child scenario to completion and returns its results."""
    return run_children([(name, target, kwargs, None)], workdir, timeout)[name]


def run_script(path, args, timeout):
    """Runs ``python path *args`` (own process group, killed on any exit).

    Returns ``(exit_code, combined_output)``; raises ChildFailed at the deadline.
    """
    proc = subprocess.Popen([sys.executable, path, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=child_env(), cwd=REPO_ROOT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out.decode(errors="replace")
    except subprocess.TimeoutExpired:
        raise ChildFailed(f"{path} {args} did not finish in {timeout}s") from None
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def worker_tf_config(ports, index, job="worker"):
    """TF_CONFIG (JSON string) for task `index` of a loopback cluster of `ports`."""
    cluster = {job: [f"{LOOPBACK}:{p}" for p in ports]}
    return json.dumps({"cluster": cluster, "task": {"type": job, "index": index}})


def run_workers(target, kwargs, workdir, timeout, num_workers=2, extra_specs=()):
    """Runs `num_workers` children as one MultiWorkerMirrored cluster on 127.0.0.1.

    `extra_specs` are started alongside (e.g. the reference run). Returns
    ``{"worker0": results, ..., **extra}``.
    """
    ports = free_ports(num_workers)
    specs = [(f"worker{i}", target, kwargs, {"TF_CONFIG": worker_tf_config(ports, i)})
             for i in range(num_workers)]
    return run_children(specs + list(extra_specs), workdir, timeout)


def save_results(results, out_prefix):
    arrays, other = {}, {}
    for rec, values in results.items():
        for key, value in values.items():
            if isinstance(value, np.ndarray):
                arrays[f"{rec}::{key}"] = value
            else:
                other.setdefault(rec, {})[key] = value
        other.setdefault(rec, {})
    np.savez(out_prefix + ".npz", **arrays)
    with open(out_prefix + ".json", "w") as f:
        json.dump(other, f)


def load_results(out_prefix):
    with open(out_prefix + ".json") as f:
        results = json.load(f)
    with np.load(out_prefix + ".npz") as data:
        for full_key in data.files:
            rec, key = full_key.split("::", 1)
            results.setdefault(rec, {})[key] = data[full_key]
    return results


# --------------------------------------------------------------------------------------
# Parent-side assertions on records.
# --------------------------------------------------------------------------------------
def check_record(record):
    """Fails with the child's traceback if the scenario raised."""
    if "error" in record:
        raise AssertionError("scenario raised in the child process:\n" + record["error"])
    return record


def assert_close(actual, expected, what, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def assert_matches_reference(record, prefix="dist", slots=True):
    """`prefix/<var>` (and its slots) equal the single-device reference `ref/<var>`."""
    for name in VAR_NAMES:
        assert_close(record[f"{prefix}/{name}"], record[f"ref/{name}"],
                     f"{prefix} weights of {name} differ from the summed-gradient reference")
        if slots:
            for slot in SLOTS:
                assert_close(record[f"{prefix}_slot/{slot}/{name}"],
                             record[f"ref_slot/{slot}/{name}"],
                             f"{prefix} slot {slot!r} of {name} differs from the reference")
        # A test that cannot fail is a defect: training must have moved every weight.
        assert not np.array_equal(record[f"ref/{name}"], record[f"init/{name}"]), name


def assert_reference_matches_numpy(record):
    """The single-device reference itself equals the NumPy float64 Adamax."""
    if optimizer_kind() != "adamax":
        return
    for name in VAR_NAMES:
        assert_close(record[f"ref/{name}"], record[f"np/{name}"],
                     f"reference weights of {name} differ from NumPy Adamax",
                     rtol=NUMPY_RTOL, atol=NUMPY_ATOL)
        for slot in SLOTS:
            assert_close(record[f"ref_slot/{slot}/{name}"], record[f"np_slot/{slot}/{name}"],
                         f"reference slot {slot!r} of {name} differs from NumPy Adamax",
                         rtol=NUMPY_RTOL, atol=NUMPY_ATOL)


def assert_lazy_rows_untouched(record, prefix="dist"):
    """Rows never looked up keep their initial value bit for bit; their slots stay 0."""
    rows = np.setdiff1d(np.arange(VOCAB), np.asarray(record["gathered_rows"]))
    assert rows.size, "the data must leave some embedding rows untouched"
    init = record["init/emb"]
    np.testing.assert_array_equal(record[f"{prefix}/emb"][rows], init[rows],
                                  err_msg=f"lazy mode changed untouched rows {rows.tolist()}")
    for slot in SLOTS:
        np.testing.assert_array_equal(
            record[f"{prefix}_slot/{slot}/emb"][rows], 0.0,
            err_msg=f"lazy mode changed slot {slot!r} of untouched rows {rows.tolist()}")
    touched = np.asarray(record["gathered_rows"])
    assert not np.array_equal(record[f"{prefix}/emb"][touched], init[touched])


# --------------------------------------------------------------------------------------
# Child side. Everything below imports TensorFlow lazily.
# --------------------------------------------------------------------------------------
def child_main():
    """Entry point of a child process (see module docstring)."""
    target, out_prefix, kwargs_json = sys.argv[1:4]
    _install_watchdog(float(os.environ.get("DIST_HELPERS_CHILD_TIMEOUT", "600")))
    module_name, func_name = target.split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        results = func(**json.loads(kwargs_json))
        save_results(results, out_prefix)
    except BaseException:  # noqa: BLE001 - report anything, then exit non-zero
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: gRPC servers and collective executors can block it.
    os._exit(0)


def _install_watchdog(timeout):
    # Dump every thread's stack and exit if the scenario hangs past its budget.
    faulthandler.dump_traceback_later(timeout, exit=True)
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:  # orphaned: the test runner is gone
                os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def import_tf(logical_cpus=1):
    """Imports TensorFlow, splitting the CPU into `logical_cpus` logical devices."""
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    if logical_cpus > 1:
        cpus = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * logical_cpus)
    return tf


@contextlib.contextmanager
def timed(label):
    """Prints how long the block took (to the child's log, for slow-test triage)."""
    start = time.monotonic()
    try:
        yield
    finally:
        print(f"[timing] {label}: {time.monotonic() - start:.1f}s", flush=True)


def error_record():
    return {"error": traceback.format_exc()}


def make_optimizer(cfg):
    """The optimizer under test for `cfg` (call under the strategy's scope)."""
    kind = optimizer_kind()
    if kind == "legacy_adam":
        import tf_keras

        return tf_keras.optimizers.legacy.Adam(LEARNING_RATE, BETA_1, BETA_2, EPSILON)
    import tf_adamax

    mode = "exact" if cfg["sparse_mode"] == "dense" else cfg["sparse_mode"]
    return tf_adamax.Adamax(learning_rate=LEARNING_RATE, beta_1=BETA_1, beta_2=BETA_2,
                            epsilon=EPSILON, sparse_mode=mode, jit_compile=cfg["jit_compile"])


def build_optimizer(opt, var_list):
    """`opt.build(var_list)`: creates the slots (call under the strategy's scope)."""
    if optimizer_kind() == "legacy_adam":
        opt._create_all_weights(var_list)  # OptimizerV2 has no public build()
    else:
        opt.build(var_list)


def slot_name(canonical):
    """Optimizer-specific slot name for "momentum" / "norm"."""
    if optimizer_kind() == "legacy_adam":
        return {"momentum": "m", "norm": "v"}[canonical]
    return canonical


def build_model(init):
    """A tf.Module with variables emb, k1, b1, k2 (create under the strategy scope)."""
    import tensorflow as tf

    model = tf.Module(name="model")
    for name in VAR_NAMES:
        setattr(model, name, tf.Variable(init[name], name=name))
    return model


def model_loss(model, ids, y):
    """Per-replica SUM of squared errors: never divided by the number of replicas, so
    the all-reduced (summed) gradient is the gradient of the summed losses."""
    import tensorflow as tf

    # embedding_lookup -> IndexedSlices gradient with the duplicates of `ids`; it also
    # dispatches to the partitioned lookup of a ShardedVariable.
    e = tf.nn.embedding_lookup(model.emb, ids)
    x = tf.reduce_sum(e, axis=1)
    h = tf.tanh(tf.matmul(x, model.k1) + model.b1)
    pred = tf.matmul(h, model.k2)
    return tf.reduce_sum(tf.square(pred - y))


def train_vars(model):
    """Trainable variables in VAR_NAMES order; a ShardedVariable contributes its shards
    (TF cannot differentiate with respect to a ShardedVariable itself)."""
    out = []
    for name in VAR_NAMES:
        v = getattr(model, name)
        out.extend(getattr(v, "variables", [v]) if is_sharded(v) else [v])
    return out


def is_sharded(v):
    from tensorflow.python.distribute import sharded_variable

    return isinstance(v, sharded_variable.ShardedVariable)


def prepare_grads(grads, cfg):
    """In "dense" configs every gradient is densified before apply_gradients."""
    import tensorflow as tf

    if cfg["sparse_mode"] != "dense":
        return list(grads)
    return [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]


def make_replica_fn(model, opt, var_list, cfg):
    """Replica step: forward+backward (optionally its own XLA function), then apply."""
    import tensorflow as tf

    def fwd_bwd(ids, y):
        with tf.GradientTape() as tape:
            loss = model_loss(model, ids, y)
        return loss, tape.gradient(loss, var_list)

    if cfg.get("replica_fn", "plain") == "xla":
        fwd_bwd = tf.function(fwd_bwd, jit_compile=True)

    def replica_fn(ids, y):
        loss, grads = fwd_bwd(ids, y)
        opt.apply_gradients(zip(prepare_grads(grads, cfg), var_list))
        return loss

    return replica_fn


class StrategyTrainer:
    """Model + optimizer under a Mirrored / MultiWorkerMirrored strategy."""

    def __init__(self, strategy, cfg, init):
        import tensorflow as tf

        self.tf, self.strategy, self.cfg = tf, strategy, cfg
        with strategy.scope():
            self.model = build_model(init)
            self.opt = make_optimizer(cfg)
        self.var_list = train_vars(self.model)
        replica_fn = make_replica_fn(self.model, self.opt, self.var_list, cfg)

        @tf.function
        def step(ids, y):
            return strategy.run(replica_fn, args=(ids, y))

        self._step = step

    def build(self):
        with self.strategy.scope():
            build_optimizer(self.opt, self.var_list)

    def step(self, ids_s, y_s):
        """One step; replica r (global id) gets ids_s[r], y_s[r]."""
        tf = self.tf

        def per_replica(data):
            return self.strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(data[ctx.replica_id_in_sync_group]))

        self._step(per_replica(ids_s), per_replica(y_s))

    def record(self, rec, prefix="dist"):
        """Primary values, every local replica value and device, slots, iterations."""
        s = self.strategy
        for name, v in zip(VAR_NAMES, self.var_list):
            rec[f"{prefix}/{name}"] = v.numpy()
            locals_ = s.experimental_local_results(v)
            rec[f"{prefix}_num_local/{name}"] = len(locals_)
            for i, lv in enumerate(locals_):
                rec[f"{prefix}_local{i}/{name}"] = lv.numpy()
                rec[f"{prefix}_device{i}/{name}"] = lv.device
            for slot in SLOTS:
                sv = self.opt.get_slot(v, slot_name(slot))
                rec[f"{prefix}_slot/{slot}/{name}"] = sv.numpy()
                slot_locals = s.experimental_local_results(sv)
                rec[f"{prefix}_slot_num_local/{slot}/{name}"] = len(slot_locals)
                for i, lv in enumerate(slot_locals):
                    rec[f"{prefix}_slot_local{i}/{slot}/{name}"] = lv.numpy()
                    rec[f"{prefix}_slot_device{i}/{slot}/{name}"] = lv.device
        rec[f"{prefix}_iterations"] = int(self.opt.iterations.numpy())
        return rec


class ReferenceTrainer:
    """No strategy: one device fed the gradient of the sum of the replicas' losses."""

    def __init__(self, cfg, init, num_replicas):
        import tensorflow as tf

        self.tf, self.cfg = tf, cfg
        self.model = build_model(init)
        self.opt = make_optimizer(cfg)
        self.var_list = train_vars(self.model)
        self.grads = []  # summed gradients per step, for the NumPy Adamax

        @tf.function
        def step(ids, y):
            with tf.GradientTape() as tape:
                loss = tf.add_n([model_loss(self.model, ids[r], y[r])
                                 for r in range(num_replicas)])
            grads = prepare_grads(tape.gradient(loss, self.var_list), cfg)
            self.opt.apply_gradients(zip(grads, self.var_list))
            return grads

        self._step = step

    def build(self):
        build_optimizer(self.opt, self.var_list)

    def step(self, ids_s, y_s):
        tf = self.tf
        grads = self._step(tf.constant(ids_s), tf.constant(y_s))
        self.grads.append({
            name: (g.indices.numpy(), g.values.numpy()) if isinstance(g, tf.IndexedSlices)
            else g.numpy() for name, g in zip(VAR_NAMES, grads)})

    def record(self, rec, prefix="ref"):
        for name, v in zip(VAR_NAMES, self.var_list):
            rec[f"{prefix}/{name}"] = v.numpy()
            for slot in SLOTS:
                rec[f"{prefix}_slot/{slot}/{name}"] = self.opt.get_slot(v, slot_name(slot)).numpy()
        rec[f"{prefix}_iterations"] = int(self.opt.iterations.numpy())
        return rec


def reference_record(cfg, ids, y, init, rec=None, cache=None):
    """Trains the single-device reference on all steps; adds ref/*, np/*, init/*.

    The reference always runs with jit_compile=False: a distributed XLA run must match
    the plain single-device path, and the reference needs no compile time. `cache` (a
    dict) reuses the reference of an earlier config with the same sparse_mode.
    """
    rec = {} if rec is None else rec
    cfg = dict(cfg, jit_compile=False)
    key = cfg["sparse_mode"]
    if cache is not None and key in cache:
        rec.update(cache[key])
        return rec
    trainer = ReferenceTrainer(cfg, init, ids.shape[1])
    for s in range(ids.shape[0]):
        trainer.step(ids[s], y[s])
    trainer.record(rec)
    w, slots = numpy_adamax(init, trainer.grads, cfg["sparse_mode"])
    for name in VAR_NAMES:
        rec[f"init/{name}"] = init[name]
        rec[f"np/{name}"] = w[name]
        for slot in SLOTS:
            rec[f"np_slot/{slot}/{name}"] = slots[slot][name]
    rec["gathered_rows"] = sorted(int(i) for i in np.unique(ids))
    if cache is not None:
        cache[key] = dict(rec)
    return rec


# --------------------------------------------------------------------------------------
# ParameterServerStrategy: in-process loopback cluster and a deterministic trainer.
# --------------------------------------------------------------------------------------
def start_in_process_cluster(num_workers=2, num_ps=2):
    """Starts gRPC servers for `num_workers` workers and `num_ps` parameter servers in
    this process, on free 127.0.0.1 ports; this process is the chief (coordinator).

    Returns ``(cluster_resolver, servers)``; keep `servers` alive while training.
    """
    import tensorflow as tf

    ports = free_ports(num_workers + num_ps)
    cluster = tf.train.ClusterSpec({
        "worker": [f"{LOOPBACK}:{p}" for p in ports[:num_workers]],
        "ps": [f"{LOOPBACK}:{p}" for p in ports[num_workers:]],
    })
    worker_config = tf.compat.v1.ConfigProto()
    if (os.cpu_count() or 1) < num_workers + 1:
        # Each worker needs threads for its own ops and the coordinator's RPCs.
        worker_config.inter_op_parallelism_threads = num_workers + 1
    servers = [tf.distribute.Server(cluster, job_name="worker", task_index=i,
                                    config=worker_config, protocol="grpc", start=True)
               for i in range(num_workers)]
    servers += [tf.distribute.Server(cluster, job_name="ps", task_index=i,
                                     protocol="grpc", start=True)
                for i in range(num_ps)]
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(cluster, rpc_layer="grpc")
    return resolver, servers


class ParameterServerTrainer:
    """Model + optimizer under ParameterServerStrategy; `run` schedules one step at a
    time and joins after each, so the result is the sequential single-device one."""

    def __init__(self, strategy, coordinator, cfg, init, ids, y):
        import tensorflow as tf

        self.tf, self.strategy, self.coordinator, self.cfg = tf, strategy, coordinator, cfg
        with strategy.scope():
            self.model = build_model(init)
            self.opt = make_optimizer(cfg)
        self.var_list = train_vars(self.model)
        if cfg.get("build", "implicit") == "explicit":
            with strategy.scope():
                build_optimizer(self.opt, self.var_list)
        replica_fn = make_replica_fn(self.model, self.opt, self.var_list, cfg)
        # [S, B, K] and [S, B, 1]: the (single) replica of step s gets row s.
        self._ids, self._y = tf.constant(ids[:, 0]), tf.constant(y[:, 0])

        @tf.function
        def step(s):
            return strategy.run(replica_fn, args=(tf.gather(self._ids, s),
                                                  tf.gather(self._y, s)))

        self._step = step
        self.num_steps = ids.shape[0]

    def run(self):
        for s in range(self.num_steps):
            self.coordinator.schedule(self._step, args=(self.tf.constant(s),))
            self.coordinator.join()

    def shards(self, name):
        v = getattr(self.model, name)
        return list(v.variables) if is_sharded(v) else [v]

    def record(self, rec, prefix="dist"):
        """Values (shards concatenated), shard and slot-shard devices, iterations."""
        for name in VAR_NAMES:
            shards = self.shards(name)
            rec[f"{prefix}/{name}"] = np.concatenate([v.numpy() for v in shards])
            rec[f"{prefix}_shard_devices/{name}"] = [v.device for v in shards]
            rec[f"{prefix}_shard_rows/{name}"] = [int(v.shape[0]) for v in shards]
            for slot in SLOTS:
                slot_shards = [self.opt.get_slot(v, slot_name(slot)) for v in shards]
                rec[f"{prefix}_slot/{slot}/{name}"] = np.concatenate(
                    [sv.numpy() for sv in slot_shards])
                rec[f"{prefix}_slot_devices/{slot}/{name}"] = [sv.device for sv in slot_shards]
                rec[f"{prefix}_slot_rows/{slot}/{name}"] = [int(sv.shape[0])
                                                            for sv in slot_shards]
        rec[f"{prefix}_iterations"] = int(self.opt.iterations.numpy())
        return rec
