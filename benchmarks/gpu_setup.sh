#!/usr/bin/env bash
# Make pycuda available on a GPU machine that has nvcc but no package registry, from the wheels and
# the pycuda sdist carried in .whl/ (see ../shared/DESIGN.md, "The lent GPU"), then run the given
# command with them on PYTHONPATH.
#
#   bash benchmarks/gpu_setup.sh python3 -m pytest tests/test_cuda_kernels.py -q
#   bash benchmarks/gpu_setup.sh python3 benchmarks/preprocess_gpu.py
#
# Prepare .whl/ once on a machine with registry access, in the repository root (PREPARE=1 does it):
#   echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"; mkdir -p .whl
#   pip download --no-deps --no-binary=:all: --no-build-isolation pycuda -d .whl
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pytools platformdirs mako siphash24 markupsafe typing_extensions \
#             setuptools wheel pytest pluggy iniconfig packaging pytest-timeout
# (pytest for the tests, setuptools and wheel to build pycuda; add the tensorrt wheels where available).
#
# pycuda's build compiles its C++ sources (its Boost.Python subset included) one after the other, about
# 1.5 min; here they are compiled in parallel on every core, falling back to pip's serial build.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${WHEELS:-$ROOT/.whl}"
SITE="${SITE:-/tmp/edgeseg-site}"
PY="${PYTHON:-python3}"

if [ "${PREPARE:-0}" = 1 ]; then
    exclude="$(git -C "$ROOT" rev-parse --git-common-dir)/info/exclude"
    mkdir -p "$(dirname "$exclude")" "$WHEELS"
    grep -qx "/.whl/" "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
    "$PY" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation pycuda -d "$WHEELS"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" pytools platformdirs mako siphash24 markupsafe typing_extensions \
        setuptools wheel pytest pluggy iniconfig packaging pytest-timeout
    echo "gpu_setup: prepared $WHEELS ($(du -sh "$WHEELS" | cut -f1))"
    exit 0
fi

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_setup: no CUDA device: nvidia-smi finds no NVIDIA GPU on this machine" >&2
    exit 2
fi
NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ]; then
    echo "gpu_setup: nvcc not found: install the CUDA toolkit (pycuda and the kernels compile with it)" >&2
    exit 2
fi
CUDA_ROOT="${CUDA_ROOT:-$(cd "$(dirname "$NVCC")/.." && pwd)}"
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
        curand=()
        [ -f "$CUDA_ROOT/include/curand.h" ] || curand=(--no-cuda-enable-curand)
        "$PY" configure.py --cuda-root="$CUDA_ROOT" "${curand[@]}" >/dev/null
        jobs="$(nproc 2>/dev/null || echo 4)"
        echo "gpu_setup: building pycuda against $CUDA_ROOT on $jobs cores" >&2
        if "$PY" - "$jobs" "$BUILD/dist" > "$BUILD/build.log" 2>&1 <<'EOF'
# setup.py bdist_wheel with distutils' compile step spread over threads (each source is one compiler
# process), as numpy.distutils used to do; the rest of the build is pycuda's own setup.py.
import runpy
import sys
from concurrent.futures import ThreadPoolExecutor

import setuptools  # noqa: F401  (puts setuptools' distutils in place)
from distutils import ccompiler

jobs, dist = int(sys.argv[1]), sys.argv[2]


def compile_parallel(self, sources, output_dir=None, macros=None, include_dirs=None, debug=0, extra_preargs=None,
                     extra_postargs=None, depends=None):
    macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
        output_dir, macros, include_dirs, sources, depends, extra_postargs)
    cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)

    def one(obj):
        src, ext = build[obj]
        self._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, [o for o in objects if o in build]))
    return objects


ccompiler.CCompiler.compile = compile_parallel
sys.argv = ["setup.py", "bdist_wheel", "-d", dist]
sys.path.insert(0, ".")  # setup.py imports its helpers from its own folder, as `python setup.py` would
runpy.run_path("setup.py", run_name="__main__")
EOF
        then
            "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$BUILD"/dist/pycuda-*.whl
        else
            echo "gpu_setup: the parallel build failed (last lines below); building with pip, one source at a time" >&2
            tail -n 5 "$BUILD/build.log" >&2
            "$PY" -m pip install -q --no-deps --no-build-isolation --target "$SITE" .
        fi
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
