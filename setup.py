"""towerstream: sampling-bias-corrected two-tower retrieval, trained as a daily stream."""

import setuptools

STACK = [
    # ScaNN's TF ops load only on TF 2.20; TFRS 0.7.7 needs Keras 2 (tf-keras).
    "tensorflow==2.20.0",
    "tf-keras==2.20.1",
    "tensorflow-recommenders==0.7.7",
    "scann[tf]==1.4.2",
    "apache-beam==2.77.0",
    "google-crc32c>=1.5",  # TFRecord CRCs written by pipeline/writers.py
    "tensorflow-serving-api==2.20.0",
    # NumPy 2 (NEP 50 scalar promotion) is what the code is tested with; scann
    # 1.4.2 already needs numpy~=2.0, and apache-beam 2.77 numpy<2.5.
    "numpy>=2,<3",
    "absl-py>=2.1",
    "matplotlib>=3.8",
]

setuptools.setup(
    name="towerstream",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10,<3.13",
    packages=["core", "estimators", "models", "serving", "evaluation", "pipeline"],
    install_requires=STACK,
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
        # Beam's DaskRunner (--runner=DaskRunner, pipeline/dask_runner.py); Beam 2.77
        # asks for dask and distributed >= 2024.4.2. tests/test_dask_runner.py passes
        # with 2025.1.0 and 2026.8.0.
        "dask": ["dask[distributed]>=2025.1.0,<2027"],
    },
)
