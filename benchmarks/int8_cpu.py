"""FP32 vs INT8 latency with ONNX Runtime on this CPU, side by side in one run.

    python benchmarks/int8_cpu.py                      # default model + a ResNet-50 DeepLabV3+ at 512x512
    python benchmarks/int8_cpu.py --threads 1 --rounds 9

For each model: export to ONNX, compute ranges on synthetic frames, write the `cpu` preset
(QDQ, U8S8 per-channel) and, for comparison, the `tensorrt` preset (S8S8 symmetric) and a
QOperator U8S8 graph; then time every graph in interleaved rounds (so load from other processes
hits all of them alike) and print medians and speed-ups over FP32. Latency does not depend on the
weights, so the ResNet-class model uses random weights; the default model uses its trained ones.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOALS = {"mobile": 1.3, "resnet": 3.0}  # cpu-preset speed-up the project aims for


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    model = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), "unknown")
    flags = next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), [])
    vnni = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{model}; {os.cpu_count()} logical cores; VNNI: {', '.join(vnni) or 'no'}"


def build_models(names: list[str], size: int, workdir: Path) -> list[tuple[str, str, Path, object]]:
    """(label, kind, fp32 onnx path, Preprocess) for each requested model."""
    from converters.onnx import export_onnx
    from edgeseg import models
    from edgeseg.spec import Preprocess

    out = []
    for name in names:
        if name == "default":
            from edgeseg.train import DEFAULT_CHECKPOINT

            model, ckpt = models.load_checkpoint(DEFAULT_CHECKPOINT)
            pre = Preprocess.from_dict(ckpt["preprocess"]) if ckpt.get("preprocess") else Preprocess()
            label, kind = f"default ({ckpt['arch']['name']}, {pre.size[0]}x{pre.size[1]})", "mobile"
        else:
            arch = name if name in models.available() else None
            if arch is None:
                raise SystemExit(f"unknown model {name!r}; available: default, {', '.join(models.available())}")
            import torch

            torch.manual_seed(0)
            model = models.create(arch, num_classes=21).eval()
            pre = Preprocess(size=(size, size))
            label = f"{arch} ({size}x{size}, random weights)"
            kind = "resnet" if "resnet" in arch else "mobile"
        path = workdir / f"{name}.fp32.onnx"
        t0 = time.perf_counter()
        export_onnx(model, path, preprocess=pre)
        print(f"  exported {label} in {time.perf_counter() - t0:.0f} s", flush=True)
        out.append((label, kind, path, pre))
    return out


def quantize_variants(path: Path, pre, frames: int, workdir: Path) -> dict[str, Path]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from calibration.data import CalibrationSet
    from calibration.quantize import compute_ranges, quantize_model, quiet_ort

    import warnings

    from calibration.data import CalibrationWarning

    with warnings.catch_warnings():  # few frames on purpose: latency does not depend on the ranges
        warnings.simplefilter("ignore", CalibrationWarning)
        calib = CalibrationSet(f"synthetic:train?n={frames}", pre, max_images=frames)
    ranges = workdir / f"{path.stem}.ranges.json"
    compute_ranges(path, calib, "minmax", ranges)
    out = {"fp32": path}
    for target in ("cpu", "tensorrt"):
        out[f"int8 {target} preset"] = quantize_model(path, workdir / f"{path.stem}.{target}.onnx", ranges, "minmax", target)
    qop = workdir / f"{path.stem}.qoperator.onnx"
    with quiet_ort():
        quantize_static(str(path), str(qop), None, quant_format=QuantFormat.QOperator, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibration_cache_path=str(ranges))
    out["int8 QOperator U8S8"] = qop
    return out


def time_variants(variants: dict[str, Path], pre, threads: int, rounds: int, runs: int) -> dict[str, float]:
    import onnxruntime as ort

    from edgeseg.data.synthetic import SyntheticScenes

    x = pre.apply(SyntheticScenes(size=pre.size, length=1, split="test")[0][0])
    sessions = {}
    for name, p in variants.items():
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        s = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        iname = s.get_inputs()[0].name
        for _ in range(3):
            s.run(None, {iname: x})
        sessions[name] = (s, iname)
    times = {n: [] for n in sessions}
    for _ in range(rounds):  # interleaved: every graph sees the same background load
        for name, (s, iname) in sessions.items():
            t0 = time.perf_counter()
            for _ in range(runs):
                s.run(None, {iname: x})
            times[name].append((time.perf_counter() - t0) / runs)
    return {n: float(np.median(v)) for n, v in times.items()}


def main(argv=None) -> int:
    from edgeseg import models

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    resnet_default = "deeplabv3plus_resnet" if "deeplabv3plus_resnet" in models.available() else "fastfcn_resnet"
    ap.add_argument("--models", nargs="+", default=["default", resnet_default],
                    help=f"'default' and/or zoo names (default: default {resnet_default})")
    ap.add_argument("--size", type=int, default=512, help="input size of zoo models (default 512)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="ONNX Runtime intra-op threads (default: all cores)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median reported)")
    ap.add_argument("--runs", type=int, default=5, help="inferences per round")
    ap.add_argument("--calib-frames", type=int, default=16, help="synthetic frames for the ranges")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    print(f"CPU: {cpu_flags()}")
    print(f"onnxruntime {ort.__version__}, {args.threads} thread(s), median of {args.rounds} rounds x {args.runs} runs\n")
    rows = []
    with tempfile.TemporaryDirectory(prefix="int8-bench-") as tmp:
        work = Path(tmp)
        for label, kind, path, pre in build_models(args.models, args.size, work):
            variants = quantize_variants(path, pre, args.calib_frames, work)
            t = time_variants(variants, pre, args.threads, args.rounds, args.runs)
            rows.append((label, kind, t))
    print(f"\n{'model':<52} {'graph':<22} {'ms':>8} {'vs FP32':>8}")
    print("-" * 94)
    verdicts = []
    for label, kind, t in rows:
        base = t["fp32"]
        for name, ms in t.items():
            print(f"{label[:52]:<52} {name:<22} {1000 * ms:>8.2f} {base / ms:>7.2f}x")
        ratio = base / t["int8 cpu preset"]
        goal = GOALS[kind]
        verdicts.append(f"{label}: cpu preset {ratio:.2f}x FP32 (goal {goal}x: {'met' if ratio >= goal else 'NOT met'})")
        print()
    print("\n".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
