"""The compiled CPU kernels (crossattn/_cpu_kernels.c): the dropout mask against the torch-op
Philox, the fused softmax (+ dropout) and softmax backward against float64."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from crossattn import _cpu_kernels
from crossattn._philox import dropout_keep_mask, dropout_threshold

HAVE_CC = sys.platform != "win32" and _cpu_kernels._compiler() is not None
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the torch ops serve every call")


@needs_cc
def test_builds_where_a_compiler_exists():
    # Not a skip: with a compiler present a failed build would silently cost the fast path.
    assert _cpu_kernels.unavailable_reason() is None
    assert _cpu_kernels.library() is not None


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("cols", [1, 3, 4, 63, 64, 65, 130])
@pytest.mark.parametrize("threads", [1, 3])
def test_mask_bits_match_the_torch_ops(dtype, cols, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed, p, direction, dropped, row0, batch_ids in [
            (torch.tensor(0x7A5B_3C2D_1E0F_9876), 0.1, 0, False, 0, None),
            (12345, 0.5, 1, True, 7, torch.tensor([3, 0])),
            (2**63 - 1, 0.9999, 1, False, 2**20, None),
            (0, 1.0, 0, False, 0, None),  # p = 1: everything dropped (threshold 2**32)
        ]:
            kw = dict(batch=2, heads=3, rows=torch.arange(row0, row0 + 5), cols=cols, direction=direction,
                      dropped=dropped, batch_ids=batch_ids, dtype=dtype)
            want = dropout_keep_mask(seed, p, compiled=False, **kw)
            got = dropout_keep_mask(seed, p, **kw)
            assert got.dtype == dtype and got.shape == want.shape
            assert torch.equal(got, want), (seed, p, direction, dropped)
            if dtype != torch.bool:
                probs = torch.rand(want.shape, dtype=torch.float64).to(dtype)
                out = torch.full(want.shape, 7.0, dtype=dtype)
                got = dropout_keep_mask(seed, p, out=out, probs=probs, **kw)
                assert torch.equal(got, want * probs)
                assert got.data_ptr() == out.data_ptr()  # written in place, no fresh buffer
    finally:
        torch.set_num_threads(old)


@needs_cc
@pytest.mark.parametrize("threads", [2, 5])
def test_rows_split_over_threads_give_the_same_bits(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:  # 3 x 7 x 101 rows x 517 keys: above 64 Ki keys per thread, rows split unevenly
        kw = dict(batch=3, heads=7, rows=torch.arange(9, 110), cols=517, direction=1, dtype=torch.float32)
        probs = torch.rand(3, 7, 101, 517)
        want = dropout_keep_mask(77, 0.2, compiled=False, **kw) * probs
        assert torch.equal(dropout_keep_mask(77, 0.2, probs=probs, **kw), want)
    finally:
        torch.set_num_threads(old)


@needs_cc
def test_the_mask_has_the_requested_rate():
    keep = dropout_keep_mask(99, 0.3, batch=4, heads=8, rows=torch.arange(256), cols=1000)
    assert abs(keep.float().mean().item() - 0.7) < 0.005


def test_autograd_and_fake_tensors_take_the_torch_ops():
    probs = torch.rand(1, 2, 3, 8, requires_grad=True)
    out = dropout_keep_mask(5, 0.5, batch=1, heads=2, rows=torch.arange(3), cols=8, dtype=torch.float32,
                            probs=probs)
    out.sum().backward()  # recorded by autograd: the C code would have bypassed it
    want = dropout_keep_mask(5, 0.5, batch=1, heads=2, rows=torch.arange(3), cols=8, dtype=torch.float32,
                             compiled=False)
    assert torch.equal(probs.grad, want)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        fake = dropout_keep_mask(torch.tensor(5), 0.5, batch=1, heads=2, rows=torch.arange(3), cols=8)
    assert fake.shape == (1, 2, 3, 8) and fake.dtype == torch.bool


@pytest.mark.parametrize("env, reason", [
    ({"CROSSATTN_CPU_KERNELS": "0"}, "CROSSATTN_CPU_KERNELS=0"),
    ({"CC": "/nonexistent/cc"}, "no C compiler"),
])
def test_without_the_library_the_torch_ops_give_the_same_mask(tmp_path, env, reason):
    script = textwrap.dedent("""
        import torch
        from crossattn import _cpu_kernels
        from crossattn._philox import dropout_keep_mask, dropout_threshold
        kw = dict(batch=2, heads=2, rows=torch.arange(3, 9), cols=37, direction=1)
        assert torch.equal(dropout_keep_mask(11, 0.25, **kw), dropout_keep_mask(11, 0.25, compiled=False, **kw))
        print(_cpu_kernels.unavailable_reason())
    """)
    env = {**os.environ, "CROSSATTN_CACHE_DIR": str(tmp_path), "TMPDIR": str(tmp_path), **env}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert reason in done.stdout
    assert not list(tmp_path.glob("*/*.so")) and not list(tmp_path.glob("*.so"))


@needs_cc
def test_the_library_is_cached_per_source_and_cpu(tmp_path):
    script = "from crossattn import _cpu_kernels; print(_cpu_kernels.unavailable_reason())"
    env = {**os.environ, "CROSSATTN_CACHE_DIR": str(tmp_path)}
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr
    assert len(list(tmp_path.glob("cpu_kernels-*.so"))) == 1  # the second process loaded the first's build


@needs_cc
@pytest.mark.parametrize("flags", [["-O3", "-mavx2", "-mno-avx512f"], ["-O3", "-mavx", "-mno-avx2", "-mno-avx512f"],
                                   ["-O3", "-mno-avx", "-mno-avx2", "-mno-avx512f"], ["-O0"]],
                         ids=["avx2", "avx-no-avx2", "no-avx", "O0"])
def test_every_vector_path_gives_the_same_bits(tmp_path, flags):
    """The build of another machine: AVX2 (32-bit Philox lanes, 8-float vectors), AVX without
    AVX2 (64-bit Philox lanes, 8 floats), neither (4 floats), no optimisation."""
    import ctypes
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        flags = [f for f in flags if not f.startswith("-m")]  # x86 switches
    lib_path = tmp_path / "k.so"
    done = subprocess.run([*_cpu_kernels._compiler(), *flags, "-std=c11", "-fPIC", "-shared", "-pthread", "-o",
                           str(lib_path), str(_cpu_kernels._SOURCE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lib = _cpu_kernels.bind(ctypes.CDLL(str(lib_path)))
    rows, cols = torch.arange(4, 11), 203
    want = dropout_keep_mask(2**40 + 17, 0.3, batch=2, heads=3, rows=rows, cols=cols, direction=1, compiled=False)
    got = torch.empty(2, 3, len(rows), cols, dtype=torch.bool)
    assert _cpu_kernels.philox_mask(2**40 + 17, dropout_threshold(0.3), bh=torch.arange(6), rows=rows, cols=cols,
                                    direction=1, dropped=False, out=got, lib=lib)
    assert torch.equal(got, want)
    _check_softmax(2, 3, 5, 203, torch.tensor([0.4, -1.1, 2.5]), 0.3, lib)  # the float kernels: within tolerance
    _check_softmax_backward(2, 3, 5, 203, torch.tensor([0.4, -1.1, 2.5]), "mean", True, True, lib)


@needs_cc
@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_a_folder_others_can_write_is_not_used(tmp_path):
    """A library loaded from a folder others can write could be theirs: such a cache folder
    is skipped for the private one in the temp folder."""
    shared, private = tmp_path / "shared", tmp_path / "tmp"
    shared.mkdir()
    private.mkdir()
    shared.chmod(0o777)
    script = "from crossattn import _cpu_kernels; print(_cpu_kernels.unavailable_reason())"
    env = {**os.environ, "CROSSATTN_CACHE_DIR": str(shared), "TMPDIR": str(private)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr
    assert not list(shared.glob("*.so"))
    assert len(list(private.glob(f"crossattn-{os.getuid()}/cpu_kernels-*.so"))) == 1


def _softmax_ref(s, coef):
    """float64 softmax of s * coef per head, -inf staying masked, a row without a key 0."""
    z = torch.where(s == -math.inf, -math.inf, s.double() * coef.double().reshape(1, -1, 1, 1))
    p = torch.softmax(z, -1)
    return torch.where((z == -math.inf).all(-1, keepdim=True), 0.0, p)


def _check_softmax(B, H, R, Lk, coef, dropout_p, lib=None, seed=2**33 + 5, row0=3):
    g = torch.Generator().manual_seed(Lk)
    s = torch.randn(B, H, R, Lk, generator=g) * 4
    s[0, 0, 1] = -math.inf  # a row without a valid key
    s[:, :, 0, ::3] = -math.inf  # masked keys
    if B * H > 1:
        s[-1, -1, -1, 0] = math.nan  # a NaN logit: a NaN row, as torch's softmax
    want = _softmax_ref(s, coef)
    # tolerance: twice the error of torch's float32 softmax of the same logits, in float32 ulps of
    # each weight (normal numbers: exp's results below 2**-126 may flush to 0)
    ulp = torch.finfo(torch.float32).eps * torch.exp2(torch.log2(want.abs().clamp(min=2.0**-126)).floor())
    z32 = torch.where(s == -math.inf, -math.inf, s * coef.reshape(1, -1, 1, 1))

    def ulps(x):
        return ((x.double() - want).abs() / ulp).nan_to_num(0).max().item()
    torch_err = ulps(torch.softmax(z32, -1).masked_fill((z32 == -math.inf).all(-1, keepdim=True), 0.0))
    rows = torch.arange(row0, row0 + R)
    batch_ids = torch.arange(B) * 2 + 1  # a subset of a batch's rows: counters b * H + h of those
    bh = (batch_ids[:, None] * H + torch.arange(H)).flatten()
    for pd_in_s in (False, True):
        src = s.clone()
        p = torch.empty_like(s)
        pd = src if pd_in_s else torch.empty_like(s)
        keep_scale = 1 / (1 - dropout_p)
        assert _cpu_kernels.softmax(src, p, coef, heads=H, pd=pd, keep_scale=keep_scale, seed=seed,
                                    threshold=dropout_threshold(dropout_p), bh=bh, rows=rows, direction=1, lib=lib)
        nan = want.isnan()
        assert torch.equal(p.isnan(), nan)
        assert ulps(p) <= 2 * max(torch_err, 1.0), (ulps(p), torch_err)
        assert not p[0, 0, 1].any() and not pd[0, 0, 1].any()  # 0, not NaN
        keep = dropout_keep_mask(seed, dropout_p, batch=B, heads=H, rows=rows, cols=Lk, direction=1,
                                 batch_ids=batch_ids, compiled=False)
        assert torch.equal(pd.nan_to_num(9.0), torch.where(keep, p * keep_scale, 0.0).nan_to_num(9.0))
    in_place = s.clone()  # no dropout, P over the logits
    assert _cpu_kernels.softmax(in_place, in_place, coef, heads=H, lib=lib)
    assert torch.equal(in_place.nan_to_num(9.0), p.nan_to_num(9.0))


@needs_cc
@pytest.mark.parametrize("cols", [1, 15, 16, 17, 130, 1000])
@pytest.mark.parametrize("coef", ["scalar", "per head, signed"])
@pytest.mark.parametrize("threads", [1, 3])
def test_softmax_kernel_against_float64(cols, coef, threads):
    """P within twice torch's float32 softmax error of float64 (the 16-lane body and the
    tail), masked keys, a row without a key (0), a NaN logit (NaN row); PD the torch-op keep
    mask's selection of P * scale, bit for bit, in a buffer of its own or over the logits."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        c = torch.tensor([0.37]) if coef == "scalar" else torch.tensor([0.5, -0.8, 0.0])
        _check_softmax(2, 3, 9, cols, c, 0.25)
        _check_softmax(3, 3, 40, max(cols, 600), c, 0.5)  # above 64 Ki elements: split over threads
    finally:
        torch.set_num_threads(old)


