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
# Acceptance 1: the replica function runs forward/backward eagerly in the step graph.
PLAIN_CONFIGS = [dict(sparse_mode=m, jit_compile=j, replica_fn="plain")
                 for m in SPARSE_MODES for j in JIT]
# Acceptance 2: forward/backward is its own tf.function(jit_compile=True), then
# apply_gradients runs in the replica function (where tf-keras hits "merge_call called
# while defining a new graph").
XLA_CONFIGS = [dict(sparse_mode=m, jit_compile=j, replica_fn="xla")
               for m in ("exact", "lazy") for j in JIT]
CHILD_TIMEOUT = 240


def child_mirrored(configs, num_steps):
    """Child: every config under MirroredStrategy and under no strategy."""
    tf = dh.import_tf(logical_cpus=NUM_REPLICAS)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == NUM_REPLICAS
    ids, y = dh.make_batches(num_steps, NUM_REPLICAS)
    init = dh.initial_values()
    results = {}
    for cfg in configs:
        rec = {}
        try:
            dh.reference_record(cfg, ids, y, init, rec)
            trainer = dh.StrategyTrainer(strategy, cfg, init)
            for s in range(num_steps):
                trainer.step(ids[s], y[s])
            trainer.record(rec)
        except Exception:  # noqa: BLE001 - reported by the owning test
            rec = dh.error_record()
        results[dh.config_name(cfg)] = rec
    return results


@pytest.fixture(scope="module")
def mirrored_results(tmp_path_factory):
    return dh.run_child(f"{__name__}:child_mirrored",
                        dict(configs=PLAIN_CONFIGS + XLA_CONFIGS, num_steps=NUM_STEPS),
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
