"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 (free ports, TF_CONFIG)
train the same model with `tf_adamax.Adamax`; both end with identical weights and slots,
equal to one device fed the sum of both workers' gradients.

The two workers and the single-device reference run as three children started and
always killed by `dist_helpers.run_workers` (own process groups, one deadline).
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
NUM_WORKERS = 2
CONFIGS = [dict(sparse_mode="dense", jit_compile=True),
           dict(sparse_mode="exact", jit_compile=True),
           dict(sparse_mode="lazy", jit_compile=True),
           dict(sparse_mode="lazy", jit_compile=False)]
# Whole cluster, start to stop. A worker whose peer died fails its collectives after
# COLLECTIVE_TIMEOUT instead of waiting forever.
CLUSTER_TIMEOUT = 240
COLLECTIVE_TIMEOUT = 120


def child_worker(configs, num_steps):
    """Child: one MultiWorkerMirroredStrategy worker (TF_CONFIG set by the parent)."""
    tf = dh.import_tf()
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING,
        timeout_seconds=COLLECTIVE_TIMEOUT)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    assert strategy.num_replicas_in_sync == NUM_WORKERS
    ids, y = dh.make_batches(num_steps, NUM_WORKERS)
    init = dh.initial_values()
    results = {}
    for cfg in configs:
        try:
            trainer = dh.StrategyTrainer(strategy, cfg, init)
            for s in range(num_steps):
                trainer.step(ids[s], y[s])
            rec = trainer.record({})
        except Exception:  # noqa: BLE001 - reported by the owning test
            rec = dh.error_record()
        results[dh.config_name(cfg)] = rec
    return results


def child_reference(configs, num_steps):
    """Child: the single-device reference fed the sum of both workers' gradients."""
    dh.import_tf()
    ids, y = dh.make_batches(num_steps, NUM_WORKERS)
    init = dh.initial_values()
    results = {}
    for cfg in configs:
        try:
            results[dh.config_name(cfg)] = dh.reference_record(cfg, ids, y, init)
        except Exception:  # noqa: BLE001
            results[dh.config_name(cfg)] = dh.error_record()
    return results


@pytest.fixture(scope="module")
def cluster_results(tmp_path_factory):
    kwargs = dict(configs=CONFIGS, num_steps=NUM_STEPS)
    reference = ("reference", f"{__name__}:child_reference", kwargs, None)
    return dh.run_workers(f"{__name__}:child_worker", kwargs,
                          tmp_path_factory.mktemp("multiworker"), CLUSTER_TIMEOUT,
                          num_workers=NUM_WORKERS, extra_specs=[reference])


@pytest.mark.parametrize("cfg", CONFIGS, ids=dh.config_name)
def test_multiworker_matches_summed_gradient_reference(cluster_results, cfg):
    name = dh.config_name(cfg)
    workers = [dh.check_record(cluster_results[f"worker{i}"][name])
               for i in range(NUM_WORKERS)]
    ref = dh.check_record(cluster_results["reference"][name])
    for i, rec in enumerate(workers):
        assert rec["dist_iterations"] == NUM_STEPS, f"worker{i} iterations"
        for key, value in rec.items():
            if key.startswith("dist/") or key.startswith("dist_slot/"):
                np.testing.assert_array_equal(
                    value, workers[0][key], err_msg=f"{key}: worker{i} != worker0")
    merged = dict(ref)
    merged.update(workers[0])
    dh.assert_reference_matches_numpy(merged)
    dh.assert_matches_reference(merged)
    if cfg["sparse_mode"] == "lazy" and dh.optimizer_kind() == "adamax":
        dh.assert_lazy_rows_untouched(merged)