def _check_softmax_backward(B, H, R, Lk, coef, weights, with_dp, with_dropout, lib=None):
    g = torch.Generator().manual_seed(R * Lk)
    p = torch.softmax(torch.randn(B, H, R, Lk, generator=g, dtype=torch.float64), -1)
    keep = torch.rand(B, H, R, Lk, generator=g, dtype=torch.float64) > 0.3
    pd = p * keep / 0.7
    dp = torch.randn(B, H, R, Lk, generator=g, dtype=torch.float64)
    full = torch.randn(B, H, R + 2, Lk, generator=g, dtype=torch.float64)[:, :, 1:-1]  # rows strided
    mean = torch.randn(B, R, Lk, generator=g, dtype=torch.float64)
    dw = {"full": full, "mean": mean, None: None}[weights]
    scale = 1 / H if weights == "mean" else 1.0
    t = torch.zeros_like(p)
    if with_dp:
        t = t + (pd if with_dropout else p) * dp
    if dw is not None:
        t = t + p * (dw if weights == "full" else dw[:, None]) * scale
    want = (t - p * t.sum(-1, keepdim=True)) * coef.double().reshape(1, -1, 1, 1)
    f32 = [None if x is None else x.float() for x in (p, pd, dp, dw)]
    p32, pd32, dp32, dw32 = f32
    if dw32 is not None and weights == "full":
        dw32 = torch.randn(B, H, R + 2, Lk).float()[:, :, 1:-1].copy_(dw32)  # keep the strided rows
    out = dp32.clone() if with_dp else torch.empty_like(p32)
    assert _cpu_kernels.softmax_backward(out, p32, coef, heads=H, dp=out if with_dp else None,
                                         pd=pd32 if with_dropout else None, dw=dw32, dw_scale=scale, lib=lib)
    # float32 inputs rounded once: the float64 formula on them bounds the kernel's own rounding
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)


