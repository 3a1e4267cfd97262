"""Where TensorRT lives: the `tensorrt` extra pip-installs TensorRT on x86-64 only (on Jetson it comes
with JetPack), and the core dependencies install on a Jetson's aarch64 Linux."""
from __future__ import annotations

import sys

import pytest

from tests.conftest import ROOT

packaging = pytest.importorskip("packaging.requirements")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

JETSON = {"platform_machine": "aarch64", "sys_platform": "linux", "platform_system": "Linux", "python_version": "3.10",
          "python_full_version": "3.10.12", "implementation_name": "cpython", "os_name": "posix"}
X86 = {**JETSON, "platform_machine": "x86_64"}
WINDOWS = {**X86, "platform_machine": "AMD64", "sys_platform": "win32", "platform_system": "Windows", "os_name": "nt"}
MAC = {**X86, "platform_machine": "arm64", "sys_platform": "darwin", "platform_system": "Darwin"}


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _installed(requirements, env) -> set[str]:
    from packaging.requirements import Requirement

    out = set()
    for text in requirements:
        r = Requirement(text)
        if r.marker is None or r.marker.evaluate({**env, "extra": ""}):
            out.add(r.name)
    return out


@pytest.mark.parametrize("env,trt", [(JETSON, False), (X86, True), (WINDOWS, True)],
                         ids=["jetson", "x86-64", "windows"])
def test_tensorrt_extra_only_where_pip_has_tensorrt(env, trt):
    extra = _installed(_project()["optional-dependencies"]["tensorrt"], env)
    assert ("tensorrt" in extra) is trt
    assert "pycuda" in extra  # built from its sdist against the CUDA toolkit, JetPack's included


def test_core_dependencies_on_a_jetson():
    core = _installed(_project()["dependencies"], JETSON)
    assert "coremltools" not in core  # no Linux aarch64 wheels
    assert {"numpy", "opencv-python", "onnxruntime", "onnx"} <= core
    assert "coremltools" in _installed(_project()["dependencies"], MAC)
    assert "coremltools" in _installed(_project()["dependencies"], X86)


def _has_nvidia_gpu() -> bool:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


@pytest.mark.skipif(_has_nvidia_gpu(), reason="this machine has an NVIDIA GPU: device_check.sh would run for real")
@pytest.mark.parametrize("args", [["--quick"], []], ids=["quick", "full"])
def test_device_check_without_a_gpu_stops_at_once(args, tmp_path):
    import os
    import subprocess
    import time

    t0 = time.monotonic()
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), *args], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path, env={**os.environ, "OUT": str(tmp_path / "out")})
    assert r.returncode == 2
    assert "no CUDA device" in r.stderr and "nothing was installed or run" in r.stderr
    assert time.monotonic() - t0 < 10 and not (tmp_path / "out").exists()


def test_device_check_rejects_unknown_options(tmp_path):
    import subprocess

    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--fast"], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "unknown option --fast (use --quick, --out DIR)" in r.stderr
