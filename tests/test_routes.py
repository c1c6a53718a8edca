"""The one place that decides which path a call takes (`keras_lstm._routes`), and the
one place each cell option is declared (`keras_lstm.options.OPTIONS`).

The table asks the resolver about every kind of context, this machine's and
others (a GPU, the JAX and torch backends, each export target, a machine
whose native kernel does not build), and checks the route and its reason.
The routes themselves are checked against the cell's own loop elsewhere
(`test_fast_path.py`, `test_fused_options.py`, `test_keras_export.py`).
"""

from __future__ import annotations

import dataclasses
import re

import keras
import numpy as np
import pytest

from keras_lstm import GatedLSTM, GatedLSTMCell, _internals, _routes, options
from keras_lstm._routes import Config, Context, Route

CPU = Context()
GPU = Context(device="gpu")
BROKEN = "the native kernel is unavailable here (no compiler)"
PEEPHOLE = Config(changes=("peephole",))
RELU = Config(changes=("activation='relu'",), not_native=("activation='relu'",))

# (what, config, context, route, a pattern the reason matches; "" for no reason)
TABLE = [
    # TensorFlow on a CPU: the native kernel, eagerly, in graphs and under XLA.
    ("cpu", Config(), CPU, Route.NATIVE, ""),
    ("cpu xla", Config(), Context(xla=True), Route.NATIVE_XLA, ""),
    ("cpu bfloat16", Config(), Context(dtype="bfloat16"), Route.NATIVE, ""),
    ("cpu float16", Config(), Context(dtype="float16"), Route.NATIVE, ""),
    ("cpu options", PEEPHOLE, CPU, Route.NATIVE, ""),
    ("cpu options xla", PEEPHOLE, Context(xla=True), Route.NATIVE_XLA, ""),
    ("cpu recurrent dropout", Config(recurrent_dropout=True), CPU, Route.NATIVE, ""),
    ("cpu masked", Config(masked=True), CPU, Route.NATIVE, ""),
    ("cpu float64", Config(), Context(dtype="float64"), Route.LOOP, "not float64"),
    ("cpu float64 xla", Config(), Context(dtype="float64", xla=True), Route.LOOP_XLA, "float64"),
    ("cpu options float64", PEEPHOLE, Context(dtype="float64"), Route.STEP_LOOP, "float64"),
    ("cpu no native", Config(), Context(native=BROKEN), Route.LOOP, "no compiler"),
    ("cpu no native xla", Config(), Context(xla=True, native=BROKEN), Route.LOOP_XLA, "compiler"),
    ("cpu no xla library", Config(), Context(xla=True, native_xla="no XLA"), Route.LOOP_XLA, "XLA"),
    ("cpu options no native", PEEPHOLE, Context(native=BROKEN), Route.STEP_LOOP, "compiler"),
    ("cpu activation", RELU, CPU, Route.STEP_LOOP, "does not compute activation='relu'"),
    ("cpu unroll", Config(unroll=True), CPU, Route.STEP_LOOP, "unroll=True"),
    ("cpu keras RNN", Config(in_keras_rnn=True), CPU, Route.STEP_LOOP, "keras.layers.RNN"),
    ("pinned", Config(pinned=Route.LOOP), CPU, Route.LOOP, "pinned"),
    (
        "pinned native in an export",
        Config(pinned=Route.NATIVE),
        Context(export="saved_model"),
        Route.EXPORT_LOOP,
        "",
    ),
    # TensorFlow on a GPU: cuDNN where it computes the same, outside XLA.
    ("gpu", Config(), GPU, Route.CUDNN, ""),
    ("gpu masked", Config(masked=True), GPU, Route.LOOP, "zeroes the masked outputs"),
    ("gpu xla", Config(), Context(device="gpu", xla=True), Route.LOOP_XLA, "not run under XLA"),
    ("gpu no bias", Config(use_bias=False), GPU, Route.LOOP, "use_bias=False"),
    ("gpu recurrent dropout", Config(recurrent_dropout=True), GPU, Route.LOOP, "recurrent"),
    ("gpu use_cudnn=False", Config(use_cudnn=False), GPU, Route.LOOP, "use_cudnn=False"),
    ("gpu options", PEEPHOLE, GPU, Route.STEP_LOOP, "standard LSTM, not peephole"),
    ("gpu float64", Config(), Context(device="gpu", dtype="float64"), Route.CUDNN, ""),
    # JAX and torch: cuDNN on a GPU through Keras's backend LSTM, else the step loop.
    ("jax gpu", Config(), Context("jax", "gpu"), Route.CUDNN, ""),
    ("jax gpu under jit", Config(), Context("jax", "gpu", xla=True), Route.CUDNN, ""),
    ("jax gpu masked", Config(masked=True), Context("jax", "gpu"), Route.STEP_LOOP, "no mask"),
    ("jax gpu options", PEEPHOLE, Context("jax", "gpu"), Route.STEP_LOOP, "peephole"),
    (
        "jax gpu backwards sequences",
        Config(go_backwards=True, return_sequences=True),
        Context("jax", "gpu"),
        Route.STEP_LOOP,
        "go_backwards sequences in input order",
    ),
    ("jax gpu backwards last", Config(go_backwards=True), Context("jax", "gpu"), Route.CUDNN, ""),
    ("jax cpu", Config(), Context("jax"), Route.STEP_LOOP, "this one is jax"),
    ("torch gpu", Config(), Context("torch", "gpu"), Route.CUDNN, ""),
    ("torch cpu", Config(), Context("torch"), Route.STEP_LOOP, "this one is torch"),
    # Exports: TensorFlow ops only, in the form each converter takes.
    ("saved_model", Config(), Context(export="saved_model"), Route.EXPORT_LOOP, ""),
    ("saved_model options", PEEPHOLE, Context(export="saved_model"), Route.STEP_LOOP, ""),
    ("onnx", Config(), Context(export="onnx"), Route.EXPORT_LOOP, ""),
    ("onnx masked", Config(masked=True), Context(export="onnx"), Route.EXPORT_LENGTHS, ""),
    ("onnx options", PEEPHOLE, Context(export="onnx"), Route.STEP_LOOP, r"\(peephole\)"),
    ("onnx keras RNN", Config(in_keras_rnn=True), Context(export="onnx"), Route.STEP_LOOP, "RNN"),
    ("onnx on a gpu", Config(), Context(device="gpu", export="onnx"), Route.EXPORT_LOOP, ""),
    ("litert", Config(), Context(export="litert"), Route.NO_TENSOR_LISTS, ""),
    ("litert options", PEEPHOLE, Context(export="litert"), Route.STEP_LOOP_UNROLLED, ""),
    (
        "litert options free length",
        dataclasses.replace(PEEPHOLE, fixed_length=False),
        Context(export="litert"),
        Route.STEP_LOOP,
        "LiteRT converter.*fixed length",
    ),
    ("openvino", Config(), Context(export="openvino"), Route.NO_TENSOR_LISTS, ""),
    (
        "openvino keras RNN free length",
        Config(in_keras_rnn=True, fixed_length=False),
        Context(export="openvino"),
        Route.STEP_LOOP,
        "OpenVINO converter",
    ),
    ("tflite", Config(), Context(export="tflite"), Route.NO_TENSOR_LISTS, ""),
    ("tflite fused", Config(), Context(export="tflite_fused"), Route.TFLITE_FUSED, ""),
    (
        "tflite fused free batch",
        Config(fixed_batch=False),
        Context(export="tflite_fused"),
        Route.NO_TENSOR_LISTS,
        "fixed batch size",
    ),
    (
        "tflite fused masked",
        Config(masked=True),
        Context(export="tflite_fused"),
        Route.NO_TENSOR_LISTS,
        "takes no mask",
    ),
    (
        "tflite fused with states",
        Config(returns_state=True),
        Context(export="tflite_fused"),
        Route.NO_TENSOR_LISTS,
        "returns its states",
    ),
    (
        "tflite fused options",
        PEEPHOLE,
        Context(export="tflite_fused"),
        Route.STEP_LOOP_UNROLLED,
        "cell option",
    ),
    (
        "tflite fused unroll",
        Config(unroll=True),
        Context(export="tflite_fused"),
        Route.STEP_LOOP,
        "unroll=True",
    ),
]


