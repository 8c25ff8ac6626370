"""tf_adamax: a TensorFlow-native Adamax optimizer.

`tf_adamax.Adamax` is the Keras-free core. The Keras adapters are submodules,
imported on first use so that `import tf_adamax` imports no Keras:
`tf_adamax.keras.Adamax` (Keras 3) and `tf_adamax.tf_keras.Adamax` (tf-keras).
"""

import importlib

from tf_adamax.optimizer import Adamax

__all__ = ["Adamax", "keras", "tf_keras"]


def __getattr__(name):
    # Lazy adapters: each imports its own Keras only when asked for.
    if name in ("keras", "tf_keras"):
        return importlib.import_module(f"tf_adamax.{name}")
    raise AttributeError(f"module 'tf_adamax' has no attribute {name!r}")
