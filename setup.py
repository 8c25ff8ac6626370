"""Packaging for tf_adamax."""

import re

from setuptools import find_packages, setup

# One version, in the package (`tf_adamax.__version__`).
with open("tf_adamax/__init__.py", encoding="utf-8") as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)

setup(
    name="tf_adamax",
    version=VERSION,
    description=(
        "A TensorFlow-native Adamax optimizer: exact sparse updates, lazy "
        "O(nnz) embeddings, one XLA program per step, tf.distribute support, "
        "Keras 3 and tf-keras adapters."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tf_adamax", "tf_adamax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "tf-keras>=2.21,<2.22",
        "numpy",
    ],
    extras_require={
        "test": ["pytest", "hypothesis"],
        "bench": ["matplotlib"],
    },
    license="Apache-2.0",
)
