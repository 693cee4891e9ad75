"""towerstream package. TFRS needs Keras 2, so tf.keras must be tf-keras: set before TF loads.

TensorFlow's C++ log is off unless TF_CPP_MIN_LOG_LEVEL is set (its errors reach
Python as exceptions; pipeline/app_logging.py routes the rest of the log).
"""
import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
