"""Step-time benchmark: tf_adamax against every Adamax a TensorFlow user could pick.

Run from the repository root:

    python benchmarks/bench_step.py --case all --quick
    python benchmarks/bench_step.py --case sparse --vocab 10000,2000000 --reps 20

Cases (see benchmarks/README.md for what each measures and the JSON layout):
  big     one dense float32 variable of 4M elements
  many    200 dense float32 variables of 64x64
  sparse  an embedding table V x 64, V in --vocab, fed a 4096-index batch with
          duplicates as tf.IndexedSlices (tf_adamax in sparse_mode "exact" and "lazy")
  fit     Keras 3 `model.fit` steps/s for a small MLP and an embedding model

Method: every competitor gets its own optimizer state and its own `tf.function` whose
body is nothing but `apply_gradients` of precomputed gradients held as tensors. After
warm-up, competitors are timed round-robin (rep 1: A, B, C...; rep 2: A, B, C...), so
load from other processes on this shared machine hits all of them alike. Each rep runs
a calibrated number of steps; we report the median ms/step over reps, its IQR, and the
ratio to each anchor (the built-ins). Results go to benchmarks/results/bench_<case>.json
and .png. This is a benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import hashlib
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
# `python benchmarks/bench_step.py` puts benchmarks/ on sys.path, not the repo root;
# benchmark the working tree's tf_adamax even when it is not pip-installed.
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

MIB = 1024**2
GIB = 1024**3
ANCHORS = ("legacy", "tf_keras", "keras3")
ANCHOR_LABELS = {"legacy": "legacy", "tf_keras": "tf_keras", "keras3": "keras3"}
MEM_PROBE_TAG = "MEM_PROBE_RESULT "


# --------------------------------------------------------------------------------------
# Competitors
# --------------------------------------------------------------------------------------

def _tf_keras_opt(name: str) -> Callable[..., Any]:
    def make(**kw):
        import tf_keras

        if name == "legacy":
            return tf_keras.optimizers.legacy.Adamax(**kw)
        return tf_keras.optimizers.Adamax(**kw)

    return make


def _keras3_opt(**kw):
    import keras

    return keras.optimizers.Adamax(**kw)


def _tf_adamax_opt(module: str) -> Callable[..., Any]:
    def make(**kw):
        mod = importlib.import_module(module)
        cls = getattr(mod, "Adamax", None)
        if cls is None:
            raise ImportError(f"{module}.Adamax does not exist yet")
        return cls(**kw)

    return make


@dataclasses.dataclass(frozen=True)
class Spec:
    """One competitor: how to build it and how to present it.

    Attributes:
      key: short id used in JSON and on the command line (--only).
      label: the constructor call a user would write.
      make: zero-config factory; `kwargs` are passed to it.
      kwargs: constructor arguments.
      role: "anchor" (a built-in we compare against), "candidate" (tf_adamax),
        "context" (an optimizer's step wrapped in an XLA tf.function: what a user
        gets by jit-compiling the step themselves) or "reference" (not an optimizer's sparse
        step: the dense step on the same table).
      xla_wrap: wrap the step in tf.function(jit_compile=True) instead of a plain one.
      densify: a "reference" fed the sparse gradient, densified inside its step
        (`tf.convert_to_tensor`), instead of the precomputed dense gradient.
    """

    key: str
    label: str
    make: Callable[..., Any]
    kwargs: tuple = ()
    role: str = "candidate"
    xla_wrap: bool = False
    densify: bool = False

    def grads(self, sparse, dense):
        """The gradients this competitor's step is given."""
        return dense if self.role == "reference" and not self.densify else sparse

    def build(self):
        return self.make(**dict(self.kwargs))


_LEGACY = Spec("legacy", "tf_keras.optimizers.legacy.Adamax()", _tf_keras_opt("legacy"),
               role="anchor")
_TFK = Spec("tf_keras", "tf_keras.optimizers.Adamax()", _tf_keras_opt("new"), role="anchor")
_K3 = Spec("keras3", "keras.optimizers.Adamax()", _keras3_opt, role="anchor")
_TFK_XLA = Spec("tf_keras+xla", "tf_keras.optimizers.Adamax() in jit tf.function",
                _tf_keras_opt("new"), role="context", xla_wrap=True)
_K3_XLA = Spec("keras3+xla", "keras.optimizers.Adamax() in jit tf.function", _keras3_opt,
               role="context", xla_wrap=True)
_CORE = _tf_adamax_opt("tf_adamax")
_CORE_XLA = Spec("core+xla", "tf_adamax.Adamax() in jit tf.function", _CORE,
                 role="context", xla_wrap=True)
_KAD = _tf_adamax_opt("tf_adamax.keras")
_TFKAD = _tf_adamax_opt("tf_adamax.tf_keras")


def _core(key, label, **kw):
    return Spec(key, label, _CORE, tuple(kw.items()))


DENSE_SPECS = [
    _LEGACY, _TFK, _K3,
    _core("core", "tf_adamax.Adamax()"),
    _core("core_nojit", "tf_adamax.Adamax(jit_compile=False)", jit_compile=False),
    Spec("kad", "tf_adamax.keras.Adamax()", _KAD),
    Spec("tfkad", "tf_adamax.tf_keras.Adamax()", _TFKAD),
    _TFK_XLA, _K3_XLA, _CORE_XLA,
]

# Listed in priority order: when a large table does not fit the memory budget
# (--max-mem-gb), competitors are dropped from the end of this list first.
SPARSE_SPECS = [
    _LEGACY, _TFK, _K3,
    _core("core_lazy", 'tf_adamax.Adamax(sparse_mode="lazy")', sparse_mode="lazy"),
    _core("core_exact", 'tf_adamax.Adamax(sparse_mode="exact")', sparse_mode="exact"),
    Spec("core_dense", "tf_adamax.Adamax(), dense grad of same table", _CORE,
         role="reference"),
    Spec("core_densify", "tf_adamax.Adamax(), tf.convert_to_tensor(grad) in the step",
         _CORE, role="reference", densify=True),
    _core("core_lazy_nojit", 'tf_adamax.Adamax(sparse_mode="lazy", jit_compile=False)',
          sparse_mode="lazy", jit_compile=False),
    _core("core_exact_nojit", 'tf_adamax.Adamax(sparse_mode="exact", jit_compile=False)',
          sparse_mode="exact", jit_compile=False),
    Spec("kad_lazy", 'tf_adamax.keras.Adamax(sparse_mode="lazy")', _KAD,
         (("sparse_mode", "lazy"),)),
    Spec("tfkad_lazy", 'tf_adamax.tf_keras.Adamax(sparse_mode="lazy")', _TFKAD,
         (("sparse_mode", "lazy"),)),
    Spec("kad_exact", 'tf_adamax.keras.Adamax(sparse_mode="exact")', _KAD,
         (("sparse_mode", "exact"),)),
    Spec("tfkad_exact", 'tf_adamax.tf_keras.Adamax(sparse_mode="exact")', _TFKAD,
         (("sparse_mode", "exact"),)),
]
# Non-default O(V) variants that take seconds per step on big tables: --quick times
# them only on tables up to QUICK_LARGE_V rows.
QUICK_SMALL_TABLES_ONLY = ("core_exact_nojit", "kad_exact", "tfkad_exact")
QUICK_LARGE_V = 100_000
# Used when tf_adamax is missing, so the sparse table still has a dense reference.
_LEGACY_DENSE = Spec("legacy_dense", "tf_keras legacy Adamax, dense grad of same table",
                     _tf_keras_opt("legacy"), role="reference")

