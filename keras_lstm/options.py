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
from typing import Any

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


def check_options(
    *,
    units: int,
    use_bias: bool,
    peephole: Any,
    layer_norm: Any,
    cifg: Any,
    proj_units: Any,
    zoneout_h: Any,
    zoneout_c: Any,
    chrono_init: Any,
    cell_clip: Any,
) -> dict:
    """Check the option arguments together; return them normalised."""
    options = {
        name: _checks.boolean(name, value)
        for name, value in [("peephole", peephole), ("layer_norm", layer_norm), ("cifg", cifg)]
    }
    if proj_units is not None:
        proj_units = _checks.positive_int("proj_units", proj_units)
        if proj_units >= units:
            raise ValueError(
                f"`proj_units` must be smaller than `units` ({units}) to project the "
                f"hidden state down, got {proj_units}. Pass proj_units=None for no projection."
            )
    options["proj_units"] = proj_units
    options["zoneout_h"] = _checks.rate("zoneout_h", zoneout_h)
    options["zoneout_c"] = _checks.rate("zoneout_c", zoneout_c)
    if chrono_init is not None:
        if not _real(chrono_init) or not chrono_init >= 2:
            raise ValueError(
                "`chrono_init` must be a number >= 2, the longest dependency to expect in "
                f"time steps (T_max of b_f ~ log(U(1, T_max - 1))), got {chrono_init!r}."
            )
        if not use_bias:
            raise ValueError(
                "`chrono_init` sets the forget and input gate biases, so it needs "
                "`use_bias=True`; got use_bias=False."
            )
        chrono_init = float(chrono_init)
    options["chrono_init"] = chrono_init
    if cell_clip is not None:
        if not _real(cell_clip) or not cell_clip > 0:
            raise ValueError(f"`cell_clip` must be a positive number or None, got {cell_clip!r}.")
        cell_clip = float(cell_clip)
    options["cell_clip"] = cell_clip
    return options


def _real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real)
