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

        # Folders already passed over: this checkout by its real path (a symlink or a second
        # spelling on sys.path is the same folder) and, when another checkout's copy of this
        # file gave way to this one, that one's (each would hand over to the other forever).
        skip = set(globals().get("__crossattn_passed_over__", ()))
        skip.add(os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        rest = [p for p in _sys.path if os.path.realpath(p or os.curdir) not in skip]
        spec = importlib.machinery.PathFinder.find_spec("kernels", rest)
        if spec is None or spec.loader is None:
            return  # no other: this module (this folder, or the copy that handed over to it) stays
        module = importlib.util.module_from_spec(spec)
        module.__crossattn_passed_over__ = frozenset(skip)  # read by a copy of this file, if that is it
        # Marked as initialising before it is published, as the import system marks what it runs:
        # another thread importing `kernels` meanwhile waits for this import instead of taking a
        # half-run module.
        spec._initializing = True
        _sys.modules["kernels"] = module  # the import statement returns what sys.modules holds
        try:
            spec.loader.exec_module(module)
        except BaseException:
            _sys.modules.pop("kernels", None)
            raise
        finally:
            spec._initializing = False
        if "__crossattn_passed_over__" in module.__dict__ and _sys.modules.get("kernels") is module:
            del module.__crossattn_passed_over__  # not ours: leave no trace in it

    _give_way()
