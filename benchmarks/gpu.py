"""Times GatedLSTM against keras.layers.LSTM and torch.nn.LSTM on a GPU, under JAX.

Run `python benchmarks/gpu.py` (or `python -m benchmarks.gpu`) on a machine
with a CUDA build of JAX and of torch; TensorFlow is not needed, nor imported.
For each shape (B, T, D, H) it times, in this one process, interleaved round
by round in a rotating order as `benchmarks.run` does:

- `GatedLSTM(H)`, `GatedLSTM(H, peephole=True)` and `keras.layers.LSTM(H)`,
  each through `layer.stateless_call` inside `jax.jit`: `inference` is the
  forward pass (`return_sequences=False`), `training` is
  `jax.value_and_grad` of a mean-squared loss with respect to the layer's
  trainable weights and the inputs;
- `torch.nn.LSTM` on CUDA (cuDNN), batch-first: the forward pass under
  `torch.no_grad()`, and the forward and backward pass of the same loss.

Each figure is the median over the rounds of one call's time, the call
blocking until its results are ready (`jax.block_until_ready`,
`torch.cuda.synchronize`). The route column says whether the compiled JAX
function holds cuDNN's RNN call or an XLA loop.

Before timing, it checks parity at every shape: with the same weights,
`GatedLSTM(H)` and `GatedLSTM(H, peephole=True)` against Keras's step loop
around the cell, `keras.layers.RNN(GatedLSTMCell(H[, peephole=True]))`, at
`jax.default_matmul_precision("highest")` (so neither XLA nor cuDNN uses
TF32): the whole output sequence, and the gradients of a summed squared loss
with respect to every weight and the inputs. The exit status is 1 when a
difference exceeds its tolerance, 2 when no GPU is found (without
`--dry-run`).

`--dry-run` runs the same code at (2, 5, 3, 4) with one round, on the CPU
where there is no GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# JAX takes 75 % of the GPU's memory at start by default; leave torch its share.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

_HERE = Path(__file__).resolve().parent
if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == _HERE:
    # Run as a file, Python puts benchmarks/ first, whose module names (profile,
    # options, run) would shadow others: put the repository root there instead.
    sys.path[0] = str(_HERE.parent)

from benchmarks.run import _log, _machine, _parse_sizes, _time_per_call  # noqa: E402

DEFAULT_SHAPES = "64x100x32x128,256x50x64x256,128x500x128x512"
DRY_RUN_SHAPES = "2x5x3x4"
OURS = "GatedLSTM"
PEEPHOLE = "GatedLSTM(peephole=True)"
ANCHOR = "keras.layers.LSTM"
TORCH = "torch.nn.LSTM"
CONTENDERS = (OURS, PEEPHOLE, ANCHOR, TORCH)
MODES = ("inference", "training")
# Parity: outputs to TOLERANCE; a gradient to TOLERANCE * max(1, its largest magnitude).
TOLERANCE = 1e-5
TABLE_HEADER = (
    "| shape (B,T,D,H) | mode | contender | route | median ms | speed vs keras.layers.LSTM "
    "| first call s |"
)


class NoGpu(Exception):
    """No GPU for JAX or torch where the run needs one."""


def _versions(torch_device) -> list[str]:
    """Lines naming the devices and the versions this run uses."""
    from importlib import metadata

    import jax
    import keras

    lines = [
        f"JAX devices: {jax.devices()} (default backend {jax.default_backend()})",
        f"jax {jax.__version__}, jaxlib {metadata.version('jaxlib')}, keras "
        f"{keras.__version__} (backend {keras.backend.backend()}); default matmul precision "
        f"{jax.config.jax_default_matmul_precision}",
    ]
    try:
        import torch
    except ImportError:
        return [*lines, "torch: not installed, left out"]
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    name = torch.cuda.get_device_name(0) if torch_device == "cuda" else "cpu"
    lines.append(
        f"torch {torch.__version__} on {name} (CUDA {torch.version.cuda}, cuDNN {cudnn}; "
        f"TF32 in cuDNN {torch.backends.cudnn.allow_tf32}, "
        f"in matmuls {torch.backends.cuda.matmul.allow_tf32})"
    )
    return lines


def _devices(dry_run: bool) -> str | None:
    """torch's device ("cuda", "cpu") or `None` without torch; `NoGpu` where a
    real run finds no GPU for JAX or torch."""
    import jax

    if not dry_run and jax.default_backend() != "gpu":
        raise NoGpu(
            f"no GPU: JAX sees only {jax.devices()}; install a CUDA build of JAX "
            "(jax[cuda12]) on a GPU machine, or pass --dry-run for a CPU smoke run"
        )
    try:
        import torch
    except ImportError:
        if not dry_run:
            raise NoGpu("torch is not installed: install a CUDA build of torch==2.13.0") from None
        _log("torch is not installed: leaving torch.nn.LSTM out")
        return None
    if torch.cuda.is_available():
        return "cuda"
    if not dry_run:
        raise NoGpu(f"no GPU for torch {torch.__version__}: install its CUDA build")
    return "cpu"


def _keras_layer(name: str, units: int):
    """A fresh contender layer, `GatedLSTM` or Keras's."""
    import keras

    from keras_lstm import GatedLSTM

    if name == OURS:
        return GatedLSTM(units)
    if name == PEEPHOLE:
        return GatedLSTM(units, peephole=True)
    return keras.layers.LSTM(units)


