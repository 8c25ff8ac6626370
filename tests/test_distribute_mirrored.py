"""MirroredStrategy over two logical CPUs: `tf_adamax.Adamax` equals one device fed the
summed gradients; slots are mirrored; an XLA forward/backward replica function works.

All configurations run in ONE fresh child process (two logical CPU devices must be set
up before TensorFlow starts); each parameterized test checks its own record.
"""

import os
import sys

import numpy as np
import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import dist_helpers as dh  # noqa: E402

NUM_STEPS = 5
NUM_REPLICAS = 2
SPARSE_MODES = ("dense", "exact", "lazy")
JIT = (True, False)
# Acceptance 1: forward/backward inline in the replica function of the step's tf.function;
# "dense" densifies the embedding gradient before apply_gradients.
PLAIN_CONFIGS = [dict(sparse_mode=m, jit_compile=j, replica_fn="plain")
                 for m in SPARSE_MODES for j in JIT]
# Acceptance 2: forward/backward is its own tf.function(jit_compile=True), then
# apply_gradients runs in the replica function (where tf-keras hits "merge_call called
# while defining a new graph"). The optimizer keeps its own jit_compile=True too.
XLA_CONFIGS = [dict(sparse_mode=m, jit_compile=True, replica_fn="xla")
               for m in ("exact", "lazy")]
# Acceptance 5: checkpoint round trips Mirrored <-> no strategy.
# Lazy mode: its untouched rows keep zero slots, which must survive the round trip.
CKPT_MODES = ("lazy",)
CKPT_STEPS_BEFORE, CKPT_STEPS_AFTER = 3, 2
CHILD_TIMEOUT = 240


def child_mirrored(configs, num_steps, ckpt_modes, ckpt_dir):
    """Child: every config under MirroredStrategy and under no strategy, then the
    checkpoint round trips."""
    tf = dh.import_tf(logical_cpus=NUM_REPLICAS)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == NUM_REPLICAS
    ids, y = dh.make_batches(num_steps, NUM_REPLICAS)
    init = dh.initial_values()
    results, cache = {}, {}
    for cfg in configs:
        rec = {}
        try:
            with dh.timed(dh.config_name(cfg)):
                dh.reference_record(cfg, ids, y, init, rec, cache=cache)
                trainer = dh.StrategyTrainer(strategy, cfg, init)
                for s in range(num_steps):
                    trainer.step(ids[s], y[s])
                trainer.record(rec)
        except Exception:  # noqa: BLE001 - reported by the owning test
            rec = dh.error_record()
        results[dh.config_name(cfg)] = rec
    for key, child in (("cross-replica", child_cross_replica),
                       ("replica-shape", child_replica_shape_mismatch),
                       ("constraint", child_constraint),
                       ("sparse-stays-sparse", child_sparse_stays_sparse),
                       ("bfloat16-sparse", child_bfloat16_sparse),
                       ("shared-gradient", child_shared_gradient),
                       ("mixed-dtypes", child_mixed_dtypes),
                       ("tpu-program", child_tpu_program),
                       ("component-slot", child_component_slot),
                      ("tpu-float64", child_tpu_float64),
                      ("autocast-copy", child_autocast_and_copy)):
        try:
            results[key] = child(tf, strategy)
        except Exception:  # noqa: BLE001 - reported by the owning test
            results[key] = dh.error_record()
    for mode in ckpt_modes:
        try:
            with dh.timed(f"ckpt-{mode}"):
                results[f"ckpt-{mode}"] = child_checkpoint(strategy, mode, ckpt_dir)
        except Exception:  # noqa: BLE001
            results[f"ckpt-{mode}"] = dh.error_record()
    return results


def child_cross_replica(tf, strategy):
    """apply_gradients on mirrored variables outside `strategy.run`, outside and
    inside the scope, for both jit settings: the error and whether state changed."""
    import tf_adamax

    out = {}
    for jit in (True, False):
        with strategy.scope():
            var = tf.Variable([1.0, 2.0], name="mirrored_w")
            opt = tf_adamax.Adamax(0.1, jit_compile=jit)
            opt.build([var])
        for where in ("outside_scope", "in_scope"):
            try:
                if where == "in_scope":
                    with strategy.scope():
                        opt.apply_gradients([(tf.constant([1.0, 1.0]), var)])
                else:
                    opt.apply_gradients([(tf.constant([1.0, 1.0]), var)])
                error = None
            except Exception as e:  # noqa: BLE001 - recorded for the test
                error = f"{type(e).__name__}: {e}"
            out[f"jit={jit}/{where}"] = {
                "error": error,
                "iterations": int(opt.iterations.numpy()),
                "values": [v.numpy().tolist()
                           for v in strategy.experimental_local_results(var)]}
    return out


CONSTRAINT_GRADS = ([[1.0, -2.0, 0.5], [0.5, 1.0, -3.0]],   # replica 0, steps 1-2
                    [[0.5, 1.0, -1.0], [-2.0, 0.5, 1.0]])   # replica 1
CONSTRAINT_LR, CONSTRAINT_BOUNDS, CONSTRAINT_INIT = 0.4, (0.0, 1.0), [0.5, 0.9, 0.1]


