"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 (free ports, TF_CONFIG)
train the same model with `tf_adamax.Adamax`; both end with identical weights and slots,
equal to one device fed the sum of both workers' gradients.

The two workers run as children started and always killed by `dist_helpers.run_workers`
(own process groups, one deadline); worker 0 also computes the reference.
"""

import json
import os
import sys
import time

import numpy as np
import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import dist_helpers as dh  # noqa: E402

NUM_STEPS = 5
NUM_WORKERS = 2
# Every sparse mode, both update paths (XLA and not); the full jit x mode matrix runs
# under MirroredStrategy, where a configuration costs less.
CONFIGS = [dict(sparse_mode="dense", jit_compile=True),
           dict(sparse_mode="exact", jit_compile=False),
           dict(sparse_mode="lazy", jit_compile=True)]
# Whole cluster, start to stop. A worker whose peer died fails its collectives after
# COLLECTIVE_TIMEOUT instead of waiting forever.
CLUSTER_TIMEOUT = 240
COLLECTIVE_TIMEOUT = 120


def child_worker(configs, num_steps):
    """Child: one MultiWorkerMirroredStrategy worker (TF_CONFIG set by the parent).

    After training, worker 0 also trains the single-device reference (no strategy:
    plain variables outside the strategy's scope), which saves starting a third
    TensorFlow process.
    """
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
            with dh.timed(dh.config_name(cfg)):
                trainer = dh.StrategyTrainer(strategy, cfg, init)
                for s in range(num_steps):
                    trainer.step(ids[s], y[s])
                rec = trainer.record({})
        except Exception:  # noqa: BLE001 - reported by the owning test
            rec = dh.error_record()
        results[dh.config_name(cfg)] = rec
    if json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 0:
        cache = {}
        for cfg in configs:
            try:
                results["reference-" + dh.config_name(cfg)] = dh.reference_record(
                    cfg, ids, y, init, cache=cache)
            except Exception:  # noqa: BLE001
                results["reference-" + dh.config_name(cfg)] = dh.error_record()
    return results


@pytest.fixture(scope="module")
def cluster_results(tmp_path_factory):
    return dh.run_workers(f"{__name__}:child_worker",
                          dict(configs=CONFIGS, num_steps=NUM_STEPS),
                          tmp_path_factory.mktemp("multiworker"), CLUSTER_TIMEOUT,
                          num_workers=NUM_WORKERS)


@pytest.mark.parametrize("cfg", CONFIGS, ids=dh.config_name)
def test_multiworker_matches_summed_gradient_reference(cluster_results, cfg):
    name = dh.config_name(cfg)
    workers = [dh.check_record(cluster_results[f"worker{i}"][name])
               for i in range(NUM_WORKERS)]
    ref = dh.check_record(cluster_results["worker0"]["reference-" + name])
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


# --------------------------------------------------------------------------------------
# The harness itself: a failed or hung cluster is stopped, in bounded time.
# --------------------------------------------------------------------------------------
def child_fail_or_hang(pid_dir, fail):
    """Child: records its pid; worker 0 raises if `fail`, every other worker hangs."""
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    with open(os.path.join(pid_dir, f"pid{index}"), "w") as f:
        f.write(str(os.getpid()))
    if fail and index == 0:
        # Fail only once every peer is up and hanging, so the harness must stop them.
        end = time.monotonic() + 60
        while len(os.listdir(pid_dir)) < NUM_WORKERS and time.monotonic() < end:
            time.sleep(0.05)
        raise RuntimeError("worker 0 fails on purpose")
    time.sleep(600)
    return {}


def _assert_all_stopped(pid_dir):
    pids = [int(open(os.path.join(pid_dir, n)).read()) for n in sorted(os.listdir(pid_dir))]
    assert len(pids) == NUM_WORKERS
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _wait_for_pid_files(pid_dir, deadline=20.0):
    end = time.monotonic() + deadline
    while len(os.listdir(pid_dir)) < NUM_WORKERS and time.monotonic() < end:
        time.sleep(0.1)


@pytest.mark.parametrize("fail", [True, False], ids=["worker-fails", "workers-hang"])
def test_harness_stops_every_worker(tmp_path, fail):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    timeout = 20  # the children's watchdog fires 10 s before it
    start = time.monotonic()
    with pytest.raises(dh.ChildFailed) as info:
        dh.run_workers(f"{__name__}:child_fail_or_hang",
                       dict(pid_dir=str(pid_dir), fail=fail), tmp_path, timeout=timeout)
    elapsed = time.monotonic() - start
    _wait_for_pid_files(pid_dir)
    _assert_all_stopped(str(pid_dir))
    if fail:
        assert "worker 0 fails on purpose" in str(info.value)
        assert elapsed < timeout - 5, "a failed worker must not wait for the deadline"
    else:
        # The children's own watchdog dumps their stacks shortly before the parent's
        # deadline, so the report shows where they hung.
        assert "Timeout (" in str(info.value) or "did not finish" in str(info.value)
        assert "child_fail_or_hang" in str(info.value)
        assert elapsed < timeout + 15
