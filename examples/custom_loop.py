"""Train a small synthetic model with tf.GradientTape + tf_adamax.Adamax.

The model embeds token ids (so the embedding gets tf.IndexedSlices gradients,
with repeated tokens in every batch), averages them and feeds a dense layer.
Run: python examples/custom_loop.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_adamax  # noqa: E402

VOCAB, DIM, SEQ, BATCH, STEPS = 200, 16, 8, 32, 60


def make_data(rng):
    """Label = whether the mean of hidden per-token scores is positive."""
    scores = rng.normal(size=VOCAB)
    ids = rng.integers(0, VOCAB, size=(STEPS * BATCH, SEQ))
    labels = (scores[ids].mean(axis=1) > 0).astype(np.float32)
    return ids.astype(np.int32), labels


def main():
    rng = np.random.default_rng(0)
    ids, labels = make_data(rng)
    embedding = tf.Variable(rng.normal(0, 0.1, (VOCAB, DIM)), dtype=tf.float32,
                            name="embedding")
    kernel = tf.Variable(rng.normal(0, 0.1, (DIM, 1)), dtype=tf.float32,
                         name="kernel")
    bias = tf.Variable(tf.zeros([1]), name="bias")
    variables = [embedding, kernel, bias]
    opt = tf_adamax.Adamax(learning_rate=0.05, sparse_mode="lazy")

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            h = tf.reduce_mean(tf.gather(embedding, x), axis=1)
            logits = tf.squeeze(tf.matmul(h, kernel) + bias, -1)
            loss = tf.reduce_mean(
                tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits))
        grads = tape.gradient(loss, variables)  # embedding: IndexedSlices
        opt.apply_gradients(zip(grads, variables))
        return loss

    losses = []
    for epoch in range(3):
        for i in range(STEPS):
            sl = slice(i * BATCH, (i + 1) * BATCH)
            losses.append(float(train_step(ids[sl], labels[sl])))
        print(f"epoch {epoch}: mean loss {np.mean(losses[-STEPS:]):.4f}")
    first, last = np.mean(losses[:STEPS]), np.mean(losses[-STEPS:])
    print(f"loss fell from {first:.4f} to {last:.4f} in "
          f"{int(opt.iterations.numpy())} steps")
    return first, last


if __name__ == "__main__":
    first, last = main()
    raise SystemExit(0 if last < first else 1)
