"""The steps of benchmarks/device_check.sh once pycuda is importable; writes one JSON summary.

    python benchmarks/device_check.py [--quick] --out DIR        (run through device_check.sh)

1. the machine: GPU, driver, CUDA toolkit, Python, pycuda, torch, TensorRT;
2. every test marked `gpu` or `tensorrt` (the `tensorrt` ones build FP32/FP16/INT8 engines of the
   default model and skip, saying why, where TensorRT is missing), JUnit XML beside the summary;
3. benchmarks/preprocess_gpu.py: 1080p -> 512x512, float32 and float16, kernel vs the memory
   bandwidth floor vs a device copy vs OpenCV on the CPU;
4. benchmarks/stream_gpu.py: pipeline FPS / engine-only FPS of the GPU frame path around the
   PyTorch CUDA-graph stand-in engine (goal >= 0.95).

Each step runs in its own process with a time limit taken from what is left of the budget (8 min,
--quick 3 min, counted from DEVICE_CHECK_T0, the start of device_check.sh), so one failing or
hanging step leaves the others' figures. Exit status 0 when every test passed and every step
finished, 1 otherwise; the summary says which.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = {"full": 480, "quick": 180}
RESERVE_S = 10  # left for writing the summary


def _run(name: str, cmd: list[str], limit_s: float, log: Path) -> dict:
    """Run a step in its own process within `limit_s`; its output goes to `log`, its tail to the terminal."""
    t0 = time.monotonic()
    if limit_s < 5:
        return {"status": "skipped", "reason": "no time left in the budget", "seconds": 0.0}
    with open(log, "w") as fh:
        try:
            r = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=limit_s)
            status = "ok" if r.returncode == 0 else f"exit {r.returncode}"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit_s:.0f} s"
    out = {"status": status, "seconds": round(time.monotonic() - t0, 1), "log": log.name}
    tail = log.read_text(errors="replace").splitlines()[-15:]
    print(f"--- {name}: {status} ({out['seconds']} s)", flush=True)
    for line in tail:
        print("    " + line)
    return out


def _machine() -> dict:
    facts = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        facts["nvidia_smi"] = [line.strip() for line in q.stdout.splitlines() if line.strip()]
    except Exception as e:  # recorded, not fatal: the tests will say more
        facts["nvidia_smi"] = f"failed: {e}"
    try:
        v = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=20).stdout
        facts["nvcc"] = (re.findall(r"release [\d.]+, V[\d.]+", v) or [v.strip()[-80:]])[0]
    except Exception as e:
        facts["nvcc"] = f"not found: {e}"
    for mod in ("pycuda", "torch", "tensorrt", "numpy", "cv2", "onnxruntime"):
        if importlib.util.find_spec(mod) is None:
            facts[mod] = None
            continue
        try:
            m = __import__(mod)
            facts[mod] = getattr(m, "VERSION_TEXT", None) or getattr(m, "__version__", "?")
        except Exception as e:
            facts[mod] = f"import failed: {e}"
    try:
        import torch

        facts["torch_cuda"] = torch.version.cuda if torch.cuda.is_available() else "not available"
    except Exception:
        pass
    try:
        from runtime.engines.tensorrt import gpu_context

        gpu = gpu_context(0)
        facts["gpu"] = {"name": gpu.name, "compute_capability": list(gpu.compute_capability)}
    except Exception as e:
        facts["gpu"] = f"pycuda cannot use it: {e}"
    facts["tensorrt_builder"] = bool(facts.get("tensorrt")) and _has_builder()
    return facts


def _has_builder() -> bool:
    try:
        import tensorrt

        return hasattr(tensorrt, "Builder")
    except Exception:
        return False


def _gpu_test_files() -> list[str]:
    """Test modules with a `gpu` or `tensorrt` mark (collecting only these keeps the other modules'
    imports, torch or coremltools, out of a machine that lacks them)."""
    marks = re.compile(r"pytest\.mark\.(gpu|tensorrt)\b")
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if marks.search(p.read_text()))


def _junit(path: Path) -> dict:
    if not path.is_file():
        return {"error": "no JUnit report (pytest did not finish)"}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skips = [], {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            counts["failed" if "failure" in kinds else "errors"] += 1
            child = next(c for c in case if c.tag in ("failure", "error"))
            failures.append({"test": name, "message": (child.get("message") or "")[:300]})
        elif "skipped" in kinds:
            counts["skipped"] += 1
            reason = next(c for c in case if c.tag == "skipped").get("message", "")
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "skip_reasons": skips}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the 3-minute version: fewer iterations and configurations")
    ap.add_argument("--out", required=True, help="folder for the summary (device_check.json), logs and JUnit XML")
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "full"
    t0 = float(os.environ.get("DEVICE_CHECK_T0") or time.time())
    deadline = t0 + BUDGET_S[mode] - RESERVE_S
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    left = lambda: deadline - time.time()  # noqa: E731
    summary = {"mode": mode, "budget_s": BUDGET_S[mode], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
               "pycuda_setup_s": float(os.environ["PYCUDA_SETUP_S"]) if os.environ.get("PYCUDA_SETUP_S") else None}
    sys.path.insert(0, str(ROOT))
    summary["machine"] = _machine()
    py = sys.executable

    files = _gpu_test_files()
    xml = out / "gpu-tests.xml"
    step = _run("gpu and tensorrt tests", [py, "-m", "pytest", "-m", "gpu or tensorrt", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                 f"--junitxml={xml}", *files], min(left() - 60, 240 if args.quick else 300), out / "gpu-tests.log")
    summary["tests"] = {**step, "files": files, **_junit(xml)}

    pre_json = out / "preprocess_gpu.json"
    step = _run("preprocessing benchmark", [py, "benchmarks/preprocess_gpu.py", "--dtype", "both", "--iters", "100" if args.quick else "300",
                 "--cpu-iters", "10" if args.quick else "30", "--json", str(pre_json)],
                min(left() - 40, 60 if args.quick else 90), out / "preprocess_gpu.log")
    summary["preprocess"] = {**step, **(json.loads(pre_json.read_text()) if pre_json.is_file() else {})}

    stream_json = out / "stream_gpu.json"
    step = _run("streaming benchmark", [py, "benchmarks/stream_gpu.py", "--matrix", mode, "--json", str(stream_json)], left(),
                out / "stream_gpu.log")
    summary["streaming"] = {**step, **(json.loads(stream_json.read_text()) if stream_json.is_file() else {})}

    trt = summary["machine"].get("tensorrt")
    summary["tensorrt"] = ({"present": True, "version": trt, "builder": summary["machine"]["tensorrt_builder"],
                            "engines": "built by the tensorrt tests (FP32, FP16, INT8): see tests"} if trt else
                           {"present": False, "reason": "TensorRT is not installed on this machine: tests marked "
                            "tensorrt skipped, the streaming benchmark used the PyTorch stand-in engine"})
    summary["elapsed_s"] = round(time.time() - t0, 1)
    tests = summary["tests"]
    ok = (tests.get("failed", 1) == 0 and tests.get("errors", 1) == 0
          and all(summary[k]["status"] == "ok" for k in ("tests", "preprocess", "streaming")))
    summary["ok"] = ok
    (out / "device_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ndevice_check ({mode}): {'OK' if ok else 'PROBLEMS'} in {summary['elapsed_s']} s; tests "
          + ", ".join(f"{k} {tests.get(k)}" for k in ("passed", "failed", "errors", "skipped")))
    for r in summary["preprocess"].get("results", []):
        print(f"  preprocess {r['dtype']}: kernel {r['kernel_ms_median']} ms, x{r['kernel_over_floor']} the bandwidth "
              f"floor, OpenCV CPU {r['cpu_1_thread_over_kernel']}x slower (1 thread)")
    for r in summary["streaming"].get("results", []):
        print(f"  stream {r['input']} {r['dtype']}{' +overlay' if r['overlay_on_gpu'] else ''}: "
              f"pipeline/engine-only {r['ratio_median']} (goal {r['goal']}, {'met' if r['goal_met'] else 'not met'})")
    print(f"summary -> {out / 'device_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
