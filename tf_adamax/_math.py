"""The Adamax update, written once.

Every path (the core optimizer's per-variable and fused updates, the dense,
exact-sparse and lazy-sparse steps, the Keras 3 and tf-keras adapters) calls the
functions here. They take variables/tensors and hyperparameter tensors; they own
no state, know nothing of Keras or `tf.distribute`, and contain only ops XLA
compiles (no data-dependent shapes, no host callbacks; the lazy step's one
`while` loop has a device-side condition, which XLA:GPU copies to the host once
per round), so they run unchanged inside `tf.function(jit_compile=True)` on
CPU, GPU and TPU.

Update rule (Kingma & Ba 2014, section 7.1), with t = iterations + 1:

    m = beta_1 * m + (1 - beta_1) * g
    u = max(beta_2 * u, |g|)
    w = w - learning_rate * m / ((1 - beta_1 ** t) * (u + epsilon))

Decoupled weight decay, when set, is `w = w - w * weight_decay * learning_rate`
before the step, as Keras 3 applies it.
"""

from __future__ import annotations

import typing

import tensorflow as tf


class Hyper(typing.NamedTuple):
    """Scalar hyperparameters of one update, already resolved for this step.

    Each field is a scalar (Python float or tensor) in any float dtype; the
    kernels cast them to the computation dtype of the variable they update.
    `weight_decay` is None when no decoupled weight decay applies.
    """

    learning_rate: typing.Any
    beta_1: typing.Any
    beta_2: typing.Any
    epsilon: typing.Any
    step: typing.Any  # t = iterations + 1, any numeric dtype
    weight_decay: typing.Any = None

    @classmethod
    def of(cls, source, learning_rate, step, weight_decay=None):
        """This step's `Hyper`, with `beta_1`, `beta_2` and `epsilon` read
        from `source` (an optimizer's config, or a Keras adapter)."""
        return cls(learning_rate=learning_rate, beta_1=source.beta_1,
                   beta_2=source.beta_2, epsilon=source.epsilon, step=step,
                   weight_decay=weight_decay)


def compute_dtype(var_dtype):
    """The dtype the slots of a `var_dtype` variable are kept and computed in.

    float16/bfloat16 variables keep float32 slots: their 10/7-bit mantissas
    would round a momentum of 1e-4 * gradient to zero.
    """
    var_dtype = tf.as_dtype(var_dtype)
    if var_dtype in (tf.float16, tf.bfloat16):
        return tf.float32
    return var_dtype


def as_dtype(value, dtype):
    """`value` in `dtype`. Python numbers convert directly: `tf.cast(0.9,
    tf.float64)` would round through float32 first."""
    if isinstance(value, (int, float)):
        return tf.constant(value, dtype)
    return tf.cast(value, dtype)


class _Coefficients(typing.NamedTuple):
    learning_rate: typing.Any
    beta_1: typing.Any
    beta_2: typing.Any
    epsilon: typing.Any
    bias_correction: typing.Any  # 1 - beta_1 ** t
    weight_decay: typing.Any


def _coefficients(hyper: Hyper, dtype):
    """`hyper` as tensors of the computation dtype."""
    beta_1 = as_dtype(hyper.beta_1, dtype)
    return _Coefficients(
        learning_rate=as_dtype(hyper.learning_rate, dtype),
        beta_1=beta_1,
        beta_2=as_dtype(hyper.beta_2, dtype),
        epsilon=as_dtype(hyper.epsilon, dtype),
        bias_correction=1 - tf.pow(beta_1, as_dtype(hyper.step, dtype)),
        weight_decay=(None if hyper.weight_decay is None
                      else as_dtype(hyper.weight_decay, dtype)),
    )


# The update, term by term; `_combine` puts them together. The gradient
# terms are elementwise in g, so `exact_rows_step` can read them per table
# row through a gather (`_per_row`).
def _decayed_momentum(m, c):
    return c.beta_1 * m


def _momentum_increment(g, c):
    return (1 - c.beta_1) * g


def _decayed_norm(u, c):
    return c.beta_2 * u


def _norm_candidate(g):
    return tf.abs(g)


def _new_weights(w, new_m, new_u, c):
    """Decoupled weight decay, then the Adamax step, in the slot dtype."""
    w_c = tf.cast(w, new_m.dtype)
    if c.weight_decay is not None:
        w_c = w_c - w_c * c.weight_decay * c.learning_rate
    new_w = w_c - c.learning_rate * new_m / (
        c.bias_correction * (new_u + c.epsilon))
    return tf.cast(new_w, w.dtype)


