"""Data-parallel training of a GatedLSTM forecaster under the JAX backend.

    python examples/distributed_jax.py                    # all local accelerators
    python examples/distributed_jax.py --cpu-devices 2    # no accelerator: split the CPU

`keras.distribution.DataParallel` keeps a copy of the weights on every
device and splits each global batch between them; `model.fit` is unchanged.
The backend and, for CPUs, the device count must be set before JAX starts,
which is why this script sets KERAS_BACKEND and XLA_FLAGS before importing
keras. The data is the first 60 days of the hourly Seattle temperatures of
2010 that `vega_datasets` ships, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-devices", type=int, default=0, help="split the CPU in N devices")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="save the trained model to this .keras file")
    args = parser.parse_args(argv)
    if args.cpu_devices < 0:
        parser.error(f"--cpu-devices must be 0 or more, got {args.cpu_devices}")

    os.environ["KERAS_BACKEND"] = "jax"
    if args.cpu_devices:
        flag = f"--xla_force_host_platform_device_count={args.cpu_devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import jax
    import keras

    from keras_lstm import GatedLSTM
    from keras_lstm._atomic import atomic_file
    from keras_lstm.datasets import seattle_hourly_temperatures
    from keras_lstm.demo import build_model, make_windows

    devices = jax.devices("cpu") if args.cpu_devices else jax.devices()
    if args.batch_size % len(devices):
        parser.error(f"--batch-size must be a multiple of the {len(devices)} devices")
    distribution = keras.distribution.DataParallel(devices=devices)
    print(f"DataParallel over {len(devices)} devices: {devices}")

    train, val, _, _ = make_windows(*(part[: 60 * 24] for part in seattle_hourly_temperatures()))
    # Every batch, the last one included, must split evenly across the devices.
    whole = args.batch_size * (len(train.x) // args.batch_size)
    x, y = train.x[:whole], train.y[:whole]
    n_val = len(devices) * (len(val.x) // len(devices))
    val_x, val_y = val.x[:n_val], val.y[:n_val]
    keras.utils.set_random_seed(args.seed)
    # Variables created in the scope are replicated; batches are split by device.
    with distribution.scope():
        model = build_model(GatedLSTM(args.units, name="gated_lstm"))
        model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse", jit_compile=True)
        history = model.fit(
            x,
            y,
            validation_data=(val_x, val_y),
            batch_size=args.batch_size,
            epochs=args.epochs,
            verbose=2,
        )
    print(f"final validation loss {history.history['val_loss'][-1]:.4f}")
    if args.out:
        with atomic_file(args.out) as tmp:
            model.save(tmp)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
