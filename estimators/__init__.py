"""Item-frequency estimators for the logQ correction, behind one Keras interface."""
from typing import Any, Mapping

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


def _estimator_class(kind: str) -> type[FrequencyEstimator]:
  if kind not in ESTIMATORS:
    raise ValueError(f"Unknown estimator kind {kind!r}; expected one of "
                     f"{sorted(ESTIMATORS)}")
  return ESTIMATORS[kind]


def make_estimator(kind: str, **kwargs: Any) -> FrequencyEstimator:
  """Builds the estimator of `kind`, a key of ESTIMATORS.

  "streaming" is the paper's estimator; "exact" and "count_min" are baselines;
  "decayed_count" is our decayed count-min sketch (estimators/decayed_count.py).
  """
  return _estimator_class(kind)(**kwargs)


def arguments(kind: str) -> tuple[str, ...]:
  """The arguments the estimator of `kind` takes (FrequencyEstimator.arguments)."""
  return _estimator_class(kind).arguments()


def check_options(kind: str, options: Mapping[str, Any]) -> None:
  """Raises ValueError naming the `options` that the estimator of `kind` does not take."""
  unknown = sorted(set(options) - set(arguments(kind)))
  if unknown:
    raise ValueError(f"estimator {kind!r} does not take {unknown}; it takes "
                     f"{sorted(arguments(kind))}")


__all__ = ["FrequencyEstimator", "StreamingFrequencyEstimator",
           "ExactFrequencyEstimator", "CountMinFrequencyEstimator",
           "DecayedCountFrequencyEstimator",
           "ESTIMATORS", "make_estimator", "arguments", "check_options"]
