"""Planning the streaming `step` signature: which models can run one step at a time.

`stream_plan(model)` walks the functional graph from the sequence input to
the outputs and decides whether every layer on the way computes each time
step from that step alone (Dense, Masking, merges, ...) or is a recurrent
layer whose state can be handed to the client (`GatedLSTM`, Keras's LSTM,
GRU, SimpleRNN). If so, it returns a `_StreamPlan` that traces `step` and
`initial_state`; otherwise `None` and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras

from keras_lstm import _internals
from keras_lstm.serving import _graph

_STATE_NAMES = ("h", "c")

# Layers that, at inference, compute each time step from that step alone (or
# leave the time axis untouched), so running them on one step at a time gives
# the same numbers as running them on the whole sequence.
_PER_STEP_LAYERS = (
    keras.layers.Dense,
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.PReLU,
    keras.layers.ELU,
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
    keras.layers.ActivityRegularization,
    keras.layers.Masking,
    keras.layers.BatchNormalization,
    keras.layers.Rescaling,
    keras.layers.Identity,
    keras.layers.TimeDistributed,
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Multiply,
    keras.layers.Average,
    keras.layers.Maximum,
    keras.layers.Minimum,
)
# Keras ops recorded in functional graphs (mask computations among them) that
# work element by element.
_ELEMENTWISE_OPS = frozenset(
    "Abs Absolute Add Cast Clip Cos Divide Equal Exp Greater GreaterEqual Less LessEqual "
    "Log LogicalAnd LogicalNot LogicalOr Maximum Minimum Multiply Negative NotEqual Power "
    "Relu Sigmoid Sign Sin Softplus Sqrt Square Subtract Tanh TrueDivide Where".split()
)
# Keras ops that reduce; per step when they reduce feature axes only.
_REDUCTION_OPS = frozenset("All Any Max Mean Min Prod Sum".split())
# These act per step only when they work along the last (feature) axis.
_LAST_AXIS_LAYERS = (
    keras.layers.Softmax,
    keras.layers.LayerNormalization,
    keras.layers.UnitNormalization,
    keras.layers.Concatenate,
)


@dataclass
class _Recurrent:
    layer: keras.layers.RNN
    state_names: list = field(default_factory=list)
    state_shapes: list = field(default_factory=list)


@dataclass
class _StreamPlan:
    """How to run a model's graph one time step at a time."""

    graph: object
    input_spec: object  # tf.TensorSpec of the sequence input
    recurrent: list  # _Recurrent, in graph order
    output_kinds: list  # "sequence" or "final" per model output

    def step_specs(self):
        import tensorflow as tf

        spec = self.input_spec
        specs = [tf.TensorSpec([None, *spec.shape[2:]], spec.dtype, name=spec.name)]
        for rec in self.recurrent:
            for name, shape in zip(rec.state_names, rec.state_shapes, strict=True):
                specs.append(tf.TensorSpec([None, *shape], rec.layer.compute_dtype, name=name))
        return specs

    def initial_state(self, batch_size):
        import tensorflow as tf

        return {
            name: tf.zeros([batch_size, *shape], dtype=rec.layer.compute_dtype)
            for rec in self.recurrent
            for name, shape in zip(rec.state_names, rec.state_shapes, strict=True)
        }

    def step_function(self, output_names):
        def step(x, *flat_states):
            states, offset = {}, 0
            for rec in self.recurrent:
                count = len(rec.state_names)
                states[id(rec.layer)] = list(flat_states[offset : offset + count])
                offset += count
            new_states = {}
            outputs = self.graph._run_through_graph(
                [keras.ops.expand_dims(x, 1)],
                operation_fn=lambda op: self._step_operation(op, states, new_states),
            )
            result = {}
            for name, kind, value in zip(
                output_names, self.output_kinds, keras.tree.flatten(outputs), strict=True
            ):
                result[name] = value[:, 0] if kind == "sequence" else value
            for rec in self.recurrent:
                for name, value in zip(rec.state_names, new_states[id(rec.layer)], strict=True):
                    if name in result:
                        raise ValueError(f"Output name `{name}` is used twice in `step`.")
                    result[name] = value
            return result

        return step

    def _step_operation(self, op, states, new_states):
        if id(op) not in states:

            def call(*args, **kwargs):
                if getattr(op, "_call_has_training_arg", False):
                    kwargs["training"] = False
                return op(*args, **kwargs)

            return call

        def recurrent_step(sequence, mask=None, training=None):
            import tensorflow as tf

            layer = op
            if mask is None:
                mask = _internals.keras_mask(sequence)
            previous = states[id(layer)]
            output, new = layer.cell(sequence[:, 0], previous, training=False)
            new = [tf.cast(s, layer.compute_dtype) for s in keras.tree.flatten(new)]
            output = tf.cast(output, layer.compute_dtype)
            if mask is not None:
                # As in keras.layers.RNN: a masked step keeps the states and
                # repeats the previous output, which for these cells is h.
                keep = tf.cast(mask[:, 0], tf.bool)[:, None]
                new = [tf.where(keep, n, p) for n, p in zip(new, previous, strict=True)]
                if layer.zero_output_for_mask and layer.return_sequences:
                    carried = tf.zeros_like(output)
                else:
                    carried = previous[0]
                output = tf.where(keep, output, carried)
            new_states[id(layer)] = new
            if layer.return_sequences:
                output = output[:, None]
                if mask is not None:
                    _internals.attach_keras_mask(output, mask)
            return [output, *new] if layer.return_state else output

        return recurrent_step