def child_constraint(tf, strategy):
    """A constrained mirrored variable after two steps in `strategy.run`: each
    device's copy, for both jit settings."""
    import tf_adamax

    out = {}
    grads = tf.constant(CONSTRAINT_GRADS)
    for jit in (True, False):
        with strategy.scope():
            var = tf.Variable(CONSTRAINT_INIT, constraint=lambda x: tf.clip_by_value(
                x, *CONSTRAINT_BOUNDS))
            opt = tf_adamax.Adamax(CONSTRAINT_LR, jit_compile=jit)

        @tf.function
        def step(t, var=var, opt=opt):
            def replica_fn():
                replica = tf.distribute.get_replica_context().replica_id_in_sync_group
                opt.apply_gradients([(grads[replica, t], var)])
            strategy.run(replica_fn)

        for t in range(2):
            step(tf.constant(t))
        out[f"jit={jit}"] = [v.numpy().tolist()
                             for v in strategy.experimental_local_results(var)]
    return out


# Replica r's gradients at step t: a table (5 x 2) named by repeated ids of
# opposite signs, and a dense vector. Rows 3 and 4 are never named.
TPU_IDS = ([[0, 2, 0], [1, 1, 2]], [[2, 0, 2], [0, 1, 0]])
TPU_VALUES = ([[[1.0, -2.0], [0.5, 0.5], [-3.0, 1.0]],
               [[2.0, 1.0], [-2.0, 0.5], [1.0, 1.0]]],
              [[[-0.5, 1.0], [1.0, 2.0], [0.25, -1.0]],
               [[1.0, -1.0], [0.5, 0.5], [-1.0, 3.0]]])
TPU_DENSE = ([[1.0, -1.0, 2.0], [0.5, 0.5, -1.0]],
             [[-2.0, 1.0, 1.0], [1.0, -0.5, 0.25]])
TPU_LR, TPU_CLIP = 0.1, 2.5


def child_tpu_program(tf, strategy):
    """The update built as inside a TPUStrategy's replicated program (no TPU
    here): `_private.in_tpu_program` and `in_xla_context` answer True while
    the step is traced, as TF's TPUReplicateContext makes them. The update
    must then take the distributed variables whole, with no nested XLA
    function; the copies of each variable, per mode and jit setting."""
    import tf_adamax
    from tf_adamax import _private

    ids, vals, dense = (tf.constant(x) for x in (TPU_IDS, TPU_VALUES, TPU_DENSE))
    out = {}
    real = (getattr(_private, "in_tpu_program", None), _private.in_xla_context)
    try:
        _private.in_tpu_program = _private.in_xla_context = lambda: True
        for mode in ("exact", "lazy"):
            for jit in (True, False):
                for clip in (None, TPU_CLIP):
                    with strategy.scope():
                        table = tf.Variable(tf.ones((5, 2)))
                        vec = tf.Variable([1.0, 2.0, -1.0])
                        opt = tf_adamax.Adamax(TPU_LR, sparse_mode=mode,
                                               jit_compile=jit,
                                               global_clipnorm=clip)

                    def nested(*args, **kwargs):
                        raise AssertionError("nested XLA update called")
                    opt._fns.update = nested

                    @tf.function
                    def step(t, table=table, vec=vec, opt=opt):
                        def replica_fn():
                            r = tf.distribute.get_replica_context(
                                ).replica_id_in_sync_group
                            opt.apply_gradients([
                                (tf.IndexedSlices(vals[r, t], ids[r, t],
                                                  tf.constant([5, 2])), table),
                                (dense[r, t], vec)])
                        strategy.run(replica_fn)

                    for t in range(2):
                        step(tf.constant(t))
                    out[f"{mode}/jit={jit}/clip={clip}"] = {
                        name: [[x.numpy().tolist() for x in
                                strategy.experimental_local_results(v)]
                               for v in (var, opt.get_slot(var, "momentum"),
                                         opt.get_slot(var, "norm"))]
                        for name, var in (("table", table), ("vec", vec))}
    finally:
        _private.in_tpu_program, _private.in_xla_context = real
    return out


def child_tpu_float64(tf, strategy):
    """The float64 tensors a step traced as in a TPU program consumes, with
    the state in float32 as on TPUs (TPUs have no float64)."""
    import tf_adamax
    from tf_adamax import _distribute, _private

    real = (getattr(_private, "in_tpu_program", None), _private.in_xla_context,
            _distribute.state_float_dtype)
    found = []
    try:
        _private.in_tpu_program = _private.in_xla_context = lambda: True
        _distribute.state_float_dtype = lambda strategy: tf.float32
        with strategy.scope():
            table = tf.Variable(tf.ones((5, 2)))
            vec = tf.Variable([1.0, 2.0, -1.0])
            opt = tf_adamax.Adamax(0.1)

        @tf.function
        def step():
            def replica_fn():
                opt.apply_gradients([(tf.IndexedSlices(
                    tf.ones((3, 2)), tf.constant([0, 2, 0]),
                    tf.constant([5, 2])), table), (tf.ones(3), vec)])
            strategy.run(replica_fn)

        def walk(graph):
            for op in graph.get_operations():
                if any(t.dtype == tf.float64 and t.consumers()
                       for t in op.outputs):
                    found.append(f"{op.type} {op.name}")
            for fn in graph._functions.values():  # nested function bodies
                if hasattr(fn, "graph"):
                    walk(fn.graph)

        walk(step.get_concrete_function().graph)
    finally:
        _private.in_tpu_program, _private.in_xla_context = real[:2]
        _distribute.state_float_dtype = real[2]
    return {"float64": found}


def child_component_slot(tf, strategy):
    """`get_slot` for each per-device copy of a mirrored variable."""
    import tf_adamax

    with strategy.scope():
        var = tf.Variable([1.0, 2.0])
        opt = tf_adamax.Adamax(0.1)
    opt.build([var])
    out = {}
    for i, copy in enumerate(strategy.experimental_local_results(var)):
        try:
            out[f"copy{i}"] = all(opt.get_slot(copy, s) is opt.get_slot(var, s)
                                  for s in ("momentum", "norm"))
        except Exception as e:  # noqa: BLE001 - recorded for the test
            out[f"copy{i}"] = f"{type(e).__name__}: {e}"
    return out


