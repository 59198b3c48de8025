"""Compiler flags for the CUDA extension, shared by setup.py (which runs this file without
importing the package or torch) and the JIT build in crossattn._cuda."""
import os

DEFAULT_ARCHS = "8.0;8.6;8.9;9.0"
# The stable ABI targeted (PyTorch 2.10): the library loads into any later PyTorch.
TARGET_VERSION = "-DTORCH_TARGET_VERSION=0x020a000000000000"
CXX_FLAGS = ["-O3", "-std=c++17", "-DUSE_CUDA", TARGET_VERSION]
NVCC_FLAGS = ["-O3", "-std=c++17", "-DUSE_CUDA", TARGET_VERSION, "--expt-relaxed-constexpr", "-lineinfo"]


def nvcc_arch_flags(arch_list=None):
    """``-gencode`` flags for ``TORCH_CUDA_ARCH_LIST`` (default 8.0;8.6;8.9;9.0; "+PTX" adds
    PTX for that entry)."""
    arch_list = arch_list or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    flags = []
    for item in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not item:
            continue
        num = item[:-4] if item.endswith("+PTX") else item
        num = num.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if item.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags
