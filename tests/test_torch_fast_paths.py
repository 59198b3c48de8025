"""The torch backend's fast paths (SDPA without weights, saved P) compute what the chunked
recomputing path and the float64 reference compute, including their edge cases."""
from __future__ import annotations

import math

import pytest
import torch

import crossattn
from conftest import TOL, make_qkv, reference
from crossattn.backends import torch_backend as tb


def _grads(out, w, q, k, v, extra=()):
    loss = out.square().sum() + (0 if w is None else (w * w).sum())
    return torch.autograd.grad(loss, (q, k, v, *extra))


def test_sdpa_path_zeroes_empty_and_padded_rows_without_nan(monkeypatch):
    calls = []
    real = tb._sdpa_attention
    monkeypatch.setattr(tb, "_sdpa_attention", lambda p: calls.append(1) or real(p))
    q, k, v = make_qkv(3, 2, 6, 9, 8, requires_grad=True)
    kpm = torch.zeros(3, 9, dtype=torch.bool)
    kpm[1] = True  # batch 1 has no valid key
    kpm[2, 4:] = True
    qpm = torch.zeros(3, 6, dtype=torch.bool)
    qpm[0, 5] = True
    temp = torch.tensor([0.7, 1.3], requires_grad=True)
    out, w = crossattn.cross_attention(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm,
                                       temperature=temp, backend="torch")
    assert calls and w is None
    ref, _ = reference(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm, temperature=temp.detach().double())
    torch.testing.assert_close(out.double(), ref, rtol=TOL[torch.float32], atol=TOL[torch.float32])
    assert (out[1] == 0).all() and (out[0, :, 5] == 0).all()
    gq, gk, gv, gt = _grads(out, None, q, k, v, (temp,))
    assert all(torch.isfinite(g).all() for g in (gq, gk, gv, gt))
    assert (gq[1] == 0).all() and (gk[1] == 0).all() and (gv[1] == 0).all() and (gq[0, :, 5] == 0).all()


def test_sdpa_path_grouped_query_heads_match_the_reference():
    q, _, _ = make_qkv(2, 4, 5, 7, 8)
    _, k, v = make_qkv(2, 2, 5, 7, 8, seed=1)
    out, _ = crossattn.cross_attention(q, k, v, backend="torch")
    ref, _ = reference(q, k, v)
    torch.testing.assert_close(out.double(), ref, rtol=TOL[torch.float32], atol=TOL[torch.float32])


@pytest.mark.parametrize("need_weights", [None, "mean", "full"])
def test_saved_p_path_equals_the_recomputing_path(monkeypatch, need_weights):
    """Dropout, padding and a learnable temperature: same outputs, weights and gradients
    whether P is saved or recomputed by the chunked path."""
    q, k, v = make_qkv(2, 3, 11, 13, 8, dtype=torch.float64, requires_grad=True)
    temp = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(2, 13, dtype=torch.bool)
    kpm[1, 5:] = True
    kw = dict(key_padding_mask=kpm, temperature=temp, dropout_p=0.3, need_weights=need_weights or False,
              backend="torch")
    results, chosen = [], []
    real = tb._saves_p
    for force in (None, False):
        monkeypatch.setattr(tb, "_saves_p", lambda p, f=force: chosen.append(real(p) if f is None else f) or chosen[-1])
        torch.manual_seed(3)
        out, w = crossattn.cross_attention(q, k, v, **kw)
        results.append([out, w, *_grads(out, w, q, k, v, (temp,))])
    assert chosen == [True, False]
    for a, b in zip(*results):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_saved_p_is_chosen_by_size(monkeypatch):
    q, k, v = make_qkv(1, 2, 4, 6, 8)
    from crossattn._validation import AttentionProblem

    def problem(need_weights, dropout_p=0.1):
        return AttentionProblem(q, k, v, None, None, None, 8**-0.5, None, dropout_p, need_weights, None)

    assert tb._saves_p(problem("full")) and tb._saves_p(problem(None)) and tb._saves_p(problem("mean"))
    monkeypatch.setenv("CROSSATTN_TORCH_CHUNK_MB", "0.000001")  # P no longer fits: recompute
    assert tb._saves_p(problem("full")) and not tb._saves_p(problem(None)) and not tb._saves_p(problem("mean"))
    assert tb._sdpa_serves(problem(None, 0.0)) and not tb._sdpa_serves(problem(None))
    assert not tb._sdpa_serves(problem("full", 0.0))


