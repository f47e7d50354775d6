#!/usr/bin/env bash
# One prepared run on a CUDA machine: the GPU tests, then the side-by-side benchmarks on
# the GPU. Every step has its own time limit and writes its log into OUTDIR, so a step
# that fails or runs long does not cost the others.
#
# Usage, from the repository root, with torch (CUDA build) and the package's
# dependencies installed, and captum importable for the benchmarks:
#
#     bash benchmarks/gpu_session.sh OUTDIR
#
# STEPS="cuda-tests fast" runs only the named steps (default: all of them).
set -u
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUTDIR/NAME.log
    local name=$1 limit=$2
    shift 2
    if [[ -n "${STEPS:-}" && " $STEPS " != *" $name "* ]]; then
        return
    fi
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    tail -n 40 "$out/$name.log"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
    "$py" -c "import captum; print('captum', captum.__version__)"
    nproc
} 2>&1 | tee "$out/machine.txt"

step cuda-tests 180 "$py" -m pytest -m cuda -v -p no:cacheprovider tests
step data-tests 60 "$py" -m pytest -q -p no:cacheprovider tests/test_data.py tests/test_fast.py
step fast 100 "$py" benchmarks/compare_captum.py --device cuda --only fast --repeats 5
step similarity 60 "$py" benchmarks/bench_similarity.py --device cuda --repeats 5
step overhead 60 "$py" benchmarks/bench_call_overhead.py --device cuda --repeats 9
step cnn 100 "$py" benchmarks/compare_captum.py --device cuda --only cnn --repeats 5 --skip-default
step profile 90 "$py" benchmarks/profile_calls.py --device cuda --top 25
step transformer 90 "$py" benchmarks/compare_captum.py --device cuda --only transformer --repeats 5