@pytest.mark.parametrize(
    "config, context, route, reason", [row[1:] for row in TABLE], ids=[row[0] for row in TABLE]
)
def test_resolver_table(config, context, route, reason):
    decision = _routes.resolve(config, context)
    assert decision.route is route
    if reason:
        assert re.search(reason, decision.reason), decision.reason
        assert "\n" not in decision.reason and not decision.reason.endswith(".")
    elif route is not Route.STEP_LOOP:
        assert decision.reason == ""


def test_every_route_has_a_unit():
    from keras_lstm import kernels

    for route in Route:
        assert route.description
        assert (route.value in kernels.ROUTES) == route.fused, route
    assert {row[3] for row in TABLE} == set(Route)  # the table reaches every route


def test_the_layer_reads_its_config_and_this_context(rng):
    x = rng.normal(size=(2, 5, 3)).astype("float32")
    layer = GatedLSTM(4, peephole=True, recurrent_dropout=0.2, return_state=True)
    layer(x)
    config = Config.of(layer, mask=np.ones((2, 5), bool), training=True, shape=x.shape)
    assert config.changes == ("peephole",) and config.not_native == ()
    assert config.masked and config.recurrent_dropout and config.returns_state
    assert not config.in_keras_rnn and config.fixed_batch and config.fixed_length
    rnn = keras.layers.RNN(GatedLSTMCell(4, activation="relu"))
    rnn(x)
    config = Config.of(rnn, shape=(None, 5))
    assert config.in_keras_rnn and not config.fixed_batch
    assert config.changes == config.not_native == ("activation='relu'",)
    context = Context.now("float32")
    assert (context.backend, context.device, context.xla, context.export) == (
        "tensorflow",
        "cpu",
        False,
        "",
    )
    with _routes.exporting("onnx"):
        assert _routes.export_target() == "onnx"
    with pytest.raises(ValueError, match="`target` must be one of"):
        with _routes.exporting("pdf"):
            pass