def _combine(w, m, u, gradient_term, c):
    """`(new_w, new_m, new_u)` from the current values, where
    `gradient_term(f)` gives the gradient term `f(g)` for these rows."""
    new_m = _decayed_momentum(m, c) + gradient_term(
        lambda g: _momentum_increment(g, c))
    new_u = _nan_max(_decayed_norm(u, c), gradient_term(_norm_candidate))
    return _new_weights(w, new_m, new_u, c), new_m, new_u


def _nan_max(a, b):
    """`max(a, b)`, NaN where either is NaN (as NumPy's and eager TF's
    maximum): XLA:CPU's max returns the other operand, so a NaN gradient
    would leave a finite norm slot under jit_compile and a NaN one without.
    Both operands are >= 0 or NaN, so their sum is NaN only from a NaN."""
    either = a + b
    return tf.where(tf.math.is_nan(either), either, tf.maximum(a, b))


def _assign(var, m, u, new_w, new_m, new_u):
    # read_value=False: returning the new value would read (copy) it.
    m.assign(new_m, read_value=False)
    u.assign(new_u, read_value=False)
    var.assign(new_w, read_value=False)


def adamax_rows(w, m, u, g, hyper: Hyper):
    """The pure Adamax update of a block of rows (or a whole variable).

    Args:
      w: current variable values (any float dtype).
      m: current first moment, in `compute_dtype(w.dtype)`.
      u: current infinity norm, in `compute_dtype(w.dtype)`.
      g: gradient for these rows, duplicates already summed; any float dtype.
      hyper: the step's `Hyper`.

    Returns:
      `(new_w, new_m, new_u)`: new_w in w's dtype, the slots in their dtype.
    """
    c = _coefficients(hyper, m.dtype)
    g = tf.cast(g, m.dtype)
    return _combine(w, m, u, lambda term: term(g), c)


def dense_step(var, m, u, grad, hyper: Hyper):
    """Applies a dense gradient to `var` and its slots `m`, `u` in place.

    Like every `*_step` here it returns nothing: inside `tf.function` TF's
    automatic control dependencies run and order the assignments.
    """
    _assign(var, m, u, *adamax_rows(
        var.read_value(), m.read_value(), u.read_value(), grad, hyper))


def _summable(values):
    """Half-precision gradient rows in float32 (the slots' dtype) before
    duplicates are added: a float16 sum of two rows rounds to 11 bits."""
    return tf.cast(values, compute_dtype(values.dtype))


def sum_duplicates(indices, values, num_rows=None):
    """Sums the rows of an IndexedSlices that name the same index, by hashing.

    O(nnz) per round and independent of the table size (the lazy path's cost
    must not grow with the table); see `_holders`. The result keeps one entry
    per input entry, in input order (static shape, so XLA compiles it);
    half-precision rows are summed, and returned, in float32.

    Args:
      indices: int32/int64 vector, may hold duplicates in any order.
      values: tensor whose first dimension matches `indices`.
      num_rows: the table's row count, if known: entries outside
        `[0, num_rows)` then get zero rows in `once`. (The optimizer rejects
        them before this where asserts can run; inside XLA the scatter drops
        their rows, and norms over `once` must not count them either.)

    Returns:
      `(rows, once, holder)`: `rows` is `indices`; `once[i]`, at the one
      entry holding each index's sum, the sum of all input rows naming
      `rows[i]`, and zero at the other entries (so sums and norms over it see
      each row once); and `holder[i]`, the position of the entry holding
      `rows[i]`'s sum, so `tf.gather(once, holder)` repeats each row's sum at
      every copy (`per_entry`).
    """
    holder = _holders(indices)
    adds = holder if num_rows is None else tf.where(
        _in_table(indices, num_rows), holder, -1)
    return indices, _sum_at(_summable(values), adds), holder


def _in_table(indices, num_rows):
    """Whether each index names a row of a `num_rows`-row table."""
    return (indices >= 0) & (indices < tf.cast(num_rows, indices.dtype))


# Each round hashes `key ^ salt` with MurmurHash3's 32-bit finalizer, a new
# salt per round. (A linear hash such as (key + salt) * phi would keep two
# keys whose difference times phi is near 0 mod 2**32 -- keys a Fibonacci
# number apart -- in one bucket in every round.)
_SALT_STEP = 0x9E3779B9


