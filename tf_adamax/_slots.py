"""Per-variable optimizer state, keyed by variable (restores into a slot
that cannot be made yet are deferred until it is).

The slot table is deliberately not a tracked attribute: slots are saved
through TF's slot-variable protocol (`get_slot_names` / `get_slot` /
`_create_or_restore_slot_variable` on the optimizer), which names each slot
by (optimizer, variable, slot name) in the checkpoint. That is what lets a
checkpoint restore into variables listed in another order, or before the
optimizer has built its slots.

The table does not keep its model variables alive: a variable is held by a
weak reference, and when it is freed its slots leave the table (one
optimizer serving models built one after another would otherwise keep every
model's variables, and their slots, for ever). Nothing can step a freed
variable again, and a new variable never inherits its slots.
"""

from __future__ import annotations

import copy
import weakref

from tf_adamax import _distribute


def _forget(table_ref, key, _):
    """Weak-reference callback: the variable behind `key` is being freed
    (its id cannot be reused before this runs)."""
    table = table_ref()
    if table is not None:
        table._drop(key)  # pylint: disable=protected-access


class SlotTable:
    """Maps (variable, slot name) to a slot variable.

    Restorations that arrive before the slot exists are parked and applied
    when the slot is created.
    """

    def __init__(self):
        self._slots = {}  # id(owner) -> {slot name: tf.Variable}
        self._owners = {}  # id(owner) -> weak reference to the owner
        self._order = []  # slot variables in creation order
        self._deferred = {}  # (id(owner), slot name) -> [CheckpointPosition]

    def _key(self, var):
        """The table's key for `var` (`_distribute.key_owner`), watching the
        owner so that its entries leave with it."""
        owner = _distribute.key_owner(var)
        key = id(owner)
        if key not in self._owners:
            self._owners[key] = weakref.ref(
                owner, lambda ref, table=weakref.ref(self), key=key:
                _forget(table, key, ref))
        return key

    def _drop(self, key):
        slots = self._slots.pop(key, {})
        self._owners.pop(key, None)
        for name in [k for k in self._deferred if k[0] == key]:
            del self._deferred[name]
        if slots:
            dropped = {id(s) for s in slots.values()}
            self._order = [s for s in self._order if id(s) not in dropped]

    def get(self, var, name):
        """The slot or None."""
        key = id(_distribute.key_owner(var))
        return self._slots.get(key, {}).get(name)

    def has(self, var):
        return id(_distribute.key_owner(var)) in self._slots

    def create(self, strategy, var, name, dtype, copy=False):  # pylint: disable=redefined-outer-name
        """Creates slot `name` of `var` (zeros, or with `copy` `var`'s
        value) unless it exists; restores any checkpoint value parked for
        it."""
        existing = self.get(var, name)
        if existing is not None:
            return existing
        base = _distribute.unwrap(var).name.split(":")[0]
        slot = _distribute.create_slot(
            strategy, var, f"{base}/{name}", dtype, var.shape, copy)
        # Registered only once created: a failed creation leaves no trace.
        key = self._key(var)
        self._slots.setdefault(key, {})[name] = slot
        self._order.append(slot)
        positions = self._deferred.pop((key, name), [])
        # Newest restore last wins; apply in restore order.
        for position in sorted(positions, key=lambda p: p.restore_uid):
            position.restore(slot)
        return slot

    def defer(self, var, name, position):
        self._deferred.setdefault((self._key(var), name), []).append(position)

    @property
    def variables(self):
        return list(self._order)

    def slotted(self):
        """The (live) variables that have slots."""
        return [self._owners[key]() for key in self._slots
                if self._owners[key]() is not None]

    # Copies (`copy.deepcopy` of the optimizer, or of a module holding it
    # and its model) and pickles carry the entries of live variables, each
    # keyed by the copy of its variable; parked restores stay behind.
    def __getstate__(self):
        entries = []
        for key, slots in self._slots.items():
            owner = self._owners[key]()
            if owner is not None:
                entries.append((owner, slots))
        return {"entries": entries, "order": self._order}

    def __setstate__(self, state):
        self.__init__()
        for owner, slots in state["entries"]:
            self._slots[self._key(owner)] = dict(slots)
        self._order = list(state["order"])

    def __deepcopy__(self, memo):
        new = SlotTable.__new__(SlotTable)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new