def child_autocast_and_copy(tf, strategy):
    """A tf-keras mixed-precision kernel stepped through its AutoCast wrapper
    and through the mirrored variable it wraps; and a deep copy, made
    outside `strategy.scope()`, of a module holding mirrored weights and the
    optimizer, stepping an old and a new variable. Weights after each."""
    import copy

    import tf_adamax
    import tf_keras

    out = {}
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with strategy.scope():
            layer = tf_keras.layers.Dense(2, use_bias=False,
                                          kernel_initializer="ones")
            layer.build((None, 2))
            opt = tf_adamax.Adamax(0.1, jit_compile=False)
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    wrapper, inner = layer.kernel, layer.kernel._variable
    out["wrapper_class"] = type(wrapper).__name__
    grads = [[[0.5, -1.0], [2.0, 0.25]], [[-0.25, 3.0], [1.0, -0.5]],
             [[1.0, 1.0], [-2.0, 0.125]]]
    for g, var in zip(grads, [wrapper, inner, wrapper]):
        # Each replica's half: the all-reduce sums them to g.
        strategy.run(lambda g=g, var=var: opt.apply_gradients(
            [(tf.constant(g, tf.float32) / 2, var)]))
    out["autocast_weights"] = inner.numpy().tolist()
    out["autocast_state"] = len(opt.variables)

    class Module(tf.Module):
        def __init__(self):
            super().__init__()
            with strategy.scope():
                self.w = tf.Variable([1.0, 2.0])
                self.opt = tf_adamax.Adamax(0.1, jit_compile=False)

    module = Module()
    strategy.run(lambda: module.opt.apply_gradients(
        [(tf.constant([0.25, -0.5]), module.w)]))
    clone = copy.deepcopy(module)  # outside the scope
    with strategy.scope():
        clone.head = tf.Variable([3.0])  # a new layer of the copy
    strategy.run(lambda: clone.opt.apply_gradients(
        [(tf.constant([0.25, -0.5]), clone.w),
         (tf.constant([1.0]), clone.head)]))
    out["copy_w"] = clone.w.numpy().tolist()
    out["copy_head"] = clone.head.numpy().tolist()
    out["original_w"] = module.w.numpy().tolist()
    return out


SPARSE_GRAPH_ROWS = 30_011  # a row count no other dimension here has


def child_sparse_stays_sparse(tf, strategy):
    """Ops yielding a table-sized tensor in a traced `strategy.run` step whose
    replicas apply IndexedSlices gradients (all-reduce included), per mode."""
    import tf_adamax
    from conftest import table_sized_outputs

    out = {}
    for mode in ("lazy", "exact"):
        with strategy.scope():
            table = tf.Variable(tf.zeros((SPARSE_GRAPH_ROWS, 4)))
            opt = tf_adamax.Adamax(sparse_mode=mode)

        def replica_fn(table=table, opt=opt):
            replica = tf.cast(
                tf.distribute.get_replica_context().replica_id_in_sync_group,
                tf.float32)
            opt.apply_gradients([(tf.IndexedSlices(
                tf.ones((3, 4)) * (replica + 1.0), tf.constant([1, 5, 1]),
                tf.constant([SPARSE_GRAPH_ROWS, 4])), table)])

        step = tf.function(lambda replica_fn=replica_fn: strategy.run(replica_fn))
        step()
        found, count = table_sized_outputs(step, SPARSE_GRAPH_ROWS)
        out[mode] = {"found": found, "ops": count,
                     "row1": [v.numpy()[1].tolist()
                              for v in strategy.experimental_local_results(table)]}
    return out


def child_bfloat16_sparse(tf, strategy):
    """A bfloat16 table's IndexedSlices gradients under the strategy (TF's
    all-gather of the values has no bfloat16 kernel) and on one device fed
    both replicas' slices, per mode and jit setting: the tables and slots
    after two steps."""
    import tf_adamax

    rows = tf.constant([[1, 3, 1], [3, 1, 4]])  # row 1 and 3 across replicas
    base = tf.constant([[[0.5, -1.0], [2.0, 0.25], [-1.5, 0.75]],
                        [[1.5, 1.0], [-2.0, -0.25], [3.0, 1.25]]])

    def grads(step):  # multiples of 1/8: every sum is exact in float32
        return [tf.IndexedSlices(tf.cast(base[r] * (step + 1.0), tf.bfloat16),
                                 rows[r], tf.constant([6, 2]))
                for r in range(NUM_REPLICAS)]

    init = np.arange(12, dtype=np.float32).reshape(6, 2) / 4

    def state(table, opt):  # [(table, m, u) of each copy]
        local = strategy.experimental_local_results
        return [[np.array(tf.cast(x, tf.float32)).tolist() for x in copy]
                for copy in zip(*[local(x) for x in [
                    table, opt.get_slot(table, "momentum"),
                    opt.get_slot(table, "norm")]])]

    out = {}
    for mode in ("exact", "lazy"):
        for jit in (True, False):
            with strategy.scope():
                table = tf.Variable(tf.constant(init, tf.bfloat16), name="emb")
                opt = tf_adamax.Adamax(0.1, sparse_mode=mode, jit_compile=jit)

            @tf.function
            def step(s, table=table, opt=opt):
                def replica_fn():
                    r = tf.distribute.get_replica_context().replica_id_in_sync_group
                    g = grads(s)
                    opt.apply_gradients([(tf.IndexedSlices(
                        tf.where(tf.equal(r, 0), g[0].values, g[1].values),
                        tf.where(tf.equal(r, 0), g[0].indices, g[1].indices),
                        g[0].dense_shape), table)])
                strategy.run(replica_fn)

            one = tf.Variable(tf.constant(init, tf.bfloat16), name="emb")
            one_opt = tf_adamax.Adamax(0.1, sparse_mode=mode, jit_compile=jit)
            for s in range(2):
                step(tf.constant(float(s)))
                g = grads(float(s))
                one_opt.apply_gradients([(tf.IndexedSlices(
                    tf.concat([x.values for x in g], 0),
                    tf.concat([x.indices for x in g], 0), g[0].dense_shape), one)])
            out[f"{mode}/jit={jit}"] = {"copies": state(table, opt),
                                        "one_device": state(one, one_opt)[0]}
    return out


def child_shared_gradient(tf, strategy):
    """Every replica passes the same gradient object (computed outside
    `strategy.run` and captured): the mirrored variable's copies after two
    steps, traced and eager, and one device's variable fed the sum (twice
    the gradient: the dense one doubled, the sparse one's slices twice)."""
    import tf_adamax

    out = {}
    for kind in ("dense", "sparse"):
        for traced in (True, False):
            # epsilon=1: Adamax's step would not change if the gradients
            # were all scaled by 2 (once instead of summed twice) otherwise.
            with strategy.scope():
                w = tf.Variable(tf.ones((4, 2)), name="shared_w")
                opt = tf_adamax.Adamax(0.1, epsilon=1.0)
            one = tf.Variable(tf.ones((4, 2)))
            one_opt = tf_adamax.Adamax(0.1, epsilon=1.0)
            dense = tf.constant([[1.0, -2.0], [0.0, 0.0], [3.0, 0.5], [0.0, 0.0]])
            rows = tf.constant([0, 2])
            values = tf.gather(dense, rows)

            def step(s, kind=kind, w=w, opt=opt):
                g = (dense * s if kind == "dense"
                     else tf.IndexedSlices(values * s, rows, tf.constant([4, 2])))
                strategy.run(lambda: opt.apply_gradients([(g, w)]))

            for s in (1.0, 2.0):
                (tf.function(step) if traced else step)(tf.constant(s))
                one_opt.apply_gradients([(
                    2 * dense * s if kind == "dense" else tf.IndexedSlices(
                        tf.concat([values, values], 0) * s,
                        tf.concat([rows, rows], 0), tf.constant([4, 2])),
                    one)])
            out[f"{kind}/traced={traced}"] = {
                "copies": [np.array(c).tolist() for c in
                           strategy.experimental_local_results(w)],
                "one_device": one.numpy().tolist(),
                "iterations": int(opt.iterations.numpy())}
    return out


# Per replica: (float16 variable's gradient, float32 variable's gradient);
# the second step's are twice the first's. Multiples of 1/4: exact sums.
MIXED_GRADS = (([0.5, -1.0, 0.25], [1.0, -2.0]),
               ([1.5, 0.75, -1.0], [-0.25, 3.0]))
MIXED_INIT = ([1.0, -0.5, 2.0], [0.5, 1.5])
# "+clip": a clip option that does not clip these gradients takes the
# adapters' other sum (over replicas before clipping).
MIXED_FRONTS = ("core/jit=True", "core/jit=False", "keras3", "tf_keras",
                "core+clip", "keras3+clip", "tf_keras+clip")


def child_mixed_dtypes(tf, strategy):
    """A float16 and a float32 variable in one `apply_gradients` call
    (TF packs one sum's gradients into one buffer, which needs one dtype):
    each copy after two steps in `strategy.run`, per front end."""
    import tf_adamax
    import tf_adamax.keras
    import tf_adamax.tf_keras

    make = {"core/jit=True": lambda: tf_adamax.Adamax(0.1),
            "core/jit=False": lambda: tf_adamax.Adamax(0.1, jit_compile=False),
            "keras3": lambda: tf_adamax.keras.Adamax(0.1),
            "tf_keras": lambda: tf_adamax.tf_keras.Adamax(0.1),
            "core+clip": lambda: tf_adamax.Adamax(0.1, clipnorm=100.0),
            "keras3+clip": lambda: tf_adamax.keras.Adamax(0.1, clipnorm=100.0),
            "tf_keras+clip": lambda: tf_adamax.tf_keras.Adamax(
                0.1, clipnorm=100.0)}
    grads = tf.constant([g16 + g32 for g16, g32 in MIXED_GRADS])
    out = {}
    for front in MIXED_FRONTS:
        try:
            with strategy.scope():
                half = tf.Variable(tf.constant(MIXED_INIT[0], tf.float16))
                full = tf.Variable(MIXED_INIT[1])
                opt = make[front]()
                if front.startswith("keras3"):  # cannot build in strategy.run
                    opt.build([half, full])

            @tf.function
            def step(scale, half=half, full=full, opt=opt):
                def replica_fn():
                    r = tf.distribute.get_replica_context().replica_id_in_sync_group
                    g = tf.gather(grads, r) * scale
                    opt.apply_gradients([(tf.cast(g[:3], tf.float16), half),
                                         (g[3:], full)])
                strategy.run(replica_fn)

            for scale in (1.0, 2.0):
                step(tf.constant(scale))
            local = strategy.experimental_local_results
            out[front] = {"copies": [
                [np.array(tf.cast(x, tf.float64)).tolist() for x in copy]
                for copy in zip(local(half), local(full))],
                "iterations": int(opt.iterations.numpy())}
        except Exception as e:  # noqa: BLE001 - recorded for the test
            out[front] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    return out


