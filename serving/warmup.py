"""TF Serving warm-up requests: `assets.extra/tf_serving_warmup_requests`.

TF Serving replays these `PredictionLog` records when it loads a version, before
the version takes traffic, so the first real request does not pay for graph
initialisation (for the ScaNN export: rebuilding the searcher from its tensors).
Requests are real queries of the day, at a few batch sizes, for the signatures
clients call: serving_default at each batch size, query_embedding and
retrieve_diverse once (the DPP's While loop is a graph of its own).
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
# The retrieve_diverse warm-up: k of N candidates (N at most the export's max_k).
DIVERSE_K = 10
DIVERSE_CANDIDATES = 100


def predict_log(model_name: str, signature_name: str,
                inputs: Mapping[str, np.ndarray]) -> prediction_log_pb2.PredictionLog:
  """One PredictionLog holding a PredictRequest for `signature_name`."""
  request = predict_pb2.PredictRequest(
      model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature_name))
  for name, value in inputs.items():
    request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
  return prediction_log_pb2.PredictionLog(
      predict_log=prediction_log_pb2.PredictLog(request=request))


def diverse_inputs(queries: Mapping[str, np.ndarray], max_k: int
                   ) -> dict[str, np.ndarray]:
  """A retrieve_diverse request for the first query: k = DIVERSE_K of N =
  DIVERSE_CANDIDATES (both at most max_k), theta 0.5, no exclusion ("" matches no
  item), and a boost of 1 for the query's seed item."""
  count = min(DIVERSE_CANDIDATES, max_k)
  return {**{name: value[:1] for name, value in queries.items()},
          "k": np.array(min(DIVERSE_K, count), np.int32),
          "num_candidates": np.array(count, np.int32),
          "theta": np.array(0.5, np.float32),
          "exclude_item_ids": np.array([[b""]], object),
          "boost_item_ids": np.asarray(queries["seed_item_id"][:1], object)[:, np.newaxis],
          "boosts": np.ones([1, 1], np.float32)}


def warmup_logs(model_name: str, queries: Mapping[str, np.ndarray], max_k: int,
                batch_sizes: Sequence[int] = BATCH_SIZES
                ) -> Iterator[prediction_log_pb2.PredictionLog]:
  """Requests to `serving_default` at each batch size, then one to
  `query_embedding` and one to `retrieve_diverse` (`diverse_inputs`).

  Args:
    model_name: the model's name in TF Serving's config.
    queries: query features (QUERY_FEATURES), as numpy arrays [n, ...]; batches
      are their first rows (fewer where n is smaller).
    max_k: the export's max_k (the most candidates a request may ask for).
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
  yield predict_log(model_name, servable.RETRIEVE_DIVERSE, diverse_inputs(queries, max_k))


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
