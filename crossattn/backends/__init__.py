"""Backend registry and dispatcher.

``backend="auto"`` picks, for CUDA tensors, the first of triton, cuda, torch that is
available and supports the inputs, and the torch backend on every other device. The
environment variable ``CROSSATTN_BACKEND`` overrides ``auto`` (and then behaves like an
explicit request). An explicit backend that cannot run raises ``RuntimeError`` saying why and
how to get it; one that cannot take the inputs raises ``ValueError`` saying why.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .._validation import AttentionProblem
from .base import Backend, ModuleBackend
from .cuda_backend import CudaBackend
from .torch_backend import TorchBackend
from .triton_backend import TritonBackend

BACKENDS: dict[str, Backend] = {b.name: b for b in (TorchBackend(), TritonBackend(), CudaBackend())}
BACKEND_NAMES = ("auto",) + tuple(BACKENDS)
AUTO_ORDER_CUDA = ("triton", "cuda", "torch")
ENV_VAR = "CROSSATTN_BACKEND"


class BackendChoice(NamedTuple):
    """The backend a call uses, and why each backend tried before it was rejected."""

    name: str
    rejected: dict


def _check_name(value, source: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{source} must be a str, one of {BACKEND_NAMES}, got {type(value).__name__}")
    if value not in BACKEND_NAMES:
        raise ValueError(f"{source} must be one of {BACKEND_NAMES}, got {value!r}")
    return value


@torch.compiler.assume_constant_result
def _unavailable(name: str) -> str | None:
    """``BACKENDS[name].unavailable()``, and the backend's module imported when it is usable.
    Under ``torch.compile`` this runs once, in plain Python, at trace time: Dynamo cannot trace
    ``importlib.util.find_spec`` (torch < 2.13) or ``importlib.import_module`` (a graph break
    on the first call in a fresh process), and availability does not change within a process."""
    backend = BACKENDS[name]
    why = backend.unavailable()
    if why is None and isinstance(backend, ModuleBackend):
        backend._module()  # cached: the traced code then only reads the attribute
    return why


@torch.compiler.assume_constant_result
def _from_environment() -> str:
    return os.environ.get(ENV_VAR, "")


def available_backends() -> dict:
    """``{name: None if usable here, else the reason it is not}``: None means the backend can
    run in this process (for inputs it supports); a string says what is missing and how to get
    it."""
    return {name: b.unavailable() for name, b in BACKENDS.items()}


def choose(problems: list[AttentionProblem], requested="auto") -> BackendChoice:
    """Pick the backend for ``problems`` (all directions of one call)."""
    name = _check_name(requested, "backend")
    source = f"backend={name!r}"
    env = _from_environment()
    if name == "auto" and env:
        name = _check_name(env, f"the environment variable {ENV_VAR}")
        source = f"{ENV_VAR}={name!r} (from the environment)"
    if name != "auto":
        backend = BACKENDS[name]
        why = _unavailable(name)
        if why:
            raise RuntimeError(f"{source} is not available: {why}")
        for p in problems:
            why = backend.unsupported(p)
            if why:
                raise ValueError(f"{source} does not support these inputs: {why}")
        return BackendChoice(name, {})
    q = problems[0].q
    order = AUTO_ORDER_CUDA if q.device.type == "cuda" else ("torch",)
    rejected = {}
    if q.device.type != "cuda":  # say why the kernel backends were not tried
        for candidate in AUTO_ORDER_CUDA[:-1]:
            why = f"auto uses the kernel backends for CUDA tensors only; the inputs are on {q.device}"
            if candidate == "triton" and q.device.type == "cpu":
                why += " (backend='triton' runs CPU tensors in the Triton interpreter, TRITON_INTERPRET=1: slow)"
            unavailable = _unavailable(candidate)
            rejected[candidate] = why + (f"; also unavailable here: {unavailable}" if unavailable else "")
    for candidate in order:
        backend = BACKENDS[candidate]
        why = _unavailable(candidate) or next(
            (w for w in (backend.unsupported(p) for p in problems) if w), None
        )
        if why is None:
            return BackendChoice(candidate, rejected)
        rejected[candidate] = why
    raise RuntimeError(f"no backend can run these inputs: {rejected}")  # torch always can