@needs_cc
@pytest.mark.parametrize("weights, with_dp, with_dropout", [
    (w, dp, drop) for w in ("full", "mean", None) for dp, drop in ((True, True), (True, False), (False, False))
    if dp or w], ids=str)
@pytest.mark.parametrize("cols", [1, 17, 1000])
def test_softmax_backward_kernel_against_float64(weights, with_dp, with_dropout, cols):
    _check_softmax_backward(2, 3, 7, cols, torch.tensor([0.3, -0.6, 1.2]), weights, with_dp, with_dropout)
    _check_softmax_backward(1, 2, 3, cols, torch.tensor([0.125]), weights, with_dp, with_dropout)


@needs_cc
def test_softmax_kernels_refuse_what_they_cannot_serve():
    s = torch.randn(1, 2, 3, 8)
    coef = torch.tensor([0.5])
    assert not _cpu_kernels.softmax(s.double(), s.double(), coef, heads=2)  # float64
    assert not _cpu_kernels.softmax(s.transpose(-1, -2), s.transpose(-1, -2), coef, heads=2)  # strided
    assert not _cpu_kernels.softmax(s, s, torch.tensor([0.5, 1.0, 2.0]), heads=2)  # coef per 3 heads
    assert not _cpu_kernels.softmax(s, s, coef, heads=2, pd=torch.empty_like(s))  # dropout without counters
    leaf = s.clone().requires_grad_(True)
    assert not _cpu_kernels.softmax(leaf, leaf, coef, heads=2)  # autograd would miss the write
    strided_keys = torch.randn(1, 2, 8, 3).transpose(-1, -2)  # the right shape, keys 3 apart
    assert strided_keys.shape == s.shape
    assert not _cpu_kernels.softmax_backward(s, s, coef, heads=2, dw=strided_keys)
    assert not _cpu_kernels.softmax_backward(s, s, coef, heads=2, dw=torch.randn(1, 8, 3).transpose(-1, -2))
    assert not _cpu_kernels.softmax_backward(s, s, coef, heads=2, dw=torch.randn(1, 1, 3, 8))  # no broadcast
    empty = torch.empty(0, 2, 3, 8)  # nothing to write: served, whatever the gradient's strides
    assert _cpu_kernels.softmax_backward(empty, empty, coef, heads=2, dw=torch.zeros(()).expand(0, 2, 3, 8))


