"""Build shim: all metadata lives in pyproject.toml.

Kept so that `pip install -e .` works with older tooling and so that native code in
csrc/ can be added as an extension (`cepo_kernels._C`) once it earns its place.
"""
from setuptools import setup

setup()
