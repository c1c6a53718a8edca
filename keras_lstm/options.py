r"""The cell's options, each a small piece that `GatedLSTMCell.call` composes.

Every piece is the identity when its option is off, so the cell's step reads
the same whichever options are on, and with all of them off it computes
exactly `keras.layers.LSTMCell` (no extra weight, no extra op). A piece that
owns weights creates them on the cell with `cell.add_weight`, after the
cell's own `kernel`, `recurrent_kernel` and `bias`, so weight order (and so
`get_weights`, `.keras` files and checkpoints) of a plain cell is unchanged.

The pieces, in the order the step uses them:

- `GateLayout` (`cifg`): which gates have weights, and the input gate
  $i_t = 1 - f_t$ when the input and forget gates are coupled.
- `LayerNorm` (`layer_norm`): $z_t = \mathrm{LN}(x_t W) + \mathrm{LN}(h_{t-1} U) + b$
  and $h_t = o_t \odot \tanh(\mathrm{LN}(C_t))$.
- `Peephole` (`peephole`): the gates also look at the cell state,
  $f_t = \sigma(z^f_t + w_f \odot C_{t-1})$, $i_t = \sigma(z^i_t + w_i \odot C_{t-1})$,
  $o_t = \sigma(z^o_t + w_o \odot C_t)$.
- `CellClip` (`cell_clip`): $C_t \leftarrow \mathrm{clip}(C_t, -c, c)$.
- `Projection` (`proj_units`): $h_t = (o_t \odot \tanh C_t)\, W_{hr}$.
- `Zoneout` (`zoneout_h`, `zoneout_c`): each unit keeps its previous value
  with probability $z$ in training, and $z h_{t-1} + (1 - z) h_t$ in inference.
- `gate_bias_initializer` (`unit_forget_bias`, `chrono_init`): the bias
  each gate starts from.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import keras
from keras import ops

from keras_lstm import _checks

# Same default as keras.layers.LayerNormalization.
LAYER_NORM_EPSILON = 1e-3


class GateLayout:
    """Which gates own weights: input, forget, candidate, output, or without
    the input gate when it is coupled to the forget gate (`cifg=True`):

    $$ i_t = 1 - f_t $$

    (Greff et al., 2017, "LSTM: A Search Space Odyssey"). The kernels then
    hold three gates, in the order forget, candidate, output.
    """

    def __init__(self, cifg: bool):
        self.cifg = cifg
        self.names = ("forget", "candidate", "output") if cifg else _KERAS_ORDER
        self.count = len(self.names)

    def split(self, z):
        """`(z_input, z_forget, z_candidate, z_output)`; `z_input` is None with cifg."""
        parts = dict(zip(self.names, ops.split(z, self.count, axis=-1), strict=True))
        return parts.get("input"), parts["forget"], parts["candidate"], parts["output"]

    def input_gate(self, sigmoid, z_input, forget_gate):
        if self.cifg:
            return 1.0 - forget_gate
        return sigmoid(z_input)


_KERAS_ORDER = ("input", "forget", "candidate", "output")


class LayerNorm:
    r"""Layer normalisation of the recurrent step (Ba, Kiros & Hinton, 2016):

    $$
    z_t = \mathrm{LN}(x_t W; \gamma_x) + \mathrm{LN}(h_{t-1} U; \gamma_h) + b,\qquad
    h_t = o_t \odot \tanh(\mathrm{LN}(C_t; \gamma_c, \beta_c))
    $$

    with $\mathrm{LN}(a; \gamma, \beta) = \gamma \odot (a - \mu_a) / \sqrt{\sigma^2_a
    + \epsilon} + \beta$ over the features of each sample. The two gate
    normalisations have a gain only: the cell's `bias` is their shift. The
    cell state carried to the next step is not normalised; only its view
    through the output gate is. With `use_bias=False` the cell-state
    normalisation has no shift $\beta_c$ either.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def build(self, cell, gate_width: int):
        if not self.enabled:
            return
        ones, zeros = keras.initializers.Ones(), keras.initializers.Zeros()
        self.kernel_gamma = cell.add_weight(
            shape=(gate_width,), name="kernel_norm_gamma", initializer=ones
        )
        self.recurrent_gamma = cell.add_weight(
            shape=(gate_width,), name="recurrent_norm_gamma", initializer=ones
        )
        self.cell_gamma = cell.add_weight(
            shape=(cell.units,), name="cell_norm_gamma", initializer=ones
        )
        self.cell_beta = None
        if cell.use_bias:
            self.cell_beta = cell.add_weight(
                shape=(cell.units,), name="cell_norm_beta", initializer=zeros
            )

    def gates(self, xw, hu):
        if not self.enabled:
            return xw + hu
        return _normalize(xw, self.kernel_gamma) + _normalize(hu, self.recurrent_gamma)

    def cell(self, c):
        if not self.enabled:
            return c
        return _normalize(c, self.cell_gamma, self.cell_beta)

    def stacked(self, cell):
        """`[γx, γh, γc, βc]` in one vector, as the native kernel takes them (βc
        zeros without a bias: the cell state's norm then has no shift)."""
        shift = self.cell_beta if self.cell_beta is not None else ops.zeros((cell.units,))
        gains = (self.kernel_gamma, self.recurrent_gamma, self.cell_gamma, shift)
        return ops.concatenate([ops.cast(w, cell.compute_dtype) for w in gains])