def child_replica_shape_mismatch(tf, strategy):
    """One replica's gradient has a shape known only at run time that does not
    fit the variable (dense rows, or sparse row width): the error, whether state
    changed, and whether a good step still runs afterwards (a failed collective
    would leave the strategy's collectives aborted)."""
    import tf_adamax

    out = {}
    # With accumulation (grappler once folded its check away) after the
    # others: a check failing in the process's very first collective step
    # can leave TF's collectives aborted (README, Errors).
    for kind, jit, accumulation in [
            (k, j, None) for k in ("dense", "sparse") for j in (True, False)
    ] + [("dense", False, 2)]:
        with strategy.scope():
            var = tf.Variable(np.arange(8, dtype=np.float32).reshape(4, 2),
                              name="tbl")
            opt = tf_adamax.Adamax(
                0.1, jit_compile=jit,
                gradient_accumulation_steps=accumulation)
            opt.build([var])

        @tf.function
        def step(bad, kind=kind, var=var, opt=opt):
            def replica_fn():
                ctx = tf.distribute.get_replica_context()
                wrong = tf.logical_and(bad, tf.equal(
                    ctx.replica_id_in_sync_group, 1))
                if kind == "dense":  # [1, 2] instead of [4, 2]
                    grad = tf.ones(tf.stack([tf.where(wrong, 1, 4), 2]))
                else:  # rows of 3 instead of 2
                    grad = tf.IndexedSlices(
                        tf.ones(tf.stack([2, tf.where(wrong, 3, 2)])),
                        tf.constant([0, 2]), tf.constant([4, 2]))
                opt.apply_gradients([(grad, var)])
            strategy.run(replica_fn)

        def state(var=var, opt=opt):
            return [np.array(v).tolist() for v in
                    strategy.experimental_local_results(var)] + [
                np.array(v).tolist() for v in opt.variables]

        before = state()
        try:
            step(tf.constant(True))
            error = None
        except Exception as e:  # noqa: BLE001 - recorded for the test
            error = f"{type(e).__name__}: {e}"
        unchanged = state() == before
        try:
            step(tf.constant(False))
            good = int(opt._iterations.numpy())  # calls
        except Exception as e:  # noqa: BLE001
            good = f"{type(e).__name__}: {str(e)[:300]}"
        out[f"{kind}/jit={jit}" + ("/accumulation" if accumulation
                                   else "")] = {
            "error": error, "unchanged": unchanged,
            "good_step_iterations": good}
    return out


def _restore(tf, trainer, path, rec, prefix):
    """Restores `path` into a fresh, unbuilt trainer, then builds its optimizer.

    Restoring before the slots exist exercises the deferred slot restoration of the
    slot-variable protocol; `assert_consumed` then proves every saved value (slots
    included) found its variable.
    """
    status = tf.train.Checkpoint(model=trainer.model, optimizer=trainer.opt).read(path)
    trainer.build()
    try:
        status.assert_consumed()
        rec[f"{prefix}_consumed"] = "ok"
    except AssertionError as e:
        rec[f"{prefix}_consumed"] = str(e)
    trainer.record(rec, prefix)


def child_checkpoint(strategy, sparse_mode, ckpt_dir):
    """Save under Mirrored -> restore without strategy (a_*), and the reverse (b_*).

    Both sides then train CKPT_STEPS_AFTER more steps and must stay equal.
    """
    import tensorflow as tf

    # Checkpointing does not depend on how the update is compiled; skip XLA's compile
    # time here (the matrix above covers jit_compile=True).
    cfg = dict(sparse_mode=sparse_mode, jit_compile=False)
    ids, y = dh.make_batches(CKPT_STEPS_BEFORE + CKPT_STEPS_AFTER, NUM_REPLICAS, seed=7)
    init = dh.initial_values()
    # The restoring side starts from other weights, so only the restore can align them.
    other = {k: np.zeros_like(v) for k, v in init.items()}
    before, after = range(CKPT_STEPS_BEFORE), range(CKPT_STEPS_BEFORE, len(ids))
    rec = {}

    def round_trip(tag, make_saver, saver_kind, make_restorer, restorer_kind):
        saver = make_saver()
        for s in before:
            saver.step(ids[s], y[s])
        saver.record(rec, f"{tag}_saved")
        path = tf.train.Checkpoint(model=saver.model, optimizer=saver.opt).write(
            os.path.join(ckpt_dir, f"{sparse_mode}-{tag}"))
        for s in after:
            saver.step(ids[s], y[s])
        saver.record(rec, f"{tag}_cont_{saver_kind}")
        restorer = make_restorer()
        _restore(tf, restorer, path, rec, f"{tag}_restored")
        for s in after:
            restorer.step(ids[s], y[s])
        restorer.record(rec, f"{tag}_cont_{restorer_kind}")

    round_trip("a", lambda: dh.StrategyTrainer(strategy, cfg, init), "dist",
               lambda: dh.ReferenceTrainer(cfg, other, NUM_REPLICAS), "ref")
    round_trip("b", lambda: dh.ReferenceTrainer(cfg, init, NUM_REPLICAS), "ref",
               lambda: dh.StrategyTrainer(strategy, cfg, other), "dist")
    return rec


@pytest.fixture(scope="module")
def mirrored_results(tmp_path_factory):
    # One child for the whole module: TensorFlow start-up and device setup are paid once.
    return dh.run_child(f"{__name__}:child_mirrored",
                        dict(configs=PLAIN_CONFIGS + XLA_CONFIGS, num_steps=NUM_STEPS,
                             ckpt_modes=CKPT_MODES,
                             ckpt_dir=str(tmp_path_factory.mktemp("ckpt"))),
                        tmp_path_factory.mktemp("mirrored"), CHILD_TIMEOUT)