def _mix(h):
    """MurmurHash3's fmix32: every output bit depends on every input bit."""
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 16))
    h = h * tf.constant(0x85EBCA6B, tf.uint32)
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 13))
    h = h * tf.constant(0xC2B2AE35, tf.uint32)
    return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 16))


def _hash_keys(indices):
    """`indices` as uint32 hash keys. Equal indices give equal keys, which
    is all correctness needs; int64 ones fold in their mixed high word (a
    plain xor of the halves would give every multiple of 2**32 + 1 one key,
    costing a round each)."""
    low = tf.cast(indices, tf.uint32)  # truncates int64
    if indices.dtype != tf.int64:
        return low
    high = tf.cast(tf.bitwise.right_shift(indices, tf.constant(32, tf.int64)),
                   tf.uint32)
    return tf.bitwise.bitwise_xor(low, _mix(high))


def _bucket_bits(n_static, n):
    """log2 of a power-of-two bucket count above 2 * n (at most 2**30, so
    the count and its spare bucket fit an int32)."""
    if n_static is not None:
        return min(30, max(1, (2 * n_static).bit_length()))
    bits = tf.math.ceil(tf.math.log(2 * tf.cast(n, tf.float64) + 1)
                        / tf.math.log(tf.constant(2.0, tf.float64)))
    return tf.clip_by_value(tf.cast(bits, tf.int32), 1, 30)


def _holders(indices):
    """For each entry, the position of the entry holding its index's sum:
    one of the entries naming that index, the same for all of them.

    Found by rounds of hashing, each O(nnz) and independent of the table:
    every entry not yet settled hashes its index into more than 2 * nnz
    buckets, each bucket elects its lowest position (a scatter-min), and an
    entry whose bucket elected an entry naming the same index settles on it.
    Entries naming one index share their bucket in every round, so they
    settle together and on one holder; every round settles each bucket's
    elect, and a new salt per round separates the indices that collided, so
    a batch takes a few rounds (sorting 4096 entries costs XLA:CPU about ten
    times as much, benchmarks/).
    """
    n = tf.shape(indices)[0]
    bits = _bucket_bits(indices.shape[0], n)
    spare = tf.bitwise.left_shift(1, bits)  # bucket of settled entries
    shift = tf.cast(32 - bits, tf.uint32)
    keys = _hash_keys(indices)
    position = tf.range(n)

    def settle(salt, holder):
        open_ = holder < 0
        hashed = _mix(tf.bitwise.bitwise_xor(keys, salt))
        bucket = tf.where(
            open_, tf.cast(tf.bitwise.right_shift(hashed, shift), tf.int32),
            spare)
        # unsorted_segment_min: also has an int32 GPU kernel (the
        # tensor_scatter_nd_min of TF 2.21 has none).
        elect = tf.gather(
            tf.math.unsorted_segment_min(position, bucket, spare + 1), bucket)
        # Every entry is in the bucket it reads, so elect is a position.
        same = open_ & tf.equal(tf.gather(indices, elect), indices)
        return (salt + tf.constant(_SALT_STEP, tf.uint32),
                tf.where(same, elect, holder))

    _, holder = tf.while_loop(
        lambda salt, holder: tf.reduce_any(holder < 0), settle,
        (tf.constant(_SALT_STEP, tf.uint32), tf.fill([n], -1)))
    return holder


def _sum_at(values, holder):
    """Each entry's row added into the row at position `holder[i]` (entries
    with a negative holder add nothing): the rows summed per holder, zero
    rows at the other entries.

    An entry that holds its own sum starts from its row, and only the other
    copies are scattered onto it: XLA folds the add into the scatter, which
    writes in place into the selected rows. Adding every row into a zero
    buffer instead (as before) made the step at V = 10K, 4096 ids, 9% slower
    in exact mode and 12% in lazy mode (interleaved A/B on a quiet 2-core
    CPU; 1-6% with other jobs running).
    """
    n = tf.shape(holder, out_type=holder.dtype)[0]
    own = tf.equal(holder, tf.range(n, dtype=holder.dtype))
    mask = tf.reshape(own, tf.concat(
        [tf.shape(own), tf.ones([tf.rank(values) - 1], tf.int32)], 0))
    return tf.where(mask, values, tf.zeros_like(values)) + (
        tf.math.unsorted_segment_sum(
            values, tf.where(own, -tf.ones_like(holder), holder), n))


