"""Warmup requests: what TensorFlow Serving replays when it loads a version.

Written to `assets.extra/tf_serving_warmup_requests` as `PredictionLog`
records (`tensorflow-serving-api`'s protos), one per signature and batch
size, so the first real request does not pay for tracing or XLA compilation.
"""

from __future__ import annotations

import os

import numpy as np

from keras_lstm.serving import _graph

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
_WARMUP_BATCH_SIZES = (1, 2)
_WARMUP_TIMESTEPS = 8


def _warmup_inputs(model, plan):
    """`(signature, {input name: array})` pairs, random but reproducible.

    Sequences have the model's own length where it declares one (XLA
    compiles once per shape, so warm up the shape traffic will have).
    """
    rng = np.random.default_rng(0)
    declared = [t.shape[1] for t in _graph.model_inputs(model) if len(t.shape) == 3]
    steps = declared[0] if declared and declared[0] is not None else _WARMUP_TIMESTEPS

    def sample(spec, batch):
        shape = [batch] + [steps if d is None else d for d in spec.shape[1:]]
        if spec.dtype.is_floating:
            return rng.standard_normal(shape).astype(spec.dtype.as_numpy_dtype)
        return np.zeros(shape, spec.dtype.as_numpy_dtype)

    requests = []
    for batch in _WARMUP_BATCH_SIZES:
        specs = _graph.input_specs(model)
        requests.append(("serving_default", {s.name: sample(s, batch) for s in specs}))
        if plan is not None:
            requests.append(("initial_state", {"batch_size": np.int32(batch)}))
            requests.append(("step", {s.name: sample(s, batch) for s in plan.step_specs()}))
    return requests


def serving_protos():
    try:
        from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
    except ImportError as error:
        raise ImportError(
            "Warmup requests are written with `tensorflow-serving-api`; install it "
            "(`pip install keras-lstm[serving]`) or pass warmup=False (`--no-warmup`)."
        ) from error
    return predict_pb2, prediction_log_pb2


def write_warmup(export_dir, model, plan, model_name):
    """Write `assets.extra/tf_serving_warmup_requests` as TF Serving reads it."""
    import tensorflow as tf

    predict_pb2, prediction_log_pb2 = serving_protos()
    path = os.path.join(export_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for signature, inputs in _warmup_inputs(model, plan):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = signature
            for name, value in inputs.items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
