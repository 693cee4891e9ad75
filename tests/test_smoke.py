"""The pinned stack imports, ScaNN's TF ops load, and tf.keras is Keras 2."""

import os
import subprocess
import sys

import pipeline  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)


def test_stack_imports_and_keras_is_2():
  import apache_beam as beam
  import tensorflow as tf
  import tensorflow_recommenders as tfrs
  import tf_keras

  assert tf.__version__ == "2.20.0"
  assert tfrs.__version__ == "v0.7.7"
  assert beam.__version__ == "2.77.0"
  assert tf_keras.__version__.startswith("2.")
  assert tf.keras.layers.Dense.__module__.startswith("tf_keras.")


def test_scann_tf_ops_build_and_search():
  import numpy as np
  import tensorflow as tf
  from scann.scann_ops.py import scann_ops

  db = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
  db /= np.linalg.norm(db, axis=1, keepdims=True)  # each row is its own best match
  searcher = scann_ops.builder(db, 5, "dot_product").score_brute_force().build()
  ids, _ = searcher.search_batched(tf.constant(db[:3]))
  assert ids.numpy()[:, 0].tolist() == [0, 1, 2]


def test_package_import_sets_legacy_keras_in_fresh_process():
  code = ("import os; import models.features; import tensorflow as tf; "
          "assert os.environ['TF_USE_LEGACY_KERAS'] == '1'; "
          "assert tf.keras.Model.__module__.startswith('tf_keras.'), tf.keras.Model.__module__")
  env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
  subprocess.run([sys.executable, "-c", code], check=True, env=env,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_packages_silence_tensorflow_cpp_and_beam_import_noise_by_default():
  code = ("import os, pipeline, models, serving; "
          "import apache_beam.io.gcp.internal.clients.bigquery; "
          "print(os.environ['TF_CPP_MIN_LOG_LEVEL'])")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  quiet = subprocess.run([sys.executable, "-c", code], env=env, cwd=root,
                         capture_output=True, text=True, check=True)
  assert quiet.stdout.split() == ["3"]
  assert "apitools" not in quiet.stderr, quiet.stderr
  # A level the user set is kept.
  chosen = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, check=True, env=dict(env, TF_CPP_MIN_LOG_LEVEL="1"))
  assert chosen.stdout.split() == ["1"]
