"""TF Serving warm-up requests: `assets.extra/tf_serving_warmup_requests`.

TF Serving replays these `PredictionLog` records when it loads a version, before
the version takes traffic, so the first real request does not pay for graph
initialisation (for the ScaNN export: rebuilding the searcher from its tensors).
Requests are real queries of the day, at a few batch sizes, for the signatures
clients call.
"""

from __future__ import annotations

import os
from typing import Iterator, Mapping, Sequence

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_log_pb2

from serving import servable
from serving import versions

WARMUP_FILE = "tf_serving_warmup_requests"
BATCH_SIZES = (1, 8, 64)


def predict_log(model_name: str, signature_name: str,
                inputs: Mapping[str, np.ndarray]) -> prediction_log_pb2.PredictionLog:
  """One PredictionLog holding a PredictRequest for `signature_name`."""
  request = predict_pb2.PredictRequest(
      model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature_name))
  for name, value in inputs.items():
    request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
  return prediction_log_pb2.PredictionLog(
      predict_log=prediction_log_pb2.PredictLog(request=request))


def warmup_logs(model_name: str, queries: Mapping[str, np.ndarray],
                batch_sizes: Sequence[int] = BATCH_SIZES
                ) -> Iterator[prediction_log_pb2.PredictionLog]:
  """Requests to `serving_default` at each batch size, and one to `query_embedding`.

  Args:
    model_name: the model's name in TF Serving's config.
    queries: query features (QUERY_FEATURES), as numpy arrays [n, ...]; batches
      are their first rows (fewer where n is smaller).
    batch_sizes: request batch sizes.
  """
  num = len(next(iter(queries.values())))
  if num == 0:
    raise ValueError("warm-up requests need at least one query")
  for size in sorted({min(b, num) for b in batch_sizes}):
    yield predict_log(model_name, servable.SERVING_DEFAULT,
                      {name: value[:size] for name, value in queries.items()})
  yield predict_log(model_name, servable.QUERY_EMBEDDING,
                    {name: value[:1] for name, value in queries.items()})


def write_warmup(export_dir: str, logs: Sequence[prediction_log_pb2.PredictionLog]) -> str:
  """Writes the records to `<export_dir>/assets.extra/`; returns the file's path."""
  directory = os.path.join(export_dir, versions.ASSETS_EXTRA)
  tf.io.gfile.makedirs(directory)
  path = os.path.join(directory, WARMUP_FILE)
  with tf.io.TFRecordWriter(path) as writer:
    for log in logs:
      writer.write(log.SerializeToString())
  return path


def read_warmup(path: str) -> list[prediction_log_pb2.PredictionLog]:
  """Parses a warm-up file back into PredictionLogs (for checks and replay)."""
  return [prediction_log_pb2.PredictionLog.FromString(record.numpy())
          for record in tf.data.TFRecordDataset(path)]


def replay(loaded: tf.Module, logs: Sequence[prediction_log_pb2.PredictionLog]
           ) -> list[dict[str, np.ndarray]]:
  """Runs each logged request through a loaded SavedModel, as TF Serving does."""
  outputs = []
  for log in logs:
    request = log.predict_log.request
    signature = loaded.signatures[request.model_spec.signature_name or
                                  servable.SERVING_DEFAULT]
    inputs = {name: tf.constant(tf.make_ndarray(proto))
              for name, proto in request.inputs.items()}
    outputs.append({name: value.numpy() for name, value in signature(**inputs).items()})
  return outputs