@pytest.mark.parametrize("native_bf16", [True, False], ids=["avx512-bf16", "emulated-bf16"])
def test_half_precision_takes_sdpa_where_the_cpu_would_emulate_it(monkeypatch, native_bf16):
    # No weights, no dropout: SDPA (its flash kernel multiplies in float32) unless the saved-P
    # path's products are fast: float16 is multiplied in float32 there, bfloat16 in bfloat16,
    # which only a CPU with AVX512-BF16 / AMX does natively.
    from crossattn._validation import AttentionProblem

    monkeypatch.setattr(tb, "_cpu_multiplies_bf16", lambda: native_bf16)

    def sdpa(dtype):
        q, k, v = make_qkv(1, 2, 4, 6, 8, dtype=dtype)
        return tb._sdpa_serves(AttentionProblem(q, k, v, None, None, None, 8**-0.5, None, 0.0, None, None))

    assert sdpa(torch.float32) and not sdpa(torch.float16)
    assert sdpa(torch.bfloat16) != native_bf16


def _fused_kernels(monkeypatch, fused):
    """Forces the saved-P path's fused float32 CPU kernels off (``fused`` False) and returns the
    list of their calls."""
    from crossattn import _cpu_kernels
    from crossattn.backends import _torch_saved_p

    if not fused:
        monkeypatch.setattr(_torch_saved_p, "_fused_coefs", lambda *a: None)
    calls = []
    for name in ("softmax", "softmax_backward"):
        real = getattr(_cpu_kernels, name)
        monkeypatch.setattr(_cpu_kernels, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    return calls


HAVE_KERNELS = __import__("crossattn._cpu_kernels", fromlist=["x"]).unavailable_reason() is None
PATHS = [pytest.param(True, id="fused", marks=pytest.mark.skipif(not HAVE_KERNELS, reason="no compiled CPU kernels")),
         pytest.param(False, id="torch-ops")]


@pytest.mark.parametrize("dtype, fused", [
    pytest.param(torch.float32, True, id="float32-fused", marks=PATHS[0].marks),
    pytest.param(torch.float32, False, id="float32-torch-ops"),
    pytest.param(torch.bfloat16, False, id="bfloat16"), pytest.param(torch.float16, False, id="float16")])
@pytest.mark.parametrize("Lk", [24, 23], ids=["keys%4==0", "keys%4!=0"])
@pytest.mark.parametrize("need_weights", ["full", "mean", "full, weights-only loss"])
def test_saved_p_dropout_matches_the_reference(monkeypatch, dtype, Lk, need_weights, fused):
    """The saved-P path with dropout keeps ``PD = P * keep`` (the mask drawn into the dead
    logits buffer when Lk % 4 == 0, else a buffer of its own; float16 by row chunks; float32
    on a CPU: the fused kernels, ``PD`` carrying the dropout scale) and derives the softmax
    backward from it: outputs, weights and every gradient (grouped heads, padding, a learnable
    temperature) against the float64 reference."""
    from conftest import check_gradients

    calls = _fused_kernels(monkeypatch, fused)
    taken = []
    real = tb._saves_p
    monkeypatch.setattr(tb, "_saves_p", lambda p: taken.append(real(p)) or taken[-1])
    q, _, _ = make_qkv(2, 4, 9, Lk, 16, dtype=dtype, requires_grad=True)
    _, k, v = make_qkv(2, 2, 9, Lk, 16, 8, dtype=dtype, seed=1, requires_grad=True)
    kpm = torch.zeros(2, Lk, dtype=torch.bool)
    kpm[1, Lk - 5:] = True
    kw = dict(key_padding_mask=kpm, temperature=torch.tensor([0.6, 1.0, 1.4, 2.0]), dropout_p=0.3)
    check_gradients(lambda *a, **k: crossattn.cross_attention(*a, backend="torch", **k), q, k, v, kw,
                    need_weights.split(",")[0], dtype, out_loss="weights-only" not in need_weights)
    assert taken and all(taken)
    assert set(calls) == ({"softmax", "softmax_backward"} if fused else set())


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("case", ["no dropout, empty rows", "negative scale", "zero scale", "float temperature, mean"])
def test_saved_p_float32_edge_cases_match_the_reference(monkeypatch, case, fused):
    """float32 on the fused kernels and on torch ops alike: a batch item without a valid key
    and a padded query row (0, never NaN; P in the logits' buffer without dropout), a
    negative or zero scale (a masked key stays masked when the factor flips sign or vanishes), a
    float temperature with head-mean weights."""
    from conftest import check_gradients

    calls = _fused_kernels(monkeypatch, fused)
    q, k, v = make_qkv(2, 3, 6, 17, 8, dtype=torch.float32, requires_grad=True)
    kpm = torch.zeros(2, 17, dtype=torch.bool)
    kpm[0, 11:] = True
    kw = dict(key_padding_mask=kpm)
    need_weights = "full"
    if case == "no dropout, empty rows":
        kpm[1] = True
        qpm = torch.zeros(2, 6, dtype=torch.bool)
        qpm[0, 4] = True
        kw["query_padding_mask"] = qpm
    elif case.endswith("scale"):
        kw.update(scale=-0.4 if case.startswith("negative") else 0.0, temperature=torch.tensor([0.7, 1.3, 2.0]),
                  dropout_p=0.2)
    else:
        kw.update(temperature=1.7, dropout_p=0.5)
        need_weights = "mean"
    check_gradients(lambda *a, **k: crossattn.cross_attention(*a, backend="torch", **k), q, k, v, kw,
                    need_weights, torch.float32)
    assert set(calls) == ({"softmax", "softmax_backward"} if fused else set())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_cpu_softmax_in_place_equals_out_of_place(dtype):
    """The saved-P forward without dropout writes P over the logits (torch.softmax(s, out=s)):
    torch's CPU softmax must keep giving the same bits that way (rows of -inf included)."""
    for shape in [(2, 3, 7, 33), (1, 2, 5, 1000), (2, 1, 3, 0)]:
        s = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 5).to(dtype)
        if s.numel():
            s[0, 0, 0] = -math.inf
        want = torch.softmax(s, -1)
        got = s.clone()
        torch.softmax(got, dim=-1, out=got)
        assert torch.equal(got.nan_to_num(2.0), want.nan_to_num(2.0))