def _normalize(a, gamma, beta=None):
    mean = ops.mean(a, axis=-1, keepdims=True)
    variance = ops.var(a, axis=-1, keepdims=True)
    a = (a - mean) * ops.rsqrt(variance + LAYER_NORM_EPSILON) * gamma
    return a if beta is None else a + beta


class Peephole:
    r"""Peephole connections (Gers & Schmidhuber, 2000): the gates read the cell.

    $$
    f_t = \sigma(z^f_t + w_f \odot C_{t-1}),\quad
    i_t = \sigma(z^i_t + w_i \odot C_{t-1}),\quad
    o_t = \sigma(z^o_t + w_o \odot C_t)
    $$

    The diagonal weights $w$ start at zero, so a fresh cell starts as a plain
    LSTM. With `cifg=True` there is no $w_i$ (the input gate is $1 - f_t$).
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.weights = {}

    def build(self, cell, layout: GateLayout):
        if not self.enabled:
            return
        for gate in ("input", "forget", "output"):
            if gate in layout.names:
                self.weights[gate] = cell.add_weight(
                    shape=(cell.units,),
                    name=f"{gate}_peephole",
                    initializer=keras.initializers.Zeros(),
                )

    def input(self, z, c):
        return self._look(z, c, "input")

    def forget(self, z, c):
        return self._look(z, c, "forget")

    def output(self, z, c):
        return self._look(z, c, "output")

    def stacked(self, cell):
        """`[w_i, w_f, w_o]` as one (3, H) tensor, as the native kernel takes them;
        with cifg there is no `w_i`, and zeros stand in (the kernel reads none)."""
        weights = {gate: ops.cast(w, cell.compute_dtype) for gate, w in self.weights.items()}
        unused = ops.zeros_like(weights["forget"])
        return ops.stack([weights.get("input", unused), weights["forget"], weights["output"]])

    def _look(self, z, c, gate):
        if gate not in self.weights:
            return z
        return z + self.weights[gate] * c


class CellClip:
    r"""Clip the cell state, as TensorFlow 1's `LSTMCell(cell_clip=c)`:

    $$ C_t \leftarrow \max(-c, \min(c, C_t)) $$

    applied before the output gate and the hidden state read it.
    """

    def __init__(self, value: float | None):
        self.value = value

    def __call__(self, c):
        if self.value is None:
            return c
        return ops.clip(c, -self.value, self.value)


class Projection:
    r"""A linear projection of the hidden state (Sak et al., 2014), as
    `torch.nn.LSTM(proj_size=P)`:

    $$ h_t = (o_t \odot \tanh C_t)\, W_{hr},\qquad W_{hr} \in \mathbb{R}^{H \times P} $$

    The states are `[h (P), C (H)]`, the recurrent kernel is `(P, gates*H)`
    and the output has P features. `projection_kernel` uses the cell's
    kernel initializer, regularizer and constraint.
    """

    def __init__(self, units: int | None):
        self.units = units

    def hidden_size(self, cell_units: int) -> int:
        return cell_units if self.units is None else self.units

    def build(self, cell):
        if self.units is None:
            return
        self.kernel = cell.add_weight(
            shape=(cell.units, self.units),
            name="projection_kernel",
            initializer=cell.kernel_initializer,
            regularizer=cell.kernel_regularizer,
            constraint=cell.kernel_constraint,
        )

    def __call__(self, m):
        if self.units is None:
            return m
        return ops.matmul(m, self.kernel)


class Zoneout:
    r"""Zoneout (Krueger et al., 2017): units keep their previous value at random.

    In training, with a fresh Bernoulli mask $d_t$ per step and unit,

    $$ h_t = d^h_t \odot h_{t-1} + (1 - d^h_t) \odot \hat h_t,\qquad
       C_t = d^c_t \odot C_{t-1} + (1 - d^c_t) \odot \hat C_t,\qquad
       d \sim \mathrm{Bernoulli}(z) $$

    and in inference the expectation, $h_t = z_h h_{t-1} + (1 - z_h) \hat h_t$
    (and so for $C_t$). $\hat h_t$ and $\hat C_t$ are the plain LSTM's new
    states; $\hat h_t$ reads $\hat C_t$, as in the paper.
    """

    def __init__(self, rate_h: float, rate_c: float):
        self.rate_h = rate_h
        self.rate_c = rate_c

    def __call__(self, h, c, h_prev, c_prev, training, seed_generator):
        return (
            _zoneout(h, h_prev, self.rate_h, training, seed_generator),
            _zoneout(c, c_prev, self.rate_c, training, seed_generator),
        )


def _zoneout(new, prev, rate, training, seed_generator):
    if rate == 0.0:
        return new
    if training:
        if keras.backend.backend() == "jax":
            # Inside jax.lax.scan the seed generator's state cannot advance, so
            # every step (and every batch) would reuse one mask.
            raise NotImplementedError(
                "`zoneout_h` and `zoneout_c` need a new random mask at every training step, "
                "which Keras's JAX loop cannot draw. Train with zoneout under the TensorFlow "
                "or torch backend; inference (which uses the expectation) runs on JAX."
            )
        keep_prev = keras.random.uniform(ops.shape(new), seed=seed_generator) < rate
        return ops.where(keep_prev, prev, new)
    return rate * prev + (1.0 - rate) * new


def gate_bias_initializer(
    layout: GateLayout,
    units: int,
    bias_initializer,
    unit_forget_bias: bool,
    chrono_init: float | None,
    seed: int | None,
):
    r"""The initializer of the cell's `bias`, gate by gate.

    - By default every gate draws from `bias_initializer`.
    - `unit_forget_bias=True`: the forget gate starts at 1 (Jozefowicz et al., 2015).
    - `chrono_init=T_max` (Tallec & Ollivier, 2018, "Can recurrent neural
      networks warp time?") overrides both for the forget and input gates:

      $$ b_f \sim \log(\mathcal{U}(1, T_{max} - 1)),\qquad b_i = -b_f $$

      so that the forget gates' characteristic times spread over
      $[1, T_{max}]$. With `cifg=True` there is no $b_i$: the coupled gate
      $1 - \sigma(z^f) = \sigma(-z^f)$ already gives it.
    """

    def initialize(shape, dtype=None):
        h = units
        chrono_forget = None
        if chrono_init is not None:
            uniform = keras.initializers.RandomUniform(1.0, chrono_init - 1.0, seed=seed)
            chrono_forget = ops.log(uniform((h,), dtype=dtype))
        slices = []
        for gate in layout.names:
            if gate == "forget" and chrono_forget is not None:
                slices.append(chrono_forget)
            elif gate == "input" and chrono_forget is not None:
                slices.append(-chrono_forget)
            elif gate == "forget" and unit_forget_bias:
                slices.append(ops.ones((h,), dtype=dtype))
            else:
                slices.append(bias_initializer((h,), dtype=dtype))
        return ops.concatenate(slices)

    return initialize


class Option(NamedTuple):
    """One cell option, declared once in `OPTIONS`.

    The cell's and the layer's arguments, their checks, `get_config`, the
    layer's forwarding, the route a layer takes (`keras_lstm._routes`) and the
    native kernel's inputs are all read from this declaration.

    - `name`, `default`: the argument and its value when off.
    - `check(name, value, arguments)`: the value normalised, or an error that
      names the argument; `arguments` holds the cell's other checked ones
      (`units`, `use_bias`, the options before this one).
    - `changes_maths`: whether turning it on changes the equations (not
      `chrono_init`, which only sets where the bias starts).
    - `native_inputs(cell, draw)`: the fields of `kernels.CellOptions` that
      carry it into the native kernel (`draw(state)` gives zoneout's masks),
      or `None` where the native kernel does not compute it.
    """

    name: str
    default: Any
    check: Callable[[str, Any, dict], Any]
    changes_maths: bool = True
    native_inputs: Callable[[Any, Callable], dict] | None = None


def _boolean(name, value, arguments):
    return _checks.boolean(name, value)


def _rate(name, value, arguments):
    return _checks.rate(name, value)


def _proj_units(name, value, arguments):
    if value is None:
        return None
    value = _checks.positive_int(name, value)
    if value >= arguments["units"]:
        raise ValueError(
            f"`{name}` must be smaller than `units` ({arguments['units']}) to project the "
            f"hidden state down, got {value}. Pass {name}=None for no projection."
        )
    return value


def _chrono_init(name, value, arguments):
    if value is None:
        return None
    if not _real(value) or not value >= 2:
        raise ValueError(
            f"`{name}` must be a number >= 2, the longest dependency to expect in "
            f"time steps (T_max of b_f ~ log(U(1, T_max - 1))), got {value!r}."
        )
    if not arguments["use_bias"]:
        raise ValueError(
            f"`{name}` sets the forget and input gate biases, so it needs "
            "`use_bias=True`; got use_bias=False."
        )
    return float(value)


def _cell_clip(name, value, arguments):
    if value is None:
        return None
    if not _real(value) or not value > 0:
        raise ValueError(f"`{name}` must be a positive number or None, got {value!r}.")
    return float(value)


def _cast(cell, weight):
    return ops.cast(weight, cell.compute_dtype)


OPTIONS: tuple[Option, ...] = (
    Option(
        "peephole",
        False,
        _boolean,
        native_inputs=lambda cell, draw: {"peephole": cell._peephole.stacked(cell)},
    ),
    Option(
        "layer_norm",
        False,
        _boolean,
        native_inputs=lambda cell, draw: {"layer_norm": cell._layer_norm.stacked(cell)},
    ),
    Option("cifg", False, _boolean, native_inputs=lambda cell, draw: {"cifg": True}),
    Option(
        "proj_units",
        None,
        _proj_units,
        native_inputs=lambda cell, draw: {"projection": _cast(cell, cell._projection.kernel)},
    ),
    Option(
        "zoneout_h",
        0.0,
        _rate,
        native_inputs=lambda cell, draw: {"zoneout_h": draw("h"), "zoneout_h_rate": cell.zoneout_h},
    ),
    Option(
        "zoneout_c",
        0.0,
        _rate,
        native_inputs=lambda cell, draw: {"zoneout_c": draw("c"), "zoneout_c_rate": cell.zoneout_c},
    ),
    Option("chrono_init", None, _chrono_init, changes_maths=False),
    Option(
        "cell_clip",
        None,
        _cell_clip,
        native_inputs=lambda cell, draw: {"cell_clip": cell.cell_clip},
    ),
)


def names() -> tuple[str, ...]:
    """Every option's argument name, in declaration order."""
    return tuple(option.name for option in OPTIONS)


def check_options(given: dict, *, units: int, use_bias: bool) -> dict:
    """Every option's value from `given` (the default where absent), checked and normalised."""
    arguments = {"units": units, "use_bias": use_bias}
    for option in OPTIONS:
        arguments[option.name] = option.check(
            option.name, given.get(option.name, option.default), arguments
        )
    return {option.name: arguments[option.name] for option in OPTIONS}


def maths_changes(cell) -> list[str]:
    """The options turned on in `cell` that change the equations."""
    return [o.name for o in OPTIONS if o.changes_maths and getattr(cell, o.name)]


def not_in_native_kernel(cell) -> list[str]:
    """The options turned on in `cell` that change the equations and that the native
    kernel does not compute."""
    return [
        o.name
        for o in OPTIONS
        if o.changes_maths and o.native_inputs is None and getattr(cell, o.name)
    ]


def activation_changes(cell) -> list[str]:
    """`["activation='relu'", ...]` for each activation of `cell` that is not the LSTM's
    own (tanh, and sigmoid for the gates): by name and the library that defines it, so
    that no backend module is loaded to ask."""
    changes = []
    for name, standard in (("activation", "tanh"), ("recurrent_activation", "sigmoid")):
        function = getattr(cell, name)
        value = getattr(function, "__name__", type(function).__name__)
        library = (getattr(function, "__module__", None) or "").split(".")[0]
        if value != standard or library not in _ACTIVATION_LIBRARIES:
            changes.append(f"{name}={value!r}")
    return changes


# Where a `tanh` or `sigmoid` is the function of that name.
_ACTIVATION_LIBRARIES = ("keras", "numpy", "jax", "jaxlib", "torch", "tensorflow")


def native_inputs(cell, draw) -> dict:
    """The `kernels.CellOptions` fields of the options on in `cell` (see `Option`)."""
    fields = {}
    for option in OPTIONS:
        if option.native_inputs is not None and getattr(cell, option.name):
            fields.update(option.native_inputs(cell, draw))
    return fields


def _real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real)