FIT_SPECS = [
    Spec("keras3", "keras.optimizers.Adamax()", _keras3_opt, role="anchor"),
    Spec("kad", "tf_adamax.keras.Adamax()", _KAD),
    Spec("kad_lazy", 'tf_adamax.keras.Adamax(sparse_mode="lazy")', _KAD,
         (("sparse_mode", "lazy"),)),
]

ALL_SPECS = {s.key: s for s in DENSE_SPECS + SPARSE_SPECS + [_LEGACY_DENSE]}


def _first_line(exc: BaseException) -> str:
    """A one-line reason; TF's "in user code:" errors carry it on their last line."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[-1] if lines[0].endswith("in user code:") else lines[0]
    return f"{type(exc).__name__}: {line}"[:240]


def _build_opt(opt, var_list):
    """Creates optimizer state outside the timed tf.function where the API allows."""
    build = getattr(opt, "build", None)
    if callable(build):
        build(var_list)


class Rotating:
    """Sparse batches of one table taken in turn, one per step.

    Training names different rows at each step; one batch replayed keeps its rows hot
    in cache, which flatters large tables (measured 2026-12-01: lazy 2M/10K 1.38x with
    one batch, 1.80x with 16). Each step picks the indices of batch `calls % K` (a
    gather of K x 4096 int32s, the same few microseconds for every competitor); the
    values are shared by all batches.
    """

    def __init__(self, grads):
        self.values = grads[0].values
        self.dense_shape = grads[0].dense_shape
        self.indices = tf.stack([g.indices for g in grads])

    def next(self, counter):
        i = counter.assign_add(1) % tf.shape(self.indices)[0]
        return tf.IndexedSlices(self.values, tf.gather(self.indices, i),
                                self.dense_shape)


def _make_step(opt, grads_and_vars, xla_wrap: bool, densify: bool = False):
    """One tf.function per competitor: nothing but apply_gradients of held tensors
    (densified first with `densify`); a `Rotating` gradient gives the next batch."""
    pairs = list(grads_and_vars)
    counter = tf.Variable(0, dtype=tf.int32, trainable=False, name="batch_counter")

    def step():
        given = [(g.next(counter) if isinstance(g, Rotating) else g, v)
                 for g, v in pairs]
        opt.apply_gradients([(tf.convert_to_tensor(g), v) for g, v in given]
                            if densify else given)

    return tf.function(step, jit_compile=xla_wrap)


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Entry:
    """A timed thing (an optimizer step or a bandwidth reference) and its samples."""

    key: str
    label: str
    role: str
    fn: Callable[[], Any] | None = None
    status: str = "ok"  # ok | skipped | failed
    note: str = ""
    first_call_s: float | None = None
    warmup_s: list = dataclasses.field(default_factory=list)
    traces_after_warmup: int | None = None
    traces_at_end: int | None = None
    steps_per_rep: int = 1
    max_reps: int = 0
    samples_ms: list = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)

    def stats(self) -> dict:
        if not self.samples_ms:
            return {}
        s = np.asarray(self.samples_ms, dtype=np.float64)
        q25, med, q75 = np.percentile(s, [25, 50, 75])
        return {"median_ms": float(med), "q25_ms": float(q25), "q75_ms": float(q75),
                "iqr_ms": float(q75 - q25), "mean_ms": float(s.mean()),
                "min_ms": float(s.min()), "reps": int(s.size)}

    @property
    def median(self) -> float | None:
        return self.stats().get("median_ms")


def _tracing_count(fn) -> int | None:
    getter = getattr(fn, "experimental_get_tracing_count", None)
    return getter() if getter else None


def warm_up(entry: Entry, warmup: int) -> None:
    """Traces/compiles and runs `warmup` calls; marks the entry failed on error."""
    try:
        for _ in range(max(1, warmup)):
            t0 = time.perf_counter()
            entry.fn()
            entry.warmup_s.append(time.perf_counter() - t0)
        entry.first_call_s = entry.warmup_s[0]
        entry.traces_after_warmup = _tracing_count(entry.fn)
    except Exception as exc:  # a broken competitor must not sink the others
        entry.status, entry.note = "failed", _first_line(exc)
        entry.fn = None
        if os.environ.get("BENCH_DEBUG"):
            traceback.print_exc()


def calibrate(entry: Entry, cfg) -> None:
    """Picks steps per rep (~cfg.rep_seconds) and a rep cap from the time budget."""
    times = []
    if len(entry.warmup_s) > 1 and entry.warmup_s[-1] > 0.2:
        # A slow step (O(V) sparse built-ins at 2M rows): the last warm-up call is
        # estimate enough, and another untimed call would cost seconds.
        times = [entry.warmup_s[-1]]
    t_end = time.perf_counter() + 0.2
    while len(times) < 5 and (not times or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        entry.fn()
        times.append(time.perf_counter() - t0)
    est = float(np.median(times))
    entry.steps_per_rep = int(min(cfg.max_steps_per_rep, max(1, round(cfg.rep_seconds / est))))
    rep_s = est * entry.steps_per_rep
    by_budget = int(cfg.budget_seconds // max(rep_s, 1e-9))
    entry.max_reps = int(min(cfg.reps, max(cfg.min_reps, by_budget)))
    if entry.max_reps < cfg.reps:
        entry.note = (entry.note + "; " if entry.note else "") + (
            f"reps capped at {entry.max_reps} (budget {cfg.budget_seconds:g}s)")


def run_round_robin(entries: list[Entry], cfg) -> None:
    """Times live entries interleaved, the order rotated each rep: rep r runs
    the entries starting at the r-th (A, B, C; B, C, A; ...). Measured here,
    the entry that always runs first is ~4% slower than identical ones after
    it, so a fixed order would favour everyone but the first."""
    live = [e for e in entries if e.status == "ok"]
    for e in live:
        try:
            calibrate(e, cfg)
        except Exception as exc:
            e.status, e.note, e.fn = "failed", _first_line(exc), None
    live = [e for e in live if e.status == "ok"]
    rounds = max((e.max_reps for e in live), default=0)
    for r in range(rounds):
        shift = r % len(live)
        for e in live[shift:] + live[:shift]:
            if e.status != "ok" or len(e.samples_ms) >= e.max_reps:
                continue
            try:
                t0 = time.perf_counter()
                for _ in range(e.steps_per_rep):
                    e.fn()
                dt = time.perf_counter() - t0
            except Exception as exc:
                e.status, e.note, e.fn = "failed", _first_line(exc), None
                continue
            e.samples_ms.append(dt * 1e3 / e.steps_per_rep)
    for e in live:
        e.traces_at_end = _tracing_count(e.fn) if e.fn is not None else None
        if (e.traces_at_end is not None and e.traces_after_warmup is not None
                and e.traces_at_end != e.traces_after_warmup):
            e.note = (e.note + "; " if e.note else "") + (
                f"RETRACED during timing ({e.traces_after_warmup}->{e.traces_at_end})")


def make_optimizer_entry(spec: Spec, var_list, grads, warmup: int) -> Entry:
    """Builds optimizer + step for `spec`; a failed import/build becomes a table note."""
    entry = Entry(spec.key, spec.label, spec.role)
    try:
        opt = spec.build()
    except ImportError as exc:
        entry.status, entry.note = "skipped", "import failed: " + _first_line(exc)
        return entry
    except Exception as exc:
        entry.status, entry.note = "failed", "constructor: " + _first_line(exc)
        return entry
    try:
        _build_opt(opt, var_list)
        entry.fn = _make_step(opt, zip(grads, var_list), spec.xla_wrap, spec.densify)
    except Exception as exc:
        entry.status, entry.note = "failed", "build: " + _first_line(exc)
        return entry
    entry.extra["optimizer"] = opt  # kept alive with the entry; dropped before JSON
    warm_up(entry, warmup)
    return entry


# --------------------------------------------------------------------------------------
# Bandwidth floor
# --------------------------------------------------------------------------------------

def bandwidth_entries(n: int) -> list[Entry]:
    """Streaming kernels with the same working set as an Adamax step on n floats.

    An Adamax step touches 4 arrays of n floats (var, m, u, g); each kernel here works
    on 2 arrays of 2n floats, so cache residency is comparable (this CPU's L3 is 32 MiB;
    the `big` step's 64 MiB working set is not cache-resident, `many`'s 13 MiB is).
    """
    size = 2 * n
    src = tf.Variable(tf.random.uniform([size]), name="bw_src")
    dst = tf.Variable(tf.zeros([size]), name="bw_dst")

    # assign_add reads dst and src and writes dst in place: like Adamax, every line it
    # writes was read first, so there is no extra write-allocate traffic to account for.
    @tf.function
    def stream_tf():
        dst.assign_add(src)

    a = np.random.default_rng(0).random(size, dtype=np.float32)
    b = np.empty_like(a)

    def copy_np():
        np.copyto(b, a)

    e1 = Entry("bw_stream_tf", f"bandwidth: tf assign_add, 2 x {size} f32", "bandwidth",
               fn=stream_tf)
    e1.extra.update(bytes_per_call=3 * 4 * size, keepalive=(src, dst))
    e2 = Entry("bw_copy_np", f"bandwidth: numpy copyto, 2 x {size} f32", "bandwidth",
               fn=copy_np)
    e2.extra.update(bytes_per_call=2 * 4 * size, keepalive=(a, b))
    return [e1, e2]


def bandwidth_summary(entries: list[Entry], n: int) -> dict:
    """Floor = bytes an Adamax step must move / best measured streaming bandwidth."""
    kernels = {}
    for e in entries:
        if e.role == "bandwidth" and e.median:
            kernels[e.key] = {
                "label": e.label, "bytes_per_call": e.extra["bytes_per_call"],
                "median_ms": e.median,
                "gb_per_s": e.extra["bytes_per_call"] / (e.median * 1e-3) / 1e9}
    step_bytes = 7 * 4 * n
    out = {"step_bytes": step_bytes,
           "step_bytes_formula": "7 * 4 * n (read var, m, u, g; write var, m, u; float32)",
           "kernels": kernels}
    if kernels:
        best = max(kernels, key=lambda k: kernels[k]["gb_per_s"])
        bw = kernels[best]["gb_per_s"]
        out.update(floor_kernel=best, floor_gb_per_s=bw,
                   floor_ms=step_bytes / (bw * 1e9) * 1e3)
    return out


# --------------------------------------------------------------------------------------
# Memory probe (runs in a fresh subprocess)
# --------------------------------------------------------------------------------------

class _AllocMeter:
    """TF's own allocator statistics; on CPU only with TF_CPU_ALLOCATOR_USE_BFC=true."""

    method = "tf_allocator"

    def current(self) -> int:
        return tf.config.experimental.get_memory_info("CPU:0")["current"]

    def reset_peak(self) -> None:
        tf.config.experimental.reset_memory_stats("CPU:0")

    def peak(self) -> int:
        return tf.config.experimental.get_memory_info("CPU:0")["peak"]


