"""Look inside an LSTM: its gates and states at every step, as arrays and plots."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from keras_lstm import _internals
from keras_lstm.cell import GatedLSTMCell, LSTMGates


def trace_gates(model_or_layer: keras.layers.Layer, inputs: Any) -> dict[str, LSTMGates]:
    """Record the gates and states of every `GatedLSTMCell` layer over time.

    Runs each layer's cell step by step with `call(..., return_gates=True)`
    (inference mode: no dropout, zoneout at its expectation) on the inputs the
    layer receives in the model (computed by a sub-model up to it), with the
    mask and initial state it is called with there. The model, its weights
    and its states are left unchanged. Without an initial state, steps start
    from zeros (a `stateful` layer's from its current states). Time index t
    is the step that read input t, also for `go_backwards` and the backward
    half of a Bidirectional. Masked steps carry the previous `cell` and
    `hidden`, as the layer does.

    Args:
        model_or_layer: A built `keras.Model` (Sequential or functional; its
            `GatedLSTM` layers, `keras.layers.RNN` layers with a
            `GatedLSTMCell`, those inside `Bidirectional` wrappers and inside
            nested models are traced), or one such layer or Bidirectional.
        inputs: What the model (or layer) takes, e.g. a `(batch, time,
            features)` array.

    Returns:
        A dict from layer name (`"outer/inner"` inside wrappers and nested
        models) to an `LSTMGates` of NumPy arrays `forget`, `input`,
        `candidate`, `output`, `cell`, each `(batch, time, units)`, and
        `hidden`, `(batch, time, proj_units or units)`.

    Example:

    >>> import numpy as np, keras, keras_lstm
    >>> model = keras.Sequential([keras.Input((6, 2)), keras_lstm.GatedLSTM(3, name="encoder")])
    >>> trace = keras_lstm.trace_gates(model, np.ones((4, 6, 2), "float32"))
    >>> trace["encoder"].forget.shape
    (4, 6, 3)
    """
    traces: dict[str, LSTMGates] = {}
    if isinstance(model_or_layer, keras.Model):
        _check_built(model_or_layer)
        _trace_model(model_or_layer, inputs, "", traces)
    elif _traceable(model_or_layer):
        _check_built(model_or_layer)
        _trace_target(model_or_layer, inputs, _internals.keras_mask(inputs), "", traces)
    else:
        raise TypeError(
            "`model_or_layer` must be a keras.Model, a GatedLSTM (or keras.layers.RNN "
            "with a GatedLSTMCell) or a Bidirectional of one, got "
            f"{type(model_or_layer).__name__}."
        )
    if not traces:
        raise ValueError(
            f"`model_or_layer` `{model_or_layer.name}` has no layer with a GatedLSTMCell to trace."
        )
    return traces


def _check_built(layer) -> None:
    if not layer.built:
        raise ValueError(
            f"`model_or_layer` `{layer.name}` is not built yet: call it on data once first."
        )


def _is_gated_rnn(layer) -> bool:
    return isinstance(layer, keras.layers.RNN) and isinstance(layer.cell, GatedLSTMCell)


def _traceable(layer) -> bool:
    if isinstance(layer, keras.layers.Bidirectional):
        return _is_gated_rnn(layer.forward_layer)
    return _is_gated_rnn(layer)


def _trace_model(model, inputs, prefix, traces) -> None:
    for layer in model.layers:
        if not (_traceable(layer) or isinstance(layer, keras.Model)):
            continue
        if isinstance(layer, keras.Model):
            upto = keras.Model(_model_input(model), layer.input)
            _trace_model(layer, upto(inputs, training=False), f"{prefix}{layer.name}/", traces)
            continue
        # Keras records the mask and initial state a layer was called with as
        # arguments of its first call; a sub-model up to them gives their values.
        arguments = _internals.first_call_arguments(layer)
        wanted = {
            "sequences": arguments.args[0],
            "mask": arguments.kwargs.get("mask"),
            "initial_state": arguments.kwargs.get("initial_state"),
        }
        wanted = {name: tensor for name, tensor in wanted.items() if tensor is not None}
        values = keras.Model(_model_input(model), wanted)(inputs, training=False)
        _trace_target(
            layer,
            values["sequences"],
            values.get("mask"),
            prefix,
            traces,
            values.get("initial_state"),
        )


def _model_input(model):
    # A Sequential's `input` is only set once it has been called; its graph
    # exists as soon as it has an Input.
    if isinstance(model, keras.Sequential):
        return model.inputs[0]
    return model.input


def _trace_target(layer, inputs, mask, prefix, traces, initial_state=None) -> None:
    if isinstance(layer, keras.layers.Bidirectional):
        states = [None, None]
        if initial_state is not None:  # forward states first, then backward
            half = len(initial_state) // 2
            states = [initial_state[:half], initial_state[half:]]
        for part, state in zip((layer.forward_layer, layer.backward_layer), states, strict=True):
            traces[f"{prefix}{layer.name}/{part.name}"] = _trace_layer(part, inputs, mask, state)
    else:
        traces[f"{prefix}{layer.name}"] = _trace_layer(layer, inputs, mask, initial_state)


def _trace_layer(layer, inputs, mask, initial_state=None) -> LSTMGates:
    cell = layer.cell
    x = ops.convert_to_tensor(inputs, dtype=cell.compute_dtype)
    if len(x.shape) != 3:
        raise ValueError(
            f"`inputs` of `{layer.name}` must be 3D (batch, time, features), "
            f"got shape {tuple(x.shape)}."
        )
    batch, time = int(x.shape[0]), int(x.shape[1])
    if initial_state is not None:
        states = [ops.convert_to_tensor(s, dtype=cell.compute_dtype) for s in initial_state]
    elif layer.stateful and layer.states is not None:
        states = [ops.convert_to_tensor(s.value) for s in layer.states]
    else:
        states = cell.get_initial_state(batch)
    steps = {}
    order = range(time - 1, -1, -1) if layer.go_backwards else range(time)
    for t in order:
        gates, new_states = cell.call(x[:, t], states, training=False, return_gates=True)
        if mask is not None:
            keep = ops.expand_dims(ops.cast(mask[:, t], "bool"), -1)
            new_states = [ops.where(keep, n, s) for n, s in zip(new_states, states, strict=True)]
            gates = gates._replace(hidden=new_states[0], cell=new_states[1])
        steps[t] = [ops.convert_to_numpy(g) for g in gates]
        states = new_states
    columns = zip(*(steps[t] for t in range(time)), strict=True)
    return LSTMGates(*(np.stack(column, axis=1) for column in columns))


_ROWS = (
    ("forget", "forget gate f", (0, 1)),
    ("input", "input gate i", (0, 1)),
    ("candidate", "candidate C~", (-1, 1)),
    ("output", "output gate o", (0, 1)),
    ("cell", "cell state C", None),
    ("hidden", "hidden state h", (-1, 1)),
)


def plot_gates(
    trace: dict[str, LSTMGates] | LSTMGates,
    sample: int = 0,
    layer: str | None = None,
    units: Any = None,
    figsize: tuple[float, float] | None = None,
):
    """Plot one sample's gates and states as heat maps, units against time.

    Six panels, top to bottom: forget, input and output gates (0 to 1),
    candidate and hidden state (-1 to 1) and the cell state (its own scale).

    Args:
        trace: What `trace_gates` returned, or one of its `LSTMGates`.
        sample: Which sample of the batch to show. Default: `0`.
        layer: The layer's name in `trace`; needed only when it holds several.
            Default: `None`.
        units: Indices of the units to show (a slice, list or array).
            Default: `None`, all of them.
        figsize: Matplotlib figure size in inches. Default: `None`, sized to
            the data.

    Returns:
        The `matplotlib.figure.Figure`.

    Example:

    >>> import numpy as np, keras, keras_lstm
    >>> layer = keras_lstm.GatedLSTM(3, return_sequences=True)
    >>> x = np.ones((2, 6, 2), "float32")
    >>> _ = layer(x)
    >>> figure = keras_lstm.plot_gates(keras_lstm.trace_gates(layer, x))
    >>> len(figure.axes) >= 6
    True
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "keras_lstm.plot_gates needs matplotlib, an optional extra. Install it with "
            "`pip install 'keras-lstm[plot]'` (or `pip install matplotlib`)."
        ) from error
    gates = _pick(trace, layer)
    batch, time = gates.forget.shape[:2]
    if isinstance(sample, bool) or not isinstance(sample, int | np.integer):
        raise TypeError(f"`sample` must be an integer, got {sample!r}.")
    if not -batch <= sample < batch:
        raise ValueError(f"`sample` must be in [0, {batch}) for this trace, got {sample}.")
    selection = slice(None) if units is None else units
    shown = {name: np.asarray(getattr(gates, name))[sample][:, selection] for name, _, _ in _ROWS}
    height = max(shown["forget"].shape[1], shown["hidden"].shape[1])
    if figsize is None:
        figsize = (min(12.0, 3.0 + 0.25 * time), 1.5 + 6 * min(2.5, 0.6 + 0.15 * height))
    figure, axes = plt.subplots(len(_ROWS), 1, figsize=figsize, sharex=True)
    for ax, (name, title, limits) in zip(axes, _ROWS, strict=True):
        values = shown[name].T
        if limits is None:
            bound = float(np.max(np.abs(values))) or 1.0
            limits = (-bound, bound)
        cmap = "viridis" if limits[0] == 0 else "RdBu_r"
        image = ax.imshow(
            values,
            aspect="auto",
            cmap=cmap,
            vmin=limits[0],
            vmax=limits[1],
            interpolation="nearest",
        )
        ax.set_ylabel("unit")
        ax.set_title(title, fontsize="small", loc="left")
        figure.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
    axes[-1].set_xlabel("time step")
    figure.suptitle(f"sample {sample}")
    return figure


def _pick(trace, layer) -> LSTMGates:
    if isinstance(trace, LSTMGates):
        return trace
    if not isinstance(trace, dict) or not trace:
        raise TypeError(
            "`trace` must be what trace_gates returns (a dict of LSTMGates) or one "
            f"LSTMGates, got {type(trace).__name__}."
        )
    if layer is None:
        if len(trace) > 1:
            raise ValueError(
                f"`trace` holds several layers {sorted(trace)}; pick one with `layer=`."
            )
        return next(iter(trace.values()))
    if layer not in trace:
        raise ValueError(f"`layer` must be one of {sorted(trace)}, got {layer!r}.")
    return trace[layer]
