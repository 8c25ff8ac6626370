"""Train a sharded embedding with `tf_adamax.Adamax(sparse_mode="lazy")` under
ParameterServerStrategy, on a local cluster.

The cluster lives in this process: two workers and two parameter servers are
`tf.distribute.Server`s on free 127.0.0.1 ports, and this process is the chief
(coordinator). On a real cluster each server runs in its own job and only the chief
runs the training loop below.

* `variable_partitioner` splits the embedding table over both parameter servers (a
  `ShardedVariable`); small variables stay whole. The optimizer gets the shards
  (`model.trainable_variables` lists them) and keeps each shard's slots on the same
  parameter server.
* `tf.nn.embedding_lookup` on the sharded table yields one `tf.IndexedSlices` gradient
  per shard; lazy mode updates only the looked-up rows of each shard, so the rows (and
  slots) the data never touches stay bit-for-bit unchanged -- checked at the end.
* The coordinator schedules steps asynchronously on whichever worker is free, reading
  from per-worker datasets.

Run: python examples/parameter_server.py [--steps 20]
"""

import argparse
import os
import socket
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_adamax  # noqa: E402

VOCAB, DIM = 1000, 8
IDS_PER_EXAMPLE = 4
BATCH = 32
NUM_WORKERS, NUM_PS = 2, 2
HOST = "127.0.0.1"
# The data uses rows from both halves of the table (both shards), never the rest.
USED_ROWS = np.concatenate([np.arange(0, 100), np.arange(600, 700)])


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def start_local_cluster():
    """Worker and parameter-server gRPC servers in this process; returns a resolver."""
    ports = free_ports(NUM_WORKERS + NUM_PS)
    cluster = tf.train.ClusterSpec({
        "worker": [f"{HOST}:{p}" for p in ports[:NUM_WORKERS]],
        "ps": [f"{HOST}:{p}" for p in ports[NUM_WORKERS:]],
    })
    worker_config = tf.compat.v1.ConfigProto()
    if (os.cpu_count() or 1) < NUM_WORKERS + 1:
        worker_config.inter_op_parallelism_threads = NUM_WORKERS + 1
    servers = [tf.distribute.Server(cluster, job_name="worker", task_index=i,
                                    config=worker_config, protocol="grpc")
               for i in range(NUM_WORKERS)]
    servers += [tf.distribute.Server(cluster, job_name="ps", task_index=i, protocol="grpc")
                for i in range(NUM_PS)]
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(cluster, rpc_layer="grpc")
    return resolver, servers


class Model(tf.Module):
    def __init__(self):
        super().__init__(name="model")
        rng = np.random.default_rng(0)
        self.embedding = tf.Variable(
            rng.normal(0.0, 0.1, (VOCAB, DIM)).astype(np.float32), name="embedding")
        self.kernel = tf.Variable(rng.normal(0.0, 0.5, (DIM, 1)).astype(np.float32),
                                  name="kernel")

    def __call__(self, ids):
        # Dispatches to a partitioned lookup when the table is a ShardedVariable.
        x = tf.reduce_sum(tf.nn.embedding_lookup(self.embedding, ids), axis=1)
        return tf.matmul(x, self.kernel)


def make_data(num_examples=2048):
    """Targets come from a hidden model of the same form."""
    rng = np.random.default_rng(1)
    ids = rng.choice(USED_ROWS, size=(num_examples, IDS_PER_EXAMPLE)).astype(np.int32)
    y = rng.normal(size=(VOCAB,)).astype(np.float32)[ids].sum(1, keepdims=True)
    return ids, y


def dataset_fn(input_context):
    ids, y = make_data()
    ds = tf.data.Dataset.from_tensor_slices((ids, y))
    # Each worker reads its own shuffle of the data.
    ds = ds.shuffle(len(ids), seed=input_context.input_pipeline_id)
    return ds.repeat().batch(BATCH)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)

    resolver, servers = start_local_cluster()
    # Shard variables of at least 16 KiB into (at most) one shard per parameter server:
    # the 1000 x 8 float32 table (32 KiB) is split, the kernel is not.
    partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
        min_shard_bytes=16 << 10, max_shards=NUM_PS)
    strategy = tf.distribute.experimental.ParameterServerStrategy(
        resolver, variable_partitioner=partitioner)
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)

    with strategy.scope():
        model = Model()
        opt = tf_adamax.Adamax(learning_rate=0.05, sparse_mode="lazy")
    variables = list(model.trainable_variables)  # the embedding's shards + the kernel
    shards = list(model.embedding.variables)
    initial = np.concatenate([s.numpy() for s in shards])
    eval_ids, eval_y = make_data()

    def full_data_loss():
        # On the chief, from the parameter servers' current values.
        table = np.concatenate([s.numpy() for s in shards])
        pred = table[eval_ids].sum(axis=1) @ model.kernel.numpy()
        return float(np.mean(np.square(pred - eval_y)))

    loss_before = full_data_loss()

    @tf.function
    def per_worker_dataset_fn():
        return strategy.distribute_datasets_from_function(dataset_fn)

    per_worker_iterator = iter(coordinator.create_per_worker_dataset(per_worker_dataset_fn))

    @tf.function
    def train_step(iterator):
        def replica_step(ids, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(ids) - y))
            opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return loss

        return strategy.run(replica_step, args=next(iterator))

    for _ in range(args.steps):
        coordinator.schedule(train_step, args=(per_worker_iterator,))
    coordinator.join()
    loss_after = full_data_loss()

    final = np.concatenate([s.numpy() for s in shards])
    changed = np.flatnonzero(np.any(final != initial, axis=1))
    unused = np.setdiff1d(np.arange(VOCAB), USED_ROWS)
    slots_unused_zero = all(
        not np.any(np.concatenate([opt.get_slot(s, name).numpy() for s in shards])[unused])
        for name in ("momentum", "norm"))
    lazy_ok = set(changed.tolist()) <= set(USED_ROWS.tolist()) and slots_unused_zero
    placed_ok = all(opt.get_slot(s, name).device == s.device
                    for s in shards for name in ("momentum", "norm"))

    print(f"cluster: chief (this process), {NUM_WORKERS} workers, {NUM_PS} parameter "
          f"servers on {HOST}")
    print(f"embedding {VOCAB} x {DIM} in {len(shards)} shards: "
          + ", ".join(f"{tuple(s.shape)} on {s.device}" for s in shards))
    print(f"optimizer: tf_adamax.Adamax(sparse_mode='lazy'), "
          f"iterations={int(opt.iterations.numpy())}")
    print(f"loss (full data): {loss_before:.4f} -> {loss_after:.4f} after "
          f"{args.steps} scheduled steps")
    print(f"slots placed with their shards: {placed_ok}")
    print(f"embedding rows changed: {len(changed)} of {VOCAB} (rows in the data: "
          f"{len(USED_ROWS)}); unused rows and their slots untouched: {lazy_ok}")
    ok = (len(shards) == NUM_PS and len({s.device for s in shards}) == NUM_PS
          and placed_ok and lazy_ok and len(changed) > 0 and loss_after < loss_before
          and int(opt.iterations.numpy()) == args.steps)
    print("parameter_server example: " + ("OK" if ok else "FAILED"))
    sys.stdout.flush()
    del servers  # in-process servers cannot be stopped; the process exit ends them
    return 0 if ok else 1


if __name__ == "__main__":
    code = main()
    # Skip interpreter teardown: in-process gRPC servers can block it.
    os._exit(code)
