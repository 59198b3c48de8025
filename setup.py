"""Packaging for crossattn.

`kernels/` (the Triton kernels) is installed as the subpackage `crossattn.kernels`;
no other top-level module is installed. The CUDA extension in `csrc/` is added here by
the CUDA backend (it builds only where a CUDA-enabled PyTorch and nvcc are present), so
`pip install .` on a CPU-only machine builds nothing heavy.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["crossattn", "crossattn.*"]) + ["crossattn.kernels"]

setup(
    packages=packages,
    package_dir={"crossattn.kernels": "kernels"},
)
