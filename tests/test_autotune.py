"""Launch configs and opt-in autotuning of the Triton passes (kernels/xattn_configs.py): the
candidate space, its pruning by device limits, the choice, its cache, and that the launchers
honour the choice. Timings are faked here (a timer that returns fixed numbers); the GPU test
at the end times for real."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import INTERPRETING, check_gradients, make_qkv, triton_ready

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(triton_ready() is not None, reason=str(triton_ready()))

from crossattn.kernels import xattn_configs as C  # noqa: E402

on_gpu = pytest.mark.skipif(INTERPRETING or not torch.cuda.is_available(), reason="needs a CUDA device")
RTX = C.DeviceLimits(shared_per_block=99 * 1024)
H100 = C.DeviceLimits(shared_per_block=227 * 1024)


@pytest.fixture
def as_on_gpu(monkeypatch):
    """The configs a GPU gets (the space is empty-handed under the interpreter)."""
    monkeypatch.setattr(C, "interpreting", lambda: False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "autotune.json"
    monkeypatch.setenv("CROSSATTN_AUTOTUNE_CACHE", str(path))
    monkeypatch.setattr(C, "_loaded_from", None)
    monkeypatch.setattr(C, "_memory", {})
    return path


def test_interpreter_gets_one_config():
    if not INTERPRETING:
        pytest.skip("interpreter only")
    assert C.candidates("fwd", 128, 128, torch.float16, limits=RTX) == [C.INTERPRETER_CONFIG]
    assert C.default_config(128, 128, torch.float16, "bwd") == C.INTERPRETER_CONFIG


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [32, 64, 96, 128, 200, 256])
def test_candidates_start_with_the_default_and_fit_the_device(as_on_gpu, kind, dtype, d):
    default = C.default_config(d, d, dtype, kind)
    for limits in (RTX, H100, None):
        cands = C.candidates(kind, d, d, dtype, limits=limits)
        assert cands[0] == default
        assert len(set(cands)) == len(cands)
        bd = max(16, triton.next_power_of_2(d))
        for cfg in cands[1:]:
            if limits is not None:
                assert C.shared_estimate(cfg, kind, bd, bd, dtype.itemsize) <= limits.shared_per_block
                assert cfg.maxnreg * 32 * cfg.num_warps <= limits.regs_per_sm
    # A card with less shared memory never gets more candidates than one with more.
    assert len(C.candidates(kind, d, d, dtype, limits=RTX)) <= len(C.candidates(kind, d, d, dtype, limits=H100))


def test_pruning_drops_what_does_not_fit_but_keeps_the_default(as_on_gpu):
    every = C.candidates("fwd", 128, 128, torch.float16)
    assert len(every) > 1
    tiny = C.DeviceLimits(shared_per_block=1024)
    assert C.candidates("fwd", 128, 128, torch.float16, limits=tiny) == every[:1]
    few_regs = C.DeviceLimits(shared_per_block=227 * 1024, regs_per_sm=32 * 1024)
    kept = C.candidates("fwd", 128, 128, torch.float16, limits=few_regs)
    assert all(c.maxnreg * 32 * c.num_warps <= 32 * 1024 for c in kept[1:])


def test_top_k_caps_the_rows_and_deduplicates(as_on_gpu):
    cands = C.candidates("fwd", 64, 64, torch.float16, top_k=4)
    assert all(c.block_m <= C.TOPK_BLOCK_M for c in cands)
    assert len(set(cands)) == len(cands)
    assert C.default_config(64, 64, torch.float16, "fwd", top_k=4).block_m <= C.TOPK_BLOCK_M


def test_maxnreg_fills_the_register_file():
    assert C.Config(16, 16, 4, 1).maxnreg == 255
    assert C.Config(16, 16, 8, 1).maxnreg == 255
    assert C.Config(16, 16, 16, 1).maxnreg == 128


def test_length_buckets():
    assert [C.bucket(n) for n in (0, 1, 64, 65, 1000, 1024, 1025, 10**6)] == [64, 64, 64, 128, 1024, 1024, 2048,
                                                                               1 << 16]


def fake_timer(times, calls):
    def timer(fn):
        fn()
        cfg = calls[-1]
        if times[cfg] is None:
            raise triton.runtime.errors.OutOfResources(200_000, 101_376, "shared memory")
        return times[cfg]
    return timer


def test_pick_times_each_candidate_keeps_the_fastest_and_caches_it(cache):
    a, b, c = C.Config(64, 32, 8, 2), C.Config(32, 32, 4, 2), C.Config(64, 64, 8, 2)
    calls = []
    timer = fake_timer({a: 2.0, b: 1.0, c: None}, calls)  # c does not load on this device
    assert C.pick(lambda: "key1", [a, b, c], calls.append, timer=timer) == b
    assert calls == [a, b, c]
    assert json.loads(cache.read_text())["configs"] == {"key1": [32, 32, 4, 2]}
    # A new process reads the file instead of timing again.
    C._memory.clear()
    C._loaded_from = None
    calls.clear()
    assert C.pick(lambda: "key1", [a, b, c], calls.append, timer=timer) == b
    assert calls == []
    # Another key is timed on its own and joins the same file.
    timer = fake_timer({a: 0.5, b: 1.0, c: 3.0}, calls)
    assert C.pick(lambda: "key2", [a, b, c], calls.append, timer=timer) == a
    assert set(json.loads(cache.read_text())["configs"]) == {"key1", "key2"}


def test_pick_ignores_a_cached_choice_that_is_no_longer_a_candidate(cache):
    cache.write_text(json.dumps({"version": 1, "configs": {"k": [128, 128, 8, 3]}}))
    a, b = C.Config(64, 32, 8, 2), C.Config(32, 32, 4, 2)
    assert C.pick(lambda: "k", [a, b], lambda cfg: None, timer=lambda fn: pytest.fail("timed")) == a


def test_unreadable_cache_is_timed_again(cache):
    cache.write_text("{not json")
    a, b = C.Config(64, 32, 8, 2), C.Config(32, 32, 4, 2)
    calls = []
    assert C.pick(lambda: "k", [a, b], calls.append, timer=fake_timer({a: 1.0, b: 2.0}, calls)) == a
    assert json.loads(cache.read_text())["configs"] == {"k": [64, 32, 8, 2]}


@pytest.mark.parametrize("where", ["compiling", "capturing"])
def test_no_timing_while_tracing_or_capturing(cache, monkeypatch, where):
    if where == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    a, b = C.Config(64, 32, 8, 2), C.Config(32, 32, 4, 2)
    assert C.pick(lambda: "k", [a, b], lambda cfg: pytest.fail("launched"),
                  timer=lambda fn: pytest.fail("timed")) == a
    assert not cache.exists()


def test_autotuning_is_opt_in_and_cuda_only(monkeypatch):
    monkeypatch.delenv("CROSSATTN_AUTOTUNE", raising=False)
    assert not C.enabled(torch.device("cuda", 0))
    monkeypatch.setenv("CROSSATTN_AUTOTUNE", "1")
    assert not C.enabled(torch.device("cpu"))
    assert C.enabled(torch.device("cuda", 0)) is (not INTERPRETING)


@pytest.mark.skipif(not INTERPRETING, reason="drives the launchers on the CPU through the interpreter")
def test_launchers_run_with_the_tuned_config_and_stay_exact(cache, monkeypatch):
    """The forward and backward passes time each candidate through the real launchers, launch
    with the winner (seen in the recorded BLOCK_M), and compute what the reference computes."""
    import crossattn
    from _kernel_compile import record_launches
    from crossattn.kernels import xattn

    small, big = C.Config(16, 16, 1, 1), C.Config(32, 32, 1, 1)
    timed = []
    monkeypatch.setattr(C, "enabled", lambda device: True)
    monkeypatch.setattr(C, "candidates", lambda *a, **k: [big, small])
    monkeypatch.setattr(C, "_device_tag", lambda device: "test-device")
    monkeypatch.setattr(xattn.configs.DeviceLimits, "of", staticmethod(lambda device: RTX))

    def timer(fn):
        n = len(timed)
        fn()
        timed.append(n)
        return 1.0 if len(timed) % 2 == 0 else 2.0  # the second candidate (small) is faster
    monkeypatch.setattr(C, "_time", timer)

    q, k, v = make_qkv(2, 2, 40, 70, 16, requires_grad=True, seed=3)
    pad = torch.arange(70)[None] >= torch.tensor([[70], [45]])

    def run(*args, **kw):
        return crossattn.cross_attention(*args, backend="triton", **kw)
    with record_launches() as launches:
        check_gradients(run, q, k, v, dict(key_padding_mask=pad), "full", torch.float32)
    assert len(timed) == 4  # two candidates x (forward, backward)
    keys = sorted(json.loads(cache.read_text())["configs"])
    assert [k.split("|")[0] for k in keys] == ["bwd", "fwd"]
    for kernel in ("_xattn_fwd_kernel", "_xattn_bwd_dq_kernel"):  # timed big, timed small, then small
        assert [lw["args"]["BLOCK_M"] for lw in launches if lw["kernel"] == kernel] == [32, 16, 16]


@pytest.mark.gpu
@on_gpu
def test_autotuning_on_the_gpu_times_caches_and_matches_the_default(tmp_path, monkeypatch):
    import crossattn

    monkeypatch.setenv("CROSSATTN_AUTOTUNE_CACHE", str(tmp_path / "tune.json"))
    monkeypatch.setattr(C, "_loaded_from", None)
    monkeypatch.setattr(C, "_memory", {})
    q, k, v = make_qkv(2, 8, 256, 1000, 96, dtype=torch.float16, device="cuda", requires_grad=True)
    res = []
    for tune in ("0", "1", "1"):  # default; timed; from the cache
        monkeypatch.setenv("CROSSATTN_AUTOTUNE", tune)
        out, w = crossattn.cross_attention(q, k, v, need_weights="mean", backend="triton")
        (out.float().square().sum() + w.float().square().sum()).backward()
        res.append([out, w] + [t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    configs = json.loads((tmp_path / "tune.json").read_text())["configs"]
    assert {k.split("|")[0] for k in configs} == {"fwd", "bwd"}
    assert all("sm_" in k for k in configs)
    for got, want in zip(res[1] + res[2], res[0] + res[0]):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
