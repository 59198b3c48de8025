"""Issue 17 in the Triton kernels: ``return_aux`` entropy, key mass and top-k (and the LSE)
without the weights, alone and composed with padding, empty rows, pruning, temperature, bias,
causality, GQA, dropout, split keys and both directions -- values and gradients against the
float64 reference (interpreter: tiny odd shapes, fp32 at the project's fp32 tolerances) -- and
no ``[B, H, Lq, Lk]`` allocation for them."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import crossattn
from conftest import DEVICE, GRAD_TOL, assert_close, f64, leaf, triton_and_reference, triton_ready
from crossattn import AuxRequest, BlockPruning
from crossattn.reference import attention_reference, bidirectional_reference

pytestmark = pytest.mark.skipif(triton_ready() is not None, reason=f"triton backend: {triton_ready()}")

ALL = AuxRequest(lse=True, entropy=True, key_mass=True, top_k=4)
DIFFERENTIABLE = ("lse", "entropy", "key_mass")


def _finite(x):
    return x.masked_fill(torch.isinf(x), 0.0)


def compare_aux(aux, ref, req, dtype, what=""):
    """Every requested statistic against the reference's; the others None."""
    for name in aux._fields:
        a, b = getattr(aux, name), getattr(ref, name)
        if b is None:
            assert a is None, f"{what}{name}: not requested, got a tensor"
            continue
        assert a.device.type == DEVICE and a.shape == b.shape, (what, name, a.shape, b.shape)
        if name == "top_k_indices":
            assert a.dtype == torch.int64
            assert torch.equal(a.cpu(), b.cpu()), f"{what}{name}: {a} != {b}"
        elif name == "top_k_values":
            assert a.dtype == dtype and not a.requires_grad
            assert_close(a, b, dtype, what=what + name)
        else:
            assert a.dtype == torch.float32, (name, a.dtype)
            if name == "lse":
                assert torch.equal(torch.isinf(a).cpu(), torch.isinf(b).cpu()), f"{what}lse: -inf rows"
                a, b = _finite(a), _finite(b)
            assert_close(a, b, dtype, what=what + name)


def _stat_loss(aux, ref, gen):
    """sum(c * statistic) over the differentiable statistics, with the same random c for both."""
    loss = ref_loss = 0
    for name in DIFFERENTIABLE:
        a, b = getattr(aux, name), getattr(ref, name)
        if b is not None:
            c = torch.randn(b.shape, generator=gen, dtype=torch.float64)
            loss = loss + (_finite(a).double() * c.to(a.device)).sum()
            ref_loss = ref_loss + (_finite(b) * c).sum()
    return loss, ref_loss


def check(*, req=ALL, dtype=torch.float32, B=2, H=2, Hkv=None, Lq=17, Lk=33, D=16, Dv=None, bias_shape=None,
          need_weights=False, grad=True, out_grad=False, tol_scale=1.0, **kw):
    """Output and statistics against the float64 reference; with ``grad``, the gradients of q, k,
    v (and bias, temperature) of a loss on the statistics (and the output with ``out_grad``)."""
    Hkv, Dv = Hkv or H, Dv or D
    (out, w, aux), (ref_out, ref_w, ref_aux), leaves, leaves64 = triton_and_reference(
        dtype=dtype, B=B, H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv, bias_shape=bias_shape,
        need_weights=need_weights, return_aux=req, **kw)
    assert_close(out, ref_out, dtype, what="out")
    if need_weights:
        assert_close(w, ref_w, dtype, what="weights")
    compare_aux(aux, ref_aux, req, dtype)
    if not grad:
        return aux
    gen = torch.Generator().manual_seed(9)
    loss, ref_loss = _stat_loss(aux, ref_aux, gen)
    if out_grad:
        c = torch.randn(ref_out.shape, generator=gen, dtype=torch.float64)
        loss, ref_loss = loss + (out.double() * c).sum(), ref_loss + (ref_out * c).sum()
    loss.backward()
    ref_loss.backward()
    for name, a, b in zip(("dq", "dk", "dv", "d_extra", "d_extra2"), leaves, leaves64):
        if b.grad is None:  # v: no path from the statistics
            assert a.grad is None or not a.grad.any(), name
            continue
        assert_close(a.grad, b.grad, dtype, tol=GRAD_TOL[dtype] * tol_scale, what=name)
    return aux


# ----------------------------------------------------------------------------- each statistic
@pytest.mark.parametrize("req", [AuxRequest(entropy=True), AuxRequest(key_mass=True), AuxRequest(top_k=3),
                                 AuxRequest(lse=True, entropy=True)], ids=["entropy", "key_mass", "top_k", "lse+ent"])
def test_each_statistic_alone(req):
    check(req=req, grad=req.top_k == 0)


