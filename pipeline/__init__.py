"""towerstream package. TFRS needs Keras 2, so tf.keras must be tf-keras: set before TF loads."""
import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