def _check_mirrored(rec, cfg):
    dh.check_record(rec)
    dh.assert_reference_matches_numpy(rec)
    dh.assert_matches_reference(rec)
    assert rec["dist_iterations"] == NUM_STEPS, "iterations must count steps, not replicas"
    assert rec["ref_iterations"] == NUM_STEPS
    for name in dh.VAR_NAMES:
        assert rec[f"dist_num_local/{name}"] == NUM_REPLICAS
        np.testing.assert_array_equal(rec[f"dist_local0/{name}"], rec[f"dist_local1/{name}"],
                                      err_msg=f"replicas of {name} diverged")
        for slot in dh.SLOTS:
            key = f"{slot}/{name}"
            assert rec[f"dist_slot_num_local/{key}"] == NUM_REPLICAS, (
                f"slot {key} is not mirrored over both devices")
            devices = [rec[f"dist_slot_device{i}/{key}"] for i in range(NUM_REPLICAS)]
            assert devices[0].endswith("CPU:0") and devices[1].endswith("CPU:1"), devices
            assert devices == [rec[f"dist_device{i}/{name}"] for i in range(NUM_REPLICAS)], (
                f"slot {key} is not colocated with its variable")
            np.testing.assert_array_equal(rec[f"dist_slot_local0/{key}"],
                                          rec[f"dist_slot_local1/{key}"],
                                          err_msg=f"slot {key} differs between replicas")
    if cfg["sparse_mode"] == "lazy" and dh.optimizer_kind() == "adamax":
        dh.assert_lazy_rows_untouched(rec)


@pytest.mark.parametrize("cfg", PLAIN_CONFIGS, ids=dh.config_name)
def test_mirrored_matches_summed_gradient_reference(mirrored_results, cfg):
    _check_mirrored(mirrored_results[dh.config_name(cfg)], cfg)


@pytest.mark.parametrize("cfg", XLA_CONFIGS, ids=dh.config_name)
def test_mirrored_xla_replica_fn_then_apply_gradients(mirrored_results, cfg):
    _check_mirrored(mirrored_results[dh.config_name(cfg)], cfg)


def _assert_same_state(rec, actual, expected, exact):
    for name in dh.VAR_NAMES:
        keys = [f"/{name}"] + [f"_slot/{slot}/{name}" for slot in dh.SLOTS]
        for key in keys:
            if exact:
                np.testing.assert_array_equal(rec[actual + key], rec[expected + key],
                                              err_msg=f"{actual}{key} != {expected}{key}")
            else:
                dh.assert_close(rec[actual + key], rec[expected + key],
                                f"{actual}{key} != {expected}{key}")
    assert rec[f"{actual}_iterations"] == rec[f"{expected}_iterations"]


def _check_restored(mirrored_results, mode, side):
    """Direction `side` ("a" or "b"): saved after CKPT_STEPS_BEFORE steps,
    every saved value consumed, restored state bit-identical to the saved."""
    rec = dh.check_record(mirrored_results[f"ckpt-{mode}"])
    assert rec[f"{side}_saved_iterations"] == CKPT_STEPS_BEFORE
    assert rec[f"{side}_restored_consumed"] == "ok", rec[f"{side}_restored_consumed"]
    _assert_same_state(rec, f"{side}_restored", f"{side}_saved", exact=True)
    return rec


@pytest.mark.parametrize("mode", CKPT_MODES)
def test_checkpoint_mirrored_to_single_device(mirrored_results, mode):
    rec = _check_restored(mirrored_results, mode, "a")
    _assert_same_state(rec, "a_cont_ref", "a_cont_dist", exact=False)
    assert rec["a_cont_ref_iterations"] == CKPT_STEPS_BEFORE + CKPT_STEPS_AFTER
    for name in dh.VAR_NAMES:  # training went on after the restore
        assert not np.array_equal(rec[f"a_cont_ref/{name}"], rec[f"a_restored/{name}"])


@pytest.mark.parametrize("mode", CKPT_MODES)
def test_checkpoint_single_device_to_mirrored(mirrored_results, mode):
    rec = _check_restored(mirrored_results, mode, "b")
    # Restored into both mirrored copies, not only the primary.
    for name in dh.VAR_NAMES:
        for i in range(NUM_REPLICAS):
            np.testing.assert_array_equal(rec[f"b_restored_local{i}/{name}"],
                                          rec[f"b_saved/{name}"], err_msg=f"{name} copy {i}")
            for slot in dh.SLOTS:
                np.testing.assert_array_equal(
                    rec[f"b_restored_slot_local{i}/{slot}/{name}"],
                    rec[f"b_saved_slot/{slot}/{name}"], err_msg=f"{slot}/{name} copy {i}")
    _assert_same_state(rec, "b_cont_dist", "b_cont_ref", exact=False)
    assert rec["b_cont_dist_iterations"] == CKPT_STEPS_BEFORE + CKPT_STEPS_AFTER
    for name in dh.VAR_NAMES:
        np.testing.assert_array_equal(rec[f"b_cont_dist_local0/{name}"],
                                      rec[f"b_cont_dist_local1/{name}"])


def test_apply_gradients_outside_strategy_run_is_a_clear_error(mirrored_results):
    # Was: an XLA cross-device error (jit_compile=True), an IndexError from TF (in
    # the scope), or an update of one gradient with no replicas to sum (jit off).
    rec = dh.check_record(mirrored_results["cross-replica"])
    for case, got in rec.items():
        assert got["error"] is not None, case
        assert got["error"].startswith("RuntimeError"), (case, got["error"])
        assert "mirrored_w" in got["error"] and "strategy.run" in got["error"], case
        assert got["iterations"] == 0, case
        assert got["values"] == [[1.0, 2.0], [1.0, 2.0]], case


