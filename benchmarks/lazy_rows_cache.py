"""How much of the lazy step's time at V = 2M is the rows' cache misses.

Run from the repository root:

    python benchmarks/lazy_rows_cache.py              # writes results/lazy_rows_cache.json
    python benchmarks/lazy_rows_cache.py --reps 10 --out /tmp/x.json

`tf_adamax.Adamax(sparse_mode="lazy")` on a 10K x 64 and a 2M x 64 table (both alive),
each fed either ONE batch of 4096 indices (2048 distinct) replayed every step, or 16
such batches of different rows taken in turn (`bench_step.py`'s `Rotating`, its
default). `exact` at 10K is timed alongside as a fixed point. All entries are timed
round-robin in the same process, like bench_step.py, with its helpers.

With one batch replayed, its 2048 rows of var, m and u stay in cache and the lazy step
costs the same at both sizes; with different rows each step, every row is a cache (and
TLB) miss in the 1.5 GB of state at 2M, which is what training sees. A benchmark, not a
test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))

import bench_step as b  # noqa: E402
import tensorflow as tf  # noqa: E402

VOCABS = (10_000, 2_000_000)
BATCHES = (1, 16)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default=os.path.join(_HERE, "results",
                                                 "lazy_rows_cache.json"))
    a = p.parse_args(argv)
    _, cfg = b.parse_args(["--reps", str(a.reps)])
    entries, tables = [], []
    for vocab in VOCABS:
        table = tf.Variable(tf.random.normal([vocab, 64], stddev=0.05, seed=1),
                            name=f"table{vocab}")
        tables.append(table)
        for count in BATCHES:
            keys = ("core_lazy", "core_exact") if vocab == min(VOCABS) else (
                "core_lazy",)
            for key in keys:
                grad = b._sparse_batches(table, cfg.batch, vocab, count)
                e = b.make_optimizer_entry(b.ALL_SPECS[key], [table], [grad],
                                           cfg.warmup)
                e.key = f"{key} V={vocab} batches={count}"
                e.extra.update(vocab=vocab, batches=count, mode=key)
                entries.append(e)
    b.run_round_robin(entries, cfg)
    rows = [dict(b.entry_record(e, {}), **{k: e.extra[k] for k in
                                           ("vocab", "batches", "mode")})
            for e in entries]
    by = {(r["mode"], r["vocab"], r["batches"]): r.get("median_ms") for r in rows}
    ratios = {f"lazy 2M / 10K, batches={n}":
              by[("core_lazy", max(VOCABS), n)] / by[("core_lazy", min(VOCABS), n)]
              for n in BATCHES}
    print(f"{'entry':<40}{'median ms':>11}{'IQR ms':>9}")
    for r in rows:
        print(f"{r['key']:<40}{r.get('median_ms', float('nan')):>11.3f}"
              f"{r.get('iqr_ms', float('nan')):>9.3f}")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    record = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "command": "python benchmarks/lazy_rows_cache.py "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": b._machine(), "versions": b._versions(),
        "results": rows, "ratios": ratios,
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(record, f, indent=1, default=b._json_default)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
