"""Item-frequency estimators for the logQ correction, behind one Keras interface."""
from typing import Any

import core  # noqa: F401  (sets the environment before TensorFlow loads)
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
