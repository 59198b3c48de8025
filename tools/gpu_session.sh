#!/usr/bin/env bash
# One GPU session in phases, in priority order, each under its own timeout; each phase writes
# its results to $OUT as soon as it ends, so a run cut off early still returns what finished.
#
#   1. Triton backend GPU tests at real shapes (fp16/bf16), sync and CUDA-graph checks  <= 2 min
#   2. quick benchmark of the performance table's workloads vs eager, SDPA, FlexAttention <= 3 min
#   3. the CUDA extension built for this GPU's architecture only, and its tests           <= 3 min
#   4. compute-sanitizer memcheck on a tiny workload                                      <= 1 min
#
# Usage: bash tools/gpu_session.sh [--dry-run] [--phases 1,2,3,4]
# Device tool: run(command="bash tools/gpu_session.sh", timeout_s=600): 9 min of phases plus
# a machine start fit the 15 minutes of device time.
# --dry-run runs the same phases on a CPU under the Triton interpreter at tiny sizes (what needs
# nvcc on a GPU or compute-sanitizer is skipped with a SKIP line); tests/test_gpu_session.py runs
# it in CI so the script cannot rot before a GPU reaches it.
#
# $OUT (default ./gpu-out) receives at most 7 files (the device tool returns 8): summary.txt
# (one line per phase: rc, seconds), session.log (everything), phase1-triton.xml,
# bench.json + bench.md, phase3-cuda.xml, memcheck.log.
# Phase timeouts can be overridden: T1, T2, T3, T4 (seconds).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
PHASES="1,2,3,4"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --phases) PHASES="$2"; shift ;;
        *) echo "unknown argument: $1 (usage: $0 [--dry-run] [--phases 1,2,3,4])" >&2; exit 2 ;;
    esac
    shift
done

OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
exec > >(tee "$OUT/session.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    T1=${T1:-300} T2=${T2:-300} T3=${T3:-120} T4=${T4:-120}
else
    T1=${T1:-120} T2=${T2:-180} T3=${T3:-180} T4=${T4:-60}
fi
# A plain checkout has no crossattn/kernels (setup.py maps kernels/ there when installing).
python -c "import crossattn.kernels" 2>/dev/null || ln -sfn ../kernels crossattn/kernels

: > "$OUT/summary.txt"
wanted() { case ",$PHASES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
# phase N NAME SECONDS COMMAND...: run under timeout (SIGINT first, so pytest still writes its
# report), record rc and duration in summary.txt at once.
phase() {
    local n=$1 name=$2 limit=$3; shift 3
    echo "== phase $n: $name (limit ${limit}s) $(date -u +%H:%M:%S)"
    local start=$SECONDS
    timeout -s INT -k 15 "$limit" "$@"
    local rc=$?
    local line="phase $n $name rc=$rc seconds=$((SECONDS - start))"
    [ $rc = 124 ] && line="$line TIMED OUT"
    echo "$line" | tee -a "$OUT/summary.txt"
}
skip() { echo "SKIP phase $1 $2: $3" | tee -a "$OUT/summary.txt"; }

nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv 2>/dev/null || true
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.is_available())"
git log -1 --format='commit %H %s' 2>/dev/null || true

PYTEST=(python -m pytest -q -rs -p no:cacheprovider)
if [ "$DRY" = 0 ] && python -c "import xdist" 2>/dev/null; then
    PYTEST+=(-n 4)  # Triton compiles dominate a fresh machine: four workers compile in parallel
fi

# ---------------------------------------------------------------- 1. Triton on the GPU
triton_phase() {
    "${PYTEST[@]}" -m gpu -k "not cuda_backend" tests/test_triton.py tests/test_triton_pruning.py tests/test_autotune.py \
        tests/test_gpu_ready.py tests/test_triton_features.py --junitxml="$OUT/phase1-triton.xml" || return
    if [ "$DRY" = 1 ]; then  # the GPU tests skipped above; run the interpreter's launch count
        "${PYTEST[@]}" -m "not slow" -k launch tests/test_gpu_ready.py
    fi
}
if wanted 1; then
    phase 1 triton-gpu-tests "$T1" bash -c "$(declare -f triton_phase); PYTEST=(${PYTEST[*]}); DRY=$DRY OUT=$OUT; triton_phase"
fi

# ---------------------------------------------------------------- 2. quick benchmark
bench_phase() {
    local deadline=$((SECONDS + $1)) names=() spec ok=1
    if [ "$DRY" = 1 ]; then
        specs=("seed001:fwd:sdpa,crossattn[torch] weights=off")
    else  # the performance table's workloads (issue 15), most important first
        specs=("seed000:fwd,fwd+bwd:sdpa,flex,crossattn[triton] weights"
               "short_inference:fwd:sdpa,flex,crossattn[triton] weights=off"
               "compute_bound:fwd:sdpa,flex,crossattn[triton] weights=off"
               "long_audio:fwd,fwd+bwd:sdpa,crossattn[triton] weights=off,crossattn[triton] prune keep=0.25")
    fi
    for spec in "${specs[@]}"; do
        IFS=: read -r w modes impls <<< "$spec"
        local left=$((deadline - SECONDS))
        [ $left -lt 10 ] && { echo "bench: no time left for $w"; break; }
        local args=(--workloads "$w" --modes "$modes" --impls "$impls" --output "$WORK/bench-$w")
        [ "$DRY" = 1 ] && args+=(--quick --device cpu --dtype float32)
        echo "-- bench $w ($modes) ${left}s left"
        # Merged whatever the exit status (one failing peer exits 1 but measured the rest; its
        # failure is listed in the merged report) and after every workload: a cut-off phase
        # keeps what was measured.
        timeout -s INT -k 10 "$left" python -m crossattn.bench "${args[@]}" || ok=0
        names+=("$WORK/bench-$w")
        python tools/merge_bench.py "$OUT/bench" "${names[@]}"
    done
    [ "$ok" = 1 ] && [ ${#names[@]} = ${#specs[@]} ]
}
if wanted 2; then
    phase 2 benchmark "$T2" bash -c "$(declare -f bench_phase); DRY=$DRY WORK=$WORK OUT=$OUT; bench_phase $T2"
fi

# ---------------------------------------------------------------- 3. CUDA extension
if wanted 3; then
    if [ "$DRY" = 1 ]; then
        skip 3 cuda-build "needs nvcc and a GPU (dry run); the CUDA tests below skip"
        phase 3 cuda-tests "$T3" "${PYTEST[@]}" -m gpu tests/test_cuda_backend.py --junitxml="$OUT/phase3-cuda.xml"
    else
        cuda_phase() {
            arch=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
            echo "building crossattn._C for sm_${arch/./} only"
            CROSSATTN_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-16} \
                python setup.py -q build_ext --inplace > "$WORK/build.log" 2>&1
            rc=$?; tail -20 "$WORK/build.log"; echo "build rc=$rc"
            [ $rc = 0 ] || return $rc
            python -c "import crossattn; print(crossattn.available_backends())"
            "${PYTEST[@]}" tests/test_cuda_backend.py tests/test_gpu_ready.py -k cuda_backend --junitxml="$OUT/phase3-cuda.xml"
        }
        phase 3 cuda-build-and-tests "$T3" bash -c "$(declare -f cuda_phase); PYTEST=(${PYTEST[*]}); WORK=$WORK OUT=$OUT; cuda_phase"
    fi
fi

# ---------------------------------------------------------------- 4. compute-sanitizer
if wanted 4; then
    if [ "$DRY" = 1 ] || ! command -v compute-sanitizer > /dev/null; then
        skip 4 memcheck "compute-sanitizer needs a GPU; the workload runs without it"
        phase 4 memcheck-workload "$T4" python tools/sanitize_workload.py --tiny
    else
        phase 4 memcheck "$T4" bash -c "compute-sanitizer --tool memcheck --error-exitcode 9 \
            python tools/sanitize_workload.py > '$OUT/memcheck.log' 2>&1; rc=\$?; tail -15 '$OUT/memcheck.log'; exit \$rc"
    fi
fi

echo "== summary"
cat "$OUT/summary.txt"
! grep -qv "rc=0\|^SKIP" "$OUT/summary.txt"
