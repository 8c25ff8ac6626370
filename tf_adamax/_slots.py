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
    (its id cannot be reused before this runs). Only queued (an atomic list
    append: this runs in whichever thread's garbage collection freed it);
    the table drops the entry at its next use (`_purge`), as
    `weakref.WeakValueDictionary` handles its pending removals."""
    table = table_ref()
    if table is not None:
        table._dead.append(key)  # pylint: disable=protected-access


class SlotTable:
    """Maps (variable, slot name) to a slot variable.

    Restorations that arrive before the slot exists are parked and applied
    when the slot is created.
    """

    def __init__(self):
        self._slots = {}  # id(owner) -> {slot name: tf.Variable}
        self._owners = {}  # id(owner) -> weak reference to the owner
        # id(owner) -> weak reference to the variable a deep copy of the
        # table was made from: its slots go back to it if the copy of the
        # variable is freed at once (the optimizer was copied without its
        # model), before the table's first use.
        self._originals = {}
        self._order = []  # slot variables in creation order
        self._deferred = {}  # (id(owner), slot name) -> [CheckpointPosition]
        self._dead = []  # ids of freed owners not yet dropped

    def _key(self, var):
        """The table's key for `var` (`_distribute.key_owner`), watching the
        owner so that its entries leave with it."""
        return self._watch(_distribute.key_owner(var))

    def _watch(self, owner):
        key = id(owner)
        if key not in self._owners:
            # `_forget` bound now: at interpreter exit, when the last
            # variables are freed, module globals may already be None.
            self._owners[key] = weakref.ref(
                owner, lambda ref, table=weakref.ref(self), key=key,
                forget=_forget: forget(table, key, ref))
        return key

    def _purge(self):
        """Drops the entries of freed variables (queued by `_forget`)."""
        while self._dead:
            self._drop(self._dead.pop())
        # Only copies of variables freed before the table's first use
        # (with the deep copy that made them) go back to their originals.
        self._originals.clear()

    def _drop(self, key):
        slots = self._slots.pop(key, {})
        self._owners.pop(key, None)
        original = self._originals.pop(key, lambda: None)()
        for name in [k for k in self._deferred if k[0] == key]:
            del self._deferred[name]
        if slots and original is not None and id(original) not in self._slots:
            self._slots[self._watch(original)] = slots
            return
        if slots:
            dropped = {id(s) for s in slots.values()}
            self._order = [s for s in self._order if id(s) not in dropped]

    def get(self, var, name):
        """The slot or None."""
        self._purge()
        key = id(_distribute.key_owner(var))
        return self._slots.get(key, {}).get(name)

    def has(self, var):
        self._purge()
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
        self._purge()
        self._deferred.setdefault((self._key(var), name), []).append(position)

    @property
    def variables(self):
        self._purge()
        return list(self._order)

    def slotted(self):
        """The (live) variables that have slots."""
        self._purge()
        owners = [ref() for ref in list(self._owners.values())]
        return [o for o in owners if o is not None and id(o) in self._slots]

    # Copies (`copy.deepcopy` of the optimizer, or of a module holding it
    # and its model) and pickles carry the entries of live variables, each
    # keyed by the copy of its variable; parked restores stay behind. A deep
    # copy of the optimizer alone makes copies of the variables that nothing
    # else holds: their slots then go back to the variables they were
    # copied from (`_originals`), so the copy steps on the same model with
    # the copied state. (A pickle of the optimizer alone has no variables to
    # go back to: its slots go with the unpickled copies, and the model's
    # variables get new slots, as variables the optimizer has not seen.)
    def _entries(self):
        self._purge()
        entries = []
        for key, slots in list(self._slots.items()):
            owner = self._owners[key]()
            if owner is not None:
                entries.append((owner, dict(slots)))
        return entries

    def __getstate__(self):
        return {"entries": self._entries(), "order": list(self._order)}

    def __setstate__(self, state, originals=()):
        self.__init__()
        for i, (owner, slots) in enumerate(state["entries"]):
            key = self._watch(owner)
            self._slots[key] = slots
            if i < len(originals) and originals[i] is not owner:
                self._originals[key] = weakref.ref(originals[i])
        self._order = state["order"]

    def __deepcopy__(self, memo):
        new = SlotTable.__new__(SlotTable)
        memo[id(self)] = new
        state = self.__getstate__()
        new.__setstate__(copy.deepcopy(state, memo),
                         originals=[owner for owner, _ in state["entries"]])
        return new
