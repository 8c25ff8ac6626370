"""The Keras adapters under OneDevice, CentralStorage and Mirrored strategies.

Under a strategy the adapters hand the update to Keras's own per-variable
path (it places each update on every copy of a mirrored variable). Bad pairs
must still raise, naming the variable, before anything changes, as they do
without a strategy; and good steps must equal the NumPy reference fed the
summed gradient. Everything runs in ONE fresh child with two logical CPUs.
"""

import os
import sys

import numpy as np
import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import dist_helpers as dh  # noqa: E402
from reference import AdamaxReference, SparseGrad  # noqa: E402

STRATEGIES = ("one_device", "central_storage", "mirrored")
LIBS = ("keras3", "tf_keras")
BAD_CASES = ("broadcast", "row_width", "out_of_range")
LR = 0.1
TABLE0 = np.arange(8, dtype=np.float32).reshape(4, 2) / 8
BIAS0 = np.ones(3, np.float32)
# Two steps; the sparse one repeats row 1 with opposite signs.
STEP_GRADS = [
    ("dense", np.array([[0.5, -1.0], [2.0, 0.25], [-0.5, 0.0], [1.0, 3.0]],
                       np.float32)),
    ("sparse", (np.array([1, 3, 1]),
                np.array([[1.0, -2.0], [0.5, 0.5], [-3.0, 1.0]], np.float32))),
]
BIAS_GRAD = np.array([0.5, -0.25, 1.0], np.float32)
# Replica r adds r * OTHER_* to its gradients: the replicas' gradients point
# in different directions, so clipping each before the sum would show.
OTHER_DENSE = np.array([[-1.0, 0.5], [0.0, 2.0], [1.5, -1.0], [0.25, 0.0]],
                       np.float32)
OTHER_ROWS = np.array([[0.0, 1.5], [-2.0, 0.0], [1.0, 1.0]], np.float32)
OTHER_BIAS = np.array([-1.0, 0.75, 0.0], np.float32)
# Clipping must apply to the gradient summed over replicas (Keras 3 alone
# clips each replica's share). The norms lie between those of the dense
# step's mean gradient (~4.1 for the table, ~4.2 all together) and its sum
# (~8.2, ~8.4): the sum is clipped, each replica's share or a mean is not.
# Also weight decay: a lazy step decays only the rows it names, as in the
# core, on every copy.
CLIPS = {"none": {}, "clipnorm": {"clipnorm": 6.0},
         "global_clipnorm": {"global_clipnorm": 6.0},
         "clipvalue": {"clipvalue": 0.8}, "weight_decay": {"weight_decay": 0.2}}
RUNS = [(graph, mode, "none") for graph in (False, True)
        for mode in ("exact", "lazy")]
RUNS += [(True, mode, clip) for mode in ("exact", "lazy")
         for clip in CLIPS if clip != "none"]


def _make_strategy(tf, name):
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/cpu:0"), 1
    if name == "central_storage":
        return tf.distribute.experimental.CentralStorageStrategy(
            ["/cpu:0", "/cpu:1"]), 2
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), 2


