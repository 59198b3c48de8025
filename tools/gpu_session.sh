#!/usr/bin/env bash
# One device call: build the CUDA extension, run every backend's GPU tests, compute-sanitizer
# on the CUDA kernels, then the full benchmark. Logs and results land under $OUT (default
# ./gpu-out). Usage (device tool): bash tools/gpu_session.sh [--no-bench]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || true
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

echo "== build (CUDA extension, stable ABI)"
start=$(date +%s)
CROSSATTN_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=${MAX_JOBS:-16} \
    python -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - start )) s"; tail -3 "$OUT/build.log"
python -c "import crossattn; print(crossattn.available_backends())"

echo "== GPU tests (all backends)"
python -m pytest -m gpu -q -rs -p no:cacheprovider tests --junitxml="$OUT/gpu-tests.xml" \
    > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests rc=$?"; tail -15 "$OUT/gpu-tests.log"

if command -v compute-sanitizer > /dev/null; then
    echo "== compute-sanitizer (CUDA kernels, small shapes, with padding, pruning, both directions)"
    cat > "$OUT/sanitize.py" <<'PY'
import torch, crossattn
for dtype in (torch.float16, torch.bfloat16):
    for D in (64, 128, 256):
        g = torch.Generator(device="cuda").manual_seed(0)
        r = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=g)
        qx, kx, vx = r(2, 2, 37, D), r(2, 2, 37, D), r(2, 2, 37, D)
        qy, ky, vy = r(2, 2, 101, D), r(2, 2, 101, D), r(2, 2, 101, D)
        ym = torch.arange(101, device="cuda")[None, :] >= torch.tensor([[101], [60]], device="cuda")
        for prune in (None, crossattn.BlockPruning(block_q=16, block_k=32, keep=0.5)):
            for w in (None, "full", "mean"):
                crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky, vy, y_padding_mask=ym, prune=prune,
                                                        need_weights=w, backend="cuda")
torch.cuda.synchronize(); print("sanitize workload done")
PY
    for tool in memcheck racecheck; do
        compute-sanitizer --tool $tool --error-exitcode 9 python "$OUT/sanitize.py" > "$OUT/sanitizer-$tool.log" 2>&1
        echo "compute-sanitizer $tool rc=$?"; tail -3 "$OUT/sanitizer-$tool.log"
    done
fi

if [ "${1:-}" != "--no-bench" ]; then
    echo "== benchmark"
    python -m crossattn.bench --output "$OUT/bench" > "$OUT/bench.log" 2>&1
    echo "bench rc=$?"; tail -40 "$OUT/bench.log"
fi
