"""tf_adamax: a TensorFlow-native Adamax optimizer.

`tf_adamax.Adamax` is the Keras-free core. The Keras adapters are submodules,
imported on first use so that `import tf_adamax` imports no Keras:
`tf_adamax.keras.Adamax` (Keras 3) and `tf_adamax.tf_keras.Adamax` (tf-keras).
"""

import importlib

from tf_adamax.optimizer import Adamax

__version__ = "0.1.0"

# Only the core: `from tf_adamax import *` must not bind the names `keras`
# and `tf_keras` over the user's own (nor import either Keras).
__all__ = ["Adamax"]


def __getattr__(name):
    # Lazy adapters: each imports its own Keras only when asked for.
    if name in ("keras", "tf_keras"):
        try:
            return importlib.import_module(f"tf_adamax.{name}")
        except ImportError as e:
            # An attribute lookup fails with AttributeError, so that
            # `hasattr(tf_adamax, "tf_keras")` is False without tf-keras;
            # the message says what to install.
            raise AttributeError(
                f"tf_adamax.{name} is unavailable: {e}") from e
    raise AttributeError(f"module 'tf_adamax' has no attribute {name!r}")
