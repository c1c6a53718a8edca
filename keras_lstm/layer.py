"""`GatedLSTM`: the recurrent layer around `GatedLSTMCell`."""

from __future__ import annotations

import warnings

import keras
from keras import ops

from keras_lstm import _checks, _internals
from keras_lstm.cell import GatedLSTMCell

# The constructor arguments that belong to the cell. Each is also readable on
# the layer (`layer.units`, `layer.dropout`, ...), forwarded below, once.
CELL_ARGUMENTS = (
    "units",
    "activation",
    "recurrent_activation",
    "use_bias",
    "kernel_initializer",
    "recurrent_initializer",
    "bias_initializer",
    "unit_forget_bias",
    "kernel_regularizer",
    "recurrent_regularizer",
    "bias_regularizer",
    "kernel_constraint",
    "recurrent_constraint",
    "bias_constraint",
    "dropout",
    "recurrent_dropout",
    "seed",
    "peephole",
    "layer_norm",
    "cifg",
    "proj_units",
    "zoneout_h",
    "zoneout_c",
    "chrono_init",
    "cell_clip",
)


@keras.saving.register_keras_serializable(package="keras_lstm")
class GatedLSTM(keras.layers.RNN):
    """Long Short-Term Memory layer whose cell is `GatedLSTMCell`.

    A drop-in for `keras.layers.LSTM`: the same arguments, defaults, weights
    and outputs. It never turns XLA off for the model around it (where
    `keras.layers.LSTM` on a GPU switches to cuDNN and disables
    `jit_compile`).

    How the sequence runs: on the TensorFlow backend, when the cell computes
    the standard LSTM (tanh and sigmoid, no option that changes the maths;
    dropout and recurrent dropout are fine), a fused whole-sequence op with its own
    gradient runs the recurrence (a native CPU kernel, under XLA as a custom
    call; a `tf.while_loop` on GPU and in exports). The native kernel also
    computes `peephole`, `cifg`, `cell_clip`, `proj_units`, `zoneout_h` and
    `zoneout_c`. Otherwise, and on the JAX and
    torch backends, Keras's step loop calls the cell's `call`, which is also
    the reference the fused op is tested against. Both give the same numbers.

    The cell's arguments, with the same defaults as `keras.layers.LSTM` and
    the same meaning as in `GatedLSTMCell` (each is also readable on the
    layer, as `layer.units`, `layer.dropout`, ...): `units`, `activation`,
    `recurrent_activation`, `use_bias`, `kernel_initializer`,
    `recurrent_initializer`, `bias_initializer`, `unit_forget_bias`,
    `kernel_regularizer`, `recurrent_regularizer`, `bias_regularizer`,
    `kernel_constraint`, `recurrent_constraint`, `bias_constraint`,
    `dropout`, `recurrent_dropout`, `seed`; and its options, each off by
    default: `peephole=False`, `layer_norm=False`, `cifg=False`,
    `proj_units=None`, `zoneout_h=0.0`, `zoneout_c=0.0`, `chrono_init=None`,
    `cell_clip=None` (with `proj_units=P` the output and `h` have P
    features).

    Args:
        units: Positive integer, the size of the hidden and cell states.
        activity_regularizer: Regularizer for the layer's output.
            Default: `None`.
        return_sequences: Return the whole output sequence `(batch, time,
            units)` rather than the last output. Default: `False`.
        return_state: Also return the final `h` and `c`. Default: `False`.
        go_backwards: Read the sequence backwards (and return the reversed
            output sequence). Default: `False`.
        stateful: Carry each sample's last state to the same sample of the
            next batch; needs a fixed batch size. Default: `False`.
        unroll: Unroll the time loop (short sequences only). Default: `False`.
        use_cudnn: `"auto"` or `False` (the cell always runs as written).
            `True` raises a `ValueError`, since this layer has no cuDNN
            kernel. Default: `"auto"`.
        **kwargs: Base layer arguments (`name`, `dtype`, `trainable`, ...),
            `zero_output_for_mask` (as in `keras.layers.RNN`) and
            `implementation` (1 or 2, as in `keras.layers.LSTM`; the same
            maths either way).

    Call arguments:
        inputs: `(batch, timesteps, features)`.
        mask: Optional boolean `(batch, timesteps)`; `False` steps are skipped
            and carry the previous state through.
        training: Whether dropout applies.
        initial_state: Optional `[h, c]`: `h` of shape `(batch, units)` (or
            `(batch, proj_units)` with a projection), `c` of shape `(batch, units)`.

    Example:

    >>> import numpy as np, keras
    >>> from keras_lstm import GatedLSTM
    >>> model = keras.Sequential([keras.Input((24, 1)), GatedLSTM(16), keras.layers.Dense(1)])
    >>> tuple(model(np.zeros((8, 24, 1), "float32")).shape)
    (8, 1)
    >>> seq, h, c = GatedLSTM(4, return_sequences=True, return_state=True)(
    ...     np.zeros((2, 5, 3), "float32"))
    >>> tuple(seq.shape), tuple(h.shape), tuple(c.shape)
    ((2, 5, 4), (2, 4), (2, 4))
    """

    def __init__(
        self,
        units: int,
        activation="tanh",
        recurrent_activation="sigmoid",
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal",
        bias_initializer="zeros",
        unit_forget_bias: bool = True,
        kernel_regularizer=None,
        recurrent_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        recurrent_constraint=None,
        bias_constraint=None,
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        seed: int | None = None,
        peephole: bool = False,
        layer_norm: bool = False,
        cifg: bool = False,
        proj_units: int | None = None,
        zoneout_h: float = 0.0,
        zoneout_c: float = 0.0,
        chrono_init: float | None = None,
        cell_clip: float | None = None,
        return_sequences: bool = False,
        return_state: bool = False,
        go_backwards: bool = False,
        stateful: bool = False,
        unroll: bool = False,
        use_cudnn="auto",
        **kwargs,
    ):
        if use_cudnn is True:
            raise ValueError(
                "`use_cudnn=True` is not supported: GatedLSTM always runs its own gate "
                "equations and has no cuDNN kernel (which keeps XLA on). "
                "Pass use_cudnn='auto' or False."
            )
        if use_cudnn not in ("auto", False):
            raise ValueError(f"`use_cudnn` must be 'auto' or False, got {use_cudnn!r}.")
        arguments = locals()
        cell = GatedLSTMCell(
            **{name: arguments[name] for name in CELL_ARGUMENTS},
            dtype=kwargs.get("dtype"),
            trainable=kwargs.get("trainable", True),
            name="gated_lstm_cell",
            implementation=kwargs.pop("implementation", 2),
        )
        if "zero_output_for_mask" in kwargs:
            _checks.boolean("zero_output_for_mask", kwargs["zero_output_for_mask"])
        super().__init__(
            cell,
            return_sequences=_checks.boolean("return_sequences", return_sequences),
            return_state=_checks.boolean("return_state", return_state),
            go_backwards=_checks.boolean("go_backwards", go_backwards),
            stateful=_checks.boolean("stateful", stateful),
            unroll=_checks.boolean("unroll", unroll),
            activity_regularizer=activity_regularizer,
            **kwargs,
        )
        self.use_cudnn = use_cudnn
        # Shapes are checked in build() and call(), with messages that name the argument.
        self.input_spec = None

    def build(self, sequences_shape, initial_state_shape=None):
        _checks.sequence_shape("inputs", sequences_shape)
        if self.stateful and sequences_shape[0] is None:
            raise ValueError(
                "`stateful=True` needs a fixed batch size, got input shape "
                f"{tuple(sequences_shape)}. Give it with "
                "`keras.Input(shape=..., batch_size=N)` or `batch_shape=(N, T, D)`."
            )
        super().build(sequences_shape, initial_state_shape)

    def _create_state_variables(self, batch_size):
        super()._create_state_variables(batch_size)
        # A stateful layer keeps its states in the variable dtype (float32 under
        # a mixed policy) and never autocasts them: under the torch backend an
        # autocast variable's assign() inside call() writes into a cast copy, so
        # the state would silently restart from zeros at every batch.
        for state in keras.tree.flatten(self.states):
            _internals.never_autocast(state)

    def call(self, sequences, initial_state=None, mask=None, training=False):
        sequences = _checks.float_inputs("inputs", sequences, self.compute_dtype)
        self._check_call(sequences, initial_state, mask)
        if self.stateful and self.built:
            sequences = self._check_stateful_batch(sequences)
        return super().call(sequences, initial_state=initial_state, mask=mask, training=training)

    def _check_stateful_batch(self, sequences):
        """A stateful layer's every batch has the rows it was built for.

        Row i of each batch continues row i of the last one, so a smaller last
        batch (4 samples in batches of 3) has no meaning: `keras.layers.LSTM`
        returns a wrong-sized result and the native op fails deep inside. One
        message instead, at trace time where the batch size is known, else as
        a run-time check in the graph (TensorFlow, whose `predict` retraces a
        partial batch with a free batch size).
        """
        rows = keras.tree.flatten(self.states)[0].shape[0]
        message = (
            f"`{self.name}` is stateful and was built for batches of {rows} rows, but got a "
            "batch of {got}. Every batch must have the same rows (row i continues row i of "
            f"the previous batch): use a batch_size that divides the number of samples, or "
            "drop the remainder (tf.data's .batch(n, drop_remainder=True))."
        )
        got = sequences.shape[0]
        if got is not None:
            if got != rows:
                raise ValueError(message.format(got=got))
            return sequences
        if keras.backend.backend() != "tensorflow":
            return sequences
        import tensorflow as tf

        check = tf.debugging.assert_equal(
            tf.shape(sequences)[0], rows, message=message.format(got="a different size")
        )
        with tf.control_dependencies([check]):
            return tf.identity(sequences)

    def inner_loop(self, sequences, initial_state, mask, training=False):
        # The fused whole-sequence op when it computes the same maths, else
        # Keras's step loop around the cell (the reference it is tested against).
        if keras.tree.is_nested(mask):
            mask = mask[0]
        if not self._runs_fused_kernel(training):
            if self.unroll and self.go_backwards and mask is not None and self.zero_output_for_mask:
                return self._unrolled_backwards_loop(sequences, initial_state, mask, training)
            return super().inner_loop(sequences, initial_state, mask, training=training)
        from keras_lstm import kernels

        if mask is not None and kernels.export_loop_form() == "onnx":
            warnings.warn(
                f"Layer '{self.name}' exports as an ONNX Loop, not ONNX's LSTM op: it is "
                "masked, and the op takes sequence lengths, not masks.",
                stacklevel=2,
            )
        if training and self.cell.dropout > 0:
            # One mask per sequence, the one the cell would draw.
            sequences = sequences * self.cell.get_dropout_mask(sequences[:, 0, :])[:, None, :]
        recurrent_mask = None
        if training and self.cell.recurrent_dropout > 0:
            # Likewise: the mask on h_{t-1} the cell's `call` would apply at every step.
            recurrent_mask = self.cell.get_recurrent_dropout_mask(initial_state[0])
        return kernels.lstm_recurrence(
            sequences,
            self.cell.kernel,
            self.cell.recurrent_kernel,
            self.cell.bias,
            initial_state[0],
            initial_state[1],
            mask=mask,
            go_backwards=self.go_backwards,
            return_sequences=self.return_sequences,
            zero_output_for_mask=self.zero_output_for_mask,
            training=training,
            recurrent_mask=recurrent_mask,
            options=self._kernel_options(sequences, training),
        )

    def _kernel_options(self, sequences, training):
        """The cell's options as the native kernel takes them, or `None` for a plain cell."""
        from keras_lstm import kernels

        cell = self.cell
        if cell.is_standard_lstm:
            return None
        peephole = None
        if cell.peephole:
            weights = {
                gate: ops.cast(w, cell.compute_dtype) for gate, w in cell._peephole.weights.items()
            }
            # [w_i, w_f, w_o]; with cifg there is no w_i, and the kernel reads none.
            unused = ops.zeros_like(weights["forget"])
            peephole = ops.stack(
                [weights.get("input", unused), weights["forget"], weights["output"]]
            )
        projection = None
        if cell.proj_units is not None:
            projection = ops.cast(cell._projection.kernel, cell.compute_dtype)
        steps, batch = ops.shape(sequences)[1], ops.shape(sequences)[0]
        zoneout_h, zoneout_c = (
            self._zoneout_masks(state, (steps, batch)) if training else None for state in "hc"
        )
        layer_norm = None
        if cell.layer_norm:
            norm = cell._layer_norm
            # [γx, γh, γc, βc]; without a bias the cell state's norm has no shift.
            shift = norm.cell_beta if norm.cell_beta is not None else ops.zeros((cell.units,))
            gains = (norm.kernel_gamma, norm.recurrent_gamma, norm.cell_gamma, shift)
            layer_norm = ops.concatenate([ops.cast(w, cell.compute_dtype) for w in gains])
        return kernels.CellOptions(
            peephole=peephole,
            cifg=cell.cifg,
            cell_clip=cell.cell_clip,
            projection=projection,
            zoneout_h=zoneout_h,
            zoneout_c=zoneout_c,
            zoneout_h_rate=cell.zoneout_h,
            zoneout_c_rate=cell.zoneout_c,
            layer_norm=layer_norm,
        )

    def _zoneout_masks(self, state, steps_and_batch):
        """Zoneout's masks of `state` ("h" or "c") for a whole sequence in training,
        (steps, batch, width) in processing order: 1 where a unit keeps its previous
        value, as the cell's `call` draws them (Bernoulli of the rate, from the
        cell's seed generator; by a generator XLA runs fast, see
        `kernels.mask_uniform`), or `None` when that state's rate is 0."""
        from keras_lstm import kernels

        cell = self.cell
        rate, width = {
            "h": (cell.zoneout_h, cell.state_size[0]),
            "c": (cell.zoneout_c, cell.units),
        }[state]
        if rate == 0.0:
            return None
        shape = (*steps_and_batch, width)
        keep = kernels.mask_uniform(shape, cell.seed_generator) < rate
        return ops.cast(keep, cell.compute_dtype)

    def _unrolled_backwards_loop(self, sequences, initial_state, mask, training):
        """Keras's unrolled loop, with masked outputs zeroed in the order they were made.

        With `unroll=True`, `go_backwards=True` and `zero_output_for_mask`
        (which `Bidirectional` turns on), Keras's TensorFlow loop zeroes the
        reversed outputs with the mask in forward order; the symbolic loop and
        the fused op are right. So zero them here instead.
        """
        self.zero_output_for_mask = False
        try:
            last_output, outputs, states = super().inner_loop(
                sequences, initial_state, mask, training=training
            )
        finally:
            self.zero_output_for_mask = True
        # Steps were processed last to first: the last one made is input step 0.
        made = ops.flip(mask, axis=1) if self.return_sequences else mask[:, :1]
        outputs = ops.where(made[:, :, None], outputs, ops.zeros_like(outputs))
        last_output = ops.where(mask[:, :1], last_output, ops.zeros_like(last_output))
        return last_output, outputs, states

    def _runs_fused_kernel(self, training) -> bool:
        """Whether `inner_loop` may use the fused op: TensorFlow backend, no
        `unroll=True` (which asks for one op per step, as TFLite wants), and a
        cell with the standard LSTM maths (recurrent dropout included), or
        with options the native kernel computes where it runs (not in exports,
        which take the standard maths only)."""
        if keras.backend.backend() != "tensorflow" or self.unroll:
            return False
        if self.cell.is_standard_lstm:
            return True
        from keras_lstm import kernels

        return (
            self.cell.has_standard_activations
            and set(self.cell.options_changing_maths()) <= set(kernels.NATIVE_CELL_OPTIONS)
            and kernels.cell_options_fuse_here(self.compute_dtype)
        )

    def _check_call(self, sequences, initial_state, mask):
        shape = tuple(sequences.shape)
        _checks.sequence_shape("inputs", shape, self.cell.kernel.shape[0])
        batch, time = shape[0], shape[1]
        if time == 0:
            raise ValueError(f"`inputs` has no time steps (shape {shape}); give at least one.")
        if initial_state is not None:
            _checks.step_states("initial_state", initial_state, self.cell.state_size, batch)
        if mask is not None:
            mask = keras.tree.flatten(mask)[0]
            mask_shape = tuple(mask.shape)
            if len(mask_shape) != 2 or any(
                m is not None and s is not None and m != s
                for m, s in zip(mask_shape, (batch, time), strict=False)
            ):
                raise ValueError(
                    f"`mask` must have shape (batch, timesteps) = ({batch}, {time}), "
                    f"got {mask_shape}."
                )

    def get_config(self):
        cell_config = self.cell.get_config()
        config = {name: cell_config[name] for name in CELL_ARGUMENTS}
        config["activity_regularizer"] = keras.regularizers.serialize(self.activity_regularizer)
        config["use_cudnn"] = self.use_cudnn
        base_config = super().get_config()
        del base_config["cell"]
        return {**base_config, **config}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _forward_to_cell(name):
    return property(lambda self: getattr(self.cell, name), doc=f"The cell's `{name}`.")


for _name in CELL_ARGUMENTS:
    setattr(GatedLSTM, _name, _forward_to_cell(_name))
del _name
