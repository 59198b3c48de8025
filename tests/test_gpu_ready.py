"""What a GPU run relies on, checked before one: dispatch resolved outside torch.compile's
traced region, the kernel launches a call makes (interpreter here, the GPU there), no host
syncs under ``torch.cuda.set_sync_debug_mode("error")``, and CUDA-graph capture of the short
inference call."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import crossattn
from conftest import INTERPRETING, make_qkv, random_padding, triton_ready

ROOT = Path(__file__).resolve().parent.parent
on_gpu = pytest.mark.skipif(INTERPRETING or not torch.cuda.is_available(), reason="needs a CUDA device")

# A fresh interpreter: nothing imported or cached by an eager call before torch.compile traces.
FRESH_COMPILE = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch, crossattn
    backend = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    qx, kx, vx = (torch.randn(1, 2, 5, 16, generator=g) for _ in range(3))
    qy, ky, vy = (torch.randn(1, 2, 7, 16, generator=g) for _ in range(3))

    def f(qx, kx, vx, qy, ky, vy):
        r = crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky, vy, need_weights="full",
                                                    backend=backend)
        return r.out_x, r.out_y, r.weights_xy

    got = torch.compile(f, fullgraph=True)(qx, kx, vx, qy, ky, vy)
    for a, b in zip(got, f(qx, kx, vx, qy, ky, vy)):
        torch.testing.assert_close(a, b)
    print("compiled", backend)
""")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_compile_fullgraph_on_the_first_call_of_a_fresh_process(backend):
    """Backend availability and the kernels' module are resolved outside the traced region:
    no graph break from importlib on the very first call (issue 18, item 14)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("CROSSATTN_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", FRESH_COMPILE, backend], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"compiled {backend}" in res.stdout


# ----------------------------------------------------------------------------- launch count
def _inference_module(d_model, heads, backend, device, dtype):
    torch.manual_seed(0)
    return crossattn.nn.BidirectionalCrossAttention(d_model, heads, backend=backend).to(device, dtype).eval()


def _count_launches(fn):
    from _kernel_compile import record_launches

    with record_launches() as launches:
        result = fn()
    return result, [launch["kernel"] for launch in launches]


@pytest.mark.skipif(triton_ready() is not None, reason=str(triton_ready()))
@pytest.mark.parametrize("masks", [False, True], ids=["no_masks", "hf_masks"])
def test_short_inference_is_one_kernel_launch(masks):
    """The short inference call (B=1, T=32 text tokens, A=300 audio frames) through
    BidirectionalCrossAttention is one Triton launch for both directions, with or without
    padding masks (interpreter here, the GPU in tests below). Head dim 16 keeps it fast."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    m = _inference_module(32, 2, "triton", device, dtype)
    text, audio = torch.randn(1, 32, 32, device=device, dtype=dtype), torch.randn(1, 300, 32, device=device, dtype=dtype)
    kw = {}
    if masks:
        kw = dict(text_mask=torch.ones(1, 32, device=device, dtype=torch.long),
                  audio_mask=(torch.arange(300, device=device) < 250).long()[None])
    with torch.no_grad():
        _, kernels = _count_launches(lambda: m(text, audio, **kw))
    assert kernels == ["_xattn_fwd_kernel"], kernels


# ----------------------------------------------------------------------------- GPU only
def _backend_or_skip(name):
    why = crossattn.available_backends()[name]
    if why:
        pytest.skip(f"{name}: {why}")


BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton"),
            pytest.param("cuda", id="cuda_backend")]


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_under_sync_debug_mode(backend):
    """A call on CUDA tensors never waits for the GPU (shared/DESIGN.md): forward with every
    common option, weights, backward, and the module, with torch's sync detector raising."""
    _backend_or_skip(backend)
    dtype = torch.float16
    qx, kx, vx = make_qkv(2, 4, 77, 77, 64, dtype=dtype, device="cuda", seed=1, requires_grad=True)
    qy, ky, vy = make_qkv(2, 4, 300, 300, 64, dtype=dtype, device="cuda", seed=2, requires_grad=True)
    ym = random_padding(2, 300, seed=3).cuda()
    t = torch.full((4,), 0.8, device="cuda", requires_grad=True)
    lengths = torch.tensor([300, 123], device="cuda")
    m = _inference_module(256, 4, backend, "cuda", dtype)
    text = torch.randn(2, 77, 256, device="cuda", dtype=dtype)
    audio = torch.randn(2, 300, 256, device="cuda", dtype=dtype)
    audio_mask = (~ym).long()
    crossattn.cross_attention(qx, ky, vy, backend=backend)  # first call: compiles, loads
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky, vy, y_padding_mask=ym, temperature=t,
                                                      need_weights="mean", backend=backend)
        out, w = crossattn.cross_attention(qx, ky, vy, kv_lengths=lengths, need_weights="full", backend=backend)
        loss = sum(r.float().square().sum() for r in res) + out.float().sum() + w.float().square().sum()
        loss.backward()
        with torch.no_grad():
            m(text, audio, audio_mask=audio_mask)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    assert torch.isfinite(qx.grad).all() and torch.isfinite(t.grad).all()


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("backend", [pytest.param("triton", id="triton"), pytest.param("cuda", id="cuda_backend")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_short_inference_captures_in_a_cuda_graph(backend, dtype):
    """B=1, T=32, A=300 through BidirectionalCrossAttention (the seed's d_model 768, 8 heads)
    captured in a CUDA graph and replayed on new inputs matches eager; the Triton backend
    makes one kernel launch for the attention."""
    _backend_or_skip(backend)
    m = _inference_module(768, 8, backend, "cuda", dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    text = torch.randn(1, 32, 768, device="cuda", dtype=dtype, generator=g)
    audio = torch.randn(1, 300, 768, device="cuda", dtype=dtype, generator=g)
    audio_mask = (torch.arange(300, device="cuda") < 271).long()[None]
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            m(text, audio, audio_mask=audio_mask)  # compiles and loads outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static, kernels = _count_launches(lambda: m(text, audio, audio_mask=audio_mask))
        text.copy_(torch.randn(text.shape, device="cuda", dtype=dtype, generator=g))
        audio.copy_(torch.randn(audio.shape, device="cuda", dtype=dtype, generator=g))
        graph.replay()
        torch.cuda.synchronize()
        eager = m(text, audio, audio_mask=audio_mask)
    for a, b in zip(static[:2], eager[:2]):
        torch.testing.assert_close(a, b)
    if backend == "triton":
        assert kernels == ["_xattn_fwd_kernel"], kernels