def per_entry(once, holder):
    """Each entry's full row sum, repeated at every copy of a row: an update
    computed per entry is then the same for every copy, and a scatter of it
    is well defined."""
    return tf.gather(once, holder)


def sum_duplicates_by_row(indices, values, num_rows):
    """Sums the rows of an IndexedSlices that name the same index, by table.

    For the exact step, which is O(num_rows) anyway and reads each table
    row's gradient through the same map (`_per_row`): one int per table row
    records the first entry naming it. Entries keep their input order;
    half-precision rows are summed, and returned, in float32.

    Returns:
      `(once, entry)`: `once`, aligned with `indices`: at the first entry
      naming each row, the sum of all input rows naming it; zero rows at the
      other entries and at entries whose index is outside `[0, num_rows)`
      (the optimizer rejects those before this where asserts can run; inside
      XLA they are dropped). `entry[r]`, for r in `[0, num_rows)`: that
      first entry for table row r, `len(indices)` if none names it; one int
      per table row, 1/64 of a 64-wide float table. (`entry[num_rows]`
      collects the out-of-range entries.)
    """
    n = tf.shape(indices, out_type=indices.dtype)[0]
    size = tf.cast(num_rows, indices.dtype)
    valid = _in_table(indices, size)
    # Out-of-range entries all name the extra row `size`: no index is ever
    # out of range. Rows no entry names get the dtype's max, then n.
    row = tf.where(valid, indices, size)
    entry = tf.minimum(tf.math.unsorted_segment_min(
        tf.range(n, dtype=indices.dtype), row, size + 1), n)
    # A negative holder drops the entry: invalid entries add nothing.
    once = _sum_at(_summable(values),
                   tf.where(valid, tf.gather(entry, row), -1))
    return once, entry


def merge_duplicates(slices):
    """An IndexedSlices with the same densified value, each index once.

    Each distinct index keeps its summed row once; the other copies become
    zero rows (static shape, for XLA). Row-wise transforms (clipping by
    value, norms) then see the densified gradient, not each copy.
    """
    rows, once, _ = sum_duplicates(
        slices.indices, slices.values,
        None if slices.dense_shape is None else slices.dense_shape[0])
    # Keras processes gradients in their variable's dtype.
    return tf.IndexedSlices(tf.cast(once, slices.values.dtype), rows,
                            slices.dense_shape)


def num_rows(var):
    """Rows of `var`, from its static shape (the optimizer refuses variables
    whose shape is not fully defined; `tf.shape(var)` would copy it)."""
    return var.shape[0]


def densify(indices, values, num_rows):
    """The dense gradient of an IndexedSlices: duplicate rows summed (in
    float32 for half-precision values).

    Indices outside `[0, num_rows)` are dropped (XLA's scatter semantics; the
    optimizer validates indices before this where asserts can run).
    """
    return tf.math.unsorted_segment_sum(_summable(values), indices, num_rows)


def _per_row(term, once, entry, num_rows):
    """`term(g)` for every table row, g the row's summed gradient (zero for
    rows not named), as a gather from the entries through `entry` (see
    `sum_duplicates_by_row`). Under XLA the gather fuses into the loop that
    consumes it, so no table-sized gradient is written; without XLA it is
    one table-sized temporary.

    `term` is applied before the gather, and the zero row that rows not
    named read (position n) is padded on after it, so each consumer has its
    own pad and gather to fuse (XLA does not duplicate a gather feeding two
    loops).
    """
    rank = once.shape.rank
    paddings = ([[0, 1]] + [[0, 0]] * (rank - 1) if rank is not None
                else tf.concat([[[0, 1]], tf.zeros([tf.rank(once) - 1, 2],
                                                   tf.int32)], 0))
    return tf.gather(tf.pad(term(once), paddings), entry[:num_rows])


