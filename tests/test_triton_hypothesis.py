"""Random shapes, masks and options on backend="triton" (the interpreter without a GPU)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crossattn
from crossattn._philox import draw_dropout_seed
from crossattn.reference import attention_reference
from conftest import DEVICE, GRAD_TOL, assert_close, triton_ready

pytestmark = pytest.mark.skipif(triton_ready() is not None, reason=f"triton backend: {triton_ready()}")


@st.composite
def problems(draw):
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    Lq, Lk = draw(st.integers(1, 45)), draw(st.integers(1, 80))
    D, Dv = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kw = {}
    mode = draw(st.sampled_from(["none", "mask", "lengths"]))
    if mode == "mask":
        kw["key_padding_mask"] = torch.rand(B, Lk, generator=g) < draw(st.floats(0, 1))
    elif mode == "lengths":
        kw["kv_lengths"] = torch.randint(0, Lk + 1, (B,), generator=g)
    if draw(st.booleans()):
        kw["query_padding_mask"] = torch.rand(B, Lq, generator=g) < 0.3
    temp = draw(st.sampled_from(["none", "float", "heads"]))
    if temp == "float":
        kw["temperature"] = draw(st.floats(0.2, 4.0))
    elif temp == "heads":
        kw["temperature"] = (torch.rand(H, generator=g) * 2 + 0.3).requires_grad_(True)
    if draw(st.booleans()):
        kw["dropout_p"] = draw(st.floats(0.0, 0.8))
    kw["need_weights"] = draw(st.sampled_from([False, "full", "mean"]))
    q = torch.randn(B, H, Lq, D, generator=g)
    k = torch.randn(B, H, Lk, D, generator=g)
    v = torch.randn(B, H, Lk, Dv, generator=g)
    return q, k, v, kw


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_random_problems_match_reference(problem):
    q, k, v, kw = problem
    kw = {n: x.to(DEVICE) if isinstance(x, torch.Tensor) and n != "temperature" else x
          for n, x in kw.items()}
    t = kw.get("temperature")
    if isinstance(t, torch.Tensor):
        kw["temperature"] = t = t.detach().to(DEVICE).requires_grad_(True)
    q, k, v = (x.to(DEVICE).requires_grad_(True) for x in (q, k, v))
    kw64 = dict(kw)
    if isinstance(t, torch.Tensor):
        kw64["temperature"] = t64 = t.detach().double().requires_grad_(True)
    _check_against_reference(q, k, v, kw, kw64)
    if isinstance(t, torch.Tensor):
        assert_close(t.grad, t64.grad, torch.float32, tol=GRAD_TOL[torch.float32] * 10, what="dtemperature")


def _check_against_reference(q, k, v, kw, kw64):
    """Triton with ``kw`` against the float64 reference with ``kw64`` (same dropout seed):
    output, weights, and the gradients of a loss on both."""
    torch.manual_seed(0)
    out, w = crossattn.cross_attention(q, k, v, backend="triton", **kw)
    torch.manual_seed(0)
    seed = draw_dropout_seed() if kw.get("dropout_p") else None
    ins64 = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ref_out, ref_w = attention_reference(*ins64, dropout_seed=seed, **kw64)
    assert_close(out, ref_out, torch.float32, what="out")
    loss, ref_loss = out.double().sum(), ref_out.sum()
    if kw["need_weights"]:
        assert_close(w, ref_w, torch.float32, what="weights")
        loss = loss + (w.double() ** 2).sum()
        ref_loss = ref_loss + (ref_w ** 2).sum()
    loss.backward()
    ref_loss.backward()
    for a, b in zip((q, k, v), ins64):
        assert_close(a.grad, b.grad, torch.float32, tol=GRAD_TOL[torch.float32] * 10, what="grad")

@st.composite
def pruned_problems(draw):
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Lq, Lk = draw(st.integers(1, 70)), draw(st.integers(1, 150))
    D = draw(st.integers(1, 24))
    bq, bk = draw(st.sampled_from([16, 32, 64])), draw(st.sampled_from([16, 32, 64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    nqb, nkb = -(-Lq // bq), -(-Lk // bk)
    rule = draw(st.sampled_from(["fixed", "top_k", "keep", "mass"]))
    if rule == "fixed":
        shape = (draw(st.sampled_from([1, B])), draw(st.sampled_from([1, H])), nqb, nkb)
        prune = crossattn.BlockPruning(block_q=bq, block_k=bk,
                                       block_mask=torch.rand(shape, generator=g) < draw(st.floats(0, 1)))
    elif rule == "top_k":
        prune = crossattn.BlockPruning(block_q=bq, block_k=bk, top_k=draw(st.integers(1, 4)))
    elif rule == "keep":
        prune = crossattn.BlockPruning(block_q=bq, block_k=bk, keep=draw(st.sampled_from([0.1, 0.3, 0.5, 1.0])))
    else:
        prune = crossattn.BlockPruning(block_q=bq, block_k=bk, mass=draw(st.sampled_from([0.5, 0.8, 0.95])),
                                       min_blocks=draw(st.integers(1, 3)))
    kw = {"prune": prune, "need_weights": draw(st.sampled_from([False, "full", "mean"]))}
    if draw(st.booleans()):
        kw["key_padding_mask"] = torch.rand(B, Lk, generator=g) < draw(st.floats(0, 0.9))
    if draw(st.booleans()):
        kw["query_padding_mask"] = torch.rand(B, Lq, generator=g) < 0.3
    if draw(st.booleans()):
        kw["dropout_p"] = 0.25
    q = torch.randn(B, H, Lq, D, generator=g)
    k = torch.randn(B, H, Lk, D, generator=g)
    v = torch.randn(B, H, Lk, D, generator=g)
    return q, k, v, kw


@pytest.mark.slow
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pruned_problems())
def test_random_pruned_problems_match_reference(problem):
    """The kernels' walk over the compact layouts (row-wise for forward/dQ, transposed for
    dK/dV, several tiles per block) against the reference attending over the same blocks."""
    from crossattn.kernels.xattn_select import select_blocks_triton

    q, k, v, kw = problem
    kw = {n: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
    q, k, v = (x.to(DEVICE).requires_grad_(True) for x in (q, k, v))
    prune = kw["prune"]
    kpm, qpm = kw.get("key_padding_mask"), kw.get("query_padding_mask")
    chosen = select_blocks_triton(q, k, prune, key_valid=None if kpm is None else ~kpm,
                                  query_valid=None if qpm is None else ~qpm).mask
    fixed = crossattn.BlockPruning(block_q=prune.block_q, block_k=prune.block_k, block_mask=chosen.cpu())
    _check_against_reference(q, k, v, kw, dict(kw, prune=fixed))