def child_adapters(strategies, libs, bad_cases):
    tf = dh.import_tf(logical_cpus=2)
    import keras
    import tf_adamax.keras
    import tf_adamax.tf_keras

    adapters = {
        "keras3": (tf_adamax.keras.Adamax, keras.Variable),
        "tf_keras": (tf_adamax.tf_keras.Adamax, tf.Variable),
    }

    def bad_grad(case):
        if case == "broadcast":  # [1, 2] would broadcast over the [4, 2] table
            return tf.ones((1, 2))
        if case == "row_width":
            return tf.IndexedSlices(tf.ones((2, 3)), tf.constant([0, 1]),
                                    tf.constant([4, 3]))
        return tf.IndexedSlices(tf.ones((2, 2)), tf.constant([1, 7]),
                                tf.constant([4, 2]))

    def values(opt, table, bias):
        return [np.array(v) for v in [table, bias] + list(opt.variables)]

    results = {}
    for sname in strategies:
        strategy, replicas = _make_strategy(tf, sname)
        for lib in libs:
            opt_class, var_class = adapters[lib]
            for graph, mode, clip in RUNS:
                if clip != "none" and replicas == 1:
                    continue  # nothing is summed: clipping is as without one
                with strategy.scope():
                    table = var_class(TABLE0, name="st_table")
                    bias = var_class(BIAS0, name="st_bias")
                    opt = opt_class(learning_rate=LR, sparse_mode=mode,
                                    **dict(CLIPS[clip]))
                    opt.build([table, bias])

                def run(make_pairs):
                    def step():
                        replica = tf.distribute.get_replica_context()
                        opt.apply_gradients(make_pairs(tf.cast(
                            replica.replica_id_in_sync_group, tf.float32)))
                    fn = lambda: strategy.run(step)  # noqa: E731
                    if graph:
                        fn = tf.function(fn)
                    fn()

                key = f"{sname}-{lib}-{'function' if graph else 'eager'}-{mode}"
                if clip != "none":
                    key += f"-{clip}"
                rec = {"replicas": replicas}
                # Good steps first: the reference is fed the gradient
                # summed over replicas.
                for kind, g in STEP_GRADS:
                    if kind == "dense":
                        make = lambda r, g=g: [  # noqa: E731
                            (g + r * OTHER_DENSE, table),
                            (BIAS_GRAD + r * OTHER_BIAS, bias)]
                    else:
                        make = lambda r, g=g: [  # noqa: E731
                            (tf.IndexedSlices(g[1] + r * OTHER_ROWS,
                                              tf.constant(g[0]),
                                              tf.constant([4, 2])), table),
                            (BIAS_GRAD + r * OTHER_BIAS, bias)]
                    run(make)
                rec["table"] = np.array(table)
                rec["bias"] = np.array(bias)
                # The slots tell a summed gradient from a mean (Adamax's
                # weights barely do: m / u is scale-free).
                for name, i in (("table", 0), ("bias", 1)):
                    rec[f"m_{name}"] = np.array(opt._m[i])
                    rec[f"u_{name}"] = np.array(opt._u[i])
                results[key] = rec
                if clip != "none":
                    continue
                before = values(opt, table, bias)
                for case in bad_cases:
                    try:
                        run(lambda r, case=case: [
                            (tf.constant(BIAS_GRAD), bias),
                            (bad_grad(case), table)])
                        rec[f"{case}:error"] = ""
                    except Exception as e:  # noqa: BLE001 - recorded
                        rec[f"{case}:error"] = f"{type(e).__name__}: {e}"
                    after = values(opt, table, bias)
                    rec[f"{case}:unchanged"] = all(
                        np.array_equal(a, b) for a, b in zip(before, after))
    # Mirrored variables updated from the cross-replica context (outside
    # strategy.run, with a gradient the user reduced): a clear error and no
    # change, as in the core.
    strategy, _ = _make_strategy(tf, "mirrored")
    for lib in libs:
        opt_class, var_class = adapters[lib]
        wheres = ["outside_scope", "in_scope", "function", "unbuilt"]
        if lib == "keras3":
            wheres.append("apply_without_variables")  # Keras 3's apply(grads)
        for where in wheres:
            with strategy.scope():
                var = var_class(np.array([0.0, 1.0], "float32"), name="cr_w")
                opt = opt_class(learning_rate=LR)
                if where != "unbuilt":  # refused before anything is built
                    opt.build([var])

            def call(opt=opt, var=var):
                opt.apply_gradients([(tf.constant([-2.0, -2.0]), var)])

            try:
                if where == "in_scope":
                    with strategy.scope():
                        call()
                elif where == "function":
                    tf.function(lambda call=call: call())()  # no tf args
                elif where == "apply_without_variables":
                    opt.apply([tf.constant([-2.0, -2.0])])
                else:
                    call()
                raised = ""
            except Exception as e:  # noqa: BLE001 - recorded
                raised = f"{type(e).__name__}: {str(e)[-700:]}"
            results[f"cross-replica-{lib}-{where}"] = {
                "raised": raised, "iterations": int(np.array(opt.iterations)),
                "built": bool(getattr(opt, "built", False)
                              or getattr(opt, "_built", False)),
                "copies": [np.array(c).tolist() for c in
                           strategy.experimental_local_results(
                               var.value if lib == "keras3" else var)]}
    # A MirroredStrategy of one device: nothing to sum, so a call outside
    # strategy.run is fine (as in the core). Keras 3 itself wants
    # strategy.run for a strategy's variables (outside the scope: "Need to
    # be inside strategy.scope()"; inside: no merge_call), so tf-keras only.
    single = tf.distribute.MirroredStrategy(["/cpu:0"])
    for lib in [lib for lib in libs if lib == "tf_keras"]:
        opt_class, var_class = adapters[lib]
        with single.scope():
            var = var_class(np.array([1.0, 2.0], "float32"), name="single_w")
            opt = opt_class(learning_rate=LR)
        try:
            for _ in range(2):
                opt.apply_gradients([(tf.constant([1.0, -1.0]), var)])
            got = np.array(var).tolist()
        except Exception as e:  # noqa: BLE001 - recorded
            got = f"{type(e).__name__}: {str(e)[:300]}"
        results[f"single-mirrored-{lib}"] = {
            "values": got, "iterations": int(np.array(opt.iterations))}
    # Without a strategy, variables on another device than the optimizer's
    # own (iterations, learning rate): the compiled update runs on theirs.
    for lib in libs:
        opt_class, var_class = adapters[lib]
        for graph in (False, True):
            with tf.device("/CPU:1"):
                far = var_class(np.array([1.0, 2.0], "float32"), name="far_w")
            opt = opt_class(learning_rate=LR)

            def step(opt=opt, far=far):  # called bare: no tf.function args
                opt.apply_gradients([(tf.constant([1.0, -1.0]), far)])

            if graph:
                step = tf.function(lambda step=step: step())
            try:
                for _ in range(2):
                    step()
                got = np.array(far).tolist()
            except Exception as e:  # noqa: BLE001 - recorded
                got = f"{type(e).__name__}: {str(e)[:300]}"
            results[f"device-{lib}-{'function' if graph else 'eager'}"] = {
                "values": got, "iterations": int(np.array(opt.iterations))}
    return results


