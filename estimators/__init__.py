"""Item-frequency estimators for the logQ correction, behind one Keras interface.

TFRS needs Keras 2, so tf.keras must be tf-keras: set before TF loads.

TensorFlow's C++ log is off unless TF_CPP_MIN_LOG_LEVEL is set (its errors reach
Python as exceptions; pipeline/app_logging.py routes the rest of the log).
"""
import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=g-import-not-at-top,wrong-import-position
from typing import Any

from estimators.base import FrequencyEstimator
from estimators.count_min import CountMinFrequencyEstimator
from estimators.decayed_count import DecayedCountFrequencyEstimator
from estimators.exact import ExactFrequencyEstimator
from estimators.streaming import StreamingFrequencyEstimator

ESTIMATORS = {
    "streaming": StreamingFrequencyEstimator,
    "exact": ExactFrequencyEstimator,
    "count_min": CountMinFrequencyEstimator,
    "decayed_count": DecayedCountFrequencyEstimator,
}


def make_estimator(kind: str, **kwargs: Any) -> FrequencyEstimator:
  """Builds the estimator of `kind`, a key of ESTIMATORS.

  "streaming" is the paper's estimator; "exact" and "count_min" are baselines;
  "decayed_count" is our decayed count-min sketch (estimators/decayed_count.py).
  """
  if kind not in ESTIMATORS:
    raise ValueError(f"Unknown estimator kind {kind!r}; expected one of "
                     f"{sorted(ESTIMATORS)}")
  return ESTIMATORS[kind](**kwargs)


__all__ = ["FrequencyEstimator", "StreamingFrequencyEstimator",
           "ExactFrequencyEstimator", "CountMinFrequencyEstimator",
           "DecayedCountFrequencyEstimator",
           "ESTIMATORS", "make_estimator"]