def _leak_inputs(cell, draw):
    return {"cell_clip": cell.leak_clip}


def test_a_new_option_declared_once_flows_through(monkeypatch, rng):
    # One declaration: the cell's and the layer's argument, its check, get_config,
    # the layer's forwarding, the routes and the native kernel's inputs follow.
    checked = options.Option("leak_clip", None, lambda n, v, a: None if v is None else _clip(n, v))
    monkeypatch.setattr(options, "OPTIONS", (*options.OPTIONS, checked))
    cell = GatedLSTMCell(4, leak_clip=2.0)
    assert cell.leak_clip == 2.0 and cell.get_config()["leak_clip"] == 2.0
    assert GatedLSTMCell.from_config(cell.get_config()).leak_clip == 2.0
    with pytest.raises(ValueError, match="`leak_clip`"):
        GatedLSTMCell(4, leak_clip=-1.0)
    layer = GatedLSTM(4, leak_clip=2.0)
    assert layer.leak_clip == 2.0 and layer.get_config()["leak_clip"] == 2.0
    assert GatedLSTM.from_config(layer.get_config()).leak_clip == 2.0
    assert GatedLSTM(4).leak_clip is None
    assert options.maths_changes(layer.cell) == ["leak_clip"]
    # Not in the native kernel: the step loop, with the option named.
    decision = _routes.resolve(Config.of(layer), CPU)
    assert decision == (Route.STEP_LOOP, "the native kernel does not compute leak_clip")
    layer(rng.normal(size=(2, 5, 3)).astype("float32"))  # and it runs there
    # Given native inputs, the native kernel takes it.
    fused = checked._replace(native_inputs=_leak_inputs)
    monkeypatch.setattr(options, "OPTIONS", (*options.OPTIONS[:-1], fused))
    assert _routes.resolve(Config.of(layer), CPU) == (Route.NATIVE, "")
    assert options.native_inputs(layer.cell, draw=None) == {"cell_clip": 2.0}


