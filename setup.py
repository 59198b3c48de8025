"""Packaging for crossattn.

`kernels/` (the Triton kernels) is installed as the subpackage `crossattn.kernels`;
no other top-level module is installed. The CUDA extension `crossattn._C` (csrc/*.cu,
PyTorch stable ABI) is built only where a CUDA-enabled PyTorch and nvcc are present, so
`pip install .` on a CPU-only machine builds nothing heavy. Build switches:

* ``CROSSATTN_SKIP_CUDA_BUILD=1``: never build the extension;
* ``CROSSATTN_FORCE_CUDA=1``: build it even without a visible GPU (a CUDA PyTorch and nvcc
  are still required) and fail loudly if it cannot be built;
* ``TORCH_CUDA_ARCH_LIST``: target architectures, default ``8.0;8.6;8.9;9.0``.

The build needs torch importable, so build without isolation:
``pip install --no-build-isolation .`` (an isolated build simply skips the extension).
"""
import os
from glob import glob

from setuptools import find_packages, setup

DEFAULT_ARCHS = "8.0;8.6;8.9;9.0"
NVCC_FLAGS = ["-O3", "-std=c++17", "-DUSE_CUDA", "--expt-relaxed-constexpr", "-lineinfo"]


def cuda_build_plan(env=os.environ):
    """(ext_modules, cmdclass, why not built or None)."""
    force = env.get("CROSSATTN_FORCE_CUDA") == "1"
    if env.get("CROSSATTN_SKIP_CUDA_BUILD") == "1":
        return [], {}, "CROSSATTN_SKIP_CUDA_BUILD=1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if force:
            raise RuntimeError("CROSSATTN_FORCE_CUDA=1: torch is not importable in the build environment; "
                               "install a CUDA-enabled torch first and build with pip install --no-build-isolation .")
        return [], {}, "torch is not importable in the build environment (use --no-build-isolation)"
    problems = []
    if torch.version.cuda is None:
        problems.append(f"this PyTorch ({torch.__version__}) is CPU-only")
    if CUDA_HOME is None:
        problems.append("nvcc was not found (set CUDA_HOME)")
    if problems:
        if force:
            raise RuntimeError("CROSSATTN_FORCE_CUDA=1 but the CUDA extension cannot be built: " + "; ".join(problems))
        return [], {}, "; ".join(problems)
    if not env.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    ext = CUDAExtension(
        "crossattn._C", sorted(glob("csrc/*.cu")),
        extra_compile_args={"cxx": ["-O3", "-std=c++17", "-DUSE_CUDA"], "nvcc": NVCC_FLAGS},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, None


if __name__ == "__main__":
    ext_modules, cmdclass, skipped = cuda_build_plan()
    if skipped:
        print(f"crossattn: building without the CUDA extension ({skipped})")
    setup(
        packages=find_packages(include=["crossattn", "crossattn.*"]) + ["crossattn.kernels"],
        package_dir={"crossattn.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
