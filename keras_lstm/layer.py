"""`GatedLSTM`: the recurrent layer around `GatedLSTMCell`."""

from __future__ import annotations

import keras
from keras import ops

from keras_lstm import _checks, _internals, _routes, options
from keras_lstm._routes import Route
from keras_lstm.cell import GatedLSTMCell

# The constructor arguments that belong to the cell besides its options
# (`options.OPTIONS`). Each is also readable on the layer (`layer.units`,
# `layer.dropout`, `layer.peephole`, ...), forwarded to the cell.
BASE_CELL_ARGUMENTS = (
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
)


def cell_arguments() -> tuple[str, ...]:
    """Every constructor argument of the layer that belongs to its cell."""
    return BASE_CELL_ARGUMENTS + options.names()


@keras.saving.register_keras_serializable(package="keras_lstm")
class GatedLSTM(keras.layers.RNN):
    """Long Short-Term Memory layer whose cell is `GatedLSTMCell`.

    A drop-in for `keras.layers.LSTM`: the same arguments, defaults, weights
    and outputs. It never turns XLA off for the model around it (where
    `keras.layers.LSTM` on a GPU switches to cuDNN and disables
    `jit_compile`).

    How the sequence runs is decided once per trace by `keras_lstm._routes`
    (`keras-lstm doctor` prints the choice for this machine, with the reason
    where it is not the fastest): on a CPU under TensorFlow, a native fused
    kernel with its own gradient (under XLA as a custom call), which also
    computes every cell option; on a GPU, for the standard LSTM, the same
    cuDNN call `keras.layers.LSTM` makes (TensorFlow outside XLA, JAX, torch),
    else a `tf.while_loop`; in exports, TensorFlow ops in the form each
    converter takes. Otherwise Keras's step loop calls the cell's `call`,
    which is also the reference every other route is tested against. All
    give the same numbers.

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
        use_cudnn: `"auto"`: cuDNN on a GPU where it computes the same
            maths (the standard LSTM, a bias, no recurrent dropout, no mask;
            outside XLA on TensorFlow). `True`: the same, a `ValueError`
            with the reason where a call cannot run it, and, as in
            `keras.layers.LSTM`, no XLA for the model around it on
            TensorFlow. `False`: never. Default: `"auto"`.
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

    _runs_routes = True  # `_routes.decide` picks its path (see `inner_loop`)

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
        return_sequences: bool = False,
        return_state: bool = False,
        go_backwards: bool = False,
        stateful: bool = False,
        unroll: bool = False,
        use_cudnn="auto",
        **kwargs,
    ):
        if use_cudnn not in ("auto", True, False):
            raise ValueError(f"`use_cudnn` must be 'auto', True or False, got {use_cudnn!r}.")
        arguments = {**locals(), **{n: kwargs.pop(n) for n in options.names() if n in kwargs}}
        cell = GatedLSTMCell(
            **{name: arguments[name] for name in cell_arguments() if name in arguments},
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
        if use_cudnn is True and keras.backend.backend() == "tensorflow":
            # As keras.layers.LSTM: cuDNN does not run under XLA, so a model
            # around the layer compiles without it (jit_compile="auto").
            self.supports_jit = False
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
        # `_routes.decide` picks the path; each branch below only runs it.
        if keras.tree.is_nested(mask):
            mask = mask[0]
        batch_and_steps = tuple(sequences.shape)[:2]  # None where free
        decision = _routes.decide(self, batch_and_steps, mask, training)
        if decision.route is Route.CUDNN:
            return self._cudnn_loop(sequences, initial_state, mask, training)
        if decision.route is Route.STEP_LOOP_UNROLLED:
            return _unrolled(self, self._step_loop, sequences, initial_state, mask, training)
        if decision.route is Route.STEP_LOOP:
            return self._step_loop(sequences, initial_state, mask, training)
        return self._fused_loop(decision.route, sequences, initial_state, mask, training)

    def _step_loop(self, sequences, initial_state, mask, training):
        """Keras's step loop around the cell's `call`: the reference the others match."""
        if self.unroll and self.go_backwards and mask is not None and self.zero_output_for_mask:
            return self._unrolled_backwards_loop(sequences, initial_state, mask, training)
        return super().inner_loop(sequences, initial_state, mask, training=training)

    def _cudnn_loop(self, sequences, initial_state, mask, training):
        """The backend's cuDNN LSTM, which `keras.layers.LSTM.inner_loop` calls too."""
        cell = self.cell
        dropped = sequences
        if training and cell.dropout > 0:
            dropped = sequences * cell.get_dropout_mask(sequences[:, 0, :])[:, None, :]
        try:
            return _internals.backend_lstm()(
                dropped,
                initial_state[0],
                initial_state[1],
                mask,
                kernel=cell.kernel,
                recurrent_kernel=cell.recurrent_kernel,
                bias=cell.bias,
                activation=cell.activation,
                recurrent_activation=cell.recurrent_activation,
                return_sequences=self.return_sequences,
                go_backwards=self.go_backwards,
                unroll=self.unroll,
            )
        except NotImplementedError:  # the backend found it cannot, at trace time
            fallback = _routes.Decision(Route.STEP_LOOP, "the backend's cuDNN LSTM refused")
            if self.use_cudnn is True:
                _routes.refuse_cudnn(self.name, fallback)
            if keras.backend.backend() == "tensorflow":
                return self._fused_loop(Route.LOOP, sequences, initial_state, mask, training)
            return self._step_loop(sequences, initial_state, mask, training)

    def _fused_loop(self, route, sequences, initial_state, mask, training):
        """One of `kernels.lstm_recurrence`'s routes over the whole sequence."""
        from keras_lstm import kernels

        cell = self.cell
        if training and cell.dropout > 0:
            # One mask per sequence, the one the cell would draw.
            sequences = sequences * cell.get_dropout_mask(sequences[:, 0, :])[:, None, :]
        recurrent_mask = None
        if training and cell.recurrent_dropout > 0:
            # Likewise: the mask on h_{t-1} the cell's `call` would apply at every step.
            recurrent_mask = cell.get_recurrent_dropout_mask(initial_state[0])
        steps_and_batch = (ops.shape(sequences)[1], ops.shape(sequences)[0])
        cell_options = None
        if not cell.is_standard_lstm:

            def draw(state):
                return self._zoneout_masks(state, steps_and_batch) if training else None

            cell_options = kernels.CellOptions(**options.native_inputs(cell, draw))
        sequence = kernels.Sequence(
            sequences,
            cell.kernel,
            cell.recurrent_kernel,
            cell.bias,
            initial_state[0],
            initial_state[1],
            mask=mask,
            recurrent_mask=recurrent_mask,
            options=cell_options,
            training=training,
            return_sequences=self.return_sequences,
        )
        return kernels.lstm_recurrence(
            route.value, sequence, self.go_backwards, self.zero_output_for_mask
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
        config = {name: cell_config[name] for name in cell_arguments()}
        config["activity_regularizer"] = keras.regularizers.serialize(self.activity_regularizer)
        config["use_cudnn"] = self.use_cudnn
        base_config = super().get_config()
        del base_config["cell"]
        return {**base_config, **config}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __getattr__(self, name):
        # Only for names not found otherwise: each cell argument (options
        # included) is readable on the layer, as `layer.units`, `layer.peephole`.
        if name in cell_arguments():
            return getattr(self.cell, name)
        # The torch backend's layers are torch modules, which find their submodules here.
        parent = getattr(super(), "__getattr__", None)
        if parent is not None:
            return parent(name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")


def _unrolled(layer, run, *arguments):
    """`run(*arguments)` with `layer.unroll` on: Keras's step loop writes every step out."""
    unroll, layer.unroll = layer.unroll, True
    try:
        return run(*arguments)
    finally:
        layer.unroll = unroll
