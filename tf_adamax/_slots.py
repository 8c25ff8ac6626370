"""Per-variable optimizer state, keyed by variable: the slot table
(restores into a slot that cannot be made yet are deferred until it is) and
the variables excluded from weight decay.

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
variable again, and a new variable never inherits its slots (or its
exclusion from weight decay). A `tf.Variable` cannot be a dictionary key
(it compares by value), so `WeakTable` keys by identity and watches each
owner with a weak reference.
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


class WeakTable:
    """Maps live objects, by identity, to values without keeping them alive.

    An entry leaves with its object. Copies (`copy.deepcopy` of the
    optimizer, or of a module holding it and its model) and pickles carry
    the entries of live objects, each keyed by the copy of its object. A
    deep copy of the optimizer alone makes copies of the variables that
    nothing else holds: their entries then go back to the variables they
    were copied from (`_originals`), so the copy steps on the same model
    with the copied state. (A pickle of the optimizer alone has no
    variables to go back to: its entries go with the unpickled copies, and
    the model's variables are new to the unpickled optimizer.)
    """

    def __init__(self):
        self._values = {}  # id(owner) -> value
        self._owners = {}  # id(owner) -> weak reference to the owner
        # id(owner) -> weak reference to the object a deep copy of the
        # table was made from: its entry goes back to it if the copy of the
        # object is freed at once (the optimizer was copied without its
        # model), before the table's first use.
        self._originals = {}
        self._dead = []  # ids of freed owners not yet dropped

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
        """Drops the entries of freed objects (queued by `_forget`)."""
        while self._dead:
            self._drop(self._dead.pop())
        # Only copies of objects freed before the table's first use (with
        # the deep copy that made them) go back to their originals.
        self._originals.clear()

    def _drop(self, key):
        """Drops `key`'s entry; returns its value unless it went back to
        the original of a copied object."""
        value = self._values.pop(key, None)
        self._owners.pop(key, None)
        original = self._originals.pop(key, lambda: None)()
        if (value is not None and original is not None
                and id(original) not in self._values):
            self._values[self._watch(original)] = value
            return None
        return value

    def _entries(self):
        self._purge()
        entries = []
        for key, value in list(self._values.items()):
            owner = self._owners[key]()
            if owner is not None:
                entries.append((owner, value))
        return entries

    def __getstate__(self):
        return {"entries": self._entries()}

    def __setstate__(self, state, originals=()):
        self.__init__()
        for i, (owner, value) in enumerate(state["entries"]):
            key = self._watch(owner)
            self._values[key] = value
            if i < len(originals) and originals[i] is not owner:
                self._originals[key] = weakref.ref(originals[i])

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = self.__getstate__()
        new.__setstate__(copy.deepcopy(state, memo),
                         originals=[owner for owner, _ in state["entries"]])
        return new


class ExcludedVariables(WeakTable):
    """The variables excluded from weight decay (by `key_owner`)."""

    def add(self, var):
        self._purge()
        self._values[self._watch(_distribute.key_owner(var))] = True

    def __contains__(self, var):
        self._purge()
        return id(_distribute.key_owner(var)) in self._values


class SlotTable(WeakTable):
    """Maps (variable, slot name) to a slot variable.

    Restorations that arrive before the slot exists are parked and applied
    when the slot is created; they stay behind in copies.
    """

    def __init__(self):
        super().__init__()
        # self._values: id(owner) -> {slot name: tf.Variable}
        self._order = []  # slot variables in creation order
        self._deferred = {}  # (id(owner), slot name) -> [CheckpointPosition]

    def _key(self, var):
        """The table's key for `var` (`_distribute.key_owner`), watching the
        owner so that its entries leave with it."""
        return self._watch(_distribute.key_owner(var))

    def _drop(self, key):
        slots = super()._drop(key)
        for name in [k for k in self._deferred if k[0] == key]:
            del self._deferred[name]
        if slots:
            dropped = {id(s) for s in slots.values()}
            self._order = [s for s in self._order if id(s) not in dropped]
        return slots

    def get(self, var, name):
        """The slot or None."""
        self._purge()
        key = id(_distribute.key_owner(var))
        return self._values.get(key, {}).get(name)

    def has(self, var):
        self._purge()
        return id(_distribute.key_owner(var)) in self._values

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
        self._values.setdefault(key, {})[name] = slot
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
        return [o for o in owners if o is not None and id(o) in self._values]

    def _entries(self):
        return [(owner, dict(slots)) for owner, slots in super()._entries()]

    def __getstate__(self):
        return dict(super().__getstate__(), order=list(self._order))

    def __setstate__(self, state, originals=()):
        super().__setstate__(state, originals)
        self._order = state["order"]
