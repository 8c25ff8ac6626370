"""Which formulation `sparse_mode="exact"` uses, for tests.

By default the exact step materializes the gradient when the batch names a
large share of a small table (`tf_adamax._math.exact_as_dense`) and otherwise
decays every row and scatters the named rows' terms. Test tables are small,
so tests that must cover both force one with `forced(kind)`.
"""

import contextlib

KINDS = ("rows", "dense")


@contextlib.contextmanager
def forced(kind):
    """`kind`: "rows" (scatter kernel), "dense" (materialized gradient) or None
    (the size rule). Takes effect for updates traced inside the block."""
    from tf_adamax import _math

    old = _math._DENSE_ROWS_PER_SPARSE_ROW
    _math._DENSE_ROWS_PER_SPARSE_ROW = {"rows": 0, "dense": 2**62, None: old}[kind]
    try:
        yield
    finally:
        _math._DENSE_ROWS_PER_SPARSE_ROW = old
