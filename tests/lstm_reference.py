"""An LSTM written again in NumPy (float64), option by option, to test the cell against.

It reads a layer's weights by name and shares no code with keras_lstm.
"""

import numpy as np

EPS = 1e-3


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def layer_norm(a, gamma, beta=0.0):
    mean = a.mean(-1, keepdims=True)
    var = a.var(-1, keepdims=True)
    return (a - mean) / np.sqrt(var + EPS) * gamma + beta


def weights_by_name(layer):
    """`{"kernel": array, ...}` for one GatedLSTM (or its cell)."""
    return {w.name: np.asarray(w.numpy(), "float64") for w in layer.weights}


def step(x, h, c, w, opts):
    """One step; returns (gates dict, h, c), with zoneout at its expectation."""
    cifg, peep = opts.get("cifg", False), opts.get("peephole", False)
    xw, hu = x @ w["kernel"], h @ w["recurrent_kernel"]
    if opts.get("layer_norm"):
        xw = layer_norm(xw, w["kernel_norm_gamma"])
        hu = layer_norm(hu, w["recurrent_norm_gamma"])
    z = xw + hu + (w["bias"] if "bias" in w else 0.0)
    if cifg:
        z_f, z_c, z_o = np.split(z, 3, axis=-1)
    else:
        z_i, z_f, z_c, z_o = np.split(z, 4, axis=-1)
    f = sigmoid(z_f + (w["forget_peephole"] * c if peep else 0.0))
    if cifg:
        i = 1.0 - f
    else:
        i = sigmoid(z_i + (w["input_peephole"] * c if peep else 0.0))
    g = np.tanh(z_c)
    c_new = f * c + i * g
    if opts.get("cell_clip") is not None:
        c_new = np.clip(c_new, -opts["cell_clip"], opts["cell_clip"])
    o = sigmoid(z_o + (w["output_peephole"] * c_new if peep else 0.0))
    c_seen = c_new
    if opts.get("layer_norm"):
        c_seen = layer_norm(c_new, w["cell_norm_gamma"], w.get("cell_norm_beta", 0.0))
    h_new = o * np.tanh(c_seen)
    if opts.get("proj_units"):
        h_new = h_new @ w["projection_kernel"]
    zh, zc = opts.get("zoneout_h", 0.0), opts.get("zoneout_c", 0.0)
    h_out = zh * h + (1 - zh) * h_new
    c_out = zc * c + (1 - zc) * c_new
    gates = {"forget": f, "input": i, "candidate": g, "output": o, "cell": c_out}
    gates["hidden"] = h_out
    return gates, h_out, c_out, h_new, c_new


def run(x, w, opts, mask=None, go_backwards=False):
    """Whole sequence, batch-first; returns dict of (B, T, .) arrays indexed by input step."""
    x = np.asarray(x, "float64")
    batch, time, _ = x.shape
    units = w["recurrent_kernel"].shape[1] // (3 if opts.get("cifg") else 4)
    hidden = opts.get("proj_units") or units
    h, c = np.zeros((batch, hidden)), np.zeros((batch, units))
    out = {}
    order = range(time - 1, -1, -1) if go_backwards else range(time)
    for t in order:
        gates, h_new, c_new, _, _ = step(x[:, t], h, c, w, opts)
        if mask is not None:
            keep = mask[:, t : t + 1].astype(bool)
            h_new, c_new = np.where(keep, h_new, h), np.where(keep, c_new, c)
            gates["hidden"], gates["cell"] = h_new, c_new
        h, c = h_new, c_new
        out[t] = gates
    return {k: np.stack([out[t][k] for t in range(time)], axis=1) for k in out[0]}
