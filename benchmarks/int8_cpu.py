"""FP32 vs INT8 latency on this CPU, side by side in one run: ONNX Runtime's graphs, and OpenVINO
and LiteRT where their extras are installed.

    python benchmarks/int8_cpu.py                      # default model + a ResNet-50 DeepLabV3+ at 512x512
    python benchmarks/int8_cpu.py --threads 1 --rounds 9
    python benchmarks/int8_cpu.py --engines onnxruntime   # ONNX Runtime only

For each model: export to ONNX, compute ranges on synthetic frames, write the `cpu` preset
(QDQ, U8S8 per-channel) and, for comparison, the `tensorrt` preset (S8S8 symmetric) and a
QOperator U8S8 graph; with the `openvino` extra, the FP32 IR and NNCF's INT8 IR
(converters/openvino.py), with the `litert` extra the FP32 .tflite and the LiteRT quantizer's
full-integer INT8 one (converters/litert.py), all calibrated on the same frames. Then every model
is timed in interleaved rounds (so load from other processes hits all of them alike) and the
medians and speed-ups over ONNX Runtime FP32 are printed. Latency does not depend on the
weights, so the ResNet-class model uses random weights; the default model uses its trained ones.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from variants import available_engines, cpu_description  # noqa: E402

GOALS = {"mobile": 1.3, "resnet": 3.0}  # cpu-preset speed-up the project aims for


def build_models(names: list[str], size: int, workdir: Path) -> list[tuple[str, str, Path, object, object]]:
    """(label, kind, fp32 onnx path, Preprocess, torch model) for each requested model."""
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
        out.append((label, kind, path, pre, model))
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


def engine_variants(model, path: Path, pre, engines: list[str], frames: int, workdir: Path, threads: int) -> dict:
    """OpenVINO and LiteRT FP32/INT8, through edgeseg's converters (a bundle around the same ONNX graph)."""
    import shutil
    import warnings

    from calibration.data import CalibrationWarning
    from converters.onnx import convert
    from runtime.engines.litert import LiteRTEngine
    from runtime.engines.openvino import OpenVINOEngine

    out = {}
    bundle = convert(path, workdir / f"{path.stem}.bundle", preprocess=pre, parity_frames=2)
    calib = f"synthetic:train?n={frames}"
    quiet = dict(max_miou_drop=1e9, max_images=frames, eval_max_images=4)  # latency only: no accuracy search
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        if "openvino" in engines:
            from converters.openvino import add_openvino

            for precision in ("fp32", "int8"):
                entry = add_openvino(bundle.path, precision, calib=calib, **quiet)
                out[f"openvino {precision}" + (" (NNCF)" if precision == "int8" else "")] = OpenVINOEngine(
                    bundle.path / entry["artifact"], precision=precision, threads=threads)
        if "litert" in engines and model is not None:
            from converters.litert import add_litert, quantize_litert

            for entry in add_litert(bundle.path, model, "int8", calib=calib, **quiet):
                p = entry["precision"]
                out[f"litert {p}" + (" (full int)" if p == "int8" else "")] = LiteRTEngine(
                    bundle.path / entry["artifact"], precision=p, threads=threads)
            # the same with HARD_SWISH in float: XNNPACK's int8 hard-swish is what makes full-integer slow here
            other = shutil.copytree(bundle.path, workdir / f"{path.stem}.hs-float.bundle")
            entry = quantize_litert(other, "int8", calib=calib, float_ops=("HARD_SWISH",), **quiet)
            out["litert int8 (hswish f32)"] = LiteRTEngine(other / entry["artifact"], precision="int8", threads=threads)
    return out


def time_variants(variants: dict[str, object], pre, threads: int, rounds: int, runs: int) -> dict[str, float]:
    """variants: name -> ONNX path (run with ONNX Runtime) or an engine (runtime.engines)."""
    import onnxruntime as ort

    from edgeseg.data.synthetic import SyntheticScenes

    x = pre.apply(SyntheticScenes(size=pre.size, length=1, split="test")[0][0])
    runners = {}
    for name, p in variants.items():
        if isinstance(p, Path):
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.intra_op_num_threads = threads
            so.log_severity_level = 3
            s = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
            feed = {s.get_inputs()[0].name: x}
            runners[name] = lambda s=s, feed=feed: s.run(None, feed)
        else:
            runners[name] = lambda e=p: e.infer(x)
        for _ in range(3):
            runners[name]()
    times = {n: [] for n in runners}
    for _ in range(rounds):  # interleaved: every engine sees the same background load
        for name, run in runners.items():
            t0 = time.perf_counter()
            for _ in range(runs):
                run()
            times[name].append((time.perf_counter() - t0) / runs)
            time.sleep(0.05)  # ONNX Runtime's workers spin for a while after a run: let them stop
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
    ap.add_argument("--engines", nargs="+", default=["onnxruntime", "openvino", "litert"],
                    help="onnxruntime (always), openvino, litert (default: all whose extras are installed)")
    args = ap.parse_args(argv)
    have = available_engines()
    engines = [e for e in args.engines if e in have]
    for e in sorted(set(args.engines) - set(have)):
        print(f"{e}: not measured (pip install 'edgeseg[{e}]')")

    import onnxruntime as ort

    print(f"CPU: {cpu_description()}")
    print(f"onnxruntime {ort.__version__}, {args.threads} thread(s), median of {args.rounds} rounds x {args.runs} runs\n")
    rows = []
    with tempfile.TemporaryDirectory(prefix="int8-bench-") as tmp:
        work = Path(tmp)
        for label, kind, path, pre, model in build_models(args.models, args.size, work):
            variants = quantize_variants(path, pre, args.calib_frames, work)
            variants.update(engine_variants(model, path, pre, engines, args.calib_frames, work, args.threads))
            t = time_variants(variants, pre, args.threads, args.rounds, args.runs)
            rows.append((label, kind, t))
    print(f"\n{'model':<52} {'graph':<22} {'ms':>8} {'vs ORT FP32':>11}")
    print("-" * 97)
    verdicts = []
    for label, kind, t in rows:
        base = t["fp32"]
        for name, ms in t.items():
            print(f"{label[:52]:<52} {name:<22} {1000 * ms:>8.2f} {base / ms:>10.2f}x")
        ratio = base / t["int8 cpu preset"]
        goal = GOALS[kind]
        verdicts.append(f"{label}: cpu preset {ratio:.2f}x FP32 (goal {goal}x: {'met' if ratio >= goal else 'NOT met'})")
        if "openvino int8 (NNCF)" in t:
            verdicts.append(f"{label}: OpenVINO INT8 {base / t['openvino int8 (NNCF)']:.2f}x ONNX Runtime FP32, "
                            f"{t['openvino fp32'] / t['openvino int8 (NNCF)']:.2f}x OpenVINO FP32")
        if "litert int8 (full int)" in t:
            verdicts.append(f"{label}: LiteRT INT8 {t['litert fp32'] / t['litert int8 (full int)']:.2f}x LiteRT FP32, "
                            f"{base / t['litert int8 (full int)']:.2f}x ONNX Runtime FP32; with HARD_SWISH in float "
                            f"{t['litert fp32'] / t['litert int8 (hswish f32)']:.2f}x LiteRT FP32")
        print()
    print("\n".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
