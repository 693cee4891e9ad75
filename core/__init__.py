"""Plumbing below every package: the process environment, the workdir, command lines.

Importing any towerstream package imports this first, so the environment is set
once, before TensorFlow loads Keras:
- TFRS 0.7.7 needs Keras 2, so tf.keras must be tf-keras (TF_USE_LEGACY_KERAS=1);
- TensorFlow's C++ log is off unless TF_CPP_MIN_LOG_LEVEL is set (its errors reach
  Python as exceptions; core/app_logging.py routes the rest of the log);
- Beam's "apitools not found" warning at import (GCP client libraries absent, as
  expected without apache-beam[gcp]) is dropped.
"""
import logging
import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
logging.getLogger().addFilter(
    lambda record: not str(record.msg).startswith("apitools not found"))