def _streamable_rnn(layer):
    """None if `layer` is a recurrent layer `step` can run, else why not."""
    from keras_lstm.cell import GatedLSTMCell

    cells = (
        GatedLSTMCell,
        keras.layers.LSTMCell,
        keras.layers.GRUCell,
        keras.layers.SimpleRNNCell,
    )
    if not isinstance(layer.cell, cells):
        return (
            f"recurrent layer `{layer.name}` has a {type(layer.cell).__name__} cell; `step` "
            "runs GatedLSTMCell (and Keras LSTM, GRU, SimpleRNN) cells."
        )
    if layer.go_backwards:
        return f"recurrent layer `{layer.name}` reads the sequence backwards (go_backwards=True)."
    return None


def _per_step(layer, rank):
    if not isinstance(layer, keras.layers.Layer):
        kind = type(layer).__name__
        if kind in _ELEMENTWISE_OPS:
            return True
        if kind in _REDUCTION_OPS and rank >= 3 and getattr(layer, "axis", None) is not None:
            axis = layer.axis
            axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
            return all(a % rank >= 2 for a in axes)
        return False
    if isinstance(layer, _PER_STEP_LAYERS):
        if isinstance(layer, keras.layers.BatchNormalization):
            return layer.axis in (-1, rank - 1)
        return True
    if isinstance(layer, _LAST_AXIS_LAYERS):
        axis = getattr(layer, "axis", -1)
        axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
        return all(a in (-1, rank - 1) for a in axes)
    return False


def stream_plan(model):
    """`(plan, None)` if `model` can run step by step, else `(None, reason)`."""
    graph = _graph.functional_graph(model)
    inputs = list(graph.inputs)
    if len(inputs) != 1 or len(inputs[0].shape) != 3:
        return None, "`step` needs a single sequence input of shape (batch, time, features)."
    kinds = {id(inputs[0]): "sequence"}
    recurrent = []
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            if not node.operation or node.is_input:
                continue
            op = node.operation
            in_kinds = {kinds.get(id(t)) for t in node.input_tensors}
            if None in in_kinds:
                return None, f"layer `{op.name}` reads a tensor that does not come from the input."
            if isinstance(op, keras.layers.RNN):
                reason = _streamable_rnn(op)
                extra = [a for a in node.arguments.args[1:] if a is not None] + [
                    name
                    for name in ("initial_state", "constants")
                    if node.arguments.kwargs.get(name) is not None
                ]
                if reason is None and extra:
                    reason = (
                        f"recurrent layer `{op.name}` is given initial_state or constants "
                        "inside the model."
                    )
                if reason is None and in_kinds != {"sequence"}:
                    reason = f"recurrent layer `{op.name}` does not read a sequence."
                if reason:
                    return None, reason
                rec = _Recurrent(op)
                sizes = op.cell.state_size
                sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
                names = _STATE_NAMES if len(sizes) == 2 else ("h",) if len(sizes) == 1 else None
                for i, size in enumerate(sizes):
                    suffix = names[i] if names else f"state{i}"
                    rec.state_names.append(f"{op.name}_{suffix}")
                    rec.state_shapes.append(
                        list(size) if isinstance(size, (list, tuple)) else [int(size)]
                    )
                recurrent.append(rec)
                out_kinds = ["sequence" if op.return_sequences else "final"]
                out_kinds += ["final"] * (len(node.outputs) - 1)
            elif in_kinds == {"final"}:
                out_kinds = ["final"] * len(node.outputs)
            elif in_kinds == {"sequence"} and all(
                _per_step(op, len(t.shape)) for t in node.input_tensors
            ):
                out_kinds = ["sequence"] * len(node.outputs)
            else:
                what = (
                    "mixes a sequence with a tensor that has no time axis"
                    if len(in_kinds) > 1
                    else "may mix time steps"
                )
                return None, (
                    f"layer `{op.name}` ({type(op).__name__}) {what}, so one step at a time "
                    "would not give the same result as the whole sequence."
                )
            for tensor, kind in zip(node.outputs, out_kinds, strict=True):
                kinds[id(tensor)] = kind
    if not recurrent:
        return None, "the model has no recurrent layer, so there is no state to carry."
    names = [name for rec in recurrent for name in rec.state_names]
    clashes = set(names) & set(_graph.output_names(model))
    if len(set(names)) != len(names) or clashes:
        return None, f"state names {sorted(clashes) or names} clash with other names."
    output_kinds = [kinds[id(t)] for t in graph.outputs]
    return _StreamPlan(graph, _graph.input_specs(model)[0], recurrent, output_kinds), None
