"""Compilation and distribution plumbing of the core optimizer.

- global_clipnorm over variables on two devices (one program each) clips by
  the norm of the unscaled gradients;
- sparse gradients whose length is only known at run time, or that reach the
  compiled update eagerly, are padded to size buckets for XLA (a few
  programs instead of one per length); the padding must change nothing;
- ShardedVariables (ParameterServerStrategy) are accepted where a variable
  list is (build, minimize, get_slot), and rejected with a clear error as the
  variable of a single gradient;
- apply_gradients inside an XLA-compiled replica function of a multi-device
  strategy raises a clear error instead of a cross-device XLA failure.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import tf_adamax
from conftest import AdamaxReference, SparseGrad, compiled_update_functions
from reference import dense_step
from tf_adamax import _distribute


@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_dynamic_length_sparse_padding_changes_nothing(mode):
    rng = np.random.default_rng(3)
    init = rng.normal(size=(40, 3)).astype(np.float32)
    tables = {jit: tf.Variable(init) for jit in (True, False)}
    opts = {jit: tf_adamax.Adamax(0.05, sparse_mode=mode, jit_compile=jit)
            for jit in (True, False)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32),
                                  tf.TensorSpec([None, 3], tf.float32)])
    def step(ids, values):
        # Data-dependent nnz, as a parameter-server shard sees it.
        for jit in (True, False):
            grad = tf.IndexedSlices(values, ids, tf.constant([40, 3]))
            opts[jit].apply_gradients([(grad, tables[jit])])

    # The first and last rows get moments first, then are never named again:
    # padding that pointed at a real row (not past the table) would move them.
    step(np.array([0, 39], np.int32), rng.normal(size=(2, 3)).astype(np.float32))
    for n in [1, 3, 9, 10, 17, 5, 33]:
        ids = rng.integers(1, 39, size=n).astype(np.int32)
        ids[: n // 2] = ids[0]  # duplicates
        step(ids, rng.normal(size=(n, 3)).astype(np.float32))
    np.testing.assert_allclose(tables[True].numpy(), tables[False].numpy(),
                               rtol=1e-6, atol=1e-7)
    for name in ("momentum", "norm"):
        np.testing.assert_allclose(
            opts[True].get_slot(tables[True], name).numpy(),
            opts[False].get_slot(tables[False], name).numpy(),
            rtol=1e-6, atol=1e-7)
    if mode == "lazy":
        # Padding rows point past the table: nothing else may move.
        touched = tables[False].numpy() != init
        np.testing.assert_array_equal(tables[True].numpy()[~touched],
                                      init[~touched])


def _slices(rng, n, rows=40, dim=3, dtype=np.int32):
    ids = rng.integers(1, rows - 1, size=n).astype(dtype)
    ids[: n // 2] = ids[0]  # duplicates
    values = rng.normal(size=(n, dim)).astype(np.float32)
    values[1 : n // 2 : 2] *= -1  # of opposite signs
    return tf.IndexedSlices(tf.constant(values), tf.constant(ids),
                            tf.constant([rows, dim]))


def test_bucketed_pads_eager_and_unknown_lengths_only():
    rng = np.random.default_rng(0)
    var = tf.Variable(tf.zeros([40, 3]))
    lengths = set()
    for n in range(1, 700):
        grad = _slices(rng, n)
        out, = _distribute.bucketed([grad], [var])
        size = int(out.indices.shape[0])
        # Rounded up by less than a quarter (at least to a multiple of 1).
        assert n <= size < n + max(1, n / 4 + 1), (n, size)
        np.testing.assert_array_equal(out.indices[:n], grad.indices)
        np.testing.assert_array_equal(out.values[:n], grad.values)
        np.testing.assert_array_equal(out.indices[n:], 40)  # past the table
        np.testing.assert_array_equal(out.values[n:], 0.0)
        if 100 <= n <= 400:
            lengths.add(size)
    # Four sizes per power of two: 100..400 spans two octaves and a bit.
    assert len(lengths) <= 12, sorted(lengths)
    assert _distribute.bucketed([tf.ones([40, 3])], [var])[0].shape == [40, 3]

    seen = {}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)])
    def unknown(ids):
        grad = tf.IndexedSlices(tf.ones([tf.shape(ids)[0], 3]), ids)
        seen["unknown"], = _distribute.bucketed([grad], [var])
        return tf.shape(seen["unknown"].indices)[0]

    @tf.function
    def static():
        grad = _slices(rng, 9)
        seen["static"] = (_distribute.bucketed([grad], [var])[0], grad)

    assert int(unknown(tf.range(9))) == 10
    static()
    assert seen["static"][0] is seen["static"][1]  # a static length stays


def test_bucketed_pads_the_sparse_gradients_of_a_call_to_one_size():
    # XLA compiles a program per combination of input shapes: a bucket per
    # table made K tables of independent lengths compile one program per
    # combination of buckets (the process ran out of memory maps).
    rng = np.random.default_rng(1)
    variables = [tf.Variable(tf.zeros([40, 3])) for _ in range(3)]
    shapes = set()
    for _ in range(60):
        lengths = rng.integers(16, 128, size=3)
        grads = [_slices(rng, int(n)) for n in lengths] + [tf.ones([40, 3])]
        out = _distribute.bucketed(grads, variables + [variables[0]])
        sizes = {int(g.indices.shape[0]) for g in out[:3]}
        assert len(sizes) == 1, sizes
        size, = sizes
        assert max(lengths) <= size < max(lengths) * 1.25 + 1, (lengths, size)
        for n, g, o in zip(lengths, grads, out):
            np.testing.assert_array_equal(o.indices[:n], g.indices)
            np.testing.assert_array_equal(o.indices[n:], 40)
            np.testing.assert_array_equal(o.values[n:], 0.0)
        assert out[3] is grads[3]
        shapes.add(size)
    assert len(shapes) <= 12, sorted(shapes)


_SEVERAL_TABLES = """
import sys
sys.path.insert(0, {tests!r})
import numpy as np
import tensorflow as tf
from reference import AdamaxReference, SparseGrad