@pytest.mark.parametrize("refused", ["softmax", "softmax_backward"])
def test_fused_path_falls_back_to_torch_ops_where_a_kernel_refuses(monkeypatch, refused):
    """A kernel refuses tensors it cannot serve (a dispatch mode's, a traced backward's, a
    gradient with strided keys): the same computation in torch ops, never an error."""
    from conftest import check_gradients
    from crossattn import _cpu_kernels

    calls = _fused_kernels(monkeypatch, True)
    monkeypatch.setattr(_cpu_kernels, refused, lambda *a, **k: calls.append("refused") or False)
    q, _, _ = make_qkv(2, 4, 7, 13, 8, requires_grad=True)
    _, k, v = make_qkv(2, 2, 7, 13, 8, seed=1, requires_grad=True)
    kpm = torch.zeros(2, 13, dtype=torch.bool)
    kpm[1] = True  # a batch item without a key: 0
    kw = dict(key_padding_mask=kpm, temperature=torch.tensor([0.6, 1.0, 1.4, 2.0]), dropout_p=0.3)
    check_gradients(lambda *a, **k: crossattn.cross_attention(*a, backend="torch", **k), q, k, v, kw,
                    "full", torch.float32)
    assert "refused" in calls


def test_fused_path_huge_logits_empty_heads_and_a_parameter_temperature(monkeypatch):
    calls = _fused_kernels(monkeypatch, True)
    q, k, v = make_qkv(1, 2, 5, 48, 16)
    out, w = crossattn.cross_attention(q * 1e5, k * 1e5, v, need_weights="full", backend="torch")
    ref_out, ref_w = reference(q * 1e5, k * 1e5, v, need_weights="full")
    assert not out.isnan().any() and not w.isnan().any()
    torch.testing.assert_close(w.double(), ref_w, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    for shape in [(2, 0, 5, 8), (0, 2, 5, 8)]:  # no heads / no batch, a loss whose gradient is expanded
        q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
        out, w = crossattn.cross_attention(q, k, v, need_weights="full", backend="torch")
        (out.sum() + w.sum()).backward()
        assert q.grad.shape == shape and k.grad.shape == shape
    calls.clear()
    temp = torch.nn.Parameter(torch.tensor([0.5, 2.0]))
    q, k, v = make_qkv(1, 2, 5, 9, 8, requires_grad=True)
    out, w = crossattn.cross_attention(q, k, v, temperature=temp, need_weights="full", dropout_p=0.2,
                                       backend="torch")
    (out.sum() + (w * w).sum()).backward()
    assert set(calls) == {"softmax", "softmax_backward"} and temp.grad is not None


@pytest.mark.skipif(not hasattr(getattr(torch._dynamo, "compiled_autograd", None), "_enable"),
                    reason="this torch has no compiled autograd")
def test_fused_forward_with_a_compiled_backward(monkeypatch):
    """The forward ran eagerly on the fused kernels; compiled autograd traces the backward,
    where the kernels step aside for torch ops: the eager gradients."""
    from torch._dynamo import compiled_autograd

    from crossattn.backends import _torch_saved_p

    ops = []
    real = _torch_saved_p._fused_softmax_backward_ops
    monkeypatch.setattr(_torch_saved_p, "_fused_softmax_backward_ops", lambda *a: ops.append(1) or real(*a))
    grads = []
    for compiled in (False, True):
        q, k, v = make_qkv(2, 2, 6, 11, 8, requires_grad=True)
        temp = torch.tensor([0.7, 1.3], requires_grad=True)
        torch.manual_seed(5)  # the same dropout seed
        out, w = crossattn.cross_attention(q, k, v, temperature=temp, need_weights="full", dropout_p=0.25,
                                           backend="torch")
        loss = out.sum() + (w * w).sum()
        if compiled:
            torch._dynamo.reset()
            with compiled_autograd._enable(torch.compile(backend="eager")):
                loss.backward()
        else:
            loss.backward()
        grads.append([q.grad, k.grad, v.grad, temp.grad])
        assert bool(ops) == compiled  # the kernel served the eager backward, torch ops the traced one
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAVE_KERNELS, reason="no compiled CPU kernels")
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_fused_path_keeps_head_split_layouts_without_copies(monkeypatch, dropout_p):
    """Head-split projections ([B, L, H, D] seen as [B, H, L, D], as attention layers make
    them) are read in place and the output and gradients come back in their layouts: no copy
    of a q, k, v, output or gradient sized tensor, forward or backward; merging the heads of
    the output is free; the values are the reference's. (Matrices this small are copied and
    multiplied in one batch -- faster than a GEMM call each --: the threshold is lifted here.)"""
    from crossattn.backends import _torch_saved_p

    monkeypatch.setattr(_torch_saved_p, "_STRIDED_MIN_MACS", 0)
    B, H, Lq, Lk, D = 2, 3, 7, 11, 8
    bases = [torch.randn(B, L, H, D, requires_grad=True) for L in (Lq, Lk, Lk)]
    g_out, g_w = torch.randn(B, H, Lq, D), torch.randn(B, H, Lq, Lk)
    torch.manual_seed(0)
    with torch.profiler.profile(record_shapes=True) as prof:
        q, k, v = ((b * 1).transpose(1, 2) for b in bases)  # non-leaf views: no grad accumulation copy
        out, w = crossattn.cross_attention(q, k, v, need_weights="full", dropout_p=dropout_p, backend="torch")
        ((out * g_out).sum() + (w * g_w).sum()).backward()
    copies = [e.input_shapes for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")
              and any(math.prod(s) > 1 for s in e.input_shapes if s)]
    assert not copies
    assert out.transpose(1, 2).is_contiguous()
    from crossattn.reference import attention_reference, draw_dropout_seed
    torch.manual_seed(0)
    seed = draw_dropout_seed() if dropout_p else None
    b64 = [b.detach().double().requires_grad_(True) for b in bases]
    ref_out, ref_w = attention_reference(*(b.transpose(1, 2) for b in b64), need_weights="full",
                                         dropout_p=dropout_p, dropout_seed=seed)
    torch.testing.assert_close(out.double(), ref_out, rtol=TOL[torch.float32], atol=TOL[torch.float32])
    torch.testing.assert_close(w.double(), ref_w, rtol=TOL[torch.float32], atol=TOL[torch.float32])
    ((ref_out * g_out.double()).sum() + (ref_w * g_w.double()).sum()).backward()
    for b, r in zip(bases, b64):
        torch.testing.assert_close(b.grad.double(), r.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAVE_KERNELS, reason="no compiled CPU kernels")