@needs_cc
def test_softmax_kernel_huge_logits_and_lone_nan():
    """Logits of 1e9: the fused x * coef - max of the maximum is its rounding error, > 0 --
    exp gives 1 there, a one-hot row as torch's, never NaN. A row whose only unmasked logit is
    NaN is NaN (as torch), one of -inf only 0."""
    s = torch.randn(1, 2, 64, 48, generator=torch.Generator().manual_seed(0)) * 3e9
    p = torch.empty_like(s)
    assert _cpu_kernels.softmax(s, p, torch.tensor([0.37]), heads=2)
    assert not p.isnan().any()
    torch.testing.assert_close(p, torch.softmax(s * 0.37, -1), rtol=0, atol=1e-6)
    s = torch.full((1, 1, 3, 5), -math.inf)
    s[0, 0, 0, 2] = math.nan
    s[0, 0, 2, 4] = 1.0
    assert _cpu_kernels.softmax(s, p[:, :1, :3, :5].contiguous(), torch.tensor([2.0]), heads=1)
    p = torch.empty_like(s)
    assert _cpu_kernels.softmax(s, p, torch.tensor([2.0]), heads=1)
    assert p[0, 0, 0].isnan().all() and torch.equal(p[0, 0, 1], torch.zeros(5))
    assert torch.equal(p[0, 0, 2], torch.tensor([0.0, 0, 0, 0, 1]))
