"""`tf_adamax.tf_keras.Adamax` with tf-keras (Keras 2) `compile` / `fit`.

The tf-keras twin of `examples/keras_fit.py`, for Keras 2 code and
`TF_USE_LEGACY_KERAS=1` users. Synthetic data; well under a minute on a CPU:

1. A dense classifier of two Gaussian blobs (dense gradients).
2. A bag-of-tokens sentiment model whose embedding table gets sparse
   gradients (`tf.IndexedSlices`), trained with `sparse_mode="lazy"`.

Run:  python examples/tf_keras_fit.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tf_keras  # noqa: E402

import tf_adamax.tf_keras  # noqa: E402

VOCAB, SEQ_LEN = 1000, 12


def blobs(rng, n=512, dim=8):
    """Two Gaussian blobs, labels 0/1."""
    y = rng.integers(0, 2, size=n)
    x = rng.normal(size=(n, dim)) + np.where(y[:, None] == 1, 1.0, -1.0)
    return x.astype("float32"), y.astype("float32")


def token_sentences(rng, n=1024):
    """Token ids; label 1 when most tokens come from the "positive" half."""
    positive = rng.random(n) < 0.5
    bias = np.where(positive, 0.7, 0.3)[:, None]
    from_positive = rng.random((n, SEQ_LEN)) < bias
    ids = np.where(from_positive,
                   rng.integers(0, VOCAB // 2, size=(n, SEQ_LEN)),
                   rng.integers(VOCAB // 2, VOCAB, size=(n, SEQ_LEN)))
    return ids.astype("int32"), positive.astype("float32")


def report(name, history):
    for epoch, (loss, acc) in enumerate(
            zip(history.history["loss"], history.history["accuracy"]), 1):
        print(f"{name} epoch {epoch} loss {loss:.4f} accuracy {acc:.3f}")


def main():
    tf_keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)

    x, y = blobs(rng)
    classifier = tf_keras.Sequential([
        tf_keras.layers.Dense(16, activation="relu", input_shape=(x.shape[1],)),
        tf_keras.layers.Dense(1, activation="sigmoid"),
    ])
    classifier.compile(
        optimizer=tf_adamax.tf_keras.Adamax(learning_rate=0.01),
        loss="binary_crossentropy", metrics=["accuracy"])
    report("classifier",
           classifier.fit(x, y, batch_size=32, epochs=5, verbose=0))

    ids, labels = token_sentences(rng)
    embedder = tf_keras.Sequential([
        tf_keras.layers.Embedding(VOCAB, 16, input_length=SEQ_LEN),
        tf_keras.layers.GlobalAveragePooling1D(),
        tf_keras.layers.Dense(1, activation="sigmoid"),
    ])
    # Lazy: rows of tokens absent from a batch (and their slots) stay as
    # they are; cost per step follows the batch, not the vocabulary.
    embedder.compile(
        optimizer=tf_adamax.tf_keras.Adamax(learning_rate=0.02,
                                            sparse_mode="lazy"),
        loss="binary_crossentropy", metrics=["accuracy"])
    report("embedding",
           embedder.fit(ids, labels, batch_size=32, epochs=5, verbose=0))


if __name__ == "__main__":
    main()