@pytest.mark.parametrize("Lq,Lk", [(1, 17), (33, 1), (17, 70)])
def test_odd_lengths_padding_and_empty_rows(Lq, Lk):
    """Batch 0 has no valid key (every row empty: lse -inf, entropy 0, no top-k, no mass),
    padded queries give nothing."""
    kpm = torch.arange(Lk)[None] >= torch.tensor([[0], [max(Lk - 3, 1)]])
    qpm = torch.arange(Lq)[None] >= torch.tensor([[Lq], [max(Lq - 2, 1)]])
    aux = check(Lq=Lq, Lk=Lk, key_padding_mask=kpm.to(DEVICE), query_padding_mask=qpm.to(DEVICE), out_grad=True)
    assert (aux.entropy[0] == 0).all() and (aux.key_mass[0] == 0).all() and (aux.top_k_indices[0] == -1).all()


def test_kv_lengths_fewer_keys_than_k():
    """Rows with fewer valid keys than k: the rest value 0, index -1."""
    aux = check(req=AuxRequest(entropy=True, top_k=6), Lq=5, Lk=9, kv_lengths=torch.tensor([3, 9], device=DEVICE))
    assert (aux.top_k_indices[0, ..., 3:] == -1).all() and (aux.top_k_values[0, ..., 3:] == 0).all()


@pytest.mark.parametrize("temperature", [0.6, "heads"])
def test_temperature(temperature):
    t = torch.tensor([0.6, 1.7], device=DEVICE) if temperature == "heads" else temperature
    check(temperature=t, scale=0.3, out_grad=True)


def test_gqa_causal_bias():
    check(H=4, Hkv=2, Lq=20, Lk=37, is_causal=True, bias_shape=(2, 1, 20, 37), out_grad=True)


def test_minus_inf_bias_empties_rows_and_masks_keys():
    bias = torch.zeros(2, 1, 11, 37, device=DEVICE)
    bias[0, :, :, 5:] = -math.inf
    bias[1, :, 3] = -math.inf
    aux = check(Lq=11, Lk=37, attn_bias=bias)
    assert (aux.entropy[1, :, 3] == 0).all() and (aux.top_k_indices[0] < 5).all()


@pytest.mark.parametrize("prune", ["topk", "fixed"])
def test_pruning(prune):
    if prune == "topk":
        pruning = BlockPruning(block_q=16, block_k=16, top_k=2)
    else:
        fixed = torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(3)) > 0.4
        fixed[..., 0, :] = False  # query block 0 keeps nothing: empty rows
        pruning = BlockPruning(block_q=16, block_k=32, block_mask=fixed.to(DEVICE))
    check(Lq=40, Lk=70, prune=pruning, out_grad=True)


def test_dropout_statistics_are_pre_dropout():
    check(dropout_p=0.3, out_grad=True)


def test_ties_go_to_the_lower_index():
    """Equal keys give equal weights: the reference's order (lower index first), across tiles."""
    q, k, v = (leaf(1, 1, L, 16, seed=s).detach() for s, L in ((1, 5), (2, 70), (3, 70)))
    k[0, 0, [3, 40, 65]] = k[0, 0, 50].clone()
    req = AuxRequest(top_k=5)
    _, _, aux = crossattn.cross_attention(q, k, v, backend="triton", return_aux=req)
    _, _, ref = attention_reference(*f64(q, k, v), return_aux=req)
    compare_aux(aux, ref, req, torch.float32)


def test_split_keys_and_weights(monkeypatch):
    """Split keys (flash-decoding) merge entropy and top-k in the combine kernel; weights and
    weight_heads alongside."""
    monkeypatch.setenv("CROSSATTN_TRITON_SPLITS", "3")
    check(req=AuxRequest(lse=True, entropy=True, key_mass=True, top_k=5), Lq=9, Lk=130, need_weights="full",
          weight_heads=(1,), key_padding_mask=(torch.arange(130)[None] >= torch.tensor([[130], [47]])).to(DEVICE),
          out_grad=True)


@pytest.mark.slow
@pytest.mark.parametrize("split", [None, "2"])
def test_everything_composed(split, monkeypatch):
    if split:
        monkeypatch.setenv("CROSSATTN_TRITON_SPLITS", split)
    B, Lq, Lk = 2, 40, 70
    fixed = torch.rand(B, 1, 3, 3, generator=torch.Generator().manual_seed(3)) > 0.3
    fixed[..., 0] = True
    check(req=AuxRequest(lse=True, entropy=True, key_mass=True, top_k=16), B=B, H=4, Hkv=2, Lq=Lq, Lk=Lk,
          bias_shape=(1, 4, 1, Lk), is_causal=True, kv_lengths=torch.tensor([70, 33], device=DEVICE),
          query_padding_mask=torch.arange(Lq, device=DEVICE)[None] >= torch.tensor([[40], [31]], device=DEVICE),
          prune=BlockPruning(block_q=16, block_k=32, block_mask=fixed.to(DEVICE)), dropout_p=0.2,
          temperature=torch.tensor([0.6, 1.0, 1.3, 2.0], device=DEVICE), need_weights="mean", out_grad=True,
          tol_scale=10.0)


