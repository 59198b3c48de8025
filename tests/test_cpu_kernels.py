"""The compiled CPU dropout mask (crossattn/_cpu_kernels.c) against the torch-op Philox."""
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
@pytest.mark.parametrize("flags", [["-O3", "-mavx2", "-mno-avx512f"], ["-O3", "-mno-avx2", "-mno-avx512f"], ["-O0"]],
                         ids=["avx2", "no-avx2", "O0"])
def test_every_vector_path_gives_the_same_bits(tmp_path, flags):
    """The build of another machine: AVX2 only, no vector multiply, no optimisation."""
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
