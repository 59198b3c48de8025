"""Shared helpers: inputs, the float64 oracle, per-dtype tolerances."""
from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels run on the CPU through the interpreter; the flag must
# be set before triton is imported (crossattn imports it lazily, on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from crossattn import BlockPruning
from crossattn._philox import draw_dropout_seed
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
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def triton_ready() -> str | None:
    """None when the Triton backend can run here, else why not."""
    import crossattn

    return crossattn.available_backends()["triton"]


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


def check_gradients(run, q, k, v, kw, need_weights, dtype, tol_scale=1.0, out_loss=True):
    """Forward, weights and every gradient of ``run`` against the float64 reference; the
    loss weighs outputs (unless not ``out_loss``: a loss on the weights alone) and weights
    with random cotangents."""
    t = kw.get("temperature")
    if isinstance(t, torch.Tensor):
        t.requires_grad_(True)
    torch.manual_seed(123)
    out, w = run(q, k, v, need_weights=need_weights, **kw)
    torch.manual_seed(123)
    seed = draw_dropout_seed() if kw.get("dropout_p") else None
    q64, k64, v64 = f64(q, k, v)
    kw64 = dict(kw)
    if isinstance(t, torch.Tensor):
        kw64["temperature"] = t.detach().double().requires_grad_(True)
    ref_out, ref_w = attention_reference(q64, k64, v64, need_weights=need_weights,
                                         dropout_seed=seed, **kw64)
    assert_close(out, ref_out, dtype, what="out")
    g = torch.Generator().manual_seed(9)
    g_out = torch.randn(out.shape, generator=g).to(out.device)
    loss = (out.double() * g_out.to(dtype).double()).sum() if out_loss else 0  # 0: no output gradient at all
    ref_loss = (ref_out * g_out.to(dtype).double()).sum() if out_loss else 0
    if need_weights:
        assert_close(w, ref_w, dtype, what="weights")
        g_w = torch.randn(w.shape, generator=g).to(w.device)
        loss = loss + (w.double() * g_w.to(dtype).double()).sum()
        ref_loss = ref_loss + (ref_w * g_w.to(dtype).double()).sum()
    loss.backward()
    ref_loss.backward()
    tol = GRAD_TOL[dtype] * tol_scale
    for name, a, b in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert a.grad.dtype == dtype
        assert_close(a.grad, b.grad if b.grad is not None else torch.zeros_like(b), dtype, tol=tol, what=name)
    if isinstance(t, torch.Tensor):
        assert_close(t.grad, kw64["temperature"].grad, dtype, tol=tol, what="dtemperature")


def check_bidirectional(res, ref, leaves, leaves64, dtype, tol_scale=10.0):
    """A bidirectional result against its float64 reference: every field (None where the
    reference has None), then the gradients of sum(field**2) for each pair of leaves."""
    for name in res._fields:
        a, b = getattr(res, name), getattr(ref, name)
        if b is None:
            assert a is None, f"{name}: expected None"
        else:
            assert_close(a, b, dtype, what=name)
    sum((r.double() ** 2).sum() for r in res if r is not None).backward()
    sum((r ** 2).sum() for r in ref if r is not None).backward()
    for a, b in zip(leaves, leaves64):
        assert_close(a.grad, b.grad, dtype, tol=GRAD_TOL[dtype] * tol_scale, what="grad")


# Option sets shared by the backend tests (strings are materialised per shape).
FEATURES = {
    "plain": {},
    "key_padding": {"key_padding_mask": "kpm"},
    "kv_lengths": {"kv_lengths": "lengths"},
    "query_padding": {"query_padding_mask": "qpm", "key_padding_mask": "kpm"},
    "temperature_float": {"temperature": 0.6, "scale": 0.3},
    "temperature_heads": {"temperature": "t"},
    "dropout": {"dropout_p": 0.2},
    "prune_topk": {"prune": BlockPruning(block_q=16, block_k=16, top_k=2)},
    "prune_fixed": {"prune": "block_mask"},
    "everything": {
        "key_padding_mask": "kpm", "query_padding_mask": "qpm", "temperature": "t",
        "dropout_p": 0.3, "prune": BlockPruning(block_q=16, block_k=32, keep=0.5),
    },
}


def materialise(spec, B, H, Lq, Lk, dtype):
    """Turn a FEATURES entry into keyword arguments for shapes (B, H, Lq, Lk)."""
    g = torch.Generator().manual_seed(5)
    out = {}
    for name, value in spec.items():
        if value == "kpm":
            value = random_padding(B, Lk, seed=2)
        elif value == "qpm":
            value = random_padding(B, Lq, seed=3)
        elif value == "lengths":
            value = torch.randint(0, Lk + 1, (B,), generator=g)
        elif value == "t":
            value = (torch.rand(H, generator=g) + 0.5).to(torch.float64 if dtype == torch.float64 else torch.float32)
        elif value == "block_mask":
            value = torch.rand(B, 1, -(-Lq // 64), -(-Lk // 64), generator=g) > 0.4
        out[name] = value
    return out


def leaf(*shape, dtype=torch.float32, seed=0):
    """A random leaf on the test device, requiring grad (seeded: same values on every device)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype).requires_grad_(True)


def triton_and_reference(*, dtype, B, H, Hkv, Lq, Lk, D, Dv, bias_shape=None, need_weights=False, return_aux=None,
                         **kw):
    """One Triton ``cross_attention`` call and the float64 reference on the same leaves, dropout
    seed, bias and temperature: ``(res, ref, leaves, leaves64)`` with ``res``/``ref`` the
    ``(out, weights, aux)`` triples and ``leaves`` q, k, v, then the bias and a temperature
    tensor when given (their float64 copies in ``leaves64``)."""
    import crossattn

    leaves = [leaf(B, H, Lq, D, dtype=dtype, seed=1), leaf(B, Hkv, Lk, D, dtype=dtype, seed=2),
              leaf(B, Hkv, Lk, Dv, dtype=dtype, seed=3)]
    if bias_shape is not None:
        kw["attn_bias"] = leaf(*bias_shape, seed=4)
        leaves.append(kw["attn_bias"])
    t = kw.get("temperature")
    if isinstance(t, torch.Tensor):
        leaves.append(t.requires_grad_(True))
    torch.manual_seed(7)
    res = crossattn.cross_attention(*leaves[:3], backend="triton", need_weights=need_weights,
                                    return_aux=return_aux, **kw)
    torch.manual_seed(7)  # the seed the call drew
    seed = draw_dropout_seed() if kw.get("dropout_p") else None
    leaves64 = f64(*leaves)
    if bias_shape is not None:
        kw["attn_bias"] = leaves64[3]
    if isinstance(t, torch.Tensor):
        kw["temperature"] = leaves64[-1]
    ref = attention_reference(*leaves64[:3], need_weights=need_weights, return_aux=return_aux, dropout_seed=seed,
                              **kw)
    return res, ref, leaves, leaves64