def _clip(name, value):
    if not value > 0:
        raise ValueError(f"`{name}` must be positive, got {value!r}.")
    return float(value)


def test_cudnn_refused_at_trace_time_falls_back_with_dropout_applied_once(monkeypatch, rng):
    # The backend's LSTM may find at trace time that it cannot run (no cuDNN op, a
    # mask it rejects): the layer then runs the TensorFlow loop on the inputs as
    # given, and the dropout mask is applied once, as the loop applies it itself.
    def refuses(*args, **kwargs):
        raise NotImplementedError

    monkeypatch.setattr(_internals, "backend_lstm", lambda: refuses)
    x = rng.normal(size=(2, 5, 3)).astype("float32")
    outputs = []
    for route in (Route.CUDNN, Route.LOOP):
        keras.utils.set_random_seed(7)
        layer = GatedLSTM(4, dropout=0.5, seed=3, return_sequences=True)
        layer.build(x.shape)
        layer.set_weights([np.full(w.shape, 0.1, "float32") for w in layer.get_weights()])
        layer._pinned_route = route
        outputs.append(np.asarray(layer(x, training=True)))
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-6)
    layer = GatedLSTM(4, use_cudnn=True)
    layer._pinned_route = Route.CUDNN
    with pytest.raises(ValueError, match="`use_cudnn=True`.*cuDNN LSTM refused"):
        layer(x)


def test_a_copy_of_a_keras_rnn_around_the_cell_runs_itself(rng):
    import copy

    rnn = keras.layers.RNN(GatedLSTMCell(4))
    x = rng.normal(size=(2, 5, 3)).astype("float32")
    rnn(x)
    for twin in (copy.copy(rnn), copy.deepcopy(rnn)):
        twin.cell.kernel.assign(np.zeros(twin.cell.kernel.shape, "float32"))
        assert not np.allclose(np.asarray(twin(x)), np.asarray(rnn(x)))
        hook = vars(twin).get("inner_loop")  # Keras copies by config: built anew, or none
        assert hook is None or hook.__self__ is twin


def test_use_cudnn_true_refuses_calls_where_cudnn_cannot_run_but_not_exports():
    # Exports run TensorFlow loops by design, so they take no cuDNN.
    layer = GatedLSTM(4, use_cudnn=True)
    layer.build((2, 5, 3))
    assert layer.supports_jit is False  # as keras.layers.LSTM's: cuDNN runs outside XLA
    with pytest.raises(ValueError, match="`use_cudnn=True` but layer .* cannot run cuDNN"):
        _routes.decide(layer, (2, 5), None, False)
    with _routes.exporting("saved_model"):
        assert _routes.decide(layer, (2, 5), None, False).route is Route.EXPORT_LOOP


def test_the_context_asks_the_native_libraries_only_where_the_route_needs_them(monkeypatch):
    asked = []
    monkeypatch.setattr(
        _routes, "native_reason", lambda jit_compile=False: asked.append(1) or "no compiler"
    )
    assert Context.now("float32").native == "no compiler"
    layer = GatedLSTM(4)
    layer.build((2, 5, 3))
    assert _routes.decide(layer, (2, 5), None, False) == (Route.LOOP, "no compiler")
    asked.clear()
    rnn = keras.layers.RNN(GatedLSTMCell(4))
    rnn.build((2, 5, 3))
    assert _routes.decide(rnn, (2, 5), None, False).route is Route.STEP_LOOP
    assert Context.now("float32", ask_native=False).native == "" and not asked
