"""backend="cuda": the Python side everywhere, the kernels on a GPU.

Without a GPU the CUDA op cannot run, but everything around it can: a CPU stand-in for
``crossattn_cuda::xattn_fwd`` is registered under the schema parsed from csrc/xattn_fwd.cu
(computing with the float64 reference), and the real fake implementation, autograd (the
Triton backward, on the interpreter here) and argument packing of crossattn._cuda run
against it through the public API. GPU-marked tests run the real kernels against the
reference at real sizes.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

import crossattn
from crossattn import BlockPruning
from crossattn.reference import attention_reference, bidirectional_reference
from conftest import (
    INTERPRETING, assert_close, check_bidirectional, f64, make_qkv, random_padding, triton_ready,
)

ROOT = Path(__file__).resolve().parent.parent
BUILT = importlib.util.find_spec("crossattn._C") is not None


def op_schema() -> str:
    src = (ROOT / "csrc" / "xattn_fwd.cu").read_text()
    body = re.search(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\)", src).group(1)
    return "".join(re.findall(r"\"([^\"]*)\"", body))


def test_schema_is_the_one_python_expects():
    schema = op_schema()
    assert schema.startswith("xattn_fwd(Tensor q0, Tensor k0, Tensor v0, Tensor? qv0")
    assert schema.endswith("-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
    from crossattn._cuda import _DIR_ARGS

    args = re.search(r"\((.*)\) ->", schema).group(1).split(", ")
    assert [a.split()[-1] for a in args] == [f"{n}{i}" for i in "01" for n in _DIR_ARGS] + ["weights", "block_q", "block_k"]


def test_unavailable_says_how_to_build():
    if BUILT and torch.cuda.is_available():
        pytest.skip("the extension is built here")
    reason = crossattn.available_backends()["cuda"]
    assert "CROSSATTN_FORCE_CUDA=1" in reason or "no CUDA device" in reason
    q, k, v = make_qkv(1, 1, 4, 4, 16)
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        crossattn.cross_attention(q, k, v, backend="cuda")


def test_unsupported_inputs_are_explained():
    from types import SimpleNamespace

    from crossattn import _cuda

    def problem(dtype=torch.float16, D=64, dropout=0.0):
        q = torch.zeros(1, 1, 2, D, dtype=dtype)
        return SimpleNamespace(q=q, k=q, v=q, temperature=None, dropout_p=dropout, dims=(1, 1, 2, 2, D, D),
                               pruning=None)

    assert "float16/bfloat16" in _cuda.unsupported(problem(torch.float32))
    assert "head dims up to 256" in _cuda.unsupported(problem(D=320))
    assert "dropout" in _cuda.unsupported(problem(dropout=0.1))
    assert _cuda.unsupported(problem()) is None


def test_arch_flags():
    from crossattn._cuda import nvcc_arch_flags

    assert nvcc_arch_flags("8.0;8.6;8.9;9.0") == [f"-gencode=arch=compute_{a},code=sm_{a}" for a in (80, 86, 89, 90)]
    assert nvcc_arch_flags("9.0+PTX")[-1] == "-gencode=arch=compute_90,code=compute_90"


def test_setup_builds_the_extension_only_where_it_can(monkeypatch):
    import runpy
    import shutil

    monkeypatch.chdir(ROOT)  # setup.py names its sources relative to the project, as pip runs it
    plan = runpy.run_path(str(ROOT / "setup.py"), run_name="crossattn_setup")["cuda_build_plan"]
    assert plan({"CROSSATTN_SKIP_CUDA_BUILD": "1"})[2] == "CROSSATTN_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        ext, cmd, why = plan({})
        assert ext == [] and "CPU-only" in why
        if shutil.which("nvcc"):  # forced: nvcc alone builds the stable-ABI library
            ext, cmd, why = plan({"CROSSATTN_FORCE_CUDA": "1"})
            assert [e.name for e in ext] == ["crossattn._C"] and why is None
            assert sorted(Path(p).name for p in ext[0].sources) == sorted(p.name for p in (ROOT / "csrc").glob("*.cu"))


# --------------------------------------------------------------------------- CPU stand-in
def _reference_op(q0, k0, v0, qv0, kv0, t0, layout0, dense0, scale0, q1, k1, v1, qv1, kv1, t1, layout1, dense1,
                  scale1, weights, block_q, block_k):
    res = []
    for q, k, v, qv, kv, t, dense, scale in ((q0, k0, v0, qv0, kv0, t0, dense0, scale0),
                                             (q1, k1, v1, qv1, kv1, t1, dense1, scale1)):
        if q is None:
            res += [q0.new_empty(0), q0.new_empty(0, dtype=torch.float32), q0.new_empty(0)]
            continue
        prune = None if dense is None else BlockPruning(block_q=block_q, block_k=block_k,
                                                         block_mask=dense.bool().cpu())
        out, w, lse = attention_reference(
            q.double(), k.double(), v.double(), scale=scale,
            key_padding_mask=None if kv is None else kv == 0, query_padding_mask=None if qv is None else qv == 0,
            temperature=None if t is None else t.double(), prune=prune,
            need_weights={0: None, 1: "full", 2: "mean"}[weights], return_lse=True)
        res += [out.to(q.dtype), lse.float(), w.to(q.dtype) if weights else q.new_empty(0)]
    return tuple(res)


@pytest.fixture
def stand_in(monkeypatch):
    if BUILT:
        pytest.skip("the real extension is built: the stand-in would clash with it")
    if triton_ready() is not None:
        pytest.skip(f"the backward runs the Triton kernels: {triton_ready()}")
    from crossattn import _cuda
    from crossattn.backends import cuda_backend

    if not _cuda._op_defined():
        lib = torch.library.Library("crossattn_cuda", "DEF")
        lib.define(op_schema())
        lib.impl("xattn_fwd", _reference_op, "CPU")
        stand_in.lib = lib  # keep the registration alive for the session
    _cuda.register()
    monkeypatch.setattr(cuda_backend.CudaBackend, "unavailable", lambda self: None)
    monkeypatch.setattr(cuda_backend.CudaBackend, "device_unsupported", lambda self, p: None)
    monkeypatch.setattr(_cuda, "unsupported", lambda p: None)  # float32 on the CPU, for tight tolerances
    return _cuda


@pytest.mark.parametrize("need_weights", [None, "full", "mean"])
def test_glue_bidirectional_with_every_option(stand_in, need_weights):
    B, H, Lx, Ly = 2, 2, 19, 45
    qx, kx, vx = make_qkv(B, H, Lx, Lx, 16, 24, seed=1, requires_grad=True)
    qy, ky, vy = make_qkv(B, H, Ly, Ly, 16, 24, seed=2, requires_grad=True)
    xm, ym = random_padding(B, Lx, seed=3), random_padding(B, Ly, seed=4)
    t = (torch.tensor([0.5, 2.0], requires_grad=True), 0.7)
    prune = (BlockPruning(block_q=16, block_k=16, top_k=2), None)
    kw = dict(x_padding_mask=xm, y_padding_mask=ym, need_weights=need_weights, temperature=t)
    res = crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky, vy, backend="cuda", prune=prune, **kw)
    sel = crossattn.select_blocks(qx, ky, prune[0], key_padding_mask=ym, query_padding_mask=xm, temperature=t[0])
    fixed = (BlockPruning(block_q=16, block_k=16, block_mask=sel), None)
    ins64 = f64(qx, kx, vx, qy, ky, vy)
    t64 = (t[0].detach().double().requires_grad_(True), 0.7)
    ref = bidirectional_reference(*ins64, prune=fixed, **dict(kw, temperature=t64))
    check_bidirectional(res, ref, (qx, kx, vx, qy, ky, vy, t[0]), (*ins64, t64[0]), torch.float32)


def test_glue_opcheck(stand_in):
    q, k, v = make_qkv(2, 2, 9, 21, 16, 24, seed=5)
    kv = (~random_padding(2, 21, seed=6)).to(torch.uint8)
    t = torch.tensor([0.5, 1.5])
    args = (q, k, v, None, kv, t, None, None, 0.25) + (None,) * 8 + (1.0, 1, 16, 16)
    torch.library.opcheck(torch.ops.crossattn_cuda.xattn_fwd, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# --------------------------------------------------------------------------- GPU
needs_gpu_build = pytest.mark.skipif(INTERPRETING or not torch.cuda.is_available() or
                                     crossattn.available_backends()["cuda"] is not None,
                                     reason="needs a CUDA GPU and the built extension")


@pytest.mark.gpu
@needs_gpu_build
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 8, 32, 300, 64, 64), (4, 8, 512, 1000, 96, 96), (2, 3, 17, 1001, 128, 40),
                                   (1, 2, 70, 33, 256, 256)], ids=str)
@pytest.mark.parametrize("need_weights", [None, "full", "mean"])
def test_cuda_forward_matches_reference_on_gpu(dtype, shape, need_weights):
    B, H, Lq, Lk, D, Dv = shape
    q, k, v = make_qkv(B, H, Lq, Lk, D, Dv, dtype=dtype, device="cuda", seed=7)
    kpm = random_padding(B, Lk, seed=8).cuda()
    qpm = random_padding(B, Lq, seed=9).cuda()
    t = torch.rand(H, device="cuda") + 0.5
    out, w = crossattn.cross_attention(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm, temperature=t,
                                       need_weights=need_weights, backend="cuda")
    ref_out, ref_w = attention_reference(*f64(q, k, v), key_padding_mask=kpm, query_padding_mask=qpm,
                                         temperature=t.double(), need_weights=need_weights)
    assert_close(out, ref_out, dtype, what="out")
    if need_weights:
        assert_close(w, ref_w, dtype, what="weights")


@pytest.mark.gpu
@needs_gpu_build
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_bidirectional_pruned_with_gradients_on_gpu(dtype):
    B, H, Lx, Ly = 2, 4, 64, 700
    qx, kx, vx = make_qkv(B, H, Lx, Lx, 64, 64, dtype=dtype, device="cuda", seed=10, requires_grad=True)
    qy, ky, vy = make_qkv(B, H, Ly, Ly, 64, 64, dtype=dtype, device="cuda", seed=11, requires_grad=True)
    ym = random_padding(B, Ly, seed=12).cuda()
    prune = (BlockPruning(block_q=16, block_k=64, keep=0.5), BlockPruning(block_q=16, block_k=64, top_k=1))
    res = crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky, vy, y_padding_mask=ym, prune=prune,
                                                  need_weights="full", backend="cuda")
    from crossattn.kernels.xattn_select import select_blocks_triton

    sels = (select_blocks_triton(qx, ky, prune[0], key_valid=~ym).mask,
            select_blocks_triton(qy, kx, prune[1], query_valid=~ym).mask)
    fixed = tuple(BlockPruning(block_q=16, block_k=64, block_mask=s) for s in sels)
    ins64 = f64(qx, kx, vx, qy, ky, vy)
    ref = bidirectional_reference(*ins64, y_padding_mask=ym, prune=fixed, need_weights="full")
    check_bidirectional(res, ref, (qx, kx, vx, qy, ky, vy), ins64, dtype)


@pytest.mark.gpu
@needs_gpu_build
def test_cuda_more_batch_heads_than_a_grid_axis_holds_on_gpu():
    q, k, v = make_qkv(70001, 1, 3, 20, 16, dtype=torch.float16, device="cuda", seed=13)
    out, w = crossattn.cross_attention(q, k, v, need_weights="mean", backend="cuda")
    ref_out, ref_w = attention_reference(*f64(q, k, v), need_weights="mean")
    assert_close(out, ref_out, torch.float16, what="out")
    assert_close(w, ref_w, torch.float16, what="weights")


def test_loading_without_a_build_says_how_to_get_one(monkeypatch, tmp_path):
    from crossattn import _cuda

    if BUILT:
        pytest.skip("the extension is built here")
    monkeypatch.setattr(_cuda, "_op_defined", lambda: False)  # as in a fresh process without the library
    monkeypatch.delenv("CROSSATTN_CUDA_JIT", raising=False)
    with pytest.raises(RuntimeError, match="CROSSATTN_FORCE_CUDA=1 pip install --no-build-isolation"):
        _cuda.load_extension()
    monkeypatch.setenv("CROSSATTN_CUDA_JIT", "1")
    monkeypatch.setattr(_cuda, "CSRC", tmp_path)  # an installed package: no sources to compile
    with pytest.raises(RuntimeError, match="needs the CUDA sources"):
        _cuda.load_extension()
