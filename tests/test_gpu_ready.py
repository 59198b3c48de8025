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
