"""Per-variable optimizer state, keyed by variable (restores into a slot
that cannot be made yet are deferred until it is).

The slot table is deliberately not a tracked attribute: slots are saved
through TF's slot-variable protocol (`get_slot_names` / `get_slot` /
`_create_or_restore_slot_variable` on the optimizer), which names each slot
by (optimizer, variable, slot name) in the checkpoint. That is what lets a
checkpoint restore into variables listed in another order, or before the
optimizer has built its slots.
"""

from __future__ import annotations

from tf_adamax import _distribute


class SlotTable:
    """Maps (variable, slot name) to a slot variable.

    Restorations that arrive before the slot exists are parked and applied
    when the slot is created.
    """

    def __init__(self):
        self._slots = {}  # var key -> {slot name: tf.Variable}
        self._order = []  # slot variables in creation order
        self._deferred = {}  # (var key, slot name) -> [CheckpointPosition]

    def get(self, var, name):
        """The slot or None."""
        return self._slots.get(_distribute.var_key(var), {}).get(name)

    def has(self, var):
        return _distribute.var_key(var) in self._slots

    def create(self, strategy, var, name, dtype, copy=False):
        """Creates slot `name` of `var` (zeros, or with `copy` `var`'s
        value) unless it exists; restores any checkpoint value parked for
        it."""
        key = _distribute.var_key(var)
        existing = self._slots.get(key, {}).get(name)
        if existing is not None:
            return existing
        base = _distribute.unwrap(var).name.split(":")[0]
        slot = _distribute.create_slot(
            strategy, var, f"{base}/{name}", dtype, var.shape, copy)
        # Registered only once created: a failed creation leaves no trace.
        self._slots.setdefault(key, {})[name] = slot
        self._order.append(slot)
        positions = self._deferred.pop((key, name), [])
        # Newest restore last wins; apply in restore order.
        for position in sorted(positions, key=lambda p: p.restore_uid):
            position.restore(slot)
        return slot

    def defer(self, var, name, position):
        self._deferred.setdefault(
            (_distribute.var_key(var), name), []).append(position)

    @property
    def variables(self):
        return list(self._order)

    def slotted(self):
        """The variables that have slots (keys are `Reference`s)."""
        return [key.deref() for key in self._slots]
