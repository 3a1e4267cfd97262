#!/usr/bin/env bash
# Make pycuda available on a GPU machine that has nvcc but no network, from wheels and the pycuda
# sdist carried in .whl/ (see DESIGN.md), then run the given command with it on PYTHONPATH.
#
#   bash benchmarks/gpu_setup.sh python -m pytest tests/test_cuda_kernels.py -q
#   bash benchmarks/gpu_setup.sh python benchmarks/preprocess_gpu.py
#
# Prepare .whl/ once on a machine with registry access, in the repository root:
#   echo /.whl/ >> .git/info/exclude; mkdir -p .whl
#   pip download --no-deps --no-binary=:all: --no-build-isolation pycuda -d .whl
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pytools platformdirs mako siphash24
# (add onnxconverter-common and the tensorrt wheels there too where they are available).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${WHEELS:-$ROOT/.whl}"
SITE="${SITE:-/tmp/edgeseg-site}"
PY="${PYTHON:-python3}"

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_setup: nvidia-smi not found: this machine has no NVIDIA driver" >&2
    exit 2
fi
NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ]; then
    echo "gpu_setup: nvcc not found: install the CUDA toolkit (pycuda compiles against it)" >&2
    exit 2
fi
CUDA_ROOT="$(cd "$(dirname "$NVCC")/.." && pwd)"
export PATH="$(dirname "$NVCC"):$PATH"

mkdir -p "$SITE"
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import pycuda.driver" >/dev/null 2>&1; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    sdists=("$WHEELS"/pycuda-*.tar.gz)
    if [ ${#sdists[@]} -eq 0 ]; then
        echo "gpu_setup: no pycuda sdist in $WHEELS; prepare .whl/ as described at the top of this script" >&2
        exit 2
    fi
    if [ ${#wheels[@]} -gt 0 ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${wheels[@]}"
    fi
    BUILD="$(mktemp -d)"
    tar xzf "${sdists[0]}" -C "$BUILD"
    (
        cd "$BUILD"/pycuda-*
        if [ -f "$CUDA_ROOT/include/curand.h" ]; then
            "$PY" configure.py --cuda-root="$CUDA_ROOT" >/dev/null
        else
            "$PY" configure.py --cuda-root="$CUDA_ROOT" --no-cuda-enable-curand >/dev/null
        fi
        echo "gpu_setup: building pycuda against $CUDA_ROOT (about 1.5 min)" >&2
        "$PY" -m pip install -q --no-deps --no-build-isolation --target "$SITE" .
    )
    rm -rf "$BUILD"
fi

"$PY" - <<'EOF'
import pycuda.driver as cuda
cuda.init()
for i in range(cuda.Device.count()):
    d = cuda.Device(i)
    print(f"gpu_setup: device {i}: {d.name()} sm{''.join(map(str, d.compute_capability()))}")
try:
    import tensorrt
    print(f"gpu_setup: TensorRT {tensorrt.__version__} (builder: {hasattr(tensorrt, 'Builder')})")
except ImportError:
    print("gpu_setup: TensorRT is not installed (tests marked tensorrt will skip)")
EOF

if [ $# -gt 0 ]; then
    cd "$ROOT"
    exec "$@"
fi