def _jax_contender(name, size, x, y):
    """(train, infer, route): jitted calls of a built layer that block on their
    results, and whether the compiled function holds cuDNN's RNN call."""
    import jax
    import jax.numpy as jnp

    batch, steps, features, units = size
    layer = _keras_layer(name, units)
    layer.build((batch, steps, features))
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    x, y = jnp.asarray(x), jnp.asarray(y)

    def forward(trainable, non_trainable, x, training):
        return layer.stateless_call(trainable, non_trainable, x, training=training)[0]

    def loss(trainable, x, non_trainable, y):
        return jnp.mean(jnp.square(forward(trainable, non_trainable, x, True) - y))

    infer_fn = jax.jit(lambda t, n, x: forward(t, n, x, False))
    train_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    lowered = infer_fn.lower(trainable, non_trainable, x).as_text()
    route = "cuDNN" if "dnn_rnn" in lowered else "XLA loop"

    def train():
        return jax.block_until_ready(train_fn(trainable, x, non_trainable, y))

    def infer():
        return jax.block_until_ready(infer_fn(trainable, non_trainable, x))

    return train, infer, route


def _torch_contender(size, x, y, device):
    """(train, infer, route) for `torch.nn.LSTM`, batch-first, on `device`."""
    import torch

    batch, steps, features, units = size
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(features, units, batch_first=True).to(device)
    x = torch.tensor(x, device=device, requires_grad=True)
    y = torch.tensor(y, device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def train():
        lstm.zero_grad(set_to_none=True)
        x.grad = None
        loss = torch.mean((lstm(x)[0][:, -1] - y) ** 2)
        loss.backward()
        sync()

    def infer():
        with torch.no_grad():
            lstm(x)[0][:, -1]
        sync()

    cudnn = device == "cuda" and torch.backends.cudnn.is_available()
    return train, infer, "cuDNN" if cudnn else "ATen (CPU)"


def _contenders(size, torch_device):
    """name -> (train, infer, route) for every contender at `size`, on the same data."""
    import numpy as np

    rng = np.random.default_rng(0)
    batch, steps, features, units = size
    x = rng.normal(size=(batch, steps, features)).astype("float32")
    y = rng.normal(size=(batch, units)).astype("float32")
    contenders = {name: _jax_contender(name, size, x, y) for name in (OURS, PEEPHOLE, ANCHOR)}
    if torch_device is not None:
        contenders[TORCH] = _torch_contender(size, x, y, torch_device)
    return contenders


def _time_shape(size, torch_device, rounds, target_s):
    """Median ms of each contender and mode at `size`, interleaved over `rounds`."""
    contenders = _contenders(size, torch_device)
    calls, first = {}, {}
    for name, (train, infer, _) in contenders.items():
        for mode, fn in (("training", train), ("inference", infer)):
            key = (name, mode)
            start = time.perf_counter()
            fn()  # tracing and compilation
            first[key] = time.perf_counter() - start
            warm = _time_per_call(fn, 1)
            calls[key] = (fn, max(1, min(200, round(target_s / max(warm, 1e-6)))))
    keys = list(calls)
    samples = {key: [] for key in keys}
    for r in range(rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            fn, repeats = calls[key]
            samples[key].append(_time_per_call(fn, repeats))
        _log(f"    round {r + 1}/{rounds} done")
    per_call = {key: statistics.median(samples[key]) * 1e3 for key in keys}
    routes = {name: route for name, (_, _, route) in contenders.items()}
    return {"ms": per_call, "first_s": first, "routes": routes}


def _parity_weights(layer, rng):
    """Keras's initial matrices (seeded); biases and peepholes drawn, so none is zero."""
    return [
        w if w.ndim == 2 else rng.normal(0.0, 0.3, w.shape).astype("float32")
        for w in layer.get_weights()
    ]


def _outputs_and_gradients(layer, x, y):
    """The output sequence, and the gradients of a summed squared loss (divided by
    the batch) with respect to each trainable weight and to the inputs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(trainable, x):
        out = layer.stateless_call(trainable, non_trainable, x, training=True)[0]
        return jnp.sum(jnp.square(out - y)) / x.shape[0], out

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    (weight_grads, input_grad), out = grad_fn(trainable, jnp.asarray(x))
    return np.asarray(out), [np.asarray(g) for g in weight_grads], np.asarray(input_grad)


def _difference(got, want):
    """Largest absolute difference over pairs of arrays, and the largest |want|."""
    import numpy as np

    diff = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want, strict=True))
    scale = max(float(np.max(np.abs(w))) for w in want)
    return diff, scale


def _parity_pair(size, peephole, rng):
    """Differences of GatedLSTM from Keras's step loop around its cell, same weights."""
    import keras

    from keras_lstm import GatedLSTM, GatedLSTMCell

    batch, steps, features, units = size
    x = rng.normal(size=(batch, steps, features)).astype("float32")
    y = rng.normal(size=(batch, steps, units)).astype("float32")
    ours = GatedLSTM(units, peephole=peephole, return_sequences=True)
    reference = keras.layers.RNN(GatedLSTMCell(units, peephole=peephole), return_sequences=True)
    for layer in (ours, reference):
        layer.build((batch, steps, features))
    weights = _parity_weights(reference, rng)
    reference.set_weights(weights)
    ours.set_weights(weights)
    got = _outputs_and_gradients(ours, x, y)
    want = _outputs_and_gradients(reference, x, y)
    return {
        "outputs": _difference([got[0]], [want[0]]),
        "weight gradients": _difference(got[1], want[1]),
        "input gradients": _difference([got[2]], [want[2]]),
    }


def _check_parity(shapes) -> bool:
    """Prints GatedLSTM's differences from the cell's step loop at each shape; True if
    all are within tolerance."""
    import jax
    import keras
    import numpy as np

    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    print(
        f"parity: max |GatedLSTM - keras.layers.RNN(GatedLSTMCell)|, same weights, "
        f"matmul precision 'highest'; tolerance {TOLERANCE:.0e} for outputs, "
        f"{TOLERANCE:.0e} x max(1, largest |gradient|) for gradients"
    )
    ok = True
    with jax.default_matmul_precision("highest"):
        for size in shapes:
            for name, peephole in ((OURS, False), (PEEPHOLE, True)):
                parts, row_ok = [], True
                for part, (diff, scale) in _parity_pair(size, peephole, rng).items():
                    limit = TOLERANCE if part == "outputs" else TOLERANCE * max(1.0, scale)
                    row_ok &= diff <= limit
                    parts.append(f"{part} {diff:.1e} (largest {scale:.1e})")
                print(f"  {size} {name}: {', '.join(parts)}: {'ok' if row_ok else 'FAILED'}")
                ok &= row_ok
    print(f"parity: {'ok' if ok else 'FAILED'}")
    return ok


def _table(results) -> str:
    """The markdown table of every shape, mode and contender."""
    lines = [TABLE_HEADER, "|---|---|---|---|---|---|---|"]
    for size, result in results.items():
        label = "x".join(map(str, size))
        for mode in MODES:
            anchor = result["ms"][(ANCHOR, mode)]
            for name in CONTENDERS:
                key = (name, mode)
                if key not in result["ms"]:
                    continue
                ms = result["ms"][key]
                lines.append(
                    f"| {label} | {mode} | {name} | {result['routes'][name]} | {ms:.3f} "
                    f"| {anchor / ms:.2f}x | {result['first_s'][key]:.1f} |"
                )
    return "\n".join(lines)


def _parse_args(argv):
    """The command line, with the defaults of a real run or of `--dry-run` filled in."""
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu.py", description=__doc__)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"shape {DRY_RUN_SHAPES}, 1 round, on the CPU where there is no GPU",
    )
    parser.add_argument(
        "--shapes",
        "--sizes",
        default=None,
        help=f"B x T x D x H, comma-separated (default {DEFAULT_SHAPES})",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="interleaved rounds (default 5; 1 with --dry-run)"
    )
    parser.add_argument(
        "--target-seconds",
        type=float,
        default=None,
        help="time per measurement (default 0.2; 0 with --dry-run: one call)",
    )
    args = parser.parse_args(argv)
    args.shapes = _parse_sizes(args.shapes or (DRY_RUN_SHAPES if args.dry_run else DEFAULT_SHAPES))
    args.repeats = args.repeats or (1 if args.dry_run else 5)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be a positive integer, got {args.repeats}")
    if args.target_seconds is None:
        args.target_seconds = 0.0 if args.dry_run else 0.2
    return args


def main(argv=None) -> int:
    """Checks parity, times every contender, prints the table; the exit status."""
    args = _parse_args(argv)
    import keras

    if keras.backend.backend() != "jax":
        print(
            f"this benchmark runs on the JAX backend, not {keras.backend.backend()}: unset "
            "KERAS_BACKEND or set it to jax"
        )
        return 2
    try:
        torch_device = _devices(args.dry_run)
    except NoGpu as error:
        print(error)
        return 2
    started = time.perf_counter()
    for line in _versions(torch_device):
        print(line)
    machine = _machine()
    print(f"host: {machine.get('Model name', machine['platform'])}, python {machine['python']}")
    parity_ok = _check_parity(args.shapes)
    results = {}
    for index, size in enumerate(args.shapes):
        _log(f"[{index + 1}/{len(args.shapes)}] (B,T,D,H)={size} ...")
        results[size] = _time_shape(size, torch_device, args.repeats, args.target_seconds)
        keras.backend.clear_session()
    print(
        f"\nmedian of {args.repeats} interleaved rounds; speed: keras.layers.LSTM's time / "
        "this one's (above 1: faster)\n"
    )
    print(_table(results))
    print(f"\ntensorflow imported: {'yes' if 'tensorflow' in sys.modules else 'no'}")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0 if parity_ok else 1


if __name__ == "__main__":
    sys.exit(main())
