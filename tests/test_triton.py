"""backend="triton" against the float64 reference.

Without a GPU these run the kernels through the Triton interpreter (conftest sets
TRITON_INTERPRET=1) at small shapes; with one, on the GPU. Tests marked ``gpu`` use real
sizes and need CUDA. bf16 is left out under the interpreter: its tl.dot is wrong there.
"""
from __future__ import annotations

import pytest
import torch

import crossattn
from crossattn._philox import draw_dropout_seed
from crossattn.reference import bidirectional_reference
from conftest import (
    DEVICE, FEATURES, GRAD_TOL, INTERPRETING, assert_close, check_bidirectional, check_gradients, f64,
    make_qkv, materialise, random_padding, reference, triton_ready,
)

pytestmark = pytest.mark.skipif(triton_ready() is not None, reason=f"triton backend: {triton_ready()}")

DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETING else [torch.bfloat16])
SHAPES = [
    # B, H, Lq, Lk, D, Dv
    (1, 1, 1, 1, 16, 16),
    (2, 3, 20, 67, 32, 32),
    (2, 2, 37, 50, 24, 16),  # non-power-of-two dims, Dv != D
    (1, 2, 17, 33, 96, 96),  # the seed's head dim
    (2, 1, 70, 5, 64, 40),  # more queries than keys
]
DENSE_FEATURES = [f for f, spec in FEATURES.items() if "prune" not in spec]
ALL_OPTIONS = {"key_padding_mask": "kpm", "query_padding_mask": "qpm", "temperature": "t",
               "dropout_p": 0.3}


def run(q, k, v, **kw):
    return crossattn.cross_attention(q, k, v, backend="triton", **kw)


def inputs(B, H, Lq, Lk, D, Dv, dtype, **kw):
    return make_qkv(B, H, Lq, Lk, D, Dv, dtype=dtype, device=DEVICE, **kw)