def mem_probe_main(spec_json: str) -> None:
    """Subprocess entry: per competitor, peak memory of steps beyond the built state."""
    req = json.loads(spec_json)
    meter = _AllocMeter()
    shape = req["shape"]
    var_bytes = int(np.prod(shape)) * 4
    var = tf.Variable(tf.random.normal(shape, stddev=0.05), name="probe_var")
    if req["grad"] == "sparse":
        grad = _sparse_grad(var, req["batch"], seed=0)
    else:
        grad = tf.random.normal(shape, stddev=0.01)
    results = {}
    for key in req["keys"]:
        spec = ALL_SPECS[key]
        g = spec.grads(grad, tf.convert_to_tensor(grad))
        gc.collect()
        before = meter.current()
        entry = make_optimizer_entry(spec, [var], [g], req["warmup"])
        if entry.status != "ok":
            results[key] = {"status": entry.status, "note": entry.note}
            continue
        gc.collect()
        after = meter.current()
        try:
            meter.reset_peak()
            base = meter.current()
            for _ in range(req["steps"]):
                entry.fn()
            peak = meter.peak()
        except Exception as exc:
            results[key] = {"status": "failed", "note": _first_line(exc)}
            continue
        extra = max(0, peak - base)
        results[key] = {"status": "ok", "state_bytes": after - before,
                        "state_var_sizes": (after - before) / var_bytes,
                        "peak_extra_bytes": extra,
                        "peak_extra_var_sizes": extra / var_bytes}
        del entry, g
        gc.collect()
    print(MEM_PROBE_TAG + json.dumps({"method": meter.method, "var_bytes": var_bytes,
                                      "results": results}), flush=True)