@pytest.fixture(scope="module")
def adapter_results(tmp_path_factory):
    return dh.run_child(
        f"{__name__}:child_adapters",
        dict(strategies=list(STRATEGIES), libs=list(LIBS),
             bad_cases=list(BAD_CASES)),
        tmp_path_factory.mktemp("adapter_strategies"), 300)


def _reference(sparse_mode, replicas, clip="none"):
    ref = AdamaxReference(learning_rate=LR, sparse_mode=sparse_mode,
                          **CLIPS[clip])
    ref.add_variable("table", TABLE0, np.float32)
    ref.add_variable("bias", BIAS0, np.float32)
    for kind, g in STEP_GRADS:
        if kind == "dense":
            table_grad = sum(g + r * OTHER_DENSE for r in range(replicas))
        else:
            table_grad = SparseGrad(
                np.tile(g[0], replicas),
                np.concatenate([g[1] + r * OTHER_ROWS
                                for r in range(replicas)]))
        ref.apply({"table": table_grad,
                   "bias": sum(BIAS_GRAD + r * OTHER_BIAS
                               for r in range(replicas))})
    return ref


CASES = [(s, lib, g, mode) for s in STRATEGIES for lib in LIBS
         for g in ("eager", "function") for mode in ("exact", "lazy")]
