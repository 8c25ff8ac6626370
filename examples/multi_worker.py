"""Train with `tf_adamax.Adamax` under MultiWorkerMirroredStrategy on two local workers.

Run without arguments, this script is the launcher: it finds two free ports on
127.0.0.1, starts itself twice as worker 0 and worker 1 (each with its own TF_CONFIG),
waits for both, always stops them, and checks that both workers ended with identical
weights and optimizer slots. On a real cluster, run the worker part on each machine
with TF_CONFIG naming all workers.

Each worker: `MultiWorkerMirroredStrategy` (RING collectives over gRPC), a dataset
sharded across workers by data, `tf.nn.compute_average_loss` over the global batch, and
`opt.apply_gradients` inside `strategy.run`, which all-reduces (sums) the gradients of
both workers -- the embedding's sparse gradient as sparse slices -- and updates each
worker's copy identically.

Run: python examples/multi_worker.py [--steps 20] [--timeout 300]
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

VOCAB, DIM = 100, 8
IDS_PER_EXAMPLE = 4
GLOBAL_BATCH = 16
NUM_WORKERS = 2
HOST = "127.0.0.1"


# ------------------------------------------------------------------------------------
# Worker
# ------------------------------------------------------------------------------------
def run_worker(args):
    import tensorflow as tf

    import tf_adamax

    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING,
        timeout_seconds=args.timeout)  # a dead peer fails collectives, not hangs them
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    task = json.loads(os.environ["TF_CONFIG"])["task"]

    rng = np.random.default_rng(0)
    with strategy.scope():
        embedding = tf.Variable(rng.normal(0, 0.1, (VOCAB, DIM)).astype(np.float32),
                                name="embedding")
        kernel = tf.Variable(rng.normal(0, 0.5, (DIM, 1)).astype(np.float32), name="kernel")
        opt = tf_adamax.Adamax(learning_rate=0.1, sparse_mode="exact")
    variables = [embedding, kernel]

    data_rng = np.random.default_rng(1)
    ids = data_rng.integers(0, VOCAB, (512, IDS_PER_EXAMPLE)).astype(np.int32)
    y = data_rng.normal(size=(VOCAB,)).astype(np.float32)[ids].sum(1, keepdims=True)
    ds = tf.data.Dataset.from_tensor_slices((ids, y)).repeat().batch(GLOBAL_BATCH)
    ds_options = tf.data.Options()
    # In-memory data: shard by elements (each worker reads every other batch).
    ds_options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    iterator = iter(strategy.experimental_distribute_dataset(ds.with_options(ds_options)))

    @tf.function
    def train_step(batch):
        def replica_step(ids, y):
            with tf.GradientTape() as tape:
                pred = tf.matmul(
                    tf.reduce_sum(tf.nn.embedding_lookup(embedding, ids), axis=1), kernel)
                loss = tf.nn.compute_average_loss(tf.square(pred - y)[:, 0],
                                                  global_batch_size=GLOBAL_BATCH)
            opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return loss

        loss = strategy.run(replica_step, args=batch)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)

    def eval_loss():
        # Full-data loss with this worker's copy of the weights (deterministic, unlike
        # the loss of single training batches).
        pred = embedding.numpy()[ids].sum(axis=1) @ kernel.numpy()
        return float(np.mean(np.square(pred - y)))

    before = eval_loss()
    for _ in range(args.steps):
        train_step(next(iterator))
    after = eval_loss()
    state = {"embedding": embedding.numpy(), "kernel": kernel.numpy(),
             "losses": np.asarray([before, after]),
             "iterations": np.asarray(int(opt.iterations.numpy()))}
    for v in variables:
        for slot in ("momentum", "norm"):
            state[f"{v.name.split(':')[0]}/{slot}"] = opt.get_slot(v, slot).numpy()
    np.savez(os.path.join(args.out, f"worker{task['index']}.npz"), **state)
    print(f"worker {task['index']}: {strategy.num_replicas_in_sync} replicas in sync, "
          f"full-data loss {before:.4f} -> {after:.4f}", flush=True)
    # Skip interpreter teardown: collective executors may block it.
    os._exit(0)


# ------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------
def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stop(proc):
    """Kills the worker's whole process group (it was started as its leader)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def launch(args):
    ports = free_ports(NUM_WORKERS)
    cluster = {"worker": [f"{HOST}:{p}" for p in ports]}
    with tempfile.TemporaryDirectory(prefix="tf_adamax_multi_worker_") as out:
        return _run_workers(args, cluster, out)


def _run_workers(args, cluster, out):
    procs = []
    try:
        for i in range(NUM_WORKERS):
            env = dict(os.environ, TF_CONFIG=json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": i}}))
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker", "--out", out,
                 "--steps", str(args.steps), "--timeout", str(args.timeout)],
                env=env, start_new_session=True))
        print(f"launched {NUM_WORKERS} workers on {cluster['worker']}", flush=True)
        deadline = time.monotonic() + args.timeout
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one failed: its peer would only wait for it
            if time.monotonic() > deadline:
                print(f"workers did not finish within {args.timeout}s")
                return 1
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
        if codes != [0] * NUM_WORKERS:
            print(f"worker exit codes: {codes}")
            return 1
    finally:
        for p in procs:
            stop(p)

    results = [np.load(os.path.join(out, f"worker{i}.npz")) for i in range(NUM_WORKERS)]
    keys = sorted(k for k in results[0].files if k != "losses")
    identical = all(np.array_equal(results[0][k], r[k]) for r in results[1:] for k in keys)
    losses = results[0]["losses"]
    iterations = int(results[0]["iterations"])
    print(f"strategy: MultiWorkerMirroredStrategy, {NUM_WORKERS} workers x 1 CPU replica")
    print(f"optimizer: tf_adamax.Adamax(learning_rate=0.1, sparse_mode='exact'), iterations={iterations}")
    print(f"loss (full data, worker 0): {losses[0]:.4f} -> {losses[-1]:.4f} "
          f"after {iterations} steps")
    print(f"weights and slots identical on both workers: {identical} ({', '.join(keys)})")
    ok = identical and losses[-1] < losses[0] and iterations == args.steps
    print("multi_worker example: " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds before the launcher gives up on its workers")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args)
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