front = {front!r}
LR = 2.0**-7  # exact in the adapters' float32 rate
rng = np.random.default_rng(2)
init = rng.normal(size=(3, 30, 2))
if front == "core":
    import tf_adamax
    variables = [tf.Variable(v) for v in init]
    opt = tf_adamax.Adamax(LR)
elif front == "keras3":
    import keras
    from tf_adamax import keras as adapter
    variables = [keras.Variable(v, dtype="float64") for v in init]
    opt = adapter.Adamax(LR)
else:
    from tf_adamax import tf_keras as adapter
    variables = [tf.Variable(v) for v in init]
    opt = adapter.Adamax(LR)
ref = AdamaxReference(learning_rate=LR)
for i, v in enumerate(init):
    ref.add_variable(i, v)
for _ in range(30):
    grads = {{}}
    for i in range(3):
        n = int(rng.integers(16, 40))
        grads[i] = SparseGrad(rng.integers(0, 30, size=n),
                              rng.normal(size=(n, 2)))
    opt.apply_gradients([
        (tf.IndexedSlices(tf.constant(g.values), tf.constant(g.indices),
                          tf.constant([30, 2])), v)
        for g, v in zip(grads.values(), variables)])
    ref.apply(grads)
for i, v in enumerate(variables):
    np.testing.assert_allclose(np.array(v), ref.w[i], rtol=1e-10)
print("values ok")
"""


@pytest.mark.parametrize("front", ("core", "keras3", "tf_keras"))
def test_independent_sparse_lengths_of_several_tables_compile_few_programs(
        front):
    """Three tables whose gradient lengths vary independently, applied
    eagerly for 30 steps: XLA compiles one program per bucket of the
    longest, not one per combination of the tables' lengths (each program
    stays mapped: a long run ran out of memory maps and crashed); every
    table matches the unpadded reference. Compiles are counted from TF's
    log in a fresh process."""
    code = _SEVERAL_TABLES.format(tests=os.path.dirname(__file__), front=front)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0",
                                   TF_CPP_VMODULE="device_compiler=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "values ok" in proc.stdout
    compiles = proc.stderr.count("Compilation of XLA executable")
    # Lengths 16-39: the longest falls in 6 buckets (16, 20, 24, 28, 32,
    # 40); a bucket per table gave 20-30 programs in 30 steps.
    assert 1 <= compiles <= 6, compiles


@pytest.mark.parametrize("name,values", [("beta_1", (0.5, 0.6, 0.7, 0.8)),
                                         ("beta_2", (0.9, 0.95, 0.99, 0.999)),
                                         ("epsilon", (1e-3, 1e-4, 1e-5, 1e-6))])
def test_setting_betas_eagerly_does_not_retrace(name, values):
    """A beta or epsilon set between eager steps (a warm-up) is read at the
    next step without compiling the update again (it compiled once per
    value, never freed)."""
    var = tf.Variable(np.ones(3))
    opt = tf_adamax.Adamax(0.1)
    settings = dict(beta_1=0.9, beta_2=0.999, epsilon=1e-7)
    w, m, u = np.ones(3), np.zeros(3), np.zeros(3)
    for t, value in enumerate(values, start=1):
        setattr(opt, name, value)
        settings[name] = value
        g = np.array([0.5, -1.0, 2.0]) * t
        opt.apply_gradients([(tf.constant(g), var)])
        w, m, u = dense_step(w, m, u, g, 0.1, settings["beta_1"],
                             settings["beta_2"], settings["epsilon"], t)
        np.testing.assert_allclose(var.numpy(), w, rtol=1e-13, atol=0)
    traces = [f.experimental_get_tracing_count()
              for f in compiled_update_functions(opt)]
    assert sum(traces) == 1, traces


@pytest.fixture
def bucketed_lengths(monkeypatch):
    """The sparse lengths that reach a compiled update, recorded."""
    lengths = []
    original = _distribute.bucketed

    def recording(grads, variables):
        out = original(grads, variables)
        if tf.executing_eagerly():
            lengths.extend(int(g.indices.shape[0]) for g in out
                           if isinstance(g, tf.IndexedSlices))
        return out

    monkeypatch.setattr(_distribute, "bucketed", recording)
    return lengths


def _eager_steps_match_unpadded(make_opt, apply, bucketed_lengths, mode):
    """Eager calls bring a new concrete length each time: the compiled
    update sees a few bucket sizes (each would be a new XLA compile), with
    results equal to the non-XLA core's."""
    rng = np.random.default_rng(5)
    init = rng.normal(size=(40, 3)).astype(np.float32)
    table, reference = tf.Variable(init), tf.Variable(init)
    opt = make_opt()
    ref_opt = tf_adamax.Adamax(0.05, sparse_mode=mode, jit_compile=False)
    # The first and last rows get moments first, then are never named again:
    # padding that landed on a real row (not past the table) would move them
    # in lazy mode, even with its zero rows.
    first = tf.IndexedSlices(tf.constant(rng.normal(size=(2, 3)), tf.float32),
                             tf.constant([0, 39]), tf.constant([40, 3]))
    apply(opt, first, table)
    ref_opt.apply_gradients([(first, reference)])
    edges = table.numpy()[[0, 39]]
    ns = rng.integers(100, 400, size=24)
    for n in ns:
        grad = _slices(rng, int(n))
        apply(opt, grad, table)
        ref_opt.apply_gradients([(grad, reference)])
    lengths = bucketed_lengths[1:]  # after the first step's
    assert len(lengths) == len(ns)
    assert all(b >= n for b, n in zip(lengths, ns))
    assert len(set(lengths)) < len(set(ns.tolist()))
    assert len(set(lengths)) <= 12
    np.testing.assert_allclose(table.numpy(), reference.numpy(),
                               rtol=1e-5, atol=1e-6)
    if mode == "lazy":
        np.testing.assert_array_equal(table.numpy()[[0, 39]], edges)
    return opt, table