def run_mem_probe(method: str, shape, keys, grad: str, cfg, batch: int = 0) -> dict:
    """Runs mem_probe_main in a fresh interpreter so no other case's memory interferes."""
    env = dict(os.environ)
    # Makes TF's CPU allocator a BFC allocator that keeps statistics; without it
    # get_memory_info('CPU:0') raises "Allocator stats not available". It sees XLA's
    # temporaries too. (Process RSS was measured alongside until 2026-12-01 and
    # dropped: TF keeps a step's freed temporaries resident after the first call, so
    # RSS showed 0 extra even for the built-ins' known full-size temporaries.)
    env["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    req = {"method": method, "shape": list(shape), "keys": list(keys), "grad": grad,
           "batch": batch, "warmup": 2 if cfg.quick else 3, "steps": cfg.mem_steps}
    cmd = [sys.executable, os.path.abspath(__file__), "--_mem-probe", json.dumps(req)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return {"method": method, "error": "timed out"}
    for line in proc.stdout.splitlines():
        if line.startswith(MEM_PROBE_TAG):
            return json.loads(line[len(MEM_PROBE_TAG):])
    tail = (proc.stderr or "").strip().splitlines()[-3:]
    return {"method": method, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------

def _entries_for(specs, var_list, grads, cfg, dense_grads=None) -> list[Entry]:
    entries = []
    for spec in specs:
        if cfg.only and spec.key not in cfg.only:
            continue
        g = spec.grads(grads, dense_grads)
        entries.append(make_optimizer_entry(spec, var_list, g, cfg.warmup))
        _log(f"    built {spec.key:<18} {entries[-1].status}"
             + (f" first call {entries[-1].first_call_s:.2f}s"
                if entries[-1].first_call_s else "")
             + (f" ({entries[-1].note})" if entries[-1].note else ""))
    return entries


def case_dense(name: str, shapes, cfg) -> dict:
    """`big` and `many`: dense gradients, bandwidth floor, (big) memory figure."""
    rng = np.random.default_rng(0)
    n = int(sum(np.prod(s) for s in shapes))
    var_list = [tf.Variable(rng.normal(0, 0.05, s).astype(np.float32), name=f"w{i}")
                for i, s in enumerate(shapes)]
    grads = [tf.constant(rng.normal(0, 0.01, s).astype(np.float32)) for s in shapes]
    _log(f"  {name}: {len(shapes)} variable(s), {n} floats ({n * 4 / MIB:.1f} MiB)")
    specs = DENSE_SPECS
    if cfg.quick and len(shapes) > 1:
        # Tracing the built-ins' 200 variables into one XLA program costs ~10-20 s
        # per competitor; in --quick keep them (context rows, not anchors) to the
        # `big` case.
        specs = [s for s in specs if s.role != "context" or s.key == "core+xla"]
    entries = _entries_for(specs, var_list, grads, cfg)
    bw = bandwidth_entries(n)
    for e in bw:
        warm_up(e, cfg.warmup)
    run_round_robin(entries + bw, cfg)
    floor = bandwidth_summary(bw, n)
    for e in entries:
        if e.median and "floor_ms" in floor:
            e.extra["achieved_gb_per_s"] = floor["step_bytes"] / (e.median * 1e-3) / 1e9
            e.extra["fraction_of_floor"] = floor["floor_ms"] / e.median
    config = {"name": name, "params": {"variables": len(shapes), "shape": list(shapes[0]),
                                       "floats": n},
              "entries": entries + bw, "bandwidth": floor}
    if name == "big" and not cfg.no_memory:
        keys = [e.key for e in entries if e.status == "ok"]
        _log(f"  {name}: memory probes (fresh subprocesses) for {', '.join(keys)}")
        config["memory"] = {"tf_allocator": run_mem_probe(
            "tf_allocator", shapes[0], keys, "dense", cfg)}
    return config


def _sparse_grad(table: tf.Variable, batch: int, seed: int):
    """The gradient of a real embedding lookup: IndexedSlices with duplicate rows.

    Half the batch are distinct rows, the other half repeats of them, so the batch has
    exactly batch/2 unique rows at every table size (uniform draws would have almost
    no duplicates at V = 2M).
    """
    vocab = int(table.shape[0])
    rng = np.random.default_rng(seed)
    uniq = rng.choice(vocab, size=batch // 2, replace=False)
    ids = np.concatenate([uniq, rng.choice(uniq, size=batch - uniq.size)])
    rng.shuffle(ids)
    ids = tf.constant(ids.astype(np.int32))
    upstream = tf.constant(rng.normal(0, 0.01, (batch, table.shape[1])).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.gather(table, ids) * upstream)
    return tape.gradient(loss, table)


def _sparse_batches(table: tf.Variable, batch: int, seed: int, count: int):
    """`count` batches of `_sparse_grad` (different rows, same duplicate structure) as
    a `Rotating` gradient, or the one batch when `count` is 1."""
    grads = [_sparse_grad(table, batch, seed=seed + 7919 * i) for i in range(count)]
    return grads[0] if count == 1 else Rotating(grads)


def _first_batch(grad):
    if isinstance(grad, Rotating):
        return tf.IndexedSlices(grad.values, grad.indices[0], grad.dense_shape)
    return grad


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _fit_memory(specs, table_bytes: int, cfg, notes: list) -> list:
    """Drops the lowest-priority competitors until the table's state fits the budget."""
    budget = cfg.max_mem_gb * GIB
    avail = _mem_available()
    if avail:
        budget = min(budget, 0.7 * avail)
    # var + dense reference gradient + O(V) temporaries of the built-ins' steps,
    # then two slots per optimizer.
    fixed = 4 * table_bytes
    kept, dropped = list(specs), []
    while kept and fixed + 2 * table_bytes * len(kept) > budget:
        dropped.insert(0, kept.pop())
    notes += [f"{d.key}: skipped at this table size, state would exceed the memory "
              f"budget {budget / GIB:.1f} GiB (--max-mem-gb)" for d in dropped]
    return kept


def case_sparse(vocab: int, cfg, core_ok: bool) -> dict:
    dim, batch = 64, cfg.batch
    table_bytes = vocab * dim * 4
    _log(f"  sparse V={vocab}: table {table_bytes / MIB:.0f} MiB")
    table = tf.Variable(tf.random.normal([vocab, dim], stddev=0.05, seed=1), name="table")
    grad = _sparse_batches(table, batch, vocab, cfg.sparse_batches)
    # The dense reference's cost does not depend on which rows are named: one batch.
    dense = tf.convert_to_tensor(_first_batch(grad))
    specs = list(SPARSE_SPECS)
    if not core_ok:
        specs.insert(specs.index(SPARSE_SPECS[5]), _LEGACY_DENSE)
    if cfg.only:
        specs = [sp for sp in specs if sp.key in cfg.only]
    notes: list = []
    if cfg.quick and vocab > QUICK_LARGE_V:
        for sp in [sp for sp in specs if sp.key in QUICK_SMALL_TABLES_ONLY]:
            specs.remove(sp)
            notes.append(f"{sp.key}: skipped in --quick above V={QUICK_LARGE_V} "
                         "(non-default O(V) variant, seconds per step)")
    specs = _fit_memory(specs, table_bytes, cfg, notes)
    entries = _entries_for(specs, [table], [grad], cfg, dense_grads=[dense])
    for n_ in notes:
        key = n_.split(":")[0]
        e = Entry(key, ALL_SPECS[key].label, ALL_SPECS[key].role, status="skipped", note=n_)
        entries.append(e)
    run_round_robin(entries, cfg)
    config = {"name": f"sparse V={vocab}",
              "params": {"vocab": vocab, "dim": dim, "batch": batch,
                         "unique_rows": int(np.unique(
                             _first_batch(grad).indices.numpy()).size),
                         "indices_dtype": grad.indices.dtype.name,
                         "batches_in_turn": cfg.sparse_batches,
                         "table_mib": table_bytes / MIB},
              "entries": entries}
    if vocab == max(cfg.vocab) and not cfg.no_memory:
        ok = [e.key for e in entries if e.status == "ok"]
        if cfg.quick:
            # Each probed step runs ~5 times; O(V) steps take seconds at 2M rows, so
            # --quick probes the sub-second ones plus the legacy anchor and exact core.
            ok = [e.key for e in entries if e.status == "ok" and (
                (e.median or 1e9) < 1000 or e.key in ("legacy", "core_exact"))]
        # Free this table's state first: the probe subprocess builds its own.
        for e in entries:
            e.fn = None
            e.extra.pop("optimizer", None)
        del table, grad, dense
        gc.collect()
        _log(f"  sparse V={vocab}: memory probes for {', '.join(ok)}")
        config["memory"] = {"tf_allocator": run_mem_probe(
            "tf_allocator", [vocab, dim], ok, "sparse", cfg, batch)}
    return config


def lazy_flatness(cfg) -> dict | None:
    """tf_adamax lazy on the smallest and largest table, both alive, interleaved.

    The per-V tables above are timed minutes apart under whatever load the machine
    has then; this pair is timed in the same rounds, so their ratio is the
    flat-in-V figure.
    """
    spec = ALL_SPECS["core_lazy"]
    if cfg.only and spec.key not in cfg.only:
        return None
    entries, keep = [], []
    for v in sorted({min(cfg.vocab), max(cfg.vocab)}):
        table = tf.Variable(tf.random.normal([v, 64], stddev=0.05, seed=1),
                            name=f"flat{v}")
        grad = _sparse_batches(table, cfg.batch, v, cfg.sparse_batches)
        e = make_optimizer_entry(spec, [table], [grad], cfg.warmup)
        e.key, e.label = f"core_lazy@{v}", f"{spec.label}, V={v}"
        e.extra["vocab"] = v
        entries.append(e)
        keep.append((table, grad))
    run_round_robin(entries, cfg)
    recs = [dict(entry_record(e, {}), vocab=e.extra["vocab"]) for e in entries]
    out = {"results": recs}
    if len(recs) == 2 and all("median_ms" in r for r in recs):
        out["ratio_max_over_min"] = recs[1]["median_ms"] / recs[0]["median_ms"]
    return out


def _fit_models(kind: str, cfg):
    import keras

    keras.utils.set_random_seed(0)
    if kind == "mlp":
        inp = keras.Input((256,))
        x = keras.layers.Dense(512, activation="relu")(inp)
        x = keras.layers.Dense(512, activation="relu")(x)
        out = keras.layers.Dense(10)(x)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        rng = np.random.default_rng(0)
        xs = rng.normal(size=(cfg.fit_batch * 16, 256)).astype(np.float32)
        ys = rng.integers(0, 10, size=(cfg.fit_batch * 16,)).astype(np.int32)
    else:
        inp = keras.Input((cfg.fit_seq,), dtype="int32")
        x = keras.layers.Embedding(cfg.fit_vocab, 64)(inp)
        x = keras.layers.GlobalAveragePooling1D()(x)
        x = keras.layers.Dense(64, activation="relu")(x)
        out = keras.layers.Dense(1)(x)
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
        rng = np.random.default_rng(0)
        xs = rng.integers(0, cfg.fit_vocab, size=(cfg.fit_batch * 16, cfg.fit_seq))
        xs = xs.astype(np.int32)
        ys = rng.integers(0, 2, size=(cfg.fit_batch * 16, 1)).astype(np.float32)
    ds = (tf.data.Dataset.from_tensor_slices((xs, ys)).batch(cfg.fit_batch, drop_remainder=True)
          .cache().repeat().prefetch(tf.data.AUTOTUNE))
    return inp, out, loss, ds


def _batch_clock():
    """A Keras callback recording when each training batch ends."""
    import keras

    class BatchClock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

    return BatchClock()


def case_fit(kind: str, cfg) -> dict:
    """Keras 3 model.fit steps/s: one model per optimizer, timed fits interleaved.

    Each rep is one `fit(steps_per_epoch=S)`. The sample is the steady step time inside
    it, (last batch end - first batch end) / (S - 1): on this machine a fit() call also
    spends 0-300 ms setting up and tearing down its data iterator, in steps of
    12.8 ms x 2^k, which would swamp the optimizer. The whole call's time per step is
    kept as `fit_call_ms_per_step`.
    """
    import keras

    entries = []
    inp, out, loss, ds = _fit_models(kind, cfg)
    jit_modes = {}
    for spec in FIT_SPECS:
        if cfg.only and spec.key not in cfg.only:
            continue
        entry = Entry(spec.key, spec.label, spec.role)
        try:
            opt = spec.build()
        except ImportError as exc:
            entry.status, entry.note = "skipped", "import failed: " + _first_line(exc)
            entries.append(entry)
            continue
        except Exception as exc:
            entry.status, entry.note = "failed", "constructor: " + _first_line(exc)
            entries.append(entry)
            continue
        model = keras.Model(inp, out)
        model = keras.models.clone_model(model)  # fresh weights per competitor
        model.compile(optimizer=opt, loss=loss)
        steps = cfg.fit_steps
        clock = _batch_clock()

        def fit_once(model=model, steps=steps, clock=clock):
            t0 = time.perf_counter()
            model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False,
                      callbacks=[clock])
            call_s = time.perf_counter() - t0
            if len(clock.ends) != steps:
                raise RuntimeError(f"fit ran {len(clock.ends)} of {steps} steps")
            return (clock.ends[-1] - clock.ends[0]) / (steps - 1), call_s / steps

        entry.fn = fit_once
        entry.extra.update(model=model, steps_per_fit=steps, fit_call_ms=[])
        try:
            t0 = time.perf_counter()
            model.fit(ds, epochs=1, steps_per_epoch=cfg.fit_warmup_steps, verbose=0,
                      shuffle=False)
            entry.first_call_s = time.perf_counter() - t0
            jit_modes[spec.key] = bool(model.jit_compile)
        except Exception as exc:
            entry.status, entry.note, entry.fn = "failed", _first_line(exc), None
        _log(f"    built {spec.key:<18} {entry.status}"
             + (f" ({entry.note})" if entry.note else ""))
        entries.append(entry)
    # A rep is one fit() of fit_steps steps, interleaved; samples are ms per step.
    live = [e for e in entries if e.status == "ok"]
    for e in live:
        e.steps_per_rep, e.max_reps = 1, cfg.fit_reps
    for r in range(cfg.fit_reps):
        shift = r % max(1, len(live))
        for e in live[shift:] + live[:shift]:  # rotated, as run_round_robin
            if e.status != "ok":
                continue
            try:
                step_s, call_s = e.fn()
            except Exception as exc:
                e.status, e.note, e.fn = "failed", _first_line(exc), None
                continue
            e.samples_ms.append(step_s * 1e3)
            e.extra["fit_call_ms"].append(call_s * 1e3)
    params = {"model": kind, "batch": cfg.fit_batch, "steps_per_fit": cfg.fit_steps,
              "model_jit_compile": jit_modes}
    if kind == "embedding":
        params.update(vocab=cfg.fit_vocab, seq_len=cfg.fit_seq, dim=64)
    return {"name": f"fit {kind}", "params": params, "entries": entries}


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------

def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def entry_record(e: Entry, anchors: dict) -> dict:
    rec = {"key": e.key, "label": e.label, "role": e.role, "status": e.status,
           "note": e.note}
    rec.update(e.stats())
    if e.samples_ms:
        rec.update(steps_per_rep=e.steps_per_rep,
                   samples_ms=[round(x, 5) for x in e.samples_ms],
                   first_call_s=e.first_call_s, traces_after_warmup=e.traces_after_warmup,
                   traces_at_end=e.traces_at_end)
        rec["ratio"] = {a: e.median / m for a, m in anchors.items() if m}
        if "steps_per_fit" in e.extra:
            rec["steps_per_s"] = 1e3 / e.median
            rec["steps_per_s_q25"] = 1e3 / rec["q75_ms"]
            rec["steps_per_s_q75"] = 1e3 / rec["q25_ms"]
            calls = e.extra["fit_call_ms"]
            rec["fit_call_ms_per_step"] = [round(x, 5) for x in calls]
            rec["fit_call_median_ms_per_step"] = float(np.median(calls))
    for k in ("achieved_gb_per_s", "fraction_of_floor", "bytes_per_call"):
        if k in e.extra:
            rec[k] = e.extra[k]
    return rec


def config_record(cfgd: dict) -> dict:
    entries = cfgd["entries"]
    anchors = {e.key: e.median for e in entries if e.role == "anchor" and e.median}
    rec = {k: v for k, v in cfgd.items() if k != "entries"}
    rec["anchors_median_ms"] = anchors
    rec["results"] = [entry_record(e, anchors) for e in entries]
    return rec


def _fmt(x, spec=".3f", none="-"):
    return none if x is None else format(x, spec)


def format_table(case: str, rec: dict) -> str:
    lines = []
    p = rec["params"]
    title = f"== {rec['name']}  " + "  ".join(
        f"{k}={v}" for k, v in p.items() if not isinstance(v, (dict, list)))
    if p.get("model_jit_compile"):
        title += "  model.jit_compile: " + ", ".join(
            f"{k}={v}" for k, v in p["model_jit_compile"].items())
    lines.append(title)
    is_fit = case == "fit"
    anchors = [a for a in (("keras3",) if is_fit else ANCHORS)]
    head = f"{'competitor':<52}{'median ms':>10}{'IQR ms':>9}{'reps':>9}"
    if is_fit:
        head += f"{'steps/s':>9}{'vs keras3':>10}{'speedup':>8}{'fit() ms':>9}"
    else:
        head += "".join(f"{'/' + ANCHOR_LABELS[a]:>14}" for a in anchors)
        if case in ("big", "many"):
            head += f"{'GB/s':>7}{'floor%':>7}"
    lines.append(head)
    lines.append("-" * len(head))
    for r in rec["results"]:
        label = r["label"] if len(r["label"]) <= 50 else r["label"][:49] + "~"
        if r["status"] != "ok" or "median_ms" not in r:
            lines.append(f"{label:<52}{r['status'].upper():>10}   {r['note']}")
            continue
        reps = f"{r['reps']}x{r.get('steps_per_rep', 1)}"
        row = f"{label:<52}{r['median_ms']:>10.3f}{r['iqr_ms']:>9.3f}{reps:>9}"
        if r["role"] == "bandwidth":
            row += f"   {r['bytes_per_call'] / (r['median_ms'] * 1e-3) / 1e9:.1f} GB/s"
            lines.append(row)
            continue
        if is_fit:
            ratio = r["ratio"].get("keras3")
            row += f"{r['steps_per_s']:>9.1f}{_fmt(ratio, '.3f'):>10}"
            row += f"{_fmt(1 / ratio if ratio else None, '.2f'):>8}"
            row += f"{r['fit_call_median_ms_per_step']:>9.2f}"
        else:
            row += "".join(f"{_fmt(r['ratio'].get(a), '.3f'):>14}" for a in anchors)
            if case in ("big", "many"):
                row += f"{_fmt(r.get('achieved_gb_per_s'), '.1f'):>7}"
                frac = r.get("fraction_of_floor")
                row += f"{_fmt(frac * 100 if frac else None, '.0f'):>7}"
        if r["note"]:
            row += f"   [{r['note']}]"
        lines.append(row)
    bw = rec.get("bandwidth")
    if bw and "floor_ms" in bw:
        lines.append(
            f"bandwidth floor: {bw['step_bytes'] / MIB:.1f} MiB/step ({bw['step_bytes_formula']})"
            f" / {bw['floor_gb_per_s']:.1f} GB/s ({bw['floor_kernel']}, same working set)"
            f" = {bw['floor_ms']:.3f} ms")
    flat = rec.get("lazy_flatness")
    if flat:
        parts = [f"V={r['vocab']}: {r['median_ms']:.3f} ms (IQR {r['iqr_ms']:.3f}, "
                 f"{r['reps']}x{r['steps_per_rep']})" for r in flat["results"]
                 if "median_ms" in r]
        lines.append("lazy flatness pair, interleaved: " + "; ".join(parts) + (
            f"; ratio {flat['ratio_max_over_min']:.3f}" if "ratio_max_over_min" in flat
            else ""))
    mem = rec.get("memory")
    if mem:
        lines.append("memory, in variable sizes: peak extra of a step beyond var + slots + "
                     "grad (fresh subprocess); state = optimizer state after build+warm-up "
                     "(TF's allocator statistics, TF_CPU_ALLOCATOR_USE_BFC=true)")
        keys = []
        for m in mem.values():
            keys += [k for k in m.get("results", {}) if k not in keys]
        for m in mem.values():
            if "error" in m:
                lines.append(f"  {m['method']}: probe failed: {m['error']}")
        lines.append(f"  {'competitor':<22}" + "".join(
            f"{m.get('method', '?') + ' extra':>20}" for m in mem.values()) + f"{'state':>8}")
        for k in keys:
            row = f"  {k:<22}"
            for m in mem.values():
                r = m.get("results", {}).get(k, {})
                if r.get("status") == "ok":
                    row += f"{r['peak_extra_var_sizes']:>20.2f}"
                else:
                    row += f"{(r.get('status') or '-'):>20}"
            st = mem.get("tf_allocator", {}).get("results", {}).get(k, {})
            row += f"{_fmt(st.get('state_var_sizes'), '.2f'):>8}"
            lines.append(row)
    return "\n".join(lines)


def _result(rec: dict, key: str) -> dict | None:
    for r in rec["results"]:
        if r["key"] == key and r["status"] == "ok" and "median_ms" in r:
            return r
    return None


def evaluate_targets(case: str, configs: list) -> list:
    """The issue's targets, computed from this run (met=None: not measurable now)."""
    out = []

    def add(tid, text, value, met, detail=""):
        out.append({"target": tid, "text": text, "value": value, "met": met,
                    "detail": detail})

    if case in ("big", "many"):
        rec = configs[0]
        core = _result(rec, "core")
        tid = 1 if case == "big" else 2
        for a, lim in (("legacy", 1.0), ("tf_keras", 0.5), ("keras3", 0.5)):
            r = core and core["ratio"].get(a)
            add(tid, f"{case}: tf_adamax.Adamax() <= {lim}x {a}", r,
                None if r is None else r <= lim,
                "" if core else "tf_adamax.Adamax not measured")
        if case == "big":
            f = core and core.get("fraction_of_floor")
            add(1, "big: >= 70% of the bandwidth floor", f,
                None if f is None else f >= 0.7)
            mem = rec.get("memory", {})
            for m, res in mem.items():
                r = res.get("results", {}).get("core", {})
                v = r.get("peak_extra_var_sizes")
                kept = r.get("state_var_sizes")
                if v is not None and kept is not None:
                    # Memory the optimizer keeps between steps beyond its two slots
                    # is a hidden copy too.
                    v += max(0.0, kept - 2.0)
                add(6, "big: extra memory of a step (peak beyond var + slots, plus "
                    f"state beyond 2 slots) <= 1 variable size ({m})", v,
                    None if v is None else v <= 1.0,
                    "" if v is not None else "not measured")
    elif case == "sparse":
        by_v = {c["params"]["vocab"]: c for c in configs}
        vmax, vmin = max(by_v), min(by_v)
        lazy_max, lazy_min = _result(by_v[vmax], "core_lazy"), _result(by_v[vmin], "core_lazy")
        anchors = by_v[vmax]["anchors_median_ms"]
        if anchors:
            fastest = min(anchors, key=anchors.get)
            r = lazy_max and lazy_max["median_ms"] / anchors[fastest]
            add(3, f"sparse lazy: at V={vmax} <= 0.05x the fastest anchor ({fastest})", r,
                None if r is None else r <= 0.05)
        flat = by_v[vmax].get("lazy_flatness", {}).get("ratio_max_over_min")
        if flat is not None:
            add(3, f"sparse lazy: time at V={vmax} <= 1.5x time at V={vmin} "
                "(interleaved pair)", flat, flat <= 1.5)
        r = lazy_max and lazy_min and lazy_max["median_ms"] / lazy_min["median_ms"]
        add(3, f"sparse lazy: time at V={vmax} <= 1.5x time at V={vmin} "
            "(per-V tables, timed apart)", r, None if r is None else r <= 1.5)
        for v, c in sorted(by_v.items()):
            ex, de = _result(c, "core_exact"), _result(c, "core_dense")
            r = ex and de and ex["median_ms"] / de["median_ms"]
            add(4, f"sparse exact: <= dense step on the same table (V={v})", r,
                None if r is None else r <= 1.0)
            dz = _result(c, "core_densify")
            r = ex and dz and ex["median_ms"] / dz["median_ms"]
            if r:
                add(4, f"(context) sparse exact: <= densify + dense step (V={v})", r,
                    r <= 1.0)
    elif case == "fit":
        for c in configs:
            kind = c["params"]["model"]
            key, lim = ("kad", 1.0) if kind == "mlp" else ("kad_lazy", 2.0)
            r = _result(c, key)
            sp = r and r["ratio"].get("keras3") and 1 / r["ratio"]["keras3"]
            add(5, f"fit {kind}: {key} steps/s >= {lim}x keras3", sp,
                None if sp is None else sp >= lim)
    return out


def format_targets(targets: list) -> str:
    lines = ["targets (issue 5):"]
    for t in targets:
        mark = {True: "MET ", False: "MISS", None: "n/a "}[t["met"]]
        val = "-" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"  [{mark}] #{t['target']} {t['text']}: {val}"
                     + (f"  ({t['detail']})" if t["detail"] else ""))
    return "\n".join(lines)


def plot_case(case: str, records: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"anchor": "tab:gray", "candidate": "tab:blue", "context": "tab:orange",
              "reference": "tab:green", "bandwidth": "tab:purple"}
    if case == "sparse":
        fig, ax = plt.subplots(figsize=(9, 6))
        keys = []
        for c in records:
            keys += [r["key"] for r in c["results"] if r["key"] not in keys]
        cmap = plt.get_cmap("tab20")
        styles = {"anchor": ("--", "s"), "reference": (":", "D"), "candidate": ("-", "o")}
        for i, k in enumerate(keys):
            pts = [(c["params"]["vocab"], r) for c in records for r in c["results"]
                   if r["key"] == k and "median_ms" in r]
            if not pts:
                continue
            v = [p[0] for p in pts]
            med = np.array([p[1]["median_ms"] for p in pts])
            lo = med - np.array([p[1]["q25_ms"] for p in pts])
            hi = np.array([p[1]["q75_ms"] for p in pts]) - med
            ls, mk = styles.get(pts[0][1]["role"], ("-", "o"))
            ax.errorbar(v, med, yerr=[lo, hi], marker=mk, capsize=3, label=k,
                        linestyle=ls, color=cmap(i % 20))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("table rows V (x 64 float32)")
        ax.set_ylabel("ms / step (median, IQR bars)")
        ax.set_title("Adamax sparse step, batch of 4096 indices with duplicates")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    else:
        n = len(records)
        has_mem = any(c.get("memory") for c in records)
        ncols = 2 if has_mem else 1
        rows_max = max(len(c["results"]) for c in records)
        fig, axes = plt.subplots(n, ncols, figsize=(8 * ncols, n * (0.4 * rows_max + 1.4)),
                                 squeeze=False)
        for i, c in enumerate(records):
            ax = axes[i][0]
            rows = [r for r in c["results"] if "median_ms" in r]
            if case == "fit":
                vals = [r["steps_per_s"] for r in rows]
                err = [[r["steps_per_s"] - r["steps_per_s_q25"] for r in rows],
                       [r["steps_per_s_q75"] - r["steps_per_s"] for r in rows]]
                ax.set_xlabel("training steps / s (median, IQR bars; higher is better)")
            else:
                vals = [r["median_ms"] for r in rows]
                err = [[r["median_ms"] - r["q25_ms"] for r in rows],
                       [r["q75_ms"] - r["median_ms"] for r in rows]]
                ax.set_xlabel("ms / step (median, IQR bars; lower is better)")
            y = np.arange(len(rows))
            ax.barh(y, vals, xerr=err, color=[colors.get(r["role"], "k") for r in rows],
                    capsize=3)
            ax.set_yticks(y)
            ax.set_yticklabels([r["key"] for r in rows], fontsize=8)
            ax.invert_yaxis()
            bw = c.get("bandwidth", {})
            if "floor_ms" in bw:
                ax.axvline(bw["floor_ms"], color="tab:red", linestyle="--",
                           label=f"bandwidth floor {bw['floor_ms']:.2f} ms")
                ax.legend(fontsize=8)
            ax.set_title(c["name"])
            ax.grid(True, axis="x", alpha=0.3)
            if has_mem:
                ax2 = axes[i][1]
                mem = c.get("memory", {})
                if mem:
                    methods = list(mem)
                    keys = []
                    for m in methods:
                        keys += [k for k in mem[m].get("results", {}) if k not in keys]
                    yk = np.arange(len(keys))
                    h = 0.8 / max(1, len(methods))
                    for j, m in enumerate(methods):
                        vals = [mem[m].get("results", {}).get(k, {}).get(
                            "peak_extra_var_sizes", np.nan) for k in keys]
                        ax2.barh(yk + j * h, vals, height=h, label=m)
                    ax2.set_yticks(yk + h * (len(methods) - 1) / 2)
                    ax2.set_yticklabels(keys, fontsize=8)
                    ax2.invert_yaxis()
                    ax2.axvline(1.0, color="tab:red", linestyle="--", label="1 variable")
                    ax2.set_xlabel("peak extra memory of a step (variable sizes)")
                    ax2.set_title("memory beyond var + slots + grad")
                    ax2.legend(fontsize=8)
                    ax2.grid(True, axis="x", alpha=0.3)
                else:
                    ax2.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    reps: int
    warmup: int
    min_reps: int
    rep_seconds: float
    budget_seconds: float
    max_steps_per_rep: int
    vocab: tuple
    batch: int
    max_mem_gb: float
    mem_steps: int
    fit_steps: int
    fit_warmup_steps: int
    fit_reps: int
    fit_batch: int
    fit_vocab: int
    fit_seq: int
    sparse_batches: int
    only: tuple
    quick: bool
    no_memory: bool


def _machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "mem_total_gib": None, "gpus": [d.name for d in
                                             tf.config.list_physical_devices("GPU")],
            # Process-wide XLA options change every compiled competitor.
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = int(f.readline().split()[1]) / 1024**2
    except OSError:
        pass
    return info


def _versions() -> dict:
    out = {"tensorflow": tf.__version__, "numpy": np.__version__}
    for mod in ("keras", "tf_keras", "matplotlib"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception as exc:
            out[mod] = "unavailable: " + _first_line(exc)
    # Tie results to the exact tf_adamax sources measured (there may be no commit yet).
    h = hashlib.sha1()
    src = os.path.join(_REPO, "tf_adamax")
    for root, _, files in sorted(os.walk(src)):
        for f in sorted(files):
            if f.endswith(".py"):
                with open(os.path.join(root, f), "rb") as fh:
                    h.update(f.encode() + b"\0" + fh.read())
    out["tf_adamax_sources_sha1"] = h.hexdigest()
    try:
        out["git_head"] = subprocess.run(
            ["git", "-C", _REPO, "rev-parse", "HEAD"], capture_output=True, text=True,
            timeout=10).stdout.strip() or None
    except Exception:
        out["git_head"] = None
    return out


def _core_available() -> tuple[bool, str]:
    try:
        import tf_adamax

        tf_adamax.Adamax  # noqa: B018
        return True, ""
    except Exception as exc:
        return False, _first_line(exc)


def run_case(case: str, cfg: Config, out_dir: str, argv: list) -> list:
    t0 = time.time()
    load0 = os.getloadavg()
    core_ok, core_err = _core_available()
    versions = _versions()  # before timing: tf_adamax may be edited while we run
    notes = []
    if not core_ok:
        notes.append(f"tf_adamax.Adamax unavailable ({core_err}); its rows are skipped")
    _log(f"[{case}] start (load avg {load0[0]:.2f})")
    if case == "big":
        raw = [case_dense("big", [(4 * 1024 * 1024,)], cfg)]
    elif case == "many":
        raw = [case_dense("many", [(64, 64)] * 200, cfg)]
    elif case == "sparse":
        raw = []
        for v in cfg.vocab:
            raw.append(config_record(case_sparse(v, cfg, core_ok)))
            gc.collect()
        if core_ok and len(set(cfg.vocab)) > 1:
            _log("  sparse: lazy flatness pair (smallest and largest table, interleaved)")
            flat = lazy_flatness(cfg)
            if flat:
                raw[-1]["lazy_flatness"] = flat
    elif case == "fit":
        raw = [case_fit("mlp", cfg), case_fit("embedding", cfg)]
    else:
        raise ValueError(case)
    records = raw if case == "sparse" else [config_record(c) for c in raw]
    del raw
    gc.collect()
    targets = evaluate_targets(case, records)
    doc = {
        "schema": 1, "case": case,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(__file__, _REPO)] + argv),
        "wall_seconds": round(time.time() - t0, 1),
        "load_avg_start": load0, "load_avg_end": os.getloadavg(),
        "machine": _machine(), "versions": versions,
        "settings": dataclasses.asdict(cfg),
        "method": ("median over interleaved reps of (rep wall time / steps per rep); "
                   "each competitor has its own state and its own tf.function holding "
                   "precomputed gradients; the variable is shared (timing does not "
                   "depend on its values)"),
        "notes": notes, "configs": records, "targets": targets,
    }
    os.makedirs(out_dir, exist_ok=True)
    jpath = os.path.join(out_dir, f"bench_{case}.json")
    with open(jpath, "w") as f:
        json.dump(doc, f, indent=1, default=_json_default)
    ppath = os.path.join(out_dir, f"bench_{case}.png")
    try:
        plot_case(case, records, ppath)
    except Exception as exc:
        notes.append("plot failed: " + _first_line(exc))
        ppath = None
    text = [f"### case {case}  ({doc['created']}, {doc['wall_seconds']}s, load avg "
            f"{load0[0]:.2f} -> {doc['load_avg_end'][0]:.2f})"
            + (f"  XLA_FLAGS={os.environ['XLA_FLAGS']}"
               if os.environ.get("XLA_FLAGS") else "")]
    text += [format_table(case, r) for r in records]
    text += notes
    text.append(format_targets(targets))
    text.append(f"wrote {os.path.relpath(jpath)}" + (f", {os.path.relpath(ppath)}"
                                                      if ppath else ""))
    print("\n\n".join(text) + "\n", flush=True)
    return targets


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="all", choices=["big", "many", "sparse", "fit", "all"])
    p.add_argument("--reps", type=int, help="max timed reps per competitor "
                   "(default 30, --quick 10; fit: reps of one fit() each, default 15, "
                   "--quick 8)")
    p.add_argument("--warmup", type=int, help="untimed calls before timing, the first "
                   "traces/compiles (default 5, --quick 2)")
    p.add_argument("--out", default=os.path.join(_HERE, "results"),
                   help="directory for bench_<case>.json and .png")
    p.add_argument("--vocab", help="comma-separated table sizes for the sparse case "
                   "(default 10000,100000,1000000,2000000; --quick 10000,100000,2000000)")
    p.add_argument("--quick", action="store_true", help="fewer reps, smaller budgets: "
                   "--case all in a few minutes on 2 cores")
    p.add_argument("--budget", type=float, help="max seconds of timed reps per "
                   "competitor per table (default 15, --quick 3); slow steps get fewer reps")
    p.add_argument("--rep-seconds", type=float, help="target duration of one rep "
                   "(default 0.1, --quick 0.05)")
    p.add_argument("--max-mem-gb", type=float, default=12.0, help="memory budget for the "
                   "sparse case's tables and optimizer state (also capped at 70%% of "
                   "MemAvailable)")
    p.add_argument("--fit-vocab", type=int, default=100000,
                   help="embedding rows of the fit case's embedding model")
    p.add_argument("--sparse-batches", type=int, default=16,
                   help="sparse case: batches of different rows taken in turn, one per "
                   "step (1: the same batch every step, its rows hot in cache)")
    p.add_argument("--only", default="", help="comma-separated competitor keys to run")
    p.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    p.add_argument("--_mem-probe", dest="mem_probe", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick
    if a.sparse_batches < 1:
        p.error("--sparse-batches must be >= 1")
    if a.vocab is not None and not [v for v in a.vocab.split(",") if v]:
        p.error("--vocab: give one or more table sizes, e.g. 10000,2000000")
    if a.vocab and min(int(v) for v in a.vocab.split(",") if v) < 2048:
        p.error("--vocab: each table needs >= 2048 rows (a batch names 2048 distinct "
                "rows)")
    cfg = Config(
        reps=a.reps or (10 if q else 30),
        warmup=a.warmup if a.warmup is not None else (2 if q else 5),
        min_reps=3 if q else 5,
        rep_seconds=a.rep_seconds or (0.05 if q else 0.1),
        budget_seconds=a.budget or (3.0 if q else 15.0),
        max_steps_per_rep=1000,
        vocab=tuple(int(v) for v in (a.vocab or (
            "10000,100000,2000000" if q else "10000,100000,1000000,2000000")).split(",") if v),
        batch=4096,
        max_mem_gb=a.max_mem_gb,
        mem_steps=2 if q else 3,
        fit_steps=20 if q else 50,
        fit_warmup_steps=5,
        fit_reps=a.reps or (8 if q else 15),
        fit_batch=256,
        fit_vocab=a.fit_vocab,
        fit_seq=16,
        sparse_batches=a.sparse_batches,
        only=tuple(k for k in a.only.split(",") if k),
        quick=q,
        no_memory=a.no_memory,
    )
    return a, cfg


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args, cfg = parse_args(argv)
    if args.mem_probe:
        mem_probe_main(args.mem_probe)
        return 0
    cases = ["big", "many", "sparse", "fit"] if args.case == "all" else [args.case]
    all_targets = []
    for case in cases:
        all_targets += run_case(case, cfg, args.out, argv)
        gc.collect()
    if len(cases) > 1:
        print(format_targets(all_targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
