"""Move LSTM weights between `GatedLSTM`, `torch.nn.LSTM` and `keras.layers.LSTM`.

The three share one set of equations. What differs is bookkeeping:

- Keras stores `kernel` (D, 4H), `recurrent_kernel` (H, 4H), `bias` (4H,) with
  the gates in the order input, forget, candidate, output.
- torch stores `weight_ih_l{k}` (4H, D) and `weight_hh_l{k}` (4H, H), the
  transposes, in the order input, forget, cell (g), output: the same order
  as Keras. It has two biases, `bias_ih` and `bias_hh`, which only ever appear
  summed, and with `proj_size=P` a `weight_hr_l{k}` (P, H) projecting `h`.
  Reverse directions carry the suffix `_reverse`.

torch's layers are batch-first or time-first (`batch_first`); Keras layers are
always batch-first.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from keras_lstm import _internals
from keras_lstm.cell import GatedLSTMCell
from keras_lstm.layer import GatedLSTM

_TORCH_MISSING = (
    "keras_lstm.{name} needs PyTorch, which is an optional extra. Install it with "
    "`pip install 'keras-lstm[torch]'` (or `pip install torch==2.13.0`)."
)


def _import_torch(name: str):
    try:
        import torch
    except ImportError as error:
        raise ImportError(_TORCH_MISSING.format(name=name)) from error
    return torch


def from_torch(torch_lstm: Any, return_sequences: bool = True) -> keras.layers.Layer:
    """Build Keras layers computing the same outputs as a `torch.nn.LSTM`.

    A one-layer, one-direction LSTM becomes a `GatedLSTM`; a bidirectional one
    a `keras.layers.Bidirectional` of two (outputs concatenated, forward
    first, as torch does); `num_layers > 1` a `keras.Sequential` stack, with
    `keras.layers.Dropout(dropout)` between layers when torch has `dropout`.
    `proj_size=P` becomes `proj_units=P`. The two torch biases are summed into
    Keras's one. The result is built and takes batch-first input
    `(batch, time, input_size)` whatever torch's `batch_first`.

    Args:
        torch_lstm: A `torch.nn.LSTM`.
        return_sequences: Whether the last layer returns the whole sequence,
            as torch's `output` does (`True`), or only the last step
            (`False`). Default: `True`.

    Returns:
        A `GatedLSTM`, a `keras.layers.Bidirectional` or a `keras.Sequential`.

    Example:

    >>> import numpy as np, torch, keras_lstm
    >>> lstm = torch.nn.LSTM(3, 8, batch_first=True)
    >>> layer = keras_lstm.from_torch(lstm)
    >>> x = np.zeros((2, 5, 3), "float32")
    >>> tuple(layer(x).shape)
    (2, 5, 8)
    """
    torch = _import_torch("from_torch")
    if not isinstance(torch_lstm, torch.nn.LSTM):
        raise TypeError(f"`torch_lstm` must be a torch.nn.LSTM, got {type(torch_lstm).__name__}.")
    if not isinstance(return_sequences, bool):
        raise TypeError(f"`return_sequences` must be True or False, got {return_sequences!r}.")
    t = torch_lstm
    proj = t.proj_size or None
    out_features = (proj or t.hidden_size) * (2 if t.bidirectional else 1)
    stack = []
    for k in range(t.num_layers):
        in_features = t.input_size if k == 0 else out_features
        last = k == t.num_layers - 1
        suffixes = ("", "_reverse") if t.bidirectional else ("",)
        directions = [
            GatedLSTM(
                t.hidden_size,
                use_bias=t.bias,
                proj_units=proj,
                return_sequences=return_sequences or not last,
                go_backwards=suffix == "_reverse",
            )
            for suffix in suffixes
        ]
        stage = directions[0]
        if t.bidirectional:
            # Bidirectional rebuilds both layers from their configs: set weights after.
            stage = keras.layers.Bidirectional(directions[0], backward_layer=directions[1])
            directions = [stage.forward_layer, stage.backward_layer]
        stage.build((None, None, in_features))
        for layer, suffix in zip(directions, suffixes, strict=True):
            layer.set_weights(_torch_weights_as_keras(t, f"l{k}{suffix}"))
        stack.append(stage)
        if t.dropout > 0 and not last:
            stack.append(keras.layers.Dropout(t.dropout))
    if len(stack) == 1:
        return stack[0]
    return keras.Sequential([keras.Input((None, t.input_size)), *stack])


def _torch_weights_as_keras(t, suffix: str) -> list[np.ndarray]:
    def get(name):
        return getattr(t, f"{name}_{suffix}").detach().cpu().numpy().astype("float32")

    weights = [get("weight_ih").T, get("weight_hh").T]
    if t.bias:
        weights.append(get("bias_ih") + get("bias_hh"))
    if t.proj_size:
        weights.append(get("weight_hr").T)
    return weights


def to_torch(layer: keras.layers.Layer, batch_first: bool = True) -> Any:
    """Build a `torch.nn.LSTM` computing the same outputs as Keras LSTM layers.

    Accepts a `GatedLSTM` or `keras.layers.LSTM`, a `keras.layers.Bidirectional`
    of them (`merge_mode="concat"`), or a `keras.Sequential` stack of these
    (optionally with `keras.layers.Dropout` layers of one rate between them).
    The layers must be built, share `units`, `use_bias` and `proj_units`,
    and use only what torch has: tanh and sigmoid, no peephole, layer_norm,
    cifg, zoneout or cell_clip, no lone `go_backwards` layer. Keras's bias
    becomes torch's `bias_ih` and `bias_hh` is zero. torch returns the whole
    output sequence, whatever the layers' `return_sequences`.

    Args:
        layer: The Keras layer or `keras.Sequential` stack to convert.
        batch_first: The returned LSTM's `batch_first`. Default: `True`.

    Returns:
        A `torch.nn.LSTM` in float32, in evaluation mode.

    Example:

    >>> import numpy as np, torch, keras_lstm
    >>> layer = keras_lstm.GatedLSTM(8, return_sequences=True)
    >>> x = np.zeros((2, 5, 3), "float32")
    >>> _ = layer(x)
    >>> lstm = keras_lstm.to_torch(layer)
    >>> lstm(torch.from_numpy(x))[0].shape
    torch.Size([2, 5, 8])
    """
    torch = _import_torch("to_torch")
    if not isinstance(batch_first, bool):
        raise TypeError(f"`batch_first` must be True or False, got {batch_first!r}.")
    stages, dropout = _stages(layer)
    first = stages[0][0]
    cell = first.cell
    units, use_bias, proj = cell.units, cell.use_bias, _proj_units(cell)
    bidirectional = len(stages[0]) == 2
    for stage in stages:
        if (len(stage) == 2) != bidirectional:
            raise ValueError(
                "`layer` mixes Bidirectional and one-direction layers; torch.nn.LSTM "
                "needs every layer the same."
            )
        for keras_layer in stage:
            _check_torch_can_run(keras_layer)
            c = keras_layer.cell
            if (c.units, c.use_bias, _proj_units(c)) != (units, use_bias, proj):
                raise ValueError(
                    "Every layer must share `units`, `use_bias` and `proj_units` for one "
                    f"torch.nn.LSTM; `{keras_layer.name}` has ({c.units}, {c.use_bias}, "
                    f"{_proj_units(c)}), the first ({units}, {use_bias}, {proj})."
                )
    lstm = torch.nn.LSTM(
        input_size=int(cell.kernel.shape[0]),
        hidden_size=units,
        num_layers=len(stages),
        bias=use_bias,
        batch_first=batch_first,
        dropout=dropout,
        bidirectional=bidirectional,
        proj_size=proj or 0,
    )
    with torch.no_grad():
        for k, stage in enumerate(stages):
            for keras_layer, suffix in zip(stage, ("", "_reverse"), strict=False):
                weights = [np.asarray(w) for w in keras_layer.cell.get_weights()]
                kernel, recurrent = weights[0], weights[1]
                _copy(torch, lstm, f"weight_ih_l{k}{suffix}", kernel.T)
                _copy(torch, lstm, f"weight_hh_l{k}{suffix}", recurrent.T)
                if use_bias:
                    _copy(torch, lstm, f"bias_ih_l{k}{suffix}", weights[2])
                    _copy(torch, lstm, f"bias_hh_l{k}{suffix}", np.zeros_like(weights[2]))
                if proj:
                    _copy(torch, lstm, f"weight_hr_l{k}{suffix}", weights[-1].T)
    return lstm.eval()


def _copy(torch, lstm, name, value):
    getattr(lstm, name).copy_(torch.from_numpy(np.ascontiguousarray(value, dtype="float32")))


def _proj_units(cell) -> int | None:
    return getattr(cell, "proj_units", None)


def _stages(layer) -> tuple[list[tuple], float]:
    """`([(forward,) or (forward, backward)] per depth, dropout)` of what to convert."""
    if isinstance(layer, keras.Sequential):
        stages, rates, after_stage = [], set(), False
        for sub in layer.layers:
            if isinstance(sub, keras.layers.Dropout):
                if not after_stage:
                    raise ValueError(
                        "A Dropout must sit between two LSTM layers to map to torch's "
                        f"`dropout`; `{sub.name}` does not."
                    )
                rates.add(float(sub.rate))
                after_stage = False
                continue
            stages.append(_stage(sub))
            after_stage = True
        if not stages:
            raise ValueError("`layer` is a Sequential with no LSTM layer to convert.")
        dropouts = len(stages) - 1
        if rates and (len(rates) > 1 or not after_stage or _count_dropouts(layer) != dropouts):
            raise ValueError(
                "torch.nn.LSTM has one `dropout` between every two layers: the Sequential "
                "needs the same Dropout rate between each pair of LSTM layers and none "
                f"after the last, got rates {sorted(rates)}."
            )
        return stages, rates.pop() if rates else 0.0
    return [_stage(layer)], 0.0


def _count_dropouts(model) -> int:
    return sum(isinstance(sub, keras.layers.Dropout) for sub in model.layers)


def _stage(layer) -> tuple:
    if isinstance(layer, keras.layers.Bidirectional):
        if layer.merge_mode != "concat":
            raise ValueError(
                "torch.nn.LSTM concatenates its two directions; `merge_mode` must be "
                f"'concat', got {layer.merge_mode!r}."
            )
        forward, backward = layer.forward_layer, layer.backward_layer
        for part in (forward, backward):
            _check_lstm_layer(part)
        if forward.go_backwards or not backward.go_backwards:
            raise ValueError("The Bidirectional's forward layer must read forwards.")
        return (forward, backward)
    _check_lstm_layer(layer)
    if layer.go_backwards:
        raise ValueError(
            f"`{layer.name}` has go_backwards=True, which torch.nn.LSTM has no "
            "one-direction equivalent for."
        )
    return (layer,)


def _check_lstm_layer(layer) -> None:
    if not isinstance(layer, keras.layers.LSTM | GatedLSTM):
        raise TypeError(
            "`layer` must be a GatedLSTM, a keras.layers.LSTM, a Bidirectional of one or a "
            f"keras.Sequential of those, got {type(layer).__name__} (`{layer.name}`)."
        )
    if not layer.built:
        raise ValueError(f"`{layer.name}` is not built yet: call it on data once first.")


def _check_torch_can_run(layer) -> None:
    cell = layer.cell
    serialize = keras.activations.serialize
    if serialize(cell.activation) != "tanh" or serialize(cell.recurrent_activation) != "sigmoid":
        raise ValueError(
            f"torch.nn.LSTM only has tanh and sigmoid; `{layer.name}` uses activation="
            f"{serialize(cell.activation)!r}, recurrent_activation="
            f"{serialize(cell.recurrent_activation)!r}."
        )
    if isinstance(cell, GatedLSTMCell):
        # torch.nn.LSTM has a projection (proj_size), none of the others.
        unsupported = [name for name in cell.options_changing_maths() if name != "proj_units"]
        if unsupported:
            raise ValueError(
                f"torch.nn.LSTM has no {', '.join(unsupported)}; `{layer.name}` uses "
                f"{'it' if len(unsupported) == 1 else 'them'}. Only proj_units and "
                "chrono_init carry over."
            )


def from_keras(lstm: keras.layers.Layer | keras.Model) -> keras.layers.Layer | keras.Model:
    """Replace `keras.layers.LSTM` by `GatedLSTM`, keeping weights and outputs.

    Given a `keras.layers.LSTM` (or a `keras.layers.Bidirectional` of them),
    returns the `GatedLSTM` (or Bidirectional of them) with the same
    configuration and, if built, the same weights. Given a Sequential or
    functional `keras.Model`, returns a new model of the same architecture
    where every LSTM layer (also inside Bidirectional wrappers and nested
    models) is a `GatedLSTM`, and every weight is copied. The new model is not
    compiled; compile it as the original was. The original is left unchanged.

    Args:
        lstm: A `keras.layers.LSTM`, a Bidirectional of them, or a Sequential or
            functional model.

    Returns:
        The converted layer or a new model.

    Example:

    >>> import numpy as np, keras, keras_lstm
    >>> model = keras.Sequential([keras.Input((5, 3)), keras.layers.LSTM(4), keras.layers.Dense(1)])
    >>> gated = keras_lstm.from_keras(model)
    >>> x = np.ones((2, 5, 3), "float32")
    >>> bool(np.allclose(model(x), gated(x), atol=1e-6))
    True
    """
    if isinstance(lstm, keras.Model):
        return _model_from_keras(lstm)
    if not _is_keras_lstm(lstm) and not _is_keras_bidirectional_lstm(lstm):
        raise TypeError(
            "`lstm` must be a keras.layers.LSTM, a Bidirectional of one, or a keras.Model; "
            f"got {type(lstm).__name__}."
        )
    converted = _convert_layer(lstm)
    if lstm.built:
        converted.build(_built_shape(lstm))
        converted.set_weights(lstm.get_weights())
    return converted


def _built_shape(layer):
    inner = layer.forward_layer if isinstance(layer, keras.layers.Bidirectional) else layer
    return (None, None, int(inner.cell.kernel.shape[0]))


def _is_keras_lstm(layer) -> bool:
    return isinstance(layer, keras.layers.LSTM)


def _is_keras_bidirectional_lstm(layer) -> bool:
    return isinstance(layer, keras.layers.Bidirectional) and _is_keras_lstm(layer.forward_layer)


def _gated_from(lstm) -> GatedLSTM:
    config = lstm.get_config()
    config.pop("use_cudnn", None)
    return GatedLSTM(**config)


def _convert_layer(layer):
    if _is_keras_bidirectional_lstm(layer):
        return keras.layers.Bidirectional(
            _gated_from(layer.forward_layer),
            backward_layer=_gated_from(layer.backward_layer),
            merge_mode=layer.merge_mode,
            name=layer.name,
        )
    return _gated_from(layer)


def _model_from_keras(model: keras.Model) -> keras.Model:
    if not _contains_keras_lstm(model):
        raise ValueError(f"`lstm` model `{model.name}` has no keras.layers.LSTM layer to convert.")

    def clone(layer):
        if _is_keras_lstm(layer) or _is_keras_bidirectional_lstm(layer):
            return _convert_layer(layer)
        return layer.__class__.from_config(layer.get_config())

    try:
        new = keras.models.clone_model(model, clone_function=clone, recursive=True)
    except ValueError as error:
        raise TypeError(
            f"`lstm` model `{model.name}` cannot be rebuilt layer by layer ({error}); "
            "from_keras converts Sequential and functional models. For a subclassed "
            "model, convert its LSTM layers with from_keras(layer) instead."
        ) from error
    new.set_weights(model.get_weights())
    return new


def _contains_keras_lstm(model) -> bool:
    return any(_is_keras_lstm(sub) for sub in _internals.layers_within(model))
