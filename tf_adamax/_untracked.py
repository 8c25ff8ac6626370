"""A plain holder for objects that must not be tracked.

`tf.Module`, Keras 3 and tf-keras optimizers track their attributes for
checkpoints and SavedModel; a `tf.function` stored on them would be traced
and exported with them. Held in an `Untracked`, it is invisible to all three.
"""


class Untracked:
    """Holds objects that must not become checkpoint/SavedModel children."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