CLIP_CASES = [(s, lib, "function", f"{mode}-{clip}") for s in STRATEGIES
              if s != "one_device"
              for lib in LIBS for _, mode, clip in RUNS if clip != "none"]


@pytest.mark.parametrize("strategy,lib,graph,sparse_mode", CASES + CLIP_CASES)
def test_adapter_under_strategy_matches_reference(adapter_results, strategy,
                                                  lib, graph, sparse_mode):
    rec = adapter_results[f"{strategy}-{lib}-{graph}-{sparse_mode}"]
    mode, _, clip = sparse_mode.partition("-")
    ref = _reference(mode, rec["replicas"], clip or "none")
    for name in ("table", "bias"):
        np.testing.assert_allclose(rec[name], ref.w[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
        np.testing.assert_allclose(rec[f"m_{name}"], ref.m[name], rtol=1e-5,
                                   atol=1e-6, err_msg=f"m of {name}")
        np.testing.assert_allclose(rec[f"u_{name}"], ref.u[name], rtol=1e-5,
                                   atol=1e-6, err_msg=f"u of {name}")


@pytest.mark.parametrize("strategy,lib,graph,sparse_mode", CASES)
def test_adapter_under_strategy_rejects_bad_pairs_and_changes_nothing(
        adapter_results, strategy, lib, graph, sparse_mode):
    rec = adapter_results[f"{strategy}-{lib}-{graph}-{sparse_mode}"]
    for case in BAD_CASES:
        error = rec[f"{case}:error"]
        assert "st_table" in error, (case, error)
        expected = "out of range" if case == "out_of_range" else "shape"
        assert expected in error, (case, error)
        assert rec[f"{case}:unchanged"], (case, error)


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("graph", ["eager", "function"])
def test_adapter_updates_a_variable_on_another_device(adapter_results, lib,
                                                      graph):
    # The built-ins can; the compiled update used to read the optimizer's
    # step inside the program, on the variable's device (a cross-device
    # resource error).
    _check_two_steps(adapter_results[f"device-{lib}-{graph}"])


def _check_two_steps(rec):
    """Two steps of [1, -1] on [1, 2], against the reference."""
    rec = dh.check_record(rec)
    assert not isinstance(rec["values"], str), rec["values"]
    ref = AdamaxReference(learning_rate=LR)
    ref.add_variable("w", np.array([1.0, 2.0]), np.float32)
    for _ in range(2):
        ref.apply({"w": np.array([1.0, -1.0])})
    np.testing.assert_allclose(rec["values"], ref.w["w"], rtol=1e-6)
    assert rec["iterations"] == 2


@pytest.mark.parametrize("lib,where", [
    (lib, where) for lib in LIBS
    for where in ("outside_scope", "in_scope", "function", "unbuilt")]
    + [("keras3", "apply_without_variables")])
def test_mirrored_variables_outside_strategy_run_are_a_clear_error(
        adapter_results, lib, where):
    # tf-keras's path updated each copy with the one gradient (its copies
    # then differed), failed inside XLA with a device error naming no fix
    # (after counting the step, in a tf.function), or on a missing
    # merge_call; as in the core, it now raises first and changes nothing.
    rec = dh.check_record(adapter_results[f"cross-replica-{lib}-{where}"])
    assert "mirrored on 2 devices" in rec["raised"], rec["raised"]
    assert "strategy.run" in rec["raised"] and "cr_w" in rec["raised"]
    assert rec["iterations"] == 0
    assert rec["copies"] == [[0.0, 1.0], [0.0, 1.0]]
    assert rec["built"] == (where != "unbuilt")


def test_one_device_mirrored_variables_update_outside_strategy_run(
        adapter_results):
    # The refusal above is for copies on several devices only.
    _check_two_steps(adapter_results["single-mirrored-tf_keras"])
