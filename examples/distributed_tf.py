"""Data-parallel training of a GatedLSTM forecaster with tf.distribute.

Two set-ups, same model, same global batch:

    # One machine, several devices: all GPUs, or the CPU split in two.
    python examples/distributed_tf.py --strategy mirrored

    # Several worker processes (here: started locally on 127.0.0.1).
    python examples/distributed_tf.py --strategy multi-worker --workers 2

MirroredStrategy runs `model.fit` unchanged inside `strategy.scope()`.
MultiWorkerMirroredStrategy needs a custom loop over `strategy.run`, since
Keras 3's `model.fit` does not run under it (keras-team/keras#20585). On a
real cluster each machine runs the worker part with its own TF_CONFIG; this
script starts local workers only to show the whole thing on one computer.

The data is the first 60 days of the hourly Seattle temperatures of 2010 that
`vega_datasets` ships, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def windows():
    from keras_lstm.datasets import seattle_hourly_temperatures
    from keras_lstm.demo import make_windows

    train, val, _, _ = make_windows(*(part[: 60 * 24] for part in seattle_hourly_temperatures()))
    return train, val


def build(units: int):
    from keras_lstm import GatedLSTM
    from keras_lstm.demo import build_model

    return build_model(GatedLSTM(units, name="gated_lstm"))


def save(model, path):
    from keras_lstm._atomic import atomic_file

    with atomic_file(path) as tmp:
        model.save(tmp)
    print(f"saved {path}")


def run_mirrored(args):
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        # No GPU: split the CPU in two logical devices, before TensorFlow starts.
        (cpu,) = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
    devices = [d.name for d in tf.config.list_logical_devices("GPU" if gpus else "CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
    print(f"MirroredStrategy over {strategy.num_replicas_in_sync} devices: {devices}")

    train, val = windows()
    keras.utils.set_random_seed(args.seed)
    with strategy.scope():
        model = build(args.units)
        model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    # batch_size is the global batch: each replica gets batch_size / replicas.
    history = model.fit(
        train.x,
        train.y,
        validation_data=(val.x, val.y),
        batch_size=args.batch_size,
        epochs=args.epochs,
        verbose=2,
    )
    print(f"final validation loss {history.history['val_loss'][-1]:.4f}")
    if args.out:
        save(model, args.out)


def run_worker(args):
    import tensorflow as tf

    # Created first, before any other TensorFlow op; reads TF_CONFIG.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras

    task = json.loads(os.environ["TF_CONFIG"])["task"]
    is_chief = task["index"] == 0
    train, val = windows()
    keras.utils.set_random_seed(args.seed)
    with strategy.scope():
        model = build(args.units)
        optimizer = keras.optimizers.Adam(3e-3)
        optimizer.build(model.trainable_variables)

    dataset = tf.data.Dataset.from_tensor_slices((train.x, train.y))
    dataset = dataset.shuffle(len(train.x), seed=args.seed).batch(args.batch_size)
    batches = strategy.experimental_distribute_dataset(dataset)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            per_sample = keras.losses.mean_squared_error(y, model(x, training=True))
            # Average over the global batch: the optimizer sums the replicas' gradients.
            loss = tf.nn.compute_average_loss(per_sample, global_batch_size=args.batch_size)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(gradients, model.trainable_variables)
        return loss

    @tf.function
    def step(batch):
        losses = strategy.run(replica_step, args=batch)
        return strategy.reduce("SUM", losses, axis=None)

    for epoch in range(args.epochs):
        total, steps = 0.0, 0
        for batch in batches:
            total += float(step(batch))
            steps += 1
        # A plain call, not model.predict: predict would start collectives of
        # its own, and every worker must issue the same collectives in order.
        val_loss = float(np.mean((np.asarray(model(val.x, training=False)) - val.y) ** 2))
        if is_chief:
            print(f"epoch {epoch + 1}: loss {total / steps:.4f}, validation loss {val_loss:.4f}")
    if is_chief and args.out:
        save(model, args.out)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def launch_local_workers(args, argv):
    """Start `--workers` processes on 127.0.0.1, each with its own TF_CONFIG."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(args.workers)]}
    print(f"cluster: {cluster}")
    processes = []
    for index in range(args.workers):
        config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(config)}
        command = [sys.executable, os.path.abspath(__file__), *argv, "--worker"]
        processes.append(subprocess.Popen(command, env=env))
    try:
        codes = [p.wait(timeout=args.timeout) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(codes):
        raise SystemExit(f"a worker failed: exit codes {codes}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", choices=["mirrored", "multi-worker"], default="mirrored")
    parser.add_argument("--workers", type=int, default=2, help="local workers (multi-worker)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per worker")
    parser.add_argument("--out", help="save the trained model to this .keras file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be a positive integer, got {args.workers}")
    if args.strategy == "mirrored":
        run_mirrored(args)
    elif args.worker or "TF_CONFIG" in os.environ:
        run_worker(args)
    else:
        launch_local_workers(args, argv)


if __name__ == "__main__":
    main()
