#!/usr/bin/env bash
# One command that proves the GPU path on a machine with an NVIDIA GPU, nvcc and no package registry.
#
#   bash benchmarks/device_check.sh [--quick] [--out DIR]
#
# 1. stops at once, exit status 2, where there is no CUDA device (nothing is installed or run);
# 2. installs the wheels carried in .whl/ and builds pycuda from its sdist there (benchmarks/gpu_setup.sh;
#    prepare .whl/ beforehand on a machine with registry access: PREPARE=1 bash benchmarks/gpu_setup.sh);
# 3. runs every test marked gpu or tensorrt, the preprocessing benchmark (1080p -> 512x512, float32 and
#    float16: kernel against the memory-bandwidth floor and OpenCV on the CPU) and the GPU streaming
#    benchmark (pipeline FPS / engine-only FPS around the machine's PyTorch CUDA model as the engine
#    stand-in; goal >= 0.95); with TensorRT installed, the tensorrt tests build FP32/FP16/INT8 engines of
#    the default model and run them (benchmarks/device_check.py);
# 4. writes one JSON summary, DIR/device_check.json (DIR: $OUT when set, else ./device-check), beside
#    the logs and the tests' JUnit XML.
#
# Budget: 8 minutes on one H200 (pycuda's build included), --quick 3 minutes. Exit status 0 when every
# test passed and every step finished, 1 otherwise, 2 without a GPU or with a bad option.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DEVICE_CHECK_T0="$(date +%s)"
QUICK=()
DIR="${OUT:-$ROOT/device-check}"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=(--quick) ;;
        --out) DIR="${2:?--out needs a folder}"; shift ;;
        --out=*) DIR="${1#--out=}" ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "device_check: unknown option $1 (use --quick, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "device_check: no CUDA device: nvidia-smi finds no NVIDIA GPU on this machine; run this where there is one" >&2
    echo "(nothing was installed or run)" >&2
    exit 2
fi

mkdir -p "$DIR"
t0="$(date +%s)"
# gpu_setup.sh builds pycuda, then runs device_check.py with it (and the carried wheels) on PYTHONPATH
SETUP_LOG="$DIR/gpu_setup.log"
if ! bash "$ROOT/benchmarks/gpu_setup.sh" true > "$SETUP_LOG" 2>&1; then
    echo "device_check: setting up pycuda failed:" >&2
    tail -n 20 "$SETUP_LOG" >&2
    printf '{"ok": false, "step": "gpu_setup", "log": "gpu_setup.log"}\n' > "$DIR/device_check.json"
    exit 1
fi
tail -n 5 "$SETUP_LOG"
export PYCUDA_SETUP_S="$(( $(date +%s) - t0 ))"
exec bash "$ROOT/benchmarks/gpu_setup.sh" "${PYTHON:-python3}" "$ROOT/benchmarks/device_check.py" ${QUICK[@]+"${QUICK[@]}"} --out "$DIR"