@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_eager_calls_of_varying_sparse_length_compile_few_programs(
        mode, bucketed_lengths):
    opt, table = _eager_steps_match_unpadded(
        lambda: tf_adamax.Adamax(0.05, sparse_mode=mode),
        lambda opt, grad, var: opt.apply_gradients([(grad, var)]),
        bucketed_lengths, mode)
    assert int(opt.iterations.numpy()) == 25


@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_keras3_adapter_eager_calls_of_varying_sparse_length(
        mode, bucketed_lengths):
    import tf_adamax.keras  # Keras 3, imported only by this test

    _eager_steps_match_unpadded(
        lambda: tf_adamax.keras.Adamax(0.05, sparse_mode=mode),
        lambda opt, grad, var: opt.apply([grad], [var]),
        bucketed_lengths, mode)


@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_tf_keras_adapter_eager_calls_of_varying_sparse_length(
        mode, bucketed_lengths):
    import tf_adamax.tf_keras  # tf-keras, imported only by this test

    _eager_steps_match_unpadded(
        lambda: tf_adamax.tf_keras.Adamax(0.05, sparse_mode=mode),
        lambda opt, grad, var: opt.apply_gradients([(grad, var)]),
        bucketed_lengths, mode)


def _sharded(rows=6):
    shards = [tf.Variable(tf.fill([rows // 2, 2], 1.0), name=f"emb/part_{i}")
              for i in range(2)]
    return tf.__internal__.distribute.ShardedVariable(shards, name="emb")


def test_sharded_variable_in_variable_lists():
    emb = _sharded()
    opt = tf_adamax.Adamax(0.1, sparse_mode="lazy")
    opt.build([emb])
    slot = opt.get_slot(emb, "momentum")
    assert [s.shape.as_list() for s in slot.variables] == [[3, 2], [3, 2]]
    opt.minimize(lambda: tf.reduce_sum(
        tf.nn.embedding_lookup(emb, [0, 4]) ** 2), [emb])
    first, second = (v.numpy() for v in emb.variables)
    assert first[0, 0] < 1 and second[1, 0] < 1  # rows 0 and 4 moved
    assert first[1, 0] == 1 and second[0, 0] == 1  # others did not
    assert opt.get_slot(emb, "norm").variables[1].numpy()[1, 0] > 0


def test_sharded_variable_as_single_variable_is_a_clear_error():
    emb = _sharded()
    opt = tf_adamax.Adamax()
    with pytest.raises(TypeError, match="ShardedVariable.*per shard"):
        opt.apply_gradients([(tf.ones([6, 2]), emb)])
    assert int(opt.iterations.numpy()) == 0


XLA_REPLICA_SCRIPT = textwrap.dedent("""
    import os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    import tf_adamax
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        w = tf.Variable(tf.ones([3]))
        opt = tf_adamax.Adamax(0.1)

    @tf.function(jit_compile=True)
    def replica_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(w ** 2)
        opt.apply_gradients([(tape.gradient(loss, w), w)])

    try:
        strategy.run(replica_step)
    except RuntimeError as e:
        print("ERROR:", " ".join(str(e).split()))
    print("iterations", int(opt.iterations.numpy()))
""")


def _run_script(tmp_path, source):
    """Runs `source` in a fresh Python (two logical CPUs need a fresh TF);
    returns its stdout, after checking it exited cleanly."""
    script = tmp_path / "script.py"
    script.write_text(source)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_apply_inside_xla_replica_function_is_a_clear_error(tmp_path):
    stdout = _run_script(tmp_path, XLA_REPLICA_SCRIPT)
    assert "jit_compile=True" in stdout
    assert "call apply_gradients outside it" in stdout
    assert "iterations 0" in stdout


SPLIT_GLOBAL_NORM_SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np
    import tensorflow as tf
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    import tf_adamax

    grads = [np.array([[3.0, 4.0]]), np.array([12.0])]
    out = {}
    for devices in (("/cpu:0", "/cpu:0"), ("/cpu:0", "/cpu:1")):
        variables = []
        for device, g in zip(devices, grads):
            with tf.device(device):
                variables.append(tf.Variable(tf.zeros(g.shape, tf.float64)))
        opt = tf_adamax.Adamax(0.1, global_clipnorm=1.0, loss_scale_factor=4.0)
        opt.apply_gradients([(tf.constant(g), v)
                             for g, v in zip(grads, variables)])
        out[devices[1]] = [opt.get_slot(v, "momentum").numpy().ravel().tolist()
                           for v in variables]
    print(json.dumps(out))
""")


def test_global_clipnorm_over_devices_divides_the_loss_scale_first(tmp_path):
    # Variables on two devices: each device runs its own program, so the
    # global norm is taken apart (`_step.global_grad_norm`); it must be the
    # norm of the unscaled gradients, as on one device.
    import json

    stdout = _run_script(tmp_path, SPLIT_GLOBAL_NORM_SCRIPT)
    out = json.loads(stdout.strip().splitlines()[-1])
    # Unscaled: [0.75, 1], [3]; norm 3.25 > 1, so clipped to norm 1.
    expected = [[0.1 * 0.75 / 3.25, 0.1 * 1.0 / 3.25], [0.1 * 3.0 / 3.25]]
    for got in out.values():
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=1e-12)


SPLIT_ACCUMULATION_SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np
    import tensorflow as tf
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    import tf_adamax

    steps = json.loads(os.environ["STEPS"])
    out = {}
    for jit in (True, False):
        for mode in ("exact", "lazy"):
            with tf.device("/cpu:0"):
                table = tf.Variable(tf.zeros((4, 2), tf.float64))
            with tf.device("/cpu:1"):
                vec = tf.Variable(tf.zeros(3, tf.float64))
            opt = tf_adamax.Adamax(0.1, global_clipnorm=1.5,
                                   gradient_accumulation_steps=2,
                                   loss_scale_factor=4.0, sparse_mode=mode,
                                   jit_compile=jit)
            step = tf.function(lambda grads, opt=opt, table=table, vec=vec:
                               opt.apply_gradients(zip(grads, (table, vec))))
            for ids, values, dense in steps:
                step([tf.IndexedSlices(tf.constant(values, tf.float64),
                                       tf.constant(ids), tf.constant([4, 2])),
                      tf.constant(dense, tf.float64)])
            out[f"jit={jit}/{mode}"] = {
                "devices": [table.device, vec.device],
                "values": [[v.numpy().tolist() for v in
                            (var, opt.get_slot(var, "momentum"),
                             opt.get_slot(var, "norm"))]
                           for var in (table, vec)]}
    print(json.dumps(out))
""")
SPLIT_ACCUMULATION_STEPS = [
    ([0, 2, 0], [[4.0, -8.0], [2.0, 2.0], [-12.0, 4.0]], [4.0, -4.0, 8.0]),
    ([1, 1, 2], [[8.0, 4.0], [-8.0, 2.0], [4.0, 4.0]], [2.0, 2.0, -4.0]),
    ([2, 0, 2], [[-2.0, 4.0], [4.0, 8.0], [1.0, -4.0]], [-8.0, 4.0, 4.0]),
    ([0, 1, 0], [[4.0, -4.0], [2.0, 2.0], [-4.0, 12.0]], [4.0, -2.0, 1.0]),
]


def test_global_clipnorm_with_accumulation_over_devices(tmp_path, monkeypatch):
    # Variables placed by hand on two devices (no strategy) run one program
    # each, so the norm is taken apart; with gradient_accumulation_steps it
    # must be the norm of the means the update clips. This raised
    # NotImplementedError (naming parameter servers) after creating slots.
    import json

    monkeypatch.setenv("STEPS", json.dumps(SPLIT_ACCUMULATION_STEPS))
    out = json.loads(_run_script(
        tmp_path, SPLIT_ACCUMULATION_SCRIPT).strip().splitlines()[-1])
    assert len(out) == 4
    for case, got in out.items():
        mode = case.split("/")[1]
        ref = AdamaxReference(learning_rate=0.1, global_clipnorm=1.5,
                              gradient_accumulation_steps=2,
                              loss_scale_factor=4.0, sparse_mode=mode)
        unclipped = AdamaxReference(learning_rate=0.1,
                                    gradient_accumulation_steps=2,
                                    loss_scale_factor=4.0, sparse_mode=mode)
        for r in (ref, unclipped):
            r.add_variable("table", np.zeros((4, 2)))
            r.add_variable("vec", np.zeros(3))
            for ids, values, dense in SPLIT_ACCUMULATION_STEPS:
                r.apply({"table": SparseGrad(np.array(ids), np.array(values)),
                         "vec": np.array(dense)})
        assert not np.allclose(ref.m["vec"], unclipped.m["vec"])  # clipped
        assert "CPU:0" in got["devices"][0] and "CPU:1" in got["devices"][1]
        for name, (var, m, u) in zip(("table", "vec"), got["values"]):
            want = (ref.w[name], ref.m[name], ref.u[name])
            for what, g, w in zip(("var", "momentum", "norm"), (var, m, u),
                                  want):
                np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-15,
                                           err_msg=f"{case} {name} {what}")


EMA_DEVICE_SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    import tf_adamax

    out = {}
    for jit in (True, False):
        opt = tf_adamax.Adamax(0.1, use_ema=True, ema_momentum=0.9,
                               jit_compile=jit)
        a = tf.Variable([1.0])
        opt.apply_gradients([(tf.constant([1.0]), a)])
        holder = []

        def make_step(holder, opt):
            @tf.function
            def step():
                if not holder:
                    with tf.device("/cpu:1"):
                        holder.append(tf.Variable([3.0, -4.0]))
                opt.apply_gradients([(tf.constant([1.0, 2.0]), holder[0])])
            return step

        make_step(holder, opt)()
        v = holder[0]
        out[str(jit)] = {
            "devices": [x.device for x in (v, opt.get_slot(v, "average"),
                                           opt.get_slot(v, "momentum"))],
            "weights": v.numpy().tolist(),
            "average": opt.get_slot(v, "average").numpy().tolist()}
    print(json.dumps(out))
""")


def test_ema_of_a_variable_created_in_a_function_on_another_device(tmp_path):
    # Its average sits with it (the compiled update cannot reach a slot on
    # another device) and starts at its weights.
    import json

    out = json.loads(_run_script(
        tmp_path, EMA_DEVICE_SCRIPT).strip().splitlines()[-1])
    for got in out.values():
        assert all(d.endswith("CPU:1") for d in got["devices"]), got
        # One step from [3, -4]: average = 0.9 * weights before + 0.1 * after.
        before = np.array([3.0, -4.0])
        np.testing.assert_allclose(
            got["average"], 0.9 * before + 0.1 * np.array(got["weights"]),
            rtol=1e-6)


def test_importing_tf_adamax_imports_no_keras():
    # TensorFlow itself imports Keras 3 (for tf.keras); tf_adamax must add
    # nothing to that and never import tf_keras.
    code = textwrap.dedent("""
        import sys
        import tensorflow
        keras_mods = lambda: {m for m in sys.modules
                              if m.split(".")[0] in ("keras", "tf_keras")}
        before = keras_mods()
        import tf_adamax
        tf_adamax.Adamax()
        print("added", sorted(keras_mods() - before))
        print("tf_keras", "tf_keras" in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "added []" in proc.stdout
    assert "tf_keras False" in proc.stdout


def test_star_import_and_a_missing_tf_keras():
    # `from tf_adamax import *` gives the core only: it must not bind the
    # user's `keras` name to the adapter module, nor import tf_keras. Without
    # tf-keras installed (blocked here), the core and `tf_adamax.keras` work
    # and `hasattr(tf_adamax, "tf_keras")` is False, not an ImportError.
    code = textwrap.dedent("""
        import sys
        import keras
        ns = {"keras": keras}
        exec("from tf_adamax import *", ns)
        print("keras kept", ns["keras"] is keras)
        print("names", sorted(k for k in ns if not k.startswith("__")))
        print("tf_keras imported", "tf_keras" in sys.modules)
        sys.modules["tf_keras"] = None  # as if tf-keras were not installed
        import tf_adamax
        print("has tf_keras", hasattr(tf_adamax, "tf_keras"))
        try:
            tf_adamax.tf_keras
        except AttributeError as e:
            print("message", "tf-keras" in str(e) or "tf_keras" in str(e))
        print("has keras", hasattr(tf_adamax, "keras"))
        tf_adamax.Adamax().build([__import__("tensorflow").Variable([1.0])])
        print("core ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("keras kept True", "names ['Adamax', 'keras']",
                 "tf_keras imported False", "has tf_keras False",
                 "message True", "has keras True", "core ok"):
        assert line in proc.stdout, proc.stdout


@pytest.mark.parametrize("device,parts", [
    ("/job:localhost/replica:0/task:0/device:CPU:0", 4), ("/device:CPU:0", 4),
    ("/job:localhost/replica:0/task:0/device:GPU:0", 1), ("/device:TPU:0", 1),
    ("", 1)])
def test_only_cpu_groups_are_split_into_programs(device, parts):
    # One launch of one program is cheapest on GPU and TPU (DESIGN: one
    # compiled program per call); CPU programs run concurrently on cores.
    variables = [tf.Variable(tf.zeros([2])) for _ in range(128)]
    group = _distribute.Group(device=device, positions=list(range(128)),
                              replica=None)
    out = _distribute.split_for_cores([group], variables, cores=4)
    assert len(out) == parts
    assert [p for g in out for p in g.positions] == list(range(128))
    assert all(g.device == device for g in out)


@pytest.mark.parametrize("kwargs", [
    dict(sparse_mode="exact", weight_decay=0.01),
    dict(sparse_mode="lazy", use_ema=True, gradient_accumulation_steps=2),
])
def test_many_variables_split_over_cores_match_reference(monkeypatch, rng, kwargs):
    """On CPU a long variable list is updated by one XLA program per core.

    The split is forced at 6 variables here (it starts at 32 per program);
    the result must equal the reference, and the update must have been
    compiled for two parts.
    """
    from conftest import AdamaxReference, SparseGrad, check_against_reference

    monkeypatch.setattr(tf_adamax._distribute, "_MIN_VARIABLES_PER_PROGRAM", 2)
    monkeypatch.setattr(tf_adamax._distribute, "cores", lambda: 2)
    shapes = [(5, 3), (7,), (4, 2, 2), (6, 3), (3,), (2, 5)]
    dtypes = [np.float32, np.float64] * 3
    opt = tf_adamax.Adamax(0.05, **kwargs)
    ref = AdamaxReference(learning_rate=0.05, **kwargs)
    var_list = []
    for i, (shape, dtype) in enumerate(zip(shapes, dtypes)):
        init = rng.normal(size=shape).astype(dtype)
        var_list.append(tf.Variable(init))
        ref.add_variable(i, init, dtype)
    step = tf.function(lambda grads: opt.apply_gradients(zip(grads, var_list)))
    for _ in range(4):
        grads, ref_grads = [], {}
        for i, (shape, dtype) in enumerate(zip(shapes, dtypes)):
            if i == 3:  # sparse, with an opposite-sign duplicate
                ids = np.array([1, 4, 1, 0])
                values = rng.normal(size=(4, 3)).astype(dtype)
                values[2] = -0.6 * values[0]
                grads.append(tf.IndexedSlices(tf.constant(values),
                                              tf.constant(ids),
                                              tf.constant(shape)))
                ref_grads[i] = SparseGrad(ids, values.astype(np.float64))
            else:
                g = rng.normal(size=shape).astype(dtype)
                grads.append(tf.constant(g))
                ref_grads[i] = g.astype(np.float64)
        step(grads)
        ref.apply(ref_grads)
    check_against_reference(opt, var_list, ref, range(len(var_list)))
    assert opt._fns.update.experimental_get_tracing_count() == 2


@pytest.mark.parametrize("length", ["static", "unknown", "empty"])
@pytest.mark.parametrize("jit", [False, True])
def test_exact_kernel_reads_each_rows_gradient_from_its_first_entry(length, jit):
    """The exact step never materializes the gradient as a table: the new m
    and u loops gather their row's term from the entries (`_per_row`)
    through one int per table row. That gather must give the densified
    gradient, zero for rows not named (they read a zero row padded on after
    the entries) and for out-of-range entries, whether the batch length is
    static, unknown (also inside XLA: data-dependent batches reach the
    compiled step with an unknown length) or zero."""
    from tf_adamax import _math

    rows = np.array([3, 0, 3, 5, -1, 0, 3, 7], np.int32)  # 5 rows; -1, 7 out
    values = np.arange(8 * 2, dtype=np.float32).reshape(8, 2) - 5.0
    values[2] = -values[0]  # row 3: opposite signs
    if length == "empty":
        rows, values = rows[:0], values[:0]
    n = None if length == "unknown" else len(rows)
    spec = [tf.TensorSpec([n], tf.int32), tf.TensorSpec([n, 2], tf.float32)]

    @tf.function(input_signature=spec, jit_compile=jit)
    def per_row(r, v):
        once, entry = _math.sum_duplicates_by_row(r, v, 5)
        return (_math._per_row(lambda x: x, once, entry, 5),
                _math._per_row(tf.abs, once, entry, 5), entry)

    got, got_abs, entry = (t.numpy() for t in per_row(rows, values))
    keep = (rows >= 0) & (rows < 5)
    want = np.zeros((5, 2), np.float32)
    np.add.at(want, rows[keep], values[keep])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_abs, np.abs(want))
    for r in range(5):  # the first entry naming each row, n if none
        at = np.flatnonzero(rows == r)
        assert entry[r] == (at[0] if len(at) else len(rows)), r


def _hash_rounds(indices, jit):
    """`_math._holders(indices)` and the number of hashing rounds it took."""
    from tf_adamax import _math

    @tf.function(jit_compile=jit)
    def holders(ids):
        counted = {}
        while_loop = tf.while_loop

        def counting(cond, body, loop_vars, **kwargs):
            out = while_loop(lambda k, *v: cond(*v),
                             lambda k, *v: (k + 1,) + tuple(body(*v)),
                             (tf.constant(0),) + tuple(loop_vars), **kwargs)
            counted["rounds"] = out[0]
            return out[1:]

        tf.while_loop = counting
        try:
            holder = _math._holders(ids)
        finally:
            tf.while_loop = while_loop
        return holder, counted["rounds"]

    holder, rounds = holders(tf.constant(indices))
    return holder.numpy(), int(rounds)


@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_lazy_hashing_settles_in_a_few_rounds(dtype):
    """Correct for any hash, the lazy step's duplicate summing is fast only
    if each round separates most indices: a broken hash, fold or bucket
    count would pass every other test while costing O(nnz) rounds. 4096 ids
    of common patterns (random over 2M rows, consecutive, strided by a
    power of two or a Fibonacci number, Zipf-distributed) settle in 3 rounds
    here; allow 6."""
    rng = np.random.default_rng(0)
    n = 4096
    patterns = {
        "random": rng.integers(0, 2_000_000, n),
        "consecutive": np.arange(n),
        "stride_1024": np.arange(n) * 1024,
        "stride_fibonacci": np.arange(n) * 75025,
        "zipf": np.minimum(rng.zipf(1.2, n), 10**6),
        "one_id": np.full(n, 17),
    }
    if dtype == "int64":
        patterns["high_words"] = np.arange(n, dtype=np.int64) * (2**32 + 1)
    for name, ids in patterns.items():
        ids = ids.astype(dtype)
        holder, rounds = _hash_rounds(ids, jit=True)
        np.testing.assert_array_equal(ids[holder], ids, err_msg=name)
        assert rounds <= 6, (name, rounds)


@pytest.mark.parametrize("length", ["static", "unknown"])
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_lazy_duplicate_sums_by_hashing(dtype, jit, length):
    """Lazy mode sums repeated indices by rounds of hashing
    (`_math._holders`), not by sorting. Every copy of an index must get the
    same holder, one of its own entries, and the sums must equal np.add.at,
    also for opposite-sign copies, indices whose int64 high words differ,
    negative and extreme indices, and 4096 distinct indices (several
    rounds)."""
    from tf_adamax import _math

    rng = np.random.default_rng(7)
    rows = np.concatenate([rng.integers(0, 50, 300), np.arange(4096) * 7])
    rows[1] = rows[0]  # opposite signs below
    if dtype == "int64":
        rows = np.concatenate([rows, [(1 << 32) | 1, 0, (5 << 32) | 5, -3,
                                      (1 << 32) | 1, -3, 2**40 + 7]])
    else:
        rows = np.concatenate([rows, [-1, -1, 2**31 - 1, -2**31, 2**31 - 1]])
    rows = rows.astype(dtype)
    values = rng.standard_normal((len(rows), 2))
    values[1] = -0.6 * values[0]
    n = None if length == "unknown" else len(rows)
    spec = [tf.TensorSpec([n], dtype), tf.TensorSpec([n, 2], tf.float64)]

    @tf.function(input_signature=spec, jit_compile=jit)
    def summed(r, v):
        got_rows, once, holder = _math.sum_duplicates(r, v)
        return got_rows, once, holder, _math.per_entry(once, holder)

    got_rows, once, holder, per_entry = (t.numpy() for t in summed(rows,
                                                                   values))
    np.testing.assert_array_equal(got_rows, rows)
    np.testing.assert_array_equal(rows[holder], rows)  # one of its own
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    want = np.zeros((len(first), 2))
    np.add.at(want, inverse, values)
    # Every copy of an index has one holder, and it holds the sum.
    np.testing.assert_array_equal(holder, holder[first][inverse])
    np.testing.assert_allclose(per_entry, want[inverse], rtol=1e-12,
                               atol=1e-15)
    others = np.ones(len(rows), bool)
    others[holder] = False
    np.testing.assert_array_equal(once[others], 0.0)  # each row once


@pytest.mark.parametrize("cls", [tf.distribute.TPUStrategy,
                                 tf.distribute.experimental.TPUStrategy],
                         ids=["TPUStrategy", "experimental.TPUStrategy"])
def test_both_tpu_strategy_classes_keep_float32_state(cls):
    # The experimental class (still exported) is not a subclass of the other:
    # under it the rate was stored as float64, which TPUs cannot hold. No
    # TPU here, so the strategy object is not initialised.
    strategy = object.__new__(cls)
    assert _distribute.is_tpu(strategy)
    assert _distribute.state_float_dtype(strategy) == tf.float32
    assert _distribute.state_float_dtype(
        tf.distribute.get_strategy()) == tf.float64


@pytest.mark.parametrize("mode", ("eager", "function", "jit"))
@pytest.mark.parametrize("front", ("keras3", "tf_keras"))
def test_adapter_steps_alternating_variables_of_one_shape(front, mode):
    # A custom loop training one of two same-shaped heads per step (the
    # other's gradient is None): the adapters' compiled update was reused
    # for the second list of variables with the first list's slots captured
    # in its trace, so `b` moved with `a`'s moments and `a`'s were
    # overwritten. Each variable must follow the reference with its own.
    import tf_adamax.keras
    import tf_adamax.tf_keras

    cls = {"keras3": tf_adamax.keras.Adamax,
           "tf_keras": tf_adamax.tf_keras.Adamax}[front]
    opt = cls(0.1, sparse_mode="lazy")
    a = tf.Variable([1.0, 1.0, 1.0], name="head_a")
    b = tf.Variable([1.0, 1.0, 1.0], name="head_b")
    table_a = tf.Variable(tf.ones((4, 2)), name="table_a")
    table_b = tf.Variable(tf.ones((4, 2)), name="table_b")
    opt.build([a, b, table_a, table_b])
    values = tf.constant([[1.0, -1.0], [2.0, 0.5], [-1.0, 1.0]])

    def train(head, g, ids):
        # Closes over the variables, one trace per head, as a train step
        # does. (Passing different variables of one shape as arguments of
        # one tf.function reuses its trace for every optimizer, TF's own
        # included: TF traces variable arguments by shape and dtype.)
        var, table = (a, table_a) if head == "a" else (b, table_b)
        opt.apply_gradients([(g, var), (tf.IndexedSlices(
            values, ids, tf.constant([4, 2])), table)])

    step = train
    if mode != "eager":
        step = tf.function(train, jit_compile=mode == "jit")
    ref = AdamaxReference(learning_rate=0.1, sparse_mode="lazy")
    for key, var in (("a", a), ("b", b), ("ta", table_a), ("tb", table_b)):
        ref.add_variable(key, var.numpy().astype(np.float64))
    calls = [("a", [1.0, -2.0, 0.5], [0, 2, 0]), ("b", [3.0, 1.0, -1.0], [1, 1, 3]),
             ("a", [-1.0, 0.5, 2.0], [3, 0, 3]), ("b", [0.5, 0.5, 0.5], [2, 0, 1])]
    for head, g, ids in calls:
        step(head, tf.constant(g), tf.constant(ids))
        ref.apply({head: np.array(g), "t" + head: SparseGrad(
            np.array(ids), values.numpy().astype(np.float64))})
    for key, var in (("a", a), ("b", b), ("ta", table_a), ("tb", table_b)):
        np.testing.assert_allclose(var.numpy(), ref.w[key], rtol=1e-6,
                                   atol=1e-6, err_msg=key)


def test_a_tf_keras_model_holding_the_core_counts_its_state_once():
    # tf-keras counts a tf.Module attribute's `variables` among a model's
    # weights, and its trainable / non-trainable variables among those; the
    # core's `non_trainable_variables` missed the slots, so `weights` (8)
    # was not trainable (2) + non-trainable (2) weights.
    tf_keras = pytest.importorskip("tf_keras")

    class Model(tf_keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = tf_keras.layers.Dense(2)
            self.opt = tf_adamax.Adamax(0.1)

        def call(self, x):
            return self.dense(x)

    model = Model()
    x = np.ones((1, 2), np.float32)
    model(x)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x))
    model.opt.apply_gradients(zip(tape.gradient(loss, model.trainable_weights),
                                  model.trainable_weights))
    ids = lambda vs: sorted(id(v) for v in vs)
    assert len(model.trainable_weights) == 2
    assert ids(model.weights) == ids(model.trainable_weights
                                     + model.non_trainable_weights)
    assert ids(model.opt.non_trainable_variables) == ids(model.opt.variables)
    assert len(model.opt.variables) == 6  # iterations, rate, 2 x (m, u)
