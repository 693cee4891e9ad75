"""The two-tower model: features, towers, logQ-corrected retrieval, the streaming trainer."""
import core  # noqa: F401  (sets the environment before TensorFlow loads)
