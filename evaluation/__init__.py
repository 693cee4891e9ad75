"""Offline evaluation of exports: test-then-train recall, baselines, plots."""
import core  # noqa: F401  (sets the environment before TensorFlow loads)
