"""Packaging for tf_adamax."""

from setuptools import find_packages, setup

setup(
    name="tf_adamax",
    version="0.1.0",
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
