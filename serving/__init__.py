"""What goes into a SavedModel: the ScaNN and exact retrievers, their export and versions."""
import core  # noqa: F401  (sets the environment before TensorFlow loads)
