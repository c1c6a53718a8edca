"""Train the same small GatedLSTM forecaster on one device or data-parallel.

`tests/test_distribution.py` computes the single-device weights in its own
process and runs this script for each distributed set-up, in a fresh process
since devices and strategies must be configured before TensorFlow or JAX
starts:

    python tests/_distribution_checks.py mirrored OUT.npz        # 2 logical CPUs
    TF_CONFIG=... python tests/_distribution_checks.py worker OUT.npz
    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python tests/_distribution_checks.py jax OUT.npz

Every set-up sees the same global batches in the same order (no shuffling),
so plain SGD must end at the same weights up to float rounding.
"""

from __future__ import annotations

import os
import sys

import numpy as np

# Appended: an installed keras_lstm comes first (the repository root serves a checkout).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SAMPLES, TIME, FEATURES, UNITS = 16, 5, 3, 4
GLOBAL_BATCH, EPOCHS = 8, 3


def make_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((SAMPLES, TIME, FEATURES)).astype("float32")
    y = (x[:, -1, :1] * 0.5 + x[:, 0, 1:2] * 0.3).astype("float32")
    weights = [
        rng.normal(0, 0.5, (FEATURES, 4 * UNITS)).astype("float32"),
        rng.normal(0, 0.5, (UNITS, 4 * UNITS)).astype("float32"),
        rng.normal(0, 0.1, (4 * UNITS,)).astype("float32"),
        rng.normal(0, 0.5, (UNITS, 1)).astype("float32"),
        np.zeros((1,), "float32"),
    ]
    return x, y, weights


def train(jit_compile=False) -> list[np.ndarray]:
    """Build, compile and fit in the current scope; return the trained weights."""
    import keras

    from keras_lstm import GatedLSTM

    x, y, weights = make_data()
    model = keras.Sequential(
        [keras.Input((TIME, FEATURES)), GatedLSTM(UNITS), keras.layers.Dense(1)]
    )
    model.set_weights(weights)
    model.compile(optimizer=keras.optimizers.SGD(0.2), loss="mse", jit_compile=jit_compile)
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    return model.get_weights()


def _save(path, weights, **extra):
    np.savez(path, **{f"weight_{i}": w for i, w in enumerate(weights)}, **extra)


def mirrored(out):
    import tensorflow as tf

    (cpu,) = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        weights = train()
    _save(out, weights, replicas=np.array(strategy.num_replicas_in_sync))


def train_custom_loop(strategy) -> list[np.ndarray]:
    """The same training as `train`, written as a loop over `strategy.run`.

    Keras 3's `model.fit` does not run under MultiWorkerMirroredStrategy
    (keras-team/keras#20585), so the multi-worker set-up steps by hand: each
    replica averages its loss over the global batch and the optimizer sums the
    replicas' gradients, which gives the single-device gradient.
    """
    import keras
    import tensorflow as tf

    from keras_lstm import GatedLSTM

    x, y, weights = make_data()
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((TIME, FEATURES)), GatedLSTM(UNITS), keras.layers.Dense(1)]
        )
        model.set_weights(weights)
        optimizer = keras.optimizers.SGD(0.2)
        optimizer.build(model.trainable_variables)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    batches = strategy.experimental_distribute_dataset(dataset)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            per_sample = keras.losses.mean_squared_error(y, model(x, training=True))
            loss = tf.nn.compute_average_loss(per_sample, global_batch_size=GLOBAL_BATCH)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(gradients, model.trainable_variables)
        return loss

    @tf.function
    def step(batch):
        return strategy.run(replica_step, args=batch)

    for _ in range(EPOCHS):
        for batch in batches:
            step(batch)
    return model.get_weights()


def worker(out):
    import tensorflow as tf

    # Created first, before any other TensorFlow op, as the strategy requires.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    weights = train_custom_loop(strategy)
    _save(out, weights, replicas=np.array(strategy.num_replicas_in_sync))


def jax(out):
    import jax
    import keras

    devices = jax.devices("cpu")
    single = train(jit_compile=True)
    with keras.distribution.DataParallel(devices=devices).scope():
        parallel = train(jit_compile=True)
    np.savez(
        out,
        devices=np.array(len(devices)),
        **{f"single_{i}": w for i, w in enumerate(single)},
        **{f"weight_{i}": w for i, w in enumerate(parallel)},
    )


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    {"mirrored": mirrored, "worker": worker, "jax": jax}[mode](out)
