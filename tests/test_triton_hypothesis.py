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


@st.composite
def model_option_problems(draw):
    """What real models add (#16): grouped kv heads, a broadcast bias with its gradient,
    bottom-right causality, a weight head subset, the statistics; with padding and temperature."""
    B, Hkv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    H = Hkv * draw(st.integers(1, 3))
    Lq, Lk = draw(st.integers(1, 40)), draw(st.integers(1, 70))
    D, Dv = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kw = {"is_causal": draw(st.booleans()), "need_weights": draw(st.sampled_from([False, "full", "mean"]))}
    if draw(st.booleans()):
        kw["kv_lengths"] = torch.randint(0, Lk + 1, (B,), generator=g)
    if draw(st.booleans()):
        kw["query_padding_mask"] = torch.rand(B, Lq, generator=g) < 0.3
    if draw(st.booleans()):
        kw["temperature"] = draw(st.floats(0.3, 3.0))
    if draw(st.booleans()):  # any broadcast of [B, H, Lq, Lk]
        shape = [draw(st.sampled_from([1, n])) for n in (B, H, Lq, Lk)]
        kw["attn_bias"] = (torch.randn(shape, generator=g) * 2).requires_grad_(True)
    if kw["need_weights"] and draw(st.booleans()):
        kw["weight_heads"] = tuple(sorted(draw(st.sets(st.integers(0, H - 1), min_size=1))))
    fields = draw(st.sets(st.sampled_from(TRITON_AUX_FIELDS)))
    if fields:
        kw["return_aux"] = crossattn.AuxRequest(**{f: (2 if f == "top_k" else True) for f in fields})
    if draw(st.booleans()):
        kw["dropout_p"] = 0.2
    q = torch.randn(B, H, Lq, D, generator=g)
    k = torch.randn(B, Hkv, Lk, D, generator=g)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g)
    return q, k, v, kw


# The statistics the Triton backend serves (crossattn/kernels/xattn.py FEATURES "aux_*").
TRITON_AUX_FIELDS = ("lse", "entropy", "key_mass", "top_k")


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_option_problems())
def test_random_model_options_match_reference(problem):
    """Outputs, weights, statistics and every gradient (q, k, v, bias, differentiable
    statistics) against the float64 reference."""
    q, k, v, kw = problem
    bias = kw.pop("attn_bias", None)
    kw = {n: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
    q, k, v = (x.to(DEVICE).requires_grad_(True) for x in (q, k, v))
    ins64 = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    kw64 = dict(kw)
    if bias is not None:
        kw["attn_bias"] = bias = bias.to(DEVICE).requires_grad_(True)
        kw64["attn_bias"] = bias64 = bias.detach().double().requires_grad_(True)
    torch.manual_seed(0)
    res = crossattn.cross_attention(q, k, v, backend="triton", **kw)
    torch.manual_seed(0)
    seed = draw_dropout_seed() if kw.get("dropout_p") else None
    ref = attention_reference(*ins64, dropout_seed=seed, **kw64)
    assert len(res) == len(ref)
    assert_close(res[0], ref[0], torch.float32, what="out")
    loss, ref_loss = res[0].double().sum(), ref[0].sum()
    if kw["need_weights"]:
        assert_close(res[1], ref[1], torch.float32, what="weights")
        loss, ref_loss = loss + (res[1].double() ** 2).sum(), ref_loss + (ref[1] ** 2).sum()
    else:
        assert res[1] is None
    if "return_aux" in kw:
        aux, ref_aux = res[2], ref[2]
        for f in ("lse", "entropy", "key_mass", "top_k_values", "top_k_indices"):
            a, b = getattr(aux, f), getattr(ref_aux, f)
            assert (a is None) == (b is None), f
            if a is None:
                continue
            if f == "top_k_indices":
                # Ties may pick either key: the indices must point at keys whose reference weight
                # is the returned value (-1 exactly where the reference has no key).
                assert torch.equal(a.cpu() < 0, b < 0), f
                p = attention_reference(*(x.detach() for x in ins64), **dict(
                    kw64, need_weights="full", weight_heads=None, return_aux=None, dropout_p=0.0))[1]
                at = p.gather(-1, a.cpu().clamp_min(0)).masked_fill(a.cpu() < 0, 0.0)
                assert_close(at, ref_aux.top_k_values, torch.float32, what="weights at top_k_indices")
                continue
            finite = torch.isfinite(b)
            assert torch.equal(torch.isfinite(a).cpu(), finite), f
            assert_close(torch.where(finite, a.double().cpu(), 0.0), torch.where(finite, b, 0.0),
                         torch.float32, what=f)
            if f in ("lse", "entropy", "key_mass"):
                w = torch.linspace(0.5, 1.5, b.numel()).reshape(b.shape)
                loss = loss + (torch.where(torch.isfinite(a), a.double(), 0.0) * w.to(a.device)).sum()
                ref_loss = ref_loss + (torch.where(finite, b, 0.0) * w).sum()
    loss.backward()
    ref_loss.backward()
    for name, a, b in zip(("dq", "dk", "dv"), (q, k, v), ins64):
        assert_close(a.grad, b.grad, torch.float32, tol=GRAD_TOL[torch.float32] * 10, what=name)
    if bias is not None:
        assert_close(bias.grad, bias64.grad, torch.float32, tol=GRAD_TOL[torch.float32] * 10, what="dbias")