def test_fp16_values():
    check(dtype=torch.float16, grad=False, key_padding_mask=(torch.arange(33)[None] >= torch.tensor(
        [[20], [33]])).to(DEVICE))


def test_bidirectional_aux_both_directions():
    B, H, Lx, Ly = 2, 2, 9, 14
    xs = [leaf(B, H, L, 16, seed=i) for i, L in enumerate((Lx, Lx, Lx, Ly, Ly, Ly))]
    kw = dict(return_aux=ALL, x_padding_mask=(torch.arange(Lx)[None] >= torch.tensor([[9], [6]])).to(DEVICE),
              temperature=0.8)
    res = crossattn.bidirectional_cross_attention(*xs, backend="triton", **kw)
    xs64 = f64(*xs)
    ref = bidirectional_reference(*xs64, **kw)
    assert_close(res.out_x, ref.out_x, torch.float32, what="out_x")
    assert_close(res.out_y, ref.out_y, torch.float32, what="out_y")
    gen = torch.Generator().manual_seed(1)
    loss = ref_loss = 0
    for which in ("aux_xy", "aux_yx"):
        compare_aux(getattr(res, which), getattr(ref, which), ALL, torch.float32, what=which + ".")
        a, b = _stat_loss(getattr(res, which), getattr(ref, which), gen)
        loss, ref_loss = loss + a, ref_loss + b
    loss.backward()
    ref_loss.backward()
    for a, b in zip(xs, xs64):
        if b.grad is not None:
            assert_close(a.grad, b.grad, torch.float32, tol=GRAD_TOL[torch.float32], what="grad")


# ----------------------------------------------------------------------------- contract
def test_top_k_limit_and_backend_choice():
    q, k, v = (torch.randn(1, 2, 5, 16, device=DEVICE) for _ in range(3))
    with pytest.raises(ValueError, match="top_k up to 16"):
        crossattn.cross_attention(q, k, v, backend="triton", return_aux=AuxRequest(top_k=17))
    assert "aux_top_k" in crossattn.kernels.xattn.FEATURES


