"""Shared helpers: inputs, the float64 oracle, per-dtype tolerances."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from crossattn.reference import attention_reference

settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("thorough", max_examples=1500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Absolute/relative tolerance against the float64 reference computed from the same
# (already rounded) inputs: backends accumulate in float32 and round the result once.
TOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
# Gradients go through one more rounded matmul chain.
GRAD_TOL = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_qkv(B, H, Lq, Lk, D, Dv=None, *, dtype=torch.float32, seed=0, requires_grad=False,
             device="cpu"):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = torch.randn(B, H, Lq, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, H, Lk, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, H, Lk, Dv, generator=g).to(device=device, dtype=dtype)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v


def random_padding(B, L, *, seed=0, min_valid=1, device="cpu"):
    """Bool [B, L], True = padding, with a random valid prefix length per batch."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_valid, L + 1, (B,), generator=g)
    return torch.arange(L)[None, :] >= lengths[:, None]


def f64(*tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def assert_close(actual, expected, dtype, tol=None, what=""):
    tol = TOL[dtype] if tol is None else tol
    assert actual is not None and expected is not None, what
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.isfinite(actual.double()).all(), f"{what}: non-finite values"
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def reference(q, k, v, **kw):
    """The float64 oracle for inputs of any dtype."""
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    return attention_reference(q64, k64, v64, **kw)


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    # Tests choose backends explicitly; a developer's CROSSATTN_BACKEND must not leak in.
    monkeypatch.delenv("CROSSATTN_BACKEND", raising=False)
