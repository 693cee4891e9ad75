"""Test set-up: Keras 2 for TFRS before anything imports TensorFlow; repo on sys.path."""
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # as the packages do
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