def test_replica_gradient_of_wrong_run_time_shape_is_named_before_the_sum(
        mirrored_results):
    # Checked per replica before the cross-replica sum: otherwise the
    # collective failed first, naming no variable, and stayed aborted.
    rec = dh.check_record(mirrored_results["replica-shape"])
    assert set(rec) == {f"{k}/jit={j}" for k in ("dense", "sparse")
                        for j in (True, False)} | {"dense/jit=False/accumulation"}
    for case, got in rec.items():
        assert got["error"] is not None, case
        assert "tbl" in got["error"], (case, got["error"][:500])
        assert got["unchanged"], case
        assert got["good_step_iterations"] == 1, (case, got["good_step_iterations"])


def test_bfloat16_sparse_gradients_are_summed_over_replicas(mirrored_results):
    # TF 2.21 cannot all-gather bfloat16 IndexedSlices values (its own
    # optimizers fail too); they are widened to float32, exactly, so each copy
    # equals one device fed both replicas' slices.
    rec = dh.check_record(mirrored_results["bfloat16-sparse"])
    assert set(rec) == {f"{m}/jit={j}" for m in ("exact", "lazy")
                        for j in (True, False)}
    init = (np.arange(12, dtype=np.float32).reshape(6, 2) / 4).tolist()
    for case, got in rec.items():
        assert len(got["copies"]) == NUM_REPLICAS, case
        for copy in got["copies"]:
            assert copy == got["one_device"], case
        table, m, _ = got["one_device"]
        assert table[1] != init[1] and table[4] != init[4], case  # stepped
        assert m[1] != [0.0, 0.0], case
        if case.startswith("lazy"):
            assert table[0] == init[0] and m[0] == [0.0, 0.0], case


def test_a_gradient_every_replica_shares_is_summed_over_replicas(mirrored_results):
    # merge_call regroups one object passed by every replica into one plain
    # value, which TF's sum could not index (IndexError; tf-keras's Adamax
    # too). Each replica's copy is summed, as any gradient.
    rec = dh.check_record(mirrored_results["shared-gradient"])
    assert set(rec) == {f"{k}/traced={t}" for k in ("dense", "sparse")
                        for t in (True, False)}
    for case, got in rec.items():
        assert got["iterations"] == 2, case
        assert got["one_device"] != np.ones((4, 2)).tolist(), case
        for copy in got["copies"]:
            np.testing.assert_allclose(copy, got["one_device"], rtol=1e-6,
                                       atol=1e-7, err_msg=case)


def test_constraint_projects_each_copy_after_the_summed_update(mirrored_results):
    from reference import dense_step

    rec = dh.check_record(mirrored_results["constraint"])
    summed = np.sum(CONSTRAINT_GRADS, axis=0)
    w, m, u = np.array(CONSTRAINT_INIT, np.float64), np.zeros(3), np.zeros(3)
    clipped = 0
    for t in range(2):
        w, m, u = dense_step(w, m, u, summed[t], CONSTRAINT_LR, 0.9, 0.999, 1e-7,
                             t + 1)
        clipped += int(np.sum((w < CONSTRAINT_BOUNDS[0]) | (w > CONSTRAINT_BOUNDS[1])))
        w = np.clip(w, *CONSTRAINT_BOUNDS)
    assert clipped, "the summed steps never reach the constraint's bounds"
    assert set(rec) == {"jit=True", "jit=False"}
    for case, copies in rec.items():
        assert len(copies) == NUM_REPLICAS, case
        for copy in copies:
            np.testing.assert_allclose(copy, w, rtol=1e-6, atol=1e-6, err_msg=case)


def test_sparse_gradients_stay_sparse_through_the_all_reduce(mirrored_results):
    # DESIGN: "Sparse gradients stay sparse where the strategy allows." A lazy
    # step's graph, all-reduce included, holds no table-sized tensor (a
    # densified sum would); the exact step's does (it is O(rows) by design).
    rec = dh.check_record(mirrored_results["sparse-stays-sparse"])
    assert rec["lazy"]["found"] == [], rec["lazy"]["found"]
    assert rec["exact"]["found"], "the check cannot see table-sized tensors"
    assert rec["lazy"]["ops"] > 20
    for mode in ("lazy", "exact"):  # the step ran and summed both replicas
        for row in rec[mode]["row1"]:
            assert all(x < 0 for x in row), (mode, row)


def test_float16_and_float32_variables_are_summed_in_one_call(mirrored_results):
    # TF concatenates one sum's dense gradients into one buffer, so a model
    # mixing float16 and float32 variables failed (ConcatV2 TypeError, TF's
    # and Keras's own optimizers too); each dtype is now summed apart.
    from reference import dense_step

    rec = dh.check_record(mirrored_results["mixed-dtypes"])
    assert set(rec) == set(MIXED_FRONTS)
    summed = [np.add(*[np.array(r[k]) for r in MIXED_GRADS]) for k in (0, 1)]
    expected = []
    for k, dtype in ((0, np.float16), (1, np.float32)):
        w = np.array(MIXED_INIT[k], np.float64)
        m = u = np.zeros_like(w)
        for t, scale in ((1, 1.0), (2, 2.0)):
            w, m, u = dense_step(w, m, u, summed[k] * scale, 0.1, 0.9, 0.999,
                                 1e-7, t)
            w = w.astype(dtype).astype(np.float64)
        expected.append(w)
    for front, got in rec.items():
        assert "error" not in got, (front, got.get("error"))
        assert got["iterations"] == 2, front
        assert len(got["copies"]) == NUM_REPLICAS, front
        for half, full in got["copies"]:
            np.testing.assert_allclose(half, expected[0], rtol=2e-3,
                                       err_msg=front)
            np.testing.assert_allclose(full, expected[1], rtol=1e-6,
                                       err_msg=front)