class _Allocations(TorchDispatchMode):
    """The largest tensor (bytes) any torch op inside the block produced; the interpreter's
    copies of the arguments' storages (as bytes) included."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("weights", [0, 1], ids=["stats", "control_with_weights"])
def test_no_score_sized_allocation(weights, monkeypatch):
    """The launchers (forward with every statistic, backward with their gradients) allocate
    nothing near a [B, H, Lq, Lk] tensor (not a quarter of its fp32 bytes; the inputs and the
    split workspaces stay below that here) -- the control with full weights shows that the
    check sees one."""
    from crossattn.kernels import xattn

    monkeypatch.setenv("CROSSATTN_TRITON_SPLITS", "2")  # the split workspaces too
    B, H, Lq, Lk, D, top_k = 1, 2, 64, 256, 16, 8
    q, k, v = (torch.randn(B, h, L, D, device=DEVICE) for h, L in ((H, Lq), (1, Lk), (1, Lk)))
    kv = torch.arange(Lk, device=DEVICE)[None] < 200
    common = ([q], [k], [v], [None], [kv], [None], [0.25], None, 0.0, weights, [None], [None], 0, 0, [None],
              False, [])
    with _Allocations() as seen:
        outs, stats, ws, ents, kms, tvs, tis = xattn._launch_fwd(*common, True, True, top_k)
        xattn._launch_bwd([torch.ones_like(outs[0])], [torch.ones_like(ws[0]) if weights else None], [q], [k], [v],
                          outs, stats, [None], [kv], [None], [0.25], None, 0.0, weights, [None], [None], 0, 0,
                          [None], False, False, [], [torch.ones(B, H, Lq)], [torch.ones(B, H, Lq)],
                          [torch.ones(B, H, Lk)])
    assert kms[0].shape == (B, H, Lk) and tis[0].shape == (B, H, Lq, top_k)
    if weights:
        assert seen.largest >= B * H * Lq * Lk * 4
    else:
        assert seen.largest < B * H * Lq * Lk, seen.largest


def test_opcheck_with_statistics():
    from crossattn.kernels.xattn import xattn_bwd, xattn_fwd

    q, k, v = (leaf(1, 2, L, 16, seed=s) for s, L in ((1, 9), (2, 21), (3, 21)))
    kv = (torch.arange(21)[None] < 15).to(DEVICE)
    args = ([q], [k], [v], [None], [kv], [None], [0.25], None, 0.0, 0, [None], [None], 0, 0, [None], False, [])
    torch.library.opcheck(xattn_fwd, args + (True, True, 3))
    with torch.no_grad():
        outs, stats, *_ = xattn_fwd(*args, True, True, 3)
    bwd = ([torch.randn_like(outs[0])], [None], [q.detach()], [k.detach()], [v.detach()], outs, stats, [None], [kv],
           [None], [0.25], None, 0.0, 0, [None], [None], 0, 0, [None], False, False, [])
    torch.library.opcheck(xattn_bwd, bwd + ([torch.randn(1, 2, 9)], [torch.randn(1, 2, 9)], [torch.randn(1, 2, 21)]))



def test_split_keys_top_k_with_splits_short_of_k(monkeypatch):
    """Splits holding fewer than k attended keys (empty slots) merge without losing any."""
    monkeypatch.setenv("CROSSATTN_TRITON_SPLITS", "3")
    valid = (torch.arange(130) >= 28) & (torch.arange(130) < 41)  # 4 keys in tile 0, 9 in tile 1
    check(req=AuxRequest(entropy=True, top_k=16), B=1, Lq=3, Lk=130, grad=False,
          key_padding_mask=(~valid)[None].to(DEVICE))


@st.composite
def _problems(draw):
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    Lq, Lk = draw(st.integers(1, 40)), draw(st.integers(1, 70))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kw = {}
    mode = draw(st.sampled_from(["none", "mask", "lengths"]))
    if mode == "mask":
        kw["key_padding_mask"] = (torch.rand(B, Lk, generator=g) < draw(st.floats(0, 1))).to(DEVICE)
    elif mode == "lengths":
        kw["kv_lengths"] = torch.randint(0, Lk + 1, (B,), generator=g).to(DEVICE)
    if draw(st.booleans()):
        kw["query_padding_mask"] = (torch.rand(B, Lq, generator=g) < 0.3).to(DEVICE)
    if draw(st.booleans()):
        kw["temperature"] = draw(st.floats(0.2, 4.0))
    kw["is_causal"] = draw(st.booleans())
    req = AuxRequest(lse=draw(st.booleans()), entropy=draw(st.booleans()), key_mass=draw(st.booleans()),
                     top_k=draw(st.integers(0, 16)))
    x = [torch.randn(B, H, L, 16, generator=g).to(DEVICE).requires_grad_(True) for L in (Lq, Lk, Lk)]
    return x, kw, req


@pytest.mark.slow
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_problems())
def test_random_problems(problem):
    """Random shapes, padding, causality and requests. Top-k is checked without relying on the
    order of near ties: values against the reference's, indices by the reference weight they
    point to."""
    (q, k, v), kw, req = problem
    _, _, aux = crossattn.cross_attention(q, k, v, backend="triton", return_aux=req, **kw)
    x64 = f64(q, k, v)
    _, w, ref = attention_reference(*x64, need_weights="full", return_aux=req, **kw)
    if req.top_k:
        assert_close(aux.top_k_values, ref.top_k_values, torch.float32, what="top_k_values")
        idx = aux.top_k_indices
        assert torch.equal(idx < 0, ref.top_k_indices < 0), "top_k: unfilled slots"
        pointed = w.detach().gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, 0.0)
        assert_close(pointed, aux.top_k_values, torch.float32, what="top_k_indices")
        aux, ref = aux._replace(top_k_values=None, top_k_indices=None), ref._replace(top_k_values=None,
                                                                                     top_k_indices=None)
    compare_aux(aux, ref, req, torch.float32)
    loss, ref_loss = _stat_loss(aux, ref, torch.Generator().manual_seed(0))
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        loss.backward()
        ref_loss.backward()
        for name, a, b in zip(("dq", "dk"), (q, k), x64):
            assert_close(a.grad, b.grad, torch.float32, tol=GRAD_TOL[torch.float32], what=name)


@pytest.mark.slow
def test_compile_fullgraph_with_statistics():
    """torch.compile sees through the ops (fake implementations give the statistics' shapes)."""
    q, k, v = (leaf(1, 2, L, 16, seed=s) for s, L in ((1, 7), (2, 19), (3, 19)))

    def f(q, k, v):
        _, _, a = crossattn.cross_attention(q, k, v, backend="triton", return_aux=ALL)
        return a.entropy.sum() + a.key_mass.square().sum(), a.top_k_values, a.top_k_indices

    want = f(q, k, v)
    want[0].backward()
    grads = [x.grad.clone() for x in (q, k)]
    for x in (q, k):
        x.grad = None
    got = torch.compile(f, fullgraph=True)(q, k, v)
    got[0].backward()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    for x, g in zip((q, k), grads):
        torch.testing.assert_close(x.grad, g)