@pytest.mark.parametrize("train", [False, True])
def test_fused_path_keeps_no_reference_to_its_results(train):
    """Nothing of a call outlives its results: a strided batch once went through a caught
    view error whose frames kept the logits' buffer -- 16 MiB a call at the seed's shape."""
    import gc
    import weakref

    B, H, Lq, Lk, D = 2, 3, 5, 9, 8
    bases = [torch.randn(B, L, H, D, requires_grad=train) for L in (Lq, Lk, Lk)]
    with torch.set_grad_enabled(train):
        q, k, v = (b.transpose(1, 2) for b in bases)
        out, w = crossattn.cross_attention(q, k, v, need_weights="full", dropout_p=0.1 if train else 0.0,
                                           backend="torch")
        if train:
            (out.sum() + w.sum()).backward()
    refs = [weakref.ref(t) for t in (out, w)]
    del out, w
    gc.collect()
    assert all(r() is None for r in refs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "head-split", "grouped heads"])
def test_saved_p_output_may_be_modified_in_place(dtype, layout):
    """The output is a tensor of its own, not a view (autograd forbids in-place ops on a
    Function's view outputs): ``out.add_`` then backward, on the fused path (float32) and on
    torch ops (bfloat16), and the gradient is the one of ``out + 1``."""
    B, H, Lq, Lk, D = 2, 4, 5, 7, 8
    Hkv = 2 if layout == "grouped heads" else H
    if layout == "head-split":
        bases = [torch.randn(B, L, h, D, dtype=dtype, requires_grad=True) for L, h in ((Lq, H), (Lk, Hkv), (Lk, Hkv))]
        q, k, v = (b.transpose(1, 2) for b in bases)
    else:
        q = torch.randn(B, H, Lq, D, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(B, Hkv, Lk, D, dtype=dtype, requires_grad=True) for _ in range(2))
        bases = [q, k, v]
    g = torch.randn(B, H, Lq, D, dtype=dtype)
    grads = []
    for in_place in (False, True):
        out, _ = crossattn.cross_attention(q, k, v, need_weights="full", backend="torch")
        out = out.add_(1) if in_place else out + 1
        grads.append(torch.autograd.grad((out * g).sum(), bases))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
