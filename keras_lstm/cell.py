"""`GatedLSTMCell`: one LSTM time step, written as the gate equations."""

from __future__ import annotations

from typing import NamedTuple

import keras
from keras import ops

from keras_lstm import _checks, _internals, options


class LSTMGates(NamedTuple):
    """The values one LSTM step computes, each of shape `(batch, units)`.

    `GatedLSTMCell.call(..., return_gates=True)` returns them, and
    `keras_lstm.trace_gates` stacks them over time.

    Example:

    >>> import numpy as np
    >>> from keras_lstm import GatedLSTMCell
    >>> cell = GatedLSTMCell(4)
    >>> x, states = np.ones((2, 3), "float32"), cell.get_initial_state(batch_size=2)
    >>> gates, (h, c) = cell(x, states, return_gates=True)
    >>> gates._fields
    ('forget', 'input', 'candidate', 'output', 'cell', 'hidden')
    >>> bool(np.allclose(gates.hidden, gates.output * np.tanh(gates.cell), atol=1e-6))
    True
    """

    forget: object
    input: object
    candidate: object
    output: object
    cell: object
    hidden: object


# Keras's own cells inherit this mixin; `keras.layers.RNN` recognises it and
# draws each dropout mask once per sequence, outside the time loop.
@keras.saving.register_keras_serializable(package="keras_lstm")
class GatedLSTMCell(keras.layers.Layer, _internals.dropout_rnn_cell()):
    r"""One step of a Long Short-Term Memory network, gate by gate.

    A drop-in for `keras.layers.LSTMCell`: the same arguments, defaults,
    weights (`kernel` (D, 4H), `recurrent_kernel` (H, 4H), `bias` (4H,), gates
    in the order input, forget, candidate, output) and outputs, so
    `set_weights(get_weights())` moves weights either way. What it adds is a
    `call` that reads like the equations it computes:

    $$
    \begin{aligned}
    z_t &= x_t W + h_{t-1} U + b \quad \text{(one fused matmul, split in four)}\\
    f_t &= \sigma(z^f_t) &&\text{forget gate}\\
    i_t &= \sigma(z^i_t) &&\text{input gate}\\
    \tilde C_t &= \tanh(z^c_t) &&\text{candidate}\\
    C_t &= f_t \odot C_{t-1} + i_t \odot \tilde C_t &&\text{new cell state}\\
    o_t &= \sigma(z^o_t) &&\text{output gate}\\
    h_t &= o_t \odot \tanh(C_t) &&\text{new hidden state}
    \end{aligned}
    $$

    with the logistic sigmoid $\sigma(x) = 1 / (1 + e^{-x})$ (`recurrent_activation`)
    and $\tanh$ (`activation`).

    Options, each off by default and free to combine (`keras_lstm.options`
    holds their pieces; docs/variants.md says when to use which):
    `peephole` ($f_t = \sigma(z^f_t + w_f \odot C_{t-1})$, ...),
    `layer_norm` ($z_t = \mathrm{LN}(x_t W) + \mathrm{LN}(h_{t-1} U) + b$,
    $h_t = o_t \odot \tanh \mathrm{LN}(C_t)$), `cifg` ($i_t = 1 - f_t$),
    `proj_units` ($h_t = (o_t \odot \tanh C_t) W_{hr}$), `zoneout_h` /
    `zoneout_c` ($h_t = d_t \odot h_{t-1} + (1 - d_t) \odot \hat h_t$),
    `chrono_init` ($b_f \sim \log \mathcal{U}(1, T_{max} - 1)$, $b_i = -b_f$)
    and `cell_clip` ($C_t \leftarrow \mathrm{clip}(C_t, -c, c)$).

    Args:
        units: Positive integer, the size H of the hidden and cell states.
        activation: Activation for the candidate and for the cell state on its
            way out. Default: `"tanh"`. `None` means linear.
        recurrent_activation: Activation of the three gates. Default:
            `"sigmoid"`. `None` means linear.
        use_bias: Whether the gates have a bias `b`. Default: `True`.
        kernel_initializer: Initializer for `kernel` (W). Default:
            `"glorot_uniform"`.
        recurrent_initializer: Initializer for `recurrent_kernel` (U).
            Default: `"orthogonal"`.
        bias_initializer: Initializer for `bias`. Default: `"zeros"`.
        unit_forget_bias: If `True`, the forget gate's bias starts at 1
            (Jozefowicz et al., 2015) and the others from
            `bias_initializer`. Default: `True`.
        kernel_regularizer: Regularizer for `kernel`. Default: `None`.
        recurrent_regularizer: Regularizer for `recurrent_kernel`.
            Default: `None`.
        bias_regularizer: Regularizer for `bias`. Default: `None`.
        kernel_constraint: Constraint for `kernel`. Default: `None`.
        recurrent_constraint: Constraint for `recurrent_kernel`.
            Default: `None`.
        bias_constraint: Constraint for `bias`. Default: `None`.
        dropout: Float in [0, 1), fraction of the inputs dropped. One mask is
            drawn per sequence and used at every step. Default: `0.0`.
        recurrent_dropout: Float in [0, 1), fraction of `h_{t-1}` dropped
            before the recurrent matmul, one mask per sequence. Default: `0.0`.
        seed: Integer seed for the dropout and zoneout masks and the
            `chrono_init` draw. Default: `None`.
        peephole: Gates read the cell state through diagonal weights
            `input_peephole`, `forget_peephole`, `output_peephole` (start at
            zero). Default: `False`.
        layer_norm: Layer-normalise `x W` and `h U` (gains
            `kernel_norm_gamma`, `recurrent_norm_gamma`) and the cell state on
            its way to `h` (`cell_norm_gamma`, and `cell_norm_beta` when
            `use_bias`). Default: `False`.
        cifg: Couple the input gate to the forget gate, `i = 1 - f`; the
            kernels then hold three gates (forget, candidate, output).
            Default: `False`.
        proj_units: Integer P < `units`: project `h` to P features through
            `projection_kernel` (H, P); states become `[h (P), c (units)]`.
            Default: `None` (no projection).
        zoneout_h: Float in [0, 1), probability that a unit of `h` keeps its
            previous value at a training step (expectation in inference).
            Default: `0.0`.
        zoneout_c: As `zoneout_h`, for the cell state. Default: `0.0`.
        chrono_init: Number T_max >= 2: start the forget bias at
            `log(U(1, T_max - 1))` and the input bias at its negative
            (overrides `unit_forget_bias` for those gates); needs `use_bias`.
            Default: `None`.
        cell_clip: Positive number c: clip the cell state to [-c, c].
            Default: `None`.
        **kwargs: Base `keras.layers.Layer` arguments (`name`, `dtype`, ...),
            and `implementation` (1 or 2), accepted as `keras.layers.LSTMCell`
            accepts it; both give the same maths here.

    Call arguments:
        inputs: `(batch, features)`, the step's input $x_t$.
        states: `[h, c]`, each `(batch, units)`.
        training: Whether dropout applies. Default: `False`.
        return_gates: If `True`, return an `LSTMGates` tuple instead of `h` as
            the first element. Default: `False`.

    Returns:
        `(h, [h, c])`, or `(LSTMGates, [h, c])` with `return_gates=True`.

    Example:

    >>> import numpy as np, keras
    >>> from keras_lstm import GatedLSTMCell
    >>> rnn = keras.layers.RNN(GatedLSTMCell(4), return_sequences=True)
    >>> tuple(rnn(np.zeros((2, 10, 3), "float32")).shape)
    (2, 10, 4)
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
        kernel_constraint=None,
        recurrent_constraint=None,
        bias_constraint=None,
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        seed: int | None = None,
        **kwargs,
    ):
        # The options (`peephole=False`, ...) arrive in kwargs, declared once in
        # `options.OPTIONS`, which checks them below.
        given = {name: kwargs.pop(name) for name in options.names() if name in kwargs}
        # Keras's LSTMCell takes `implementation` (1: a product per gate, 2: one
        # product for all four) in its kwargs. Both are the same maths; this
        # cell always writes the four gates out, so it only checks and keeps it.
        implementation = kwargs.pop("implementation", 2)
        super().__init__(**kwargs)
        if isinstance(implementation, bool) or implementation not in (1, 2):
            raise ValueError(
                "`implementation` must be 1 or 2 (keras.layers.LSTMCell's modes, which compute "
                f"the same gates), got {implementation!r}."
            )
        self.implementation = int(implementation)
        self.units = _checks.positive_int("units", units)
        self.activation = _checks.activation("activation", activation)
        self.recurrent_activation = _checks.activation("recurrent_activation", recurrent_activation)
        self.use_bias = _checks.boolean("use_bias", use_bias)
        self.kernel_initializer = _checks.initializer("kernel_initializer", kernel_initializer)
        self.recurrent_initializer = _checks.initializer(
            "recurrent_initializer", recurrent_initializer
        )
        self.bias_initializer = _checks.initializer("bias_initializer", bias_initializer)
        self.unit_forget_bias = _checks.boolean("unit_forget_bias", unit_forget_bias)
        self.kernel_regularizer = _checks.regularizer("kernel_regularizer", kernel_regularizer)
        self.recurrent_regularizer = _checks.regularizer(
            "recurrent_regularizer", recurrent_regularizer
        )
        self.bias_regularizer = _checks.regularizer("bias_regularizer", bias_regularizer)
        self.kernel_constraint = _checks.constraint("kernel_constraint", kernel_constraint)
        self.recurrent_constraint = _checks.constraint("recurrent_constraint", recurrent_constraint)
        self.bias_constraint = _checks.constraint("bias_constraint", bias_constraint)
        self.dropout = _checks.rate("dropout", dropout)
        self.recurrent_dropout = _checks.rate("recurrent_dropout", recurrent_dropout)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed=seed)
        checked = options.check_options(given, units=self.units, use_bias=self.use_bias)
        for name, value in checked.items():
            setattr(self, name, value)
        # The pieces `call` composes; each is the identity when its option is off.
        self._gates = options.GateLayout(self.cifg)
        self._layer_norm = options.LayerNorm(self.layer_norm)
        self._peephole = options.Peephole(self.peephole)
        self._clip = options.CellClip(self.cell_clip)
        self._projection = options.Projection(self.proj_units)
        self._zoneout = options.Zoneout(self.zoneout_h, self.zoneout_c)
        hidden_size = self._projection.hidden_size(self.units)
        self.state_size = [hidden_size, self.units]
        self.output_size = hidden_size

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(
                f"`inputs` must have a known feature size (last axis), got shape {input_shape}."
            )
        self.kernel = self.add_weight(
            shape=(input_dim, self._gates.count * self.units),
            name="kernel",
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.recurrent_kernel = self.add_weight(
            shape=(self.state_size[0], self._gates.count * self.units),
            name="recurrent_kernel",
            initializer=self.recurrent_initializer,
            regularizer=self.recurrent_regularizer,
            constraint=self.recurrent_constraint,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                shape=(self._gates.count * self.units,),
                name="bias",
                initializer=options.gate_bias_initializer(
                    self._gates,
                    self.units,
                    self.bias_initializer,
                    self.unit_forget_bias,
                    self.chrono_init,
                    self.seed,
                ),
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        # Option weights come after the three above, so a plain cell's are unchanged.
        self._peephole.build(self, self._gates)
        self._layer_norm.build(self, self._gates.count * self.units)
        self._projection.build(self)
        rnn = _internals.layer_building(self)
        if rnn is not None and not getattr(rnn, "_runs_routes", False):
            from keras_lstm import _routes

            _routes.follow_routes(rnn)  # keras.layers.RNN(GatedLSTMCell(...)): see there

    def call(self, inputs, states, training=False, return_gates=False):
        inputs = _checks.float_inputs("inputs", inputs, self.compute_dtype)
        self._check_step(inputs, states)
        h_prev, c_prev = states[0], states[1]
        x, h_in = self._apply_dropout(inputs, h_prev, training)
        sigmoid, tanh = self.recurrent_activation, self.activation
        norm, peephole = self._layer_norm, self._peephole

        # One fused matmul per input gives the pre-activations of all gates.
        z = norm.gates(ops.matmul(x, self.kernel), ops.matmul(h_in, self.recurrent_kernel))
        if self.use_bias:
            z = z + self.bias
        z_input, z_forget, z_candidate, z_output = self._gates.split(z)

        forget_gate = sigmoid(peephole.forget(z_forget, c_prev))  # what to keep of C_{t-1}
        # How much of the candidate to let in (1 - forget_gate with cifg).
        input_gate = self._gates.input_gate(sigmoid, peephole.input(z_input, c_prev), forget_gate)
        candidate = tanh(z_candidate)  # new information, C~_t
        c = self._clip(forget_gate * c_prev + input_gate * candidate)  # C_t
        output_gate = sigmoid(peephole.output(z_output, c))  # what part of the memory to show
        h = self._projection(output_gate * tanh(norm.cell(c)))  # h_t
        # Zoneout (when on) lets some units keep their previous values.
        h, c = self._zoneout(h, c, h_prev, c_prev, training, self.seed_generator)

        if return_gates:
            return LSTMGates(forget_gate, input_gate, candidate, output_gate, c, h), [h, c]
        return h, [h, c]

    def _apply_dropout(self, inputs, h_prev, training):
        if training and self.dropout > 0:
            inputs = inputs * self.get_dropout_mask(inputs)
        if training and self.recurrent_dropout > 0:
            h_prev = h_prev * self.get_recurrent_dropout_mask(h_prev)
        return inputs, h_prev

    def _check_step(self, inputs, states):
        expected = self.kernel.shape[0]
        got = inputs.shape[-1]
        if len(inputs.shape) != 2:
            raise ValueError(
                "`inputs` of a cell step must be 2D (batch, features), got shape "
                f"{tuple(inputs.shape)}."
            )
        if got is not None and got != expected:
            raise ValueError(
                f"`inputs` has {got} features (last axis of shape {tuple(inputs.shape)}), "
                f"but the cell was built for {expected}."
            )
        _checks.step_states("states", states, self.state_size, inputs.shape[0])

    @property
    def is_standard_lstm(self) -> bool:
        """Whether this cell computes exactly `keras.layers.LSTMCell`'s maths:
        tanh and sigmoid activations and no option that changes the equations
        (`chrono_init` only changes where the bias starts, so it keeps the cell
        standard). Which path runs a layer is decided in `keras_lstm._routes`."""
        return not options.maths_changes(self) and self.has_standard_activations

    @property
    def has_standard_activations(self) -> bool:
        """Whether the activations are the LSTM's own: tanh and sigmoid."""
        return not options.activation_changes(self)

    def options_changing_maths(self) -> list[str]:
        """The names of the options turned on that change the equations (not
        `chrono_init`, which only sets where the bias starts)."""
        return options.maths_changes(self)

    def get_initial_state(self, batch_size=None):
        return [ops.zeros((batch_size, size), dtype=self.compute_dtype) for size in self.state_size]

    def get_config(self):
        activation, initializer = keras.activations.serialize, keras.initializers.serialize
        regularizer, constraint = keras.regularizers.serialize, keras.constraints.serialize
        config = {
            "units": self.units,
            "activation": activation(self.activation),
            "recurrent_activation": activation(self.recurrent_activation),
            "use_bias": self.use_bias,
            "kernel_initializer": initializer(self.kernel_initializer),
            "recurrent_initializer": initializer(self.recurrent_initializer),
            "bias_initializer": initializer(self.bias_initializer),
            "unit_forget_bias": self.unit_forget_bias,
            "kernel_regularizer": regularizer(self.kernel_regularizer),
            "recurrent_regularizer": regularizer(self.recurrent_regularizer),
            "bias_regularizer": regularizer(self.bias_regularizer),
            "kernel_constraint": constraint(self.kernel_constraint),
            "recurrent_constraint": constraint(self.recurrent_constraint),
            "bias_constraint": constraint(self.bias_constraint),
            "dropout": self.dropout,
            "recurrent_dropout": self.recurrent_dropout,
            "seed": self.seed,
            **{name: getattr(self, name) for name in options.names()},
        }
        return {**super().get_config(), **config}
