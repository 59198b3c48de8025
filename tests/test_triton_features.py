"""Issue 16 in the Triton kernels: grouped-query heads, attn_bias, is_causal, ragged lengths,
weight_heads and the LSE statistic, alone and composed with padding, pruning, dropout,
temperature, split keys and both directions -- against the float64 reference (interpreter:
tiny shapes, fp32/fp16), and the tiles causal and ragged calls skip, counted."""
from __future__ import annotations

import math

import pytest
import torch

import crossattn
from conftest import (
    DEVICE,
    GRAD_TOL,
    INTERPRETING,
    assert_close,
    check_bidirectional,
    f64,
    leaf,
    random_padding,
    triton_and_reference,
    triton_ready,
)
from crossattn import AuxRequest, BlockPruning
from crossattn.reference import attention_reference, bidirectional_reference

pytestmark = pytest.mark.skipif(triton_ready() is not None, reason=f"triton backend: {triton_ready()}")

DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETING else [torch.bfloat16])
LSE = AuxRequest(lse=True)


def _finite(x):
    return x.masked_fill(torch.isinf(x), 0.0)


def check(dtype, *, B=2, H=4, Hkv=2, Lq=11, Lk=37, D=16, Dv=24, bias_shape=None, need_weights="full",
          tol_scale=1.0, **kw):
    """Outputs, weights, LSE and the gradients of q, k, v, bias and temperature against the
    float64 reference, for a loss with random cotangents on every result."""
    (out, w, aux), (ref_out, ref_w, ref_aux), leaves, leaves64 = triton_and_reference(
        dtype=dtype, B=B, H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv, bias_shape=bias_shape,
        need_weights=need_weights, return_aux=LSE, **kw)
    assert_close(out, ref_out, dtype, what="out")
    assert aux.lse.dtype == torch.float32
    assert torch.equal(torch.isinf(aux.lse), torch.isinf(ref_aux.lse)), "lse: -inf rows"
    assert_close(_finite(aux.lse), _finite(ref_aux.lse), dtype, what="lse")
    g = torch.Generator().manual_seed(9)
    pairs = [(out, ref_out), (_finite(aux.lse), _finite(ref_aux.lse))]
    if need_weights:
        assert_close(w, ref_w, dtype, what="weights")
        pairs.append((w, ref_w))
    loss = ref_loss = 0
    for a, b in pairs:
        c = torch.randn(a.shape, generator=g).to(a.device)
        loss = loss + (a.double() * c.double()).sum()
        ref_loss = ref_loss + (b * c.double()).sum()
    loss.backward()
    ref_loss.backward()
    for name, a, b in zip(("dq", "dk", "dv", "d_extra", "d_extra2"), leaves, leaves64):
        assert_close(a.grad, b.grad, dtype, tol=GRAD_TOL[dtype] * tol_scale, what=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["gqa", "mqa", "causal", "causal_more_queries", "ragged", "ragged_mask",
                                  "heads_full", "heads_mean"])
def test_feature_matches_reference(case, dtype):
    kw = {
        "gqa": dict(Hkv=2),
        "mqa": dict(Hkv=1, need_weights="mean"),
        "causal": dict(is_causal=True),
        "causal_more_queries": dict(is_causal=True, Lq=45, Lk=20),
        "ragged": dict(kv_lengths=torch.tensor([37, 9], device=DEVICE)),
        "ragged_mask": dict(key_padding_mask=torch.arange(37, device=DEVICE)[None] >= torch.tensor(
            [[0], [20]], device=DEVICE)),  # batch 0: no key at all (empty rows, -inf LSE)
        "heads_full": dict(weight_heads=(3, 0)),
        "heads_mean": dict(weight_heads=(2,), need_weights="mean"),
    }[case]
    check(dtype, **kw)


BIAS_SHAPES = [(1, 1, 11, 37), (2, 1, 11, 37), (1, 4, 1, 37), (2, 4, 11, 37), (1, 1, 1, 1), (2, 1, 11, 1)]


@pytest.mark.parametrize("dtype,shape", [(torch.float32, s) for s in BIAS_SHAPES]
                         + [(d, s) for d in DTYPES[1:] for s in BIAS_SHAPES[2:4]], ids=str)
