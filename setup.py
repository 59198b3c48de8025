"""Packaging for crossattn.

`kernels/` (the Triton kernels) is installed as the subpackage `crossattn.kernels`;
no other top-level module is installed. The CUDA extension `crossattn._C` (csrc/*.cu,
PyTorch stable ABI) is built only where a CUDA-enabled PyTorch and nvcc are present, so
`pip install .` on a CPU-only machine builds nothing heavy. Build switches:

* ``CROSSATTN_SKIP_CUDA_BUILD=1``: never build the extension;
* ``CROSSATTN_FORCE_CUDA=1``: build it even without a visible GPU and fail loudly if it
  cannot be built. nvcc is required; with a CPU-only PyTorch the library is compiled and
  linked by nvcc alone (the stable ABI resolves PyTorch's C shim when it is loaded), e.g.
  to build wheels for GPU machines on a CPU machine;
* ``TORCH_CUDA_ARCH_LIST``: target architectures, default ``8.0;8.6;8.9;9.0``.

The build needs torch importable, so build without isolation:
``pip install --no-build-isolation .`` (an isolated build simply skips the extension).
"""
import os
import runpy
import shutil
import subprocess
from glob import glob
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

# One source for the flags: crossattn/_build_flags.py, run here without importing the package.
_FLAGS = runpy.run_path(str(Path(__file__).resolve().parent / "crossattn" / "_build_flags.py"))
DEFAULT_ARCHS, NVCC_FLAGS, CXX_FLAGS = _FLAGS["DEFAULT_ARCHS"], _FLAGS["NVCC_FLAGS"], _FLAGS["CXX_FLAGS"]


class NvccBuildExt(build_ext):
    """Compiles and links ``crossattn._C`` with nvcc alone (no CUDA PyTorch needed)."""

    nvcc = "nvcc"
    torch_include = ""

    def build_extension(self, ext):
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [self.nvcc, "-shared", "-o", str(out), *ext.sources, *NVCC_FLAGS, "-isystem", self.torch_include,
               *_FLAGS["nvcc_arch_flags"](), "-Xcompiler", "-fPIC", "-cudart", "static"]
        print("crossattn: " + " ".join(cmd))
        subprocess.check_call(cmd)


def cuda_build_plan(env=os.environ):
    """(ext_modules, cmdclass, why not built or None)."""
    force = env.get("CROSSATTN_FORCE_CUDA") == "1"
    if env.get("CROSSATTN_SKIP_CUDA_BUILD") == "1":
        return [], {}, "CROSSATTN_SKIP_CUDA_BUILD=1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        if force:
            raise RuntimeError("CROSSATTN_FORCE_CUDA=1: torch is not importable in the build environment; "
                               "install a CUDA-enabled torch first and build with "
                               "pip install --no-build-isolation .") from exc
        return [], {}, "torch is not importable in the build environment (use --no-build-isolation)"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if nvcc is None:
        if force:
            raise RuntimeError("CROSSATTN_FORCE_CUDA=1 but the CUDA extension cannot be built: nvcc was not "
                               "found (set CUDA_HOME)")
        return [], {}, "nvcc was not found (set CUDA_HOME)"
    sources = sorted(glob("csrc/*.cu"))
    if torch.version.cuda is None:
        if not force:
            return [], {}, f"this PyTorch ({torch.__version__}) is CPU-only (CROSSATTN_FORCE_CUDA=1 builds anyway)"
        NvccBuildExt.nvcc = nvcc
        NvccBuildExt.torch_include = str(Path(torch.__file__).parent / "include")
        return [Extension("crossattn._C", sources)], {"build_ext": NvccBuildExt}, None
    if not env.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    ext = CUDAExtension(
        "crossattn._C", sources,
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, None


if __name__ == "__main__":
    ext_modules, cmdclass, skipped = cuda_build_plan()
    if skipped:
        print(f"crossattn: building without the CUDA extension ({skipped})")
    setup(
        # A set: a development checkout may hold crossattn/kernels as a link to kernels/.
        packages=sorted(set(find_packages(include=["crossattn", "crossattn.*"])) | {"crossattn.kernels"}),
        package_dir={"crossattn.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
