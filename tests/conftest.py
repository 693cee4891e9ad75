"""Test set-up: the repo on sys.path, and its environment (core) before TensorFlow loads."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import core  # noqa: E402,F401  (Keras 2 for TFRS, TensorFlow's C++ log off)