def to_device(kw):
    return {n: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for n, x in kw.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("need_weights", [False, "full", "mean"])
def test_forward_and_weights_match_reference(shape, dtype, need_weights):
    B, H, Lq, Lk, D, Dv = shape
    q, k, v = inputs(*shape, dtype)
    kpm = random_padding(B, Lk, seed=1).to(DEVICE)
    out, w = run(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
    ref_out, ref_w = reference(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
    assert out.dtype == dtype and out.device == q.device
    assert_close(out, ref_out, dtype, what="out")
    if need_weights:
        assert w.dtype == dtype
        assert_close(w, ref_w, dtype, what="weights")
    else:
        assert w is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", DENSE_FEATURES)
@pytest.mark.parametrize("need_weights", [False, "mean"])
def test_gradients_match_reference(feature, dtype, need_weights):
    B, H, Lq, Lk, D, Dv = 2, 3, 37, 50, 24, 16
    q, k, v = inputs(B, H, Lq, Lk, D, Dv, dtype, requires_grad=True)
    kw = to_device(materialise(FEATURES[feature], B, H, Lq, Lk, dtype))
    check_gradients(run, q, k, v, kw, need_weights, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_all_options_with_full_weights(shape, dtype):
    B, H, Lq, Lk, D, Dv = shape
    q, k, v = inputs(*shape, dtype, requires_grad=True)
    kw = to_device(materialise(ALL_OPTIONS, B, H, Lq, Lk, dtype))
    check_gradients(run, q, k, v, kw, "full", dtype)


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_key_forward_matches_reference(splits, dtype, monkeypatch):
    """Flash-decoding path: few query rows, the keys split across programs and merged."""
    monkeypatch.setenv("CROSSATTN_TRITON_SPLITS", str(splits))
    B, H, Lq, Lk, D, Dv = 2, 2, 5, 150, 32, 24
    q, k, v = inputs(B, H, Lq, Lk, D, Dv, dtype, requires_grad=True)
    kw = to_device(materialise(ALL_OPTIONS, B, H, Lq, Lk, dtype))
    kw["key_padding_mask"][0, 40:] = True  # batch 0: the later splits see only padding
    kw["query_padding_mask"][1, 3] = True
    check_gradients(run, q, k, v, kw, "mean", dtype)


def test_split_key_bidirectional_with_unequal_lengths(monkeypatch):
    monkeypatch.setenv("CROSSATTN_TRITON_SPLITS", "4")
    counts = _count_launches(monkeypatch)
    qx, kx, vx = inputs(1, 2, 3, 3, 16, 16, torch.float32, seed=1)
    qy, ky, vy = inputs(1, 2, 130, 130, 16, 16, torch.float32, seed=2)
    res = crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky, vy, backend="triton",
                                                  need_weights="full")
    assert counts["_xattn_fwd_kernel"] == 1 and counts["_xattn_fwd_combine_kernel"] == 1
    ref = bidirectional_reference(*f64(qx, kx, vx, qy, ky, vy), need_weights="full")
    for name in res._fields:
        assert_close(getattr(res, name), getattr(ref, name), torch.float32, what=name)


def test_empty_rows_give_zero_output_weights_and_gradients():
    q, k, v = inputs(3, 2, 20, 40, 16, 16, torch.float32, requires_grad=True)
    lengths = torch.tensor([40, 0, 7], device=DEVICE)
    qpm = torch.zeros(3, 20, dtype=torch.bool, device=DEVICE)
    qpm[2, 11:] = True
    out, w = run(q, k, v, kv_lengths=lengths, query_padding_mask=qpm, need_weights="full")
    assert (out[1] == 0).all() and (w[1] == 0).all()
    assert (out[2, :, 11:] == 0).all() and (w[2, :, 11:] == 0).all() and (w[2, ..., 7:] == 0).all()
    (out.sum() + (w * 3).sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[1] == 0).all() and (k.grad[1] == 0).all() and (v.grad[1] == 0).all()
    assert (q.grad[2, :, 11:] == 0).all() and (k.grad[2, :, 7:] == 0).all()


@pytest.mark.parametrize("Lq,Lk", [(0, 5), (4, 0)])
def test_empty_sequences(Lq, Lk):
    q, k, v = inputs(2, 2, Lq, Lk, 16, 16, torch.float32, requires_grad=True)
    out, w = run(q, k, v, need_weights="mean")
    assert out.shape == (2, 2, Lq, 16) and w.shape == (2, Lq, Lk)
    assert (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()


def test_non_contiguous_inputs():
    base = torch.randn(2, 30, 3, 16 * 3, device=DEVICE)
    q = base[..., :16].transpose(1, 2)
    k = base[..., 16:32].transpose(1, 2)[:, :, ::2]
    v = base[..., 32:].transpose(1, 2)[:, :, ::2]
    assert not q.is_contiguous() and not k.is_contiguous()
    out, w = run(q, k, v, need_weights="full")
    ref_out, ref_w = reference(q, k, v, need_weights="full")
    assert_close(out, ref_out, torch.float32, what="out")
    assert_close(w, ref_w, torch.float32, what="weights")


def _count_launches(monkeypatch):
    import crossattn.kernels.xattn as xattn

    counts = {}
    for name in ("_xattn_fwd_kernel", "_xattn_fwd_combine_kernel", "_xattn_weights_kernel",
                 "_xattn_bwd_delta_kernel", "_xattn_bwd_dkdv_kernel", "_xattn_bwd_dq_kernel"):
        kernel = getattr(xattn, name)

        class Counting:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                counts[self.name] = counts.get(self.name, 0) + 1
                return self.kernel[grid]

        monkeypatch.setattr(xattn, name, Counting(kernel, name))
    return counts


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bidirectional_one_launch_per_pass_matches_reference(dtype, monkeypatch):
    counts = _count_launches(monkeypatch)
    B, H, Lx, Ly = 2, 2, 19, 45
    qx, kx, vx = inputs(B, H, Lx, Lx, 32, 24, dtype, seed=1, requires_grad=True)
    qy, ky, vy = inputs(B, H, Ly, Ly, 32, 24, dtype, seed=2, requires_grad=True)
    xm = random_padding(B, Lx, seed=3).to(DEVICE)
    ym = random_padding(B, Ly, seed=4).to(DEVICE)
    t = (torch.tensor([0.5, 2.0], device=DEVICE, requires_grad=True), 0.7)
    kw = dict(x_padding_mask=xm, y_padding_mask=ym, need_weights="full", dropout_p=0.1)
    torch.manual_seed(8)
    res = crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky, vy, backend="triton",
                                                  temperature=t, **kw)
    loss = sum((r.double() ** 2).sum() for r in res)
    loss.backward()
    assert counts == {"_xattn_fwd_kernel": 1, "_xattn_weights_kernel": 1,
                      "_xattn_bwd_delta_kernel": 1, "_xattn_bwd_dkdv_kernel": 1,
                      "_xattn_bwd_dq_kernel": 1}
    torch.manual_seed(8)
    seed = draw_dropout_seed()
    ins64 = f64(qx, kx, vx, qy, ky, vy)
    t64 = (t[0].detach().double().requires_grad_(True), 0.7)
    ref = bidirectional_reference(*ins64, dropout_seed=seed, temperature=t64, **kw)
    for name in res._fields:
        assert_close(getattr(res, name), getattr(ref, name), dtype, what=name)
    sum((r ** 2).sum() for r in ref).backward()
    for a, b in zip((qx, kx, vx, qy, ky, vy, t[0]), (*ins64, t64[0])):
        assert_close(a.grad, b.grad, dtype, tol=GRAD_TOL[dtype] * 10, what="grad")


@pytest.mark.slow
def test_opcheck():
    from crossattn.kernels.xattn import xattn_bwd, xattn_fwd
    from crossattn.kernels.xattn_select import compact

    q, k, v = inputs(2, 2, 9, 21, 16, 24, torch.float32, requires_grad=True)
    kv = ~random_padding(2, 21, seed=1).to(DEVICE)
    qv = ~random_padding(2, 9, seed=2).to(DEVICE)
    t = torch.tensor([0.5, 1.5], device=DEVICE, requires_grad=True)
    seed = torch.tensor(1234, dtype=torch.int64, device=DEVICE)
    block_mask = torch.rand(2, 1, 1, 2, device=DEVICE) > 0.3
    no_prune = ([None], [None], 0, 0)
    plain = ([None], False, [], False, False, 0)  # attn_bias, is_causal, weight_heads, statistics
    for weights in (0, 1, 2):
        args = ([q], [k], [v], [qv], [kv], [t], [0.25], seed, 0.2, weights)
        torch.library.opcheck(xattn_fwd, args + no_prune + plain)
    torch.library.opcheck(xattn_fwd, args + ([block_mask], [None], 16, 16) + plain)
    layout = compact(block_mask, 2, 2)
    torch.library.opcheck(xattn_fwd, args + ([block_mask], [layout], 16, 16) + plain)
    # Grouped heads, a learnable bias, causality and a head subset.
    k1, v1 = k[:, :1].detach().requires_grad_(True), v[:, :1].detach().requires_grad_(True)
    bias = torch.randn(1, 2, 1, 21, device=DEVICE, requires_grad=True)
    args = ([q], [k1], [v1], [qv], [kv], [t], [0.25], None, 0.0, 1) + no_prune
    torch.library.opcheck(xattn_fwd, args + ([bias], True, [1], False, False, 0))
    with torch.no_grad():  # the backward op itself is not differentiable (no double backward)
        outs, stats, *_ = xattn_fwd([q], [k], [v], [None], [kv], [None], [0.25], None, 0.0, 1, *no_prune, *plain)
    bwd_args = ([torch.randn_like(outs[0])], [torch.randn(2, 2, 9, 21, device=DEVICE)],
                [q.detach()], [k.detach()], [v.detach()], outs, stats, [None], [kv], [None],
                [0.25], None, 0.0, 1) + no_prune
    torch.library.opcheck(xattn_bwd, bwd_args + ([bias.detach()], True, True, [], [torch.randn(2, 2, 9)], [None],
                                                 [None]))


def test_compile_fullgraph():
    q, k, v = inputs(2, 2, 10, 30, 16, 16, torch.float32, requires_grad=True)
    kpm = random_padding(2, 30, seed=1).to(DEVICE)

    def f(q, k, v):
        o, w = run(q, k, v, key_padding_mask=kpm, need_weights="mean")
        return o.sum() + w.square().sum()

    expected = f(q, k, v)
    expected.backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    got = torch.compile(f, fullgraph=True)(q, k, v)
    got.backward()
    torch.testing.assert_close(got, expected)
    for x, g in zip((q, k, v), grads):
        torch.testing.assert_close(x.grad, g)


# ----------------------------------------------------------------------------- GPU only
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_seed_workload_on_gpu(dtype):
    """Seed 000: B=4, T=512 text tokens, A=1000 audio frames, E=768, H=8 (head dim 96)."""
    B, H, T, A, D = 4, 8, 512, 1000, 96
    qx, kx, vx = make_qkv(B, H, T, T, D, dtype=dtype, device="cuda", seed=1, requires_grad=True)
    qy, ky, vy = make_qkv(B, H, A, A, D, dtype=dtype, device="cuda", seed=2, requires_grad=True)
    xm = random_padding(B, T, seed=3).cuda()
    ym = random_padding(B, A, seed=4).cuda()
    kw = dict(x_padding_mask=xm, y_padding_mask=ym, need_weights="mean")
    res = crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky, vy, backend="triton", **kw)
    ins64 = f64(qx, kx, vx, qy, ky, vy)
    ref = bidirectional_reference(*ins64, **kw)
    check_bidirectional(res, ref, (qx, kx, vx, qy, ky, vy), ins64, dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("Lq,Lk,D", [(20, 30_001, 64), (1, 1000, 128), (257, 999, 80), (129, 65, 256)])
def test_odd_lengths_on_gpu(Lq, Lk, D, dtype):
    q, k, v = make_qkv(2, 4, Lq, Lk, D, dtype=dtype, device="cuda", requires_grad=True)
    kw = to_device(materialise(ALL_OPTIONS, 2, 4, Lq, Lk, dtype))
    check_gradients(run, q, k, v, kw, "full", dtype, tol_scale=10)


@pytest.mark.gpu
@gpu
def test_cuda_graph_replay_matches_eager():
    q, k, v = make_qkv(2, 8, 64, 700, 64, dtype=torch.float16, device="cuda")
    kpm = random_padding(2, 700, seed=1).cuda()

    def f():
        return crossattn.cross_attention(q, k, v, key_padding_mask=kpm, need_weights="mean",
                                         backend="triton")

    expected = f()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        f()  # warm-up compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, w = f()
    q.copy_(q * 0.5)
    graph.replay()
    torch.cuda.synchronize()
    fresh = f()
    torch.testing.assert_close(out, fresh[0])
    torch.testing.assert_close(w, fresh[1])
    assert not torch.allclose(out, expected[0])


def test_bidirectional_options_on_one_side_only():
    """A mask on one side and a temperature for one direction: lists of optional tensors
    through the custom op's autograd."""
    qx, kx, vx = inputs(2, 2, 11, 11, 16, 16, torch.float32, seed=1, requires_grad=True)
    qy, ky, vy = inputs(2, 2, 23, 23, 16, 16, torch.float32, seed=2, requires_grad=True)
    ym = random_padding(2, 23, seed=3).to(DEVICE)
    t = torch.tensor([0.6, 1.4], device=DEVICE, requires_grad=True)
    kw = dict(y_padding_mask=ym, need_weights="mean")
    res = crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky, vy, temperature=(t, None),
                                                  backend="triton", **kw)
    ins64 = f64(qx, kx, vx, qy, ky, vy)
    t64 = t.detach().double().requires_grad_(True)
    ref = bidirectional_reference(*ins64, temperature=(t64, None), **kw)
    check_bidirectional(res, ref, (qx, kx, vx, qy, ky, vy, t), (*ins64, t64), torch.float32)


@pytest.mark.parametrize("need_weights", ["full", "mean"])
def test_loss_on_one_directions_weights_only(need_weights):
    qx, kx, vx = inputs(1, 2, 9, 9, 16, 16, torch.float32, seed=1, requires_grad=True)
    qy, ky, vy = inputs(1, 2, 20, 20, 16, 16, torch.float32, seed=2, requires_grad=True)
    res = crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky, vy, backend="triton",
                                                  need_weights=need_weights)
    ins64 = f64(qx, kx, vx, qy, ky, vy)
    ref = bidirectional_reference(*ins64, need_weights=need_weights)
    (res.weights_xy.double() ** 2).sum().backward()  # weights_yx and the outputs unused
    (ref.weights_xy ** 2).sum().backward()
    for a, b in zip((qx, ky), (ins64[0], ins64[4])):
        assert a.grad.abs().sum() > 0
        assert_close(a.grad, b.grad, torch.float32, tol=GRAD_TOL[torch.float32] * 10, what="grad")


PRUNINGS = [
    crossattn.BlockPruning(block_q=16, block_k=16, top_k=2),
    crossattn.BlockPruning(block_q=32, block_k=16, keep=0.5),
    crossattn.BlockPruning(block_q=16, block_k=32, mass=0.8, min_blocks=2),
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prune", PRUNINGS, ids=repr)
@pytest.mark.parametrize("need_weights", [False, "full", "mean"])
def test_pruned_attention_matches_reference(prune, need_weights, dtype):
    """Kept blocks only: exact over the kept keys, zeros in pruned weights, gradients."""
    B, H, Lq, Lk = 2, 2, 45, 100
    q, k, v = inputs(B, H, Lq, Lk, 16, 24, dtype, requires_grad=True)
    # Temperature gradients in fp16 are test_all_options_with_full_weights' subject; here the
    # masks, dropout and pruning.
    options = {n: x for n, x in ALL_OPTIONS.items() if n != "temperature"}
    kw = to_device(materialise(options, B, H, Lq, Lk, dtype))
    kw["temperature"] = 0.8
    # Select on the inputs' own precision; the reference then attends over the same blocks.
    sel_kw = {n: x for n, x in kw.items() if n not in ("dropout_p",)}
    sel = crossattn.select_blocks(q, k, prune, **sel_kw)
    fixed = crossattn.BlockPruning(block_q=prune.block_q, block_k=prune.block_k, block_mask=sel)
    torch.manual_seed(5)
    out, w = run(q, k, v, prune=prune, need_weights=need_weights, **kw)
    torch.manual_seed(5)
    out_fixed, _ = run(q, k, v, prune=fixed, need_weights=need_weights, **kw)
    torch.testing.assert_close(out, out_fixed, rtol=0, atol=0)
    check_gradients(run, q, k, v, dict(kw, prune=fixed), need_weights, dtype)
    if need_weights == "full":
        pruned = ~sel.repeat_interleave(prune.block_q, 2)[:, :, :Lq].repeat_interleave(prune.block_k, 3)[..., :Lk]
        assert (w[pruned] == 0).all()


def test_pruned_bidirectional_takes_a_pair():
    qx, kx, vx = inputs(1, 2, 40, 40, 16, 16, torch.float32, seed=1, requires_grad=True)
    qy, ky, vy = inputs(1, 2, 70, 70, 16, 16, torch.float32, seed=2, requires_grad=True)
    pxy = torch.zeros(1, 1, 3, 5, dtype=torch.bool, device=DEVICE)
    pxy[..., 0, :2] = True
    pxy[..., 1:, 3] = True
    prune = (crossattn.BlockPruning(block_q=16, block_k=16, block_mask=pxy),
             crossattn.BlockPruning(block_q=16, block_k=16, top_k=1))
    res = crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky, vy, prune=prune,
                                                  need_weights="full", backend="triton")
    ins64 = f64(qx, kx, vx, qy, ky, vy)
    ref = bidirectional_reference(*ins64, prune=prune, need_weights="full")
    check_bidirectional(res, ref, (qx, kx, vx, qy, ky, vy), ins64, torch.float32)


def test_pruned_bidirectional_pair_with_different_block_sizes():
    """Issue 18 #12: each direction keeps its own blocks (served at the smaller size)."""
    qx, kx, vx = inputs(1, 2, 40, 40, 16, 16, torch.float32, seed=1, requires_grad=True)
    qy, ky, vy = inputs(1, 2, 70, 70, 16, 16, torch.float32, seed=2, requires_grad=True)
    prune = (crossattn.BlockPruning(block_q=16, block_k=16, top_k=1),
             crossattn.BlockPruning(block_q=32, block_k=32, top_k=1))
    res = crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky, vy, prune=prune,
                                                  need_weights="full", backend="triton")
    ins64 = f64(qx, kx, vx, qy, ky, vy)
    ref = bidirectional_reference(*ins64, prune=prune, need_weights="full")
    check_bidirectional(res, ref, (qx, kx, vx, qy, ky, vy), ins64, torch.float32)



@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETING or not torch.cuda.is_available(), reason="needs a CUDA device")
def test_more_batch_heads_than_a_grid_axis_holds_on_gpu():
    """One grid axis carries tiles x batch*heads, so B*H beyond 65 535 (CUDA's cap on axes 1
    and 2) still launches: forward, weights and backward."""
    q, k, v = inputs(70001, 1, 3, 20, 16, 16, torch.float16, requires_grad=True)
    out, w = run(q, k, v, need_weights="full")
    ref_out, ref_w = reference(q, k, v, need_weights="full")
    assert_close(out, ref_out, torch.float16, what="out")
    assert_close(w, ref_w, torch.float16, what="weights")
    out.float().sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
