"""Triton kernels of crossattn, installed as the subpackage ``crossattn.kernels``.

The ``triton`` backend (``crossattn/backends/triton_backend.py``) looks for the module
``crossattn.kernels.xattn`` with ``unsupported(problem)``, ``attention(problem)`` and
``bidirectional(xy, yx)``. Importing this package does not import Triton.
"""
