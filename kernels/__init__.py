"""Triton kernels of crossattn, installed as the subpackage ``crossattn.kernels``.

The ``triton`` backend (``crossattn/backends/triton_backend.py``) looks for the module
``crossattn.kernels.xattn`` with ``unsupported(problem)``, ``attention(problem)`` and
``bidirectional(xy, yx)``. Importing this package does not import Triton.
"""
import sys as _sys

if __name__ == "kernels":
    # This folder seen as a top-level package: Python run in a crossattn checkout puts the
    # checkout on sys.path (``python -m pytest``, ``python -m crossattn.train``), where
    # ``import kernels`` means Hugging Face's ``kernels`` (a transformers dependency since 5.x,
    # imported by its models). Give way to a package of that name further down the path.
    def _give_way() -> None:
        import importlib.machinery
        import importlib.util
        import os

        checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        rest = [p for p in _sys.path if os.path.abspath(p or os.curdir) != checkout]
        spec = importlib.machinery.PathFinder.find_spec("kernels", rest)
        if spec is None or spec.loader is None:
            return  # no other: this folder stays what `import kernels` finds (nothing uses it so)
        module = importlib.util.module_from_spec(spec)
        _sys.modules["kernels"] = module  # the import statement returns what sys.modules holds
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del _sys.modules["kernels"]
            raise

    _give_way()
