"""ParameterServerStrategy: a loopback cluster (this child is the chief; 2 workers and
2 parameter servers run as in-process gRPC servers) trains the toy model with every
variable sharded over both parameter servers (`FixedShardsPartitioner(2)`).

One step is scheduled at a time and joined, so the result must equal the sequential
single-device reference; lazy mode must leave never-gathered rows of each embedding
shard (and their slots) untouched; slots are sharded like, and placed with, their
variable shards.

The data looks up the same number of ids in each shard every step
(`make_shard_balanced_batches`): each shard's IndexedSlices then has a fixed length,
and the jit_compile=True update is compiled once per shard instead of once per new
length (XLA specializes on shapes), which keeps this test's run time bounded.
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
NUM_WORKERS, NUM_PS = 2, 2
# build="explicit": opt.build(var_list) under strategy.scope() before the first step;
# otherwise slots are created while the first scheduled step is traced (as in the
# tf.distribute parameter-server tutorial). Every config also has dense gradients: the
# kernels and the bias are sharded too.
CONFIGS = [
    dict(sparse_mode="lazy", jit_compile=True),
    dict(sparse_mode="lazy", jit_compile=False, build="explicit"),
    dict(sparse_mode="exact", jit_compile=True),
    dict(sparse_mode="exact", jit_compile=False),
]
CHILD_TIMEOUT = 240
_KEEP_ALIVE = []


def child_ps(configs, num_steps):
    """Child: references first, then the cluster and every config under it."""
    tf = dh.import_tf()
    ids, y = dh.make_shard_balanced_batches(num_steps, NUM_PS)
    init = dh.initial_values()
    results, cache = {}, {}
    for cfg in configs:
        try:
            results[dh.config_name(cfg)] = dh.reference_record(cfg, ids, y, init, cache=cache)
        except Exception:  # noqa: BLE001 - reported by the owning test
            results[dh.config_name(cfg)] = dh.error_record()
    resolver, servers = dh.start_in_process_cluster(NUM_WORKERS, NUM_PS)
    strategy = tf.distribute.experimental.ParameterServerStrategy(
        resolver,
        variable_partitioner=tf.distribute.experimental.partitioners.FixedShardsPartitioner(
            NUM_PS))
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    # Kept alive to the end: a trainer dropped mid-run makes the coordinator log gRPC
    # "Tried to remove non-existent function" noise for its functions.
    trainers = []
    for cfg in configs:
        name = dh.config_name(cfg)
        if "error" in results[name]:
            continue
        try:
            with dh.timed(name):
                trainer = dh.ParameterServerTrainer(strategy, coordinator, cfg, init, ids, y)
                trainers.append(trainer)
                trainer.run()
                trainer.record(results[name])
        except Exception:  # noqa: BLE001
            results[name] = dh.error_record()
    try:
        results["checkpoint"] = _checkpoint_round_trip(tf, strategy)
    except Exception:  # noqa: BLE001 - reported by the owning test
        results["checkpoint"] = dh.error_record()
    try:
        results["saved_model"] = _saved_model_export(tf, strategy, coordinator)
    except Exception:  # noqa: BLE001 - reported by the owning test
        results["saved_model"] = dh.error_record()
    # Servers and trainers must outlive this function: the child exits with os._exit
    # right after saving the results, without tearing the cluster down.
    _KEEP_ALIVE.extend([servers, trainers])
    return results


def _checkpoint_round_trip(tf, strategy):
    """Saves a sharded table with distinct slot values per shard and restores it into
    a fresh sharded table and optimizer, built before and after the restore."""
    import tempfile

    import tf_adamax

    def make(build):
        with strategy.scope():
            var = tf.Variable(tf.reshape(tf.range(8.0), [4, 2]), name="ckpt_emb")
            opt = tf_adamax.Adamax(0.1)
            if build:
                opt.build([var])
        return var, opt

    def state(var, opt):
        return {"iterations": int(opt.iterations.numpy()),
                "var": [s.numpy().tolist() for s in var.variables],
                **{slot: [opt.get_slot(s, slot).numpy().tolist() for s in var.variables]
                   for slot in ("momentum", "norm")}}

    var, opt = make(build=True)
    for i, shard in enumerate(var.variables):
        opt.get_slot(shard, "momentum").assign(tf.fill(shard.shape, 1.0 + i))
        opt.get_slot(shard, "norm").assign(tf.fill(shard.shape, 5.0 + i))
    opt.iterations.assign(7)
    path = tf.train.Checkpoint(opt=opt, emb=var).write(
        os.path.join(tempfile.mkdtemp(), "ckpt"))
    out = {"saved": state(var, opt)}
    for build in (True, False):
        fresh_var, fresh_opt = make(build)
        fresh_var.assign(tf.zeros([4, 2]))
        tf.train.Checkpoint(opt=fresh_opt, emb=fresh_var).read(path).assert_consumed()
        out["build_first" if build else "restore_first"] = state(fresh_var, fresh_opt)
    return out


def _saved_model_export(tf, strategy, coordinator):
    """Trains a sharded table two steps and exports it with its optimizer
    (`tf.saved_model.save`); returns the directory and the trained state."""
    import tempfile

    import tf_adamax

    with strategy.scope():
        module = tf.Module()
        module.emb = tf.Variable(tf.reshape(tf.range(8.0), [4, 2]), name="sm_emb")
        module.opt = tf_adamax.Adamax(0.1)
        module.opt.build([module.emb])

    @tf.function
    def step():
        strategy.run(lambda: module.opt.apply_gradients(zip(
            [tf.fill(s.shape, 1.0 + i) for i, s in enumerate(module.emb.variables)],
            module.emb.variables)))

    for _ in range(2):
        coordinator.schedule(step)
        coordinator.join()
    path = os.path.join(tempfile.mkdtemp(), "saved_model")
    tf.saved_model.save(module, path)
    return {"path": path, "iterations": int(module.opt.iterations.numpy()),
            **{slot: module.opt.get_slot(module.emb, slot).numpy().tolist()
               for slot in ("momentum", "norm")}}


def _eager_grads(tf, shards):
    """A sparse gradient (opposite-sign repeats) for the first shard, a dense
    one for the second."""
    return [tf.IndexedSlices(tf.constant([[1.0, -2.0], [-3.0, 0.5], [0.25, 1.0]]),
                             tf.constant([0, 1, 0]), tf.constant(shards[0].shape)),
            tf.fill(shards[1].shape, 2.0)]


def child_eager_chief():
    """Child: a fresh cluster (1 worker, 2 parameter servers, a sharded table)
    where the chief applies two eager steps with the default jit_compile=True
    (TF's XLA launcher cannot write a parameter server's variables from an
    eager XLA call; the failure shows in a fresh process like this one)."""
    tf = dh.import_tf()
    import tf_adamax

    resolver, servers = dh.start_in_process_cluster(1, NUM_PS)
    strategy = tf.distribute.experimental.ParameterServerStrategy(
        resolver,
        variable_partitioner=tf.distribute.experimental.partitioners.FixedShardsPartitioner(
            NUM_PS))
    _KEEP_ALIVE.append(servers)
    with strategy.scope():
        var = tf.Variable(tf.reshape(tf.range(8.0), [4, 2]), name="eager_emb")
        opt = tf_adamax.Adamax(0.1)
        # Lazy, two tables whose sparse lengths are not bucket sizes: the
        # op-by-op step must get them unpadded (its gather refuses the
        # padding rows' index).
        tables = [tf.Variable(tf.zeros([20, 2])), tf.Variable(tf.zeros([10, 2]))]
        lazy = tf_adamax.Adamax(0.1, sparse_mode="lazy")
    try:
        for _ in range(2):
            opt.apply_gradients(zip(_eager_grads(tf, var.variables), var.variables))
        shards = [t for table in tables for t in table.variables]
        lazy.apply_gradients(zip(_lazy_grads(tf, shards), shards))
    except Exception:  # noqa: BLE001 - reported by the owning test
        return {"eager_chief": dh.error_record()}
    return {"eager_chief": {"shards": [s.numpy().tolist() for s in var.variables],
                            "iterations": int(opt.iterations.numpy()),
                            "tables": [t.numpy().tolist() for t in shards]}}


def _lazy_grads(tf, shards):
    """Per shard, a sparse gradient naming all its rows but one, so no
    length is a bucket size and the shards of a server differ in length."""
    grads = []
    for i, shard in enumerate(shards):
        n = shard.shape[0] - 1
        grads.append(tf.IndexedSlices((-1.0) ** i * tf.ones([n, 2]), tf.range(n),
                                      tf.constant(shard.shape)))
    return grads


@pytest.fixture(scope="module")
def ps_results(tmp_path_factory):
    return dh.run_child(f"{__name__}:child_ps", dict(configs=CONFIGS, num_steps=NUM_STEPS),
                        tmp_path_factory.mktemp("ps"), CHILD_TIMEOUT)


def _ps_task(device):
    """"/job:ps/replica:0/task:1/device:CPU:0" -> 1 (None if not on a ps)."""
    parts = dict(p.split(":", 1) for p in device.strip("/").split("/") if ":" in p)
    return int(parts["task"]) if parts.get("job") == "ps" else None


@pytest.mark.parametrize("cfg", CONFIGS, ids=dh.config_name)
def test_parameter_server_matches_sequential_reference(ps_results, cfg):
    rec = dh.check_record(ps_results[dh.config_name(cfg)])
    # The embedding (and every other variable) is split over both parameter servers.
    for name in dh.VAR_NAMES:
        devices = rec[f"dist_shard_devices/{name}"]
        assert sorted(_ps_task(d) for d in devices) == list(range(NUM_PS)), (name, devices)
        for slot in dh.SLOTS:
            assert rec[f"dist_slot_devices/{slot}/{name}"] == devices, (
                f"slot {slot!r} shards of {name} are not placed with the variable shards")
            assert rec[f"dist_slot_rows/{slot}/{name}"] == rec[f"dist_shard_rows/{name}"], (
                f"slot {slot!r} of {name} is not sharded like the variable")
    assert rec["dist_iterations"] == NUM_STEPS
    dh.assert_reference_matches_numpy(rec)
    dh.assert_matches_reference(rec)
    if cfg["sparse_mode"] == "lazy" and dh.optimizer_kind() == "adamax":
        dh.assert_lazy_rows_untouched(rec)
        # Both shards hold gathered and never-gathered rows, so the check covers both.
        bounds = np.cumsum([0] + rec["dist_shard_rows/emb"])
        untouched = np.setdiff1d(np.arange(dh.VOCAB), rec["gathered_rows"])
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            assert np.any((untouched >= lo) & (untouched < hi)), (lo, hi)
            assert np.any((np.asarray(rec["gathered_rows"]) >= lo)
                          & (np.asarray(rec["gathered_rows"]) < hi)), (lo, hi)


@pytest.mark.parametrize("order", ["build_first", "restore_first"])
def test_sharded_checkpoint_restores_into_sharded_variables(ps_results, order):
    # A sharded variable's slots are saved as sharded values; restoring them into a
    # fresh sharded table used to fail (AttributeError), before or after build.
    rec = dh.check_record(ps_results["checkpoint"])
    assert rec[order] == rec["saved"]
    assert rec["saved"]["momentum"] == [[[1.0, 1.0]] * 2, [[2.0, 2.0]] * 2]


def test_saved_model_of_a_sharded_table_keeps_its_slots(ps_results, tmp_path):
    # TF's SavedModel has no slot nodes for a ShardedVariable, only their
    # values: the loaded optimizer parked them until `build`, so get_slot
    # failed and a second export wrote zero slots. Now they are made when
    # restored. (Loaded in this process, without a strategy.)
    import tensorflow as tf
    import tf_adamax  # noqa: F401 - the loader revives the optimizer

    saved = dh.check_record(ps_results["saved_model"])
    assert np.any(saved["momentum"]) and np.any(saved["norm"])
    loaded = tf.saved_model.load(saved["path"])
    for slot in ("momentum", "norm"):
        np.testing.assert_array_equal(
            loaded.opt.get_slot(loaded.emb, slot).numpy(), saved[slot])
    again_path = str(tmp_path / "again")
    tf.saved_model.save(loaded, again_path)  # before any step
    again = tf.saved_model.load(again_path)
    assert int(again.opt.iterations.numpy()) == saved["iterations"]
    for slot in ("momentum", "norm"):
        np.testing.assert_array_equal(
            again.opt.get_slot(again.emb, slot).numpy(), saved[slot])


def test_eager_update_on_the_coordinator_matches_one_device(tmp_path):
    # With jit_compile=True an eager apply_gradients on the chief failed
    # inside TF (InternalError: KernelAndDeviceOp does not support
    # EagerFunctionParams); it now runs the same step op by op there.
    import tensorflow as tf
    import tf_adamax

    rec = dh.check_record(dh.run_child(f"{__name__}:child_eager_chief", {}, tmp_path,
                                       CHILD_TIMEOUT)["eager_chief"])
    values = np.arange(8.0, dtype=np.float32).reshape(4, 2)
    shards = [tf.Variable(part) for part in np.split(values, [len(rec["shards"][0])])]
    opt = tf_adamax.Adamax(0.1)
    for _ in range(2):
        opt.apply_gradients(zip(_eager_grads(tf, shards), shards))
    assert rec["iterations"] == 2
    for got, want in zip(rec["shards"], shards):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
    assert not np.array_equal(np.concatenate(rec["shards"]), values)
    tables = [tf.Variable(tf.zeros([len(t), 2])) for t in rec["tables"]]
    tf_adamax.Adamax(0.1, sparse_mode="lazy").apply_gradients(
        zip(_lazy_grads(tf, tables), tables))
    for got, want in zip(rec["tables"], tables):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
        assert np.count_nonzero(np.asarray(got)[:-1]) == 2 * (len(got) - 1)
        assert not np.any(np.asarray(got)[-1])  # the row not named
