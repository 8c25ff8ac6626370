"""Train an embedding model with `tf_adamax.Adamax` under MirroredStrategy.

The CPU is split into two logical devices, so this runs anywhere; on a machine with
GPUs, drop `split_cpu` and let MirroredStrategy pick them up. The recipe is the usual
custom training loop:

* variables and the optimizer are created under `strategy.scope()`;
* each replica computes `tf.nn.compute_average_loss` over the GLOBAL batch, so the
  gradients that `apply_gradients` sums over replicas are those of the global mean;
* `apply_gradients` is called inside `strategy.run`; it all-reduces once and updates
  every mirrored copy (with `jit_compile=True`, one XLA program per device).

The embedding's gradient is a `tf.IndexedSlices`; with `sparse_mode="lazy"` only the
looked-up rows (and their slots) change, which this script checks at the end.

Run: python examples/mirrored.py [--steps 30] [--sparse-mode lazy|exact]
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_adamax  # noqa: E402

VOCAB, DIM = 1000, 8
IDS_PER_EXAMPLE = 4
GLOBAL_BATCH = 32
# Only these rows ever appear in the data: lazy mode must leave the others untouched.
USED_ROWS = np.arange(0, VOCAB, 5)


def split_cpu(n):
    """Makes `n` logical devices out of the CPU (before TensorFlow starts)."""
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * n)
    return [d.name for d in tf.config.list_logical_devices("CPU")]


class Model(tf.Module):
    """Sum of looked-up embedding rows, then a linear layer."""

    def __init__(self):
        super().__init__(name="model")
        rng = np.random.default_rng(0)
        self.embedding = tf.Variable(
            rng.normal(0.0, 0.1, (VOCAB, DIM)).astype(np.float32), name="embedding")
        self.kernel = tf.Variable(rng.normal(0.0, 0.5, (DIM, 1)).astype(np.float32),
                                  name="kernel")
        self.bias = tf.Variable(np.zeros(1, np.float32), name="bias")

    def __call__(self, ids):
        x = tf.reduce_sum(tf.nn.embedding_lookup(self.embedding, ids), axis=1)
        return tf.matmul(x, self.kernel) + self.bias


def make_data(num_examples=1024):
    """Targets come from a hidden linear model of the same form."""
    rng = np.random.default_rng(1)
    ids = rng.choice(USED_ROWS, size=(num_examples, IDS_PER_EXAMPLE)).astype(np.int32)
    true_rows = rng.normal(size=(VOCAB,)).astype(np.float32)
    y = true_rows[ids].sum(axis=1, keepdims=True).astype(np.float32)
    return ids, y


def make_dataset(ids, y):
    ds = tf.data.Dataset.from_tensor_slices((ids, y))
    return ds.shuffle(len(ids), seed=2).repeat().batch(GLOBAL_BATCH, drop_remainder=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sparse-mode", default="lazy", choices=("lazy", "exact"))
    parser.add_argument("--learning-rate", type=float, default=0.05)
    args = parser.parse_args(argv)

    devices = split_cpu(2)
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        model = Model()
        opt = tf_adamax.Adamax(learning_rate=args.learning_rate,
                               sparse_mode=args.sparse_mode)
    variables = list(model.trainable_variables)
    initial_embedding = model.embedding.numpy()

    @tf.function
    def train_step(ids, y):
        def replica_step(ids, y):
            with tf.GradientTape() as tape:
                per_example = tf.square(model(ids) - y)[:, 0]
                loss = tf.nn.compute_average_loss(per_example,
                                                  global_batch_size=GLOBAL_BATCH)
            grads = tape.gradient(loss, variables)
            opt.apply_gradients(zip(grads, variables))
            return loss

        per_replica_loss = strategy.run(replica_step, args=(ids, y))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_loss, axis=None)

    ids, y = make_data()

    def full_data_loss():
        pred = model.embedding.numpy()[ids].sum(axis=1) @ model.kernel.numpy()
        return float(np.mean(np.square(pred + model.bias.numpy() - y)))

    loss_before = full_data_loss()
    iterator = iter(strategy.experimental_distribute_dataset(make_dataset(ids, y)))
    for step in range(args.steps):
        batch_loss = float(train_step(*next(iterator)))
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  batch loss {batch_loss:.4f}")
    loss_after = full_data_loss()

    # Every mirrored copy -- weights and slots -- must be identical.
    in_sync = all(
        all(np.array_equal(parts[0].numpy(), p.numpy()) for p in parts[1:])
        for v in variables
        for parts in [strategy.experimental_local_results(v)]
        + [strategy.experimental_local_results(opt.get_slot(v, s))
           for s in ("momentum", "norm")])
    slot_devices = [p.device for p in
                    strategy.experimental_local_results(opt.get_slot(model.embedding, "norm"))]
    final = model.embedding.numpy()
    changed = np.flatnonzero(np.any(final != initial_embedding, axis=1))
    untouched_ok = set(changed.tolist()) <= set(USED_ROWS.tolist())

    print(f"strategy: MirroredStrategy, {strategy.num_replicas_in_sync} replicas on {devices}")
    print(f"optimizer: tf_adamax.Adamax(sparse_mode={args.sparse_mode!r}, jit_compile=True), "
          f"iterations={int(opt.iterations.numpy())}")
    print(f"loss (full data): {loss_before:.4f} -> {loss_after:.4f} after {args.steps} steps")
    print(f"embedding slots mirrored on: {slot_devices}")
    print(f"replicas in sync (weights and slots): {in_sync}")
    print(f"embedding rows changed: {len(changed)} of {VOCAB} "
          f"(rows in the data: {len(USED_ROWS)}); only looked-up rows changed: {untouched_ok}")
    ok = (in_sync and loss_after < loss_before and len(slot_devices) == 2
          and int(opt.iterations.numpy()) == args.steps
          and (untouched_ok or args.sparse_mode != "lazy"))
    print("mirrored example: " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
