"""The data side: raw log schema, the Beam job, data generators, the daily orchestration."""
import core  # noqa: F401  (sets the environment before TensorFlow loads)