def test_attn_bias_shapes_and_gradient(shape, dtype):
    """Read through broadcast strides; the gradient has the bias's own shape."""
    check(dtype, bias_shape=shape, temperature=torch.tensor([0.5, 1.0, 1.5, 2.0], device=DEVICE))


def test_minus_inf_bias_masks_and_empties_rows():
    bias = torch.zeros(2, 1, 11, 37, device=DEVICE)
    bias[0, :, :, 5:] = -math.inf
    bias[1, :, 3] = -math.inf  # query 3 of batch 1 sees nothing: zeros, LSE -inf, no NaN
    q, k, v = (leaf(2, 4, L, 16, seed=s) for s, L in ((1, 11), (2, 37), (3, 37)))
    out, w, aux = crossattn.cross_attention(q, k, v, attn_bias=bias, need_weights="full", return_aux=LSE,
                                            backend="triton")
    ref_out, ref_w, ref_aux = attention_reference(*f64(q, k, v), attn_bias=bias.double(), need_weights="full",
                                                  return_aux=LSE)
    assert_close(out, ref_out, torch.float32, what="out")
    assert_close(w, ref_w, torch.float32, what="weights")
    assert (out[1, :, 3] == 0).all() and (aux.lse[1, :, 3] == -math.inf).all()
    (out.sum() + w.sum()).backward()
    assert torch.isfinite(q.grad).all() and (q.grad[1, :, 3] == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", [None, "3"])
def test_everything_composed(split, dtype, monkeypatch):
    """GQA + bias + causal + ragged + query padding + pruning + dropout + per-head temperature
    + weight_heads + LSE, with and without split keys."""
    if split:
        monkeypatch.setenv("CROSSATTN_TRITON_SPLITS", split)
    B, Lq, Lk = 2, 40, 70
    fixed = torch.rand(B, 1, 3, 3, generator=torch.Generator().manual_seed(3)) > 0.3
    fixed[..., 0] = True
    check(dtype, B=B, Lq=Lq, Lk=Lk, bias_shape=(1, 4, 1, Lk), is_causal=True,
          kv_lengths=torch.tensor([70, 33], device=DEVICE),
          query_padding_mask=torch.arange(Lq, device=DEVICE)[None] >= torch.tensor([[40], [31]], device=DEVICE),
          prune=BlockPruning(block_q=16, block_k=32, block_mask=fixed.to(DEVICE)), dropout_p=0.2,
          temperature=torch.tensor([0.6, 1.0, 1.3, 2.0], device=DEVICE), weight_heads=(1, 3), tol_scale=10.0)


@pytest.mark.slow
@pytest.mark.parametrize("need_weights", ["full", "mean"])
def test_selected_causal_pruning_matches_reference(need_weights):
    """The selection kernel with causality: blocks above the diagonal are no candidates."""
    check(torch.float32, Lq=40, Lk=70, Hkv=1, is_causal=True, need_weights=need_weights,
          prune=BlockPruning(block_q=16, block_k=16, top_k=2))


def test_bidirectional_grouped_heads_and_weight_heads():
    """Each direction its own kv head count (k_y: 2 heads, k_x: 1), weights for two heads."""
    B, H, Lx, Ly = 2, 4, 9, 14
    heads_lengths = [(H, Lx), (1, Lx), (1, Lx), (H, Ly), (2, Ly), (2, Ly)]
    xs = [leaf(B, h, L, 16, seed=i) for i, (h, L) in enumerate(heads_lengths)]
    kw = dict(need_weights="full", weight_heads=(0, 3),
              x_padding_mask=(torch.arange(Lx, device=DEVICE)[None] >= torch.tensor([[9], [6]], device=DEVICE)))
    res = crossattn.bidirectional_cross_attention(*xs, backend="triton", **kw)
    ins64 = f64(*xs)
    ref = bidirectional_reference(*ins64, **kw)
    check_bidirectional(res, ref, xs, ins64, torch.float32)


def test_bidirectional_idle_kv_slabs_with_pruning_and_key_padding():
    """Directions with different kv head counts: the dK/dV launch covers the larger, so the
    other direction's extra slabs idle; with pruning and key padding they must read no layout or
    mask row past their own (an out-of-bounds read on a GPU) and change nothing."""
    B, H, Lx, Ly = 2, 4, 20, 37
    heads_lengths = [(H, Lx), (1, Lx), (1, Lx), (H, Ly), (4, Ly), (4, Ly)]
    xs = [leaf(B, h, L, 16, seed=i) for i, (h, L) in enumerate(heads_lengths)]
    kw = dict(need_weights="mean", prune=BlockPruning(block_q=16, block_k=16, keep=0.5),
              x_padding_mask=random_padding(B, Lx, seed=4).to(DEVICE),
              y_padding_mask=random_padding(B, Ly, seed=5).to(DEVICE))
    res = crossattn.bidirectional_cross_attention(*xs, backend="triton", **kw)
    ins64 = f64(*xs)
    ref = bidirectional_reference(*ins64, **kw)
    check_bidirectional(res, ref, xs, ins64, torch.float32)


@pytest.mark.skipif(not INTERPRETING, reason="counts tl.dot calls through the Triton interpreter")
def test_causal_and_ragged_tiles_cost_no_matrix_work(monkeypatch):
    """Every tl.dot belongs to a (query tile, key tile) pair some query of which attends some
    key of: forward 2 per pair (+1 for the weights), backward 7 (+1 for delta with a loss on the
    weights). Interpreter tiles are 32 x 32."""
    import triton.runtime.interpreter as interp

    calls = {"n": 0}
    real_dot = interp.InterpreterBuilder.create_dot

    def counting_dot(self, *args, **kwargs):
        calls["n"] += 1
        return real_dot(self, *args, **kwargs)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", counting_dot)

    def dots(Lq, Lk, **kw):
        q, k, v = (leaf(1, 1, L, 16, seed=s) for s, L in ((1, Lq), (2, Lk), (3, Lk)))
        calls["n"] = 0
        out, w = crossattn.cross_attention(q, k, v, backend="triton", need_weights="full", **kw)
        fwd = calls["n"]
        (out.sum() + w.square().sum()).backward()
        return fwd, calls["n"] - fwd

    assert dots(128, 128) == (3 * 16, 8 * 16)  # dense: 4 x 4 tile pairs
    assert dots(128, 128, is_causal=True) == (3 * 10, 8 * 10)  # the lower triangle with the diagonal
    assert dots(64, 128, is_causal=True) == (3 * 7, 8 * 7)  # bottom-right: rows see keys <= i + 64
    assert dots(64, 128, kv_lengths=torch.tensor([40], device=DEVICE)) == (3 * 4, 8 * 4)  # 2 key tiles
    mask = torch.ones(1, 128, dtype=torch.bool, device=DEVICE)
    mask[0, :33] = False  # the last valid key is 32: tiles 0 and 1
    assert dots(32, 128, key_padding_mask=mask) == (3 * 2, 8 * 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_call_on_cuda_tensors_never_waits_for_the_gpu():
    """Contract: no host sync in the default configuration -- dropout's seed, the weight heads'
    tables, the pruning keep table and a kv_lengths list reach the device without waiting."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 64, generator=g).to("cuda", torch.float16).requires_grad_()
               for n in (100, 300, 300))
    bias = torch.randn(1, 4, 1, 300, generator=g).to("cuda", torch.float16)
    cases = (dict(kv_lengths=[300, 180], dropout_p=0.1, need_weights="mean", weight_heads=[1, 3]),
             dict(prune=BlockPruning(block_q=64, block_k=64, keep=0.5), return_aux=LSE, attn_bias=bias),
             dict(is_causal=True, need_weights="full", temperature=torch.full((4,), 0.7, device="cuda")))

    def run(kw):
        res = crossattn.cross_attention(q, k, v, backend="triton", **kw)
        (res[0].float().sum() + (res[1].float().sum() if res[1] is not None else 0.0)).backward()

    for kw in cases:  # compiles every variant outside the checked region
        run(kw)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for kw in cases:
            run(kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