def test_update_inside_a_tpu_program_takes_the_variables_whole(mirrored_results):
    # TPUStrategy runs `strategy.run` as one XLA program per core, where TF's
    # `extended.update` calls the update once with the whole TPU variable.
    # The core raised there ("apply_gradients was called inside a
    # tf.function(jit_compile=True)"), and would have updated every core's
    # copy from each core's program, in a nested XLA function, with float64
    # betas. Emulated on MirroredStrategy: every copy must still equal one
    # device fed the summed gradients (NumPy float64), clipped or not.
    from reference import exact_sparse_step, lazy_sparse_step, dense_step

    rec = dh.check_record(mirrored_results["tpu-program"])
    assert len(rec) == 8, sorted(rec)
    ids = np.concatenate(TPU_IDS, axis=1)          # [step, both replicas' ids]
    vals = np.concatenate(TPU_VALUES, axis=1)
    dense = np.sum(TPU_DENSE, axis=0)
    for case, got in rec.items():
        mode, _, clip = case.split("/")
        sparse_step = exact_sparse_step if mode == "exact" else lazy_sparse_step
        table = [np.ones((5, 2)), np.zeros((5, 2)), np.zeros((5, 2))]
        vec = [np.array([1.0, 2.0, -1.0]), np.zeros(3), np.zeros(3)]
        for t in range(2):
            g_table = np.zeros((5, 2))
            np.add.at(g_table, ids[t], vals[t])
            scale = 1.0
            if clip != "clip=None":
                norm = np.sqrt(np.sum(g_table ** 2) + np.sum(dense[t] ** 2))
                scale = min(1.0, TPU_CLIP / norm)
            table = list(sparse_step(*table, ids[t], vals[t] * scale, TPU_LR,
                                     0.9, 0.999, 1e-7, t + 1))
            vec = list(dense_step(*vec, dense[t] * scale, TPU_LR, 0.9, 0.999,
                                  1e-7, t + 1))
        for name, want in (("table", table), ("vec", vec)):
            for what, copies, expected in zip(("var", "momentum", "norm"),
                                              got[name], want):
                assert len(copies) == NUM_REPLICAS, (case, name)
                for copy in copies:
                    np.testing.assert_allclose(
                        copy, expected, rtol=2e-6, atol=1e-6,
                        err_msg=f"{case} {name} {what}")
        if mode == "lazy":  # rows 3 and 4 were never named
            for copies in got["table"][1:]:
                for copy in copies:
                    assert np.all(np.array(copy)[3:] == 0), case


def test_get_slot_of_each_copy_of_a_mirrored_variable(mirrored_results):
    # TF 2.21 links a copy to its MirroredVariable on the copy's handle only;
    # the copy of the second device had "no slot 'norm' yet" (KeyError).
    rec = dh.check_record(mirrored_results["component-slot"])
    assert rec == {f"copy{i}": True for i in range(NUM_REPLICAS)}, rec


def test_update_inside_a_tpu_program_uses_no_float64(mirrored_results):
    # TPUs have no float64: with the rate stored in float32 there, the step
    # built as in a TPU program consumes no float64 tensor (the betas were
    # float64 arguments of the core's update).
    rec = dh.check_record(mirrored_results["tpu-float64"])
    assert rec == {"float64": []}, rec


def test_autocast_wrapper_of_a_mirrored_variable_and_a_copy_outside_scope(
        mirrored_results):
    # Under a strategy tf-keras wraps a mirrored variable in a subclass of
    # AutoCastVariable: the wrapper and the variable it wraps got two sets
    # of slots. A deep copy made outside the scope steps on under the
    # strategy, a new variable of the copy included.
    from reference import dense_step

    rec = dh.check_record(mirrored_results["autocast-copy"])
    assert rec["wrapper_class"] != "AutoCastVariable"  # the subclass case
    g = [np.array([[0.5, -1.0], [2.0, 0.25]]),
         np.array([[-0.25, 3.0], [1.0, -0.5]]),
         np.array([[1.0, 1.0], [-2.0, 0.125]])]
    w, m, u = np.ones((2, 2)), np.zeros((2, 2)), np.zeros((2, 2))
    for t, gt in enumerate(g, 1):
        w, m, u = dense_step(w, m, u, gt, 0.1, 0.9, 0.999, 1e-7, t)
    np.testing.assert_allclose(rec["autocast_weights"], w, rtol=1e-6)
    assert rec["autocast_state"] == 4  # iterations, rate, one m, one u
    # Replicas each give the gradient: the sum is twice it.
    g1, g2 = np.array([0.5, -1.0]), np.array([0.5, -1.0])
    w, m, u = dense_step(np.array([1.0, 2.0]), 0, 0, g1, 0.1, 0.9, 0.999,
                         1e-7, 1)
    np.testing.assert_allclose(rec["original_w"], w, rtol=1e-6)
    w, m, u = dense_step(w, m, u, g2, 0.1, 0.9, 0.999, 1e-7, 2)
    np.testing.assert_allclose(rec["copy_w"], w, rtol=1e-6)
    head, _, _ = dense_step(np.array([3.0]), 0, 0, np.array([2.0]), 0.1, 0.9,
                            0.999, 1e-7, 2)
    np.testing.assert_allclose(rec["copy_head"], head, rtol=1e-6)