def exact_rows_step(var, m, u, once, entry, hyper: Hyper):
    """Applies a sparse gradient exactly as its densified gradient.

    Rows not named have g = 0: their moments decay and they still move. The
    new `m` and new `u` loops over the table read their row's gradient term
    straight from the entries (`_per_row`), and the weights loop reads the
    new `m` and `u`: 8 table-sized array streams where a dense step with a
    materialized gradient makes 10, and under XLA no table-sized temporary.

    Args:
      var, m, u: the variable and its slots.
      once: gradient rows, each distinct row's full (summed) gradient at the
        first of its entries and zero rows at the others.
      entry: for each table row, the entry holding its gradient in `once`,
        `len(once)` for rows not named (`sum_duplicates_by_row` gives both).
      hyper: the step's `Hyper`.
    """
    c = _coefficients(hyper, m.dtype)
    g = tf.cast(once, m.dtype)
    size = num_rows(var)
    _assign(var, m, u, *_combine(
        var.read_value(), m.read_value(), u.read_value(),
        lambda term: _per_row(term, g, entry, size), c))


def _scatter_rows(var, m, u, rows, new_w, new_m, new_u):
    # Repeated rows carry identical results, so the scatter is well defined
    # whichever copy lands last. The return values (lazy reads of the whole
    # variable) are dropped on purpose: using them would copy the table.
    m.scatter_update(tf.IndexedSlices(new_m, rows))
    u.scatter_update(tf.IndexedSlices(new_u, rows))
    var.scatter_update(tf.IndexedSlices(new_w, rows))


def lazy_rows_step(var, m, u, rows, row_grads, hyper: Hyper):
    """Updates only `rows` of var, m, u; O(len(rows) * row size).

    `row_grads[i]` must be the full (duplicates summed) gradient of row
    `rows[i]`; a row may repeat, carrying the same gradient each time (as
    `sum_duplicates` returns it). Only these rows are gathered and scattered:
    nothing reads, copies or rewrites the whole variable.
    """
    new_w, new_m, new_u = adamax_rows(
        tf.gather(var, rows), tf.gather(m, rows), tf.gather(u, rows),
        row_grads, hyper,
    )
    _scatter_rows(var, m, u, rows, new_w, new_m, new_u)


def sum_rows(indices, values, var, sparse_mode):
    """Sums the duplicate rows of an IndexedSlices the way `sparse_mode`'s
    kernel needs them (always before any nonlinearity: |g| and max are not
    linear, |g1| + |g2| != |g1 + g2| for opposite signs).

    Returns `(rows, once, source)` for `rows_step`: `rows` the indices as
    given; `once` the summed gradient rows, each distinct row's sum at one
    of its entries and zero rows at the others (so sums and norms over it
    see each row once); `source`, for each row the kernel writes, the
    position in `once` of its gradient. "lazy" writes each entry's row:
    `source` is per entry (`sum_duplicates`, hashing, so its cost does not
    depend on the table). "exact" writes every table row: `source` is per
    table row, `len(indices)` for rows not named (`sum_duplicates_by_row`,
    O(rows of the table), as the exact step is anyway). `var` gives the
    table's row count: entries outside it are left out of `once`.
    """
    if sparse_mode == "lazy":
        return sum_duplicates(indices, values, num_rows(var))
    return (indices,) + sum_duplicates_by_row(indices, values, num_rows(var))


def rows_step(var, m, u, rows, once, source, hyper: Hyper, sparse_mode):
    """The `sparse_mode` kernel on rows summed by `sum_rows`."""
    if sparse_mode == "lazy":
        lazy_rows_step(var, m, u, rows, per_entry(once, source), hyper)
    else:
        exact_rows_step(var, m, u, once, source, hyper)


def apply_gradient(var, m, u, grad, hyper: Hyper, sparse_mode):
    """Applies a dense or `tf.IndexedSlices` gradient to `var`, `m`, `u`.

    The entry point for callers that apply one gradient at a time (the Keras
    adapters).
    """
    if isinstance(grad, tf.IndexedSlices):
        rows_step(var, m, u,
                  *sum_rows(grad.indices, grad.values, var, sparse_mode),
                  hyper, sparse_mode)
    else:
        dense_step(var, m, u, grad, hyper)


def ema_momentum(momentum, count, dtype):
    """Keras 3's EMA momentum at call `count`: 0 at the first (the average
    takes the weights), `momentum` after, in `dtype`."""
    return tf.cast(tf.not_equal(count, 0), dtype) * as_dtype(momentum, dtype)


def moving_average(average, value, momentum):
    """`momentum * average + (1 - momentum) * value` (Keras's weight EMA),
    written as a step from the average: where the value has not moved from
    its average (a row no lazy step named) the average stays bit for bit,
    which the two-product form misses by a rounding."""
    return average + (1 - momentum) * (value - average)
