"""Backend selection: availability, support, auto order, CROSSATTN_BACKEND, reasons."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import crossattn
from crossattn import backends
from crossattn.backends.base import Backend
from conftest import make_qkv


def test_torch_is_always_available():
    avail = crossattn.available_backends()
    assert set(avail) == {"torch", "triton", "cuda"}
    assert avail["torch"] is None


def test_unavailable_backends_explain_how_to_get_them(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = make_qkv(1, 1, 3, 4, 8)
    with pytest.raises(RuntimeError) as info:
        crossattn.cross_attention(q, k, v, backend="triton")
    msg = str(info.value)
    assert "backend='triton' is not available" in msg and "TRITON_INTERPRET=1" in msg
    with pytest.raises(RuntimeError) as info:
        crossattn.cross_attention(q, k, v, backend="cuda")
    msg = str(info.value)
    assert "crossattn._C" in msg and "CROSSATTN_FORCE_CUDA=1" in msg and "no CUDA device" in msg


def test_interpreter_removes_the_device_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    why = backends.BACKENDS["triton"].unavailable() or ""
    assert "no CUDA device" not in why


def test_a_build_without_the_kernels_package_is_a_reason_not_a_crash(monkeypatch):
    # find_spec("a.b.c") raises ModuleNotFoundError when "a.b" is missing (a broken install).
    monkeypatch.setattr(backends.BACKENDS["triton"], "module_name", "crossattn._no_such_kernels.xattn")
    why = backends.BACKENDS["triton"].unavailable() or ""
    assert "this build of crossattn has no Triton kernels (crossattn._no_such_kernels.xattn" in why


def test_environment_overrides_auto(monkeypatch):
    q, k, v = make_qkv(1, 1, 3, 4, 8)
    monkeypatch.setenv("CROSSATTN_BACKEND", "torch")
    assert crossattn.choose_backend(q, k, v).name == "torch"
    monkeypatch.setenv("CROSSATTN_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"CROSSATTN_BACKEND='cuda' \(from the environment\) is not available"):
        crossattn.cross_attention(q, k, v)
    # An explicit argument wins over the environment.
    out, _ = crossattn.cross_attention(q, k, v, backend="torch")
    assert out.shape == (1, 1, 3, 8)
    monkeypatch.setenv("CROSSATTN_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"environment variable CROSSATTN_BACKEND must be one of"):
        crossattn.cross_attention(q, k, v)


class FakeBackend(Backend):
    def __init__(self, name, unavailable=None, unsupported=None):
        self.name, self._na, self._ns = name, unavailable, unsupported
        self.calls = 0

    def unavailable(self):
        return self._na

    def unsupported(self, problem):
        return self._ns

    def attention(self, problem):
        self.calls += 1
        return problem.q, None, None


def _cuda_problem():
    return SimpleNamespace(q=SimpleNamespace(device=torch.device("cuda", 0)))


def test_auto_on_cuda_tries_triton_then_cuda_then_torch(monkeypatch):
    fakes = {
        "triton": FakeBackend("triton", unavailable="no kernels"),
        "cuda": FakeBackend("cuda", unsupported="head dim 300 > 256"),
        "torch": FakeBackend("torch"),
    }
    monkeypatch.setattr(backends, "BACKENDS", fakes)
    choice = backends.choose([_cuda_problem()], "auto")
    assert choice == ("torch", {"triton": "no kernels", "cuda": "head dim 300 > 256"})
    fakes["cuda"] = FakeBackend("cuda")
    assert backends.choose([_cuda_problem()], "auto") == ("cuda", {"triton": "no kernels"})
    fakes["triton"] = FakeBackend("triton")
    assert backends.choose([_cuda_problem()], "auto").name == "triton"


def test_explicit_unsupported_is_a_value_error(monkeypatch):
    fakes = dict(backends.BACKENDS, cuda=FakeBackend("cuda", unsupported="float64 is supported by the torch backend only"))
    monkeypatch.setattr(backends, "BACKENDS", fakes)
    q, k, v = make_qkv(1, 1, 3, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"backend='cuda' does not support these inputs: float64"):
        crossattn.cross_attention(q, k, v, backend="cuda")


def test_bidirectional_asks_the_backend_once_for_both_directions(monkeypatch):
    seen = []

    class Recording(FakeBackend):
        def bidirectional(self, xy, yx):
            seen.append((xy.direction, yx.direction, xy.dropout_seed, yx.dropout_seed))
            return xy.q, yx.q, None, None, None, None

    fakes = dict(backends.BACKENDS, torch=Recording("torch"))
    monkeypatch.setattr(backends, "BACKENDS", fakes)
    qx, kx, vx = make_qkv(1, 1, 3, 3, 8)
    qy, ky, vy = make_qkv(1, 1, 5, 5, 8)
    crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky, vy, dropout_p=0.1)
    (d_xy, d_yx, s_xy, s_yx), = seen
    assert (d_xy, d_yx) == (0, 1) and s_xy == s_yx is not None


def test_auto_on_cpu_explains_why_the_kernel_backends_were_not_tried():
    q, k, v = make_qkv(1, 1, 3, 4, 8)
    choice = crossattn.choose_backend(q, k, v)
    assert choice.name == "torch"
    assert set(choice.rejected) == {"triton", "cuda"}
    for name, why in choice.rejected.items():
        assert "CUDA tensors only" in why and "cpu" in why, (name, why)
    assert "TRITON_INTERPRET=1" in choice.rejected["triton"]
