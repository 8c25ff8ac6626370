"""A plain holder for objects that must not be tracked.

`tf.Module`, Keras 3 and tf-keras optimizers track their attributes for
checkpoints and SavedModel; a `tf.function` stored on them would be traced
and exported with them. Held in an `Untracked`, it is invisible to all three.
"""

import copy


class Untracked:
    """Holds objects that must not become checkpoint/SavedModel children.

    The entries named in `shared` (a distribution strategy, compiled
    functions: neither can be copied or pickled) are shared by a deep copy
    and left out of a pickle, whose owner restores them when unpickled.
    """

    def __init__(self, shared=(), **kwargs):
        self.__dict__.update(kwargs)
        self._shared = frozenset(shared)

    def __copy__(self):
        new = Untracked.__new__(Untracked)
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo):
        new = Untracked.__new__(Untracked)
        memo[id(self)] = new
        new.__dict__.update({
            k: v if k in self._shared else copy.deepcopy(v, memo)
            for k, v in self.__dict__.items()})
        return new

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items()
                if k not in self._shared}
