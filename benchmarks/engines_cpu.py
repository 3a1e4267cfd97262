"""The CPU engines side by side in one run: ONNX Runtime, OpenVINO and LiteRT, FP32 and INT8.

For each model (benchmarks/variants.py: the default model, the same trained network at 512x512,
and DeepLabV3+ ResNet-50 at 512x512), one bundle with every engine's FP32 and INT8 artifact, made
by edgeseg's converters and calibrated on the same synthetic frames; then, per artifact:

* mIoU on `synthetic:test?n=200` (trained models) and class agreement with the FP32 ONNX model,
  through `calibration.evaluate.evaluate_bundle` (each artifact on its own engine);
* engine-only latency: `infer` on one preprocessed frame, in interleaved rounds (every engine sees
  the same background load), median over rounds;
* pipeline FPS: `Segmenter.stream` on a 1280x720 clip (decode, preprocess, infer, class map at
  frame size), interleaved the same way, with the Segmenter's default configuration (engine
  threads and stage priority chosen on the clip's first frames, runtime.pipeline.Tuner).

Slow engines get fewer infers per engine-only round and fewer frames per pipeline burst (so the
ResNet-50 does not take an hour); the report says how many.

Speed-ups are against ONNX Runtime FP32 of the same run (and LiteRT INT8 against LiteRT FP32).

    python benchmarks/engines_cpu.py                       # default, default512, resnet (~25 min on 2 busy cores)
    python benchmarks/engines_cpu.py --quick               # fewer rounds, mIoU on 100 frames
    python benchmarks/engines_cpu.py --models default --rounds 9 --threads 2 --json engines.json

This script imports torch (to export the models); the runtime it measures does not.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from variants import VARIANTS, available_engines, build_bundle, cpu_description, load_average, load_model, open_engine  # noqa: E402

GOALS = {("default", "openvino"): 1.5, ("resnet", "openvino"): 3.5}  # INT8 engine-only speed-up over ORT FP32


def engine_latency(engines: dict, x: np.ndarray, rounds: int, runs: int, round_seconds: float) -> tuple[dict[str, float], dict]:
    """Median ms per infer, interleaved rounds. Each engine runs `runs` infers per round, fewer
    where they would take longer than `round_seconds` (a ResNet-50 takes ~1 s an infer here)."""
    per_round = {}
    for k, e in engines.items():
        for _ in range(2):
            e.infer(x)
        t0 = time.perf_counter()
        e.infer(x)
        per_round[k] = max(1, min(runs, int(round_seconds / max(time.perf_counter() - t0, 1e-6))))
    times = {k: [] for k in engines}
    for _ in range(rounds):
        for k, e in engines.items():
            t0 = time.perf_counter()
            for _ in range(per_round[k]):
                e.infer(x)
            times[k].append((time.perf_counter() - t0) / per_round[k] * 1000.0)
            time.sleep(0.1)  # ONNX Runtime's workers spin for a while after a run: let them stop
    return {k: statistics.median(v) for k, v in times.items()}, per_round


def pipeline_fps(bundle, variants, clip: str, frames: int, rounds: int, threads: int | None) -> dict[str, float]:
    from runtime.segmenter import Segmenter

    options = {"threads": threads} if threads else {}
    segs = {v: Segmenter(bundle, backend=v[0], precision=v[1], **options) for v in variants}
    for seg in segs.values():  # each chooses its configuration first, as a stream's first frames do
        seg.tune(clip, loop=True)
    fps = {v: [] for v in variants}
    for _ in range(rounds):
        for v, seg in segs.items():
            for _ in seg.stream(clip, max_frames=frames):
                pass
            fps[v].append(seg.stats.pipeline_fps or 0.0)
    chosen = {v: seg.stats.info.get("engine_threads", "?") for v, seg in segs.items()}
    for seg in segs.values():
        seg.close()
    return {v: statistics.median(f) for v, f in fps.items()}, chosen


def burst_frames(latency_ms: dict, frames: int, seconds: float) -> int:
    """Frames per pipeline burst: `frames`, fewer for a model whose slowest engine would take longer
    than `seconds` (at least 10, so the pipeline fills and drains within a burst)."""
    return max(10, min(frames, int(seconds * 1000.0 / max(latency_ms.values()))))


def measure(key: str, work: Path, engines: list[str], args, clip: str) -> dict:
    from calibration.evaluate import evaluate_bundle
    from edgeseg.data.synthetic import SyntheticScenes

    model = load_model(key)
    print(f"building {model.label} ...", flush=True)
    t0 = time.perf_counter()
    # random weights: the ranges only have to exist (latency does not depend on them)
    calib_frames = args.calib_frames if model.trained else min(args.calib_frames, args.calib_frames_untrained)
    bundle = build_bundle(model, work / key, engines, calib_frames, args.miou_frames)
    print(f"  built in {time.perf_counter() - t0:.0f} s", flush=True)
    variants = [v for v in VARIANTS if v[0] in engines]
    accuracy = {}
    if model.trained:
        result = evaluate_bundle(bundle, f"synthetic:test?n={args.miou_frames}", max_images=args.miou_frames)
        for row in result["results"]:
            if row["backend"] == "onnxruntime" and row["precision"] == "int8" and row.get("target") != "cpu":
                continue
            accuracy[(row["backend"], row["precision"])] = {"miou": row["miou"], "agreement": row.get("agreement_with_fp32")}
    for v in variants:  # parity on the conversion frames: agreement for every model, trained or not
        art = bundle.select(*v)
        accuracy.setdefault(v, {})["parity_agreement"] = art.parity.get("mask_agreement")
    pre = bundle.manifest.preprocess
    x = pre.apply(SyntheticScenes(size=pre.size, length=1, split="test")[0][0])
    opened = {v: open_engine(bundle, *v, threads=args.threads) for v in variants}
    print(f"  engine-only latency, {args.rounds} rounds ...", flush=True)
    latency, runs = engine_latency(opened, x, args.rounds, args.runs, args.round_seconds)
    for e in opened.values():
        e.close()
    frames = burst_frames(latency, args.frames, args.burst_seconds)
    fps, threads = {}, {}
    if args.pipeline_rounds:
        print(f"  pipeline FPS on the 720p clip, {args.pipeline_rounds} rounds of {frames} frames ...", flush=True)
        fps, threads = pipeline_fps(bundle, variants, clip, frames, args.pipeline_rounds, args.pipeline_threads)
    return {"model": key, "label": model.label, "trained": model.trained, "variants": variants,
            "latency_ms": latency, "runs_per_round": runs, "pipeline_fps": fps, "pipeline_frames": frames,
            "pipeline_threads": threads, "accuracy": accuracy,
            "sizes_mb": {v: artifact_mb(bundle, bundle.select(*v)) for v in variants}}


def artifact_mb(bundle, art) -> float:
    path = bundle.artifact_path(art)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


def report(results: list[dict], args) -> list[str]:
    lines = [f"\nengine-only: {args.threads} threads, median of {args.rounds} interleaved rounds of up to {args.runs} infers "
             f"(fewer past {args.round_seconds} s); pipeline: Segmenter.stream on the 1280x720 clip, "
             f"{'engine threads ' + str(args.pipeline_threads) if args.pipeline_threads else 'configuration chosen by the Segmenter'}, "
             f"median of {args.pipeline_rounds} rounds; load average {load_average()}"]
    for r in results:
        lines.append(f"  {r['label']}: infers per round " + ", ".join(f"{a}/{b} {n}" for (a, b), n in r["runs_per_round"].items())
                     + f"; {r['pipeline_frames']} frames per pipeline burst"
                     + (", engine threads chosen " + ", ".join(f"{a}/{b} {t}" for (a, b), t in r["pipeline_threads"].items())
                        if r["pipeline_threads"] else ""))
    head = (f"{'model':<44} {'engine':<12} {'prec':<5} {'mIoU':>7} {'agree':>7} {'MB':>6} {'engine ms':>9} {'x ORT32':>7} "
            f"{'pipe FPS':>8} {'x ORT32':>7}")
    lines += [head, "-" * len(head)]
    verdicts = []
    for r in results:
        base_ms = r["latency_ms"][("onnxruntime", "fp32")]
        base_fps = r["pipeline_fps"].get(("onnxruntime", "fp32"))
        for v in r["variants"]:
            acc = r["accuracy"].get(v, {})
            miou = f"{acc['miou']:.4f}" if "miou" in acc else "-"
            agree = acc.get("agreement") if acc.get("agreement") is not None else acc.get("parity_agreement")
            ms = r["latency_ms"][v]
            fps = r["pipeline_fps"].get(v)
            lines.append(f"{r['label'][:44]:<44} {v[0]:<12} {v[1]:<5} {miou:>7} {'-' if agree is None else f'{agree:.4f}':>7} "
                         f"{r['sizes_mb'][v]:>6.2f} {ms:>9.2f} {base_ms / ms:>6.2f}x "
                         f"{'-' if fps is None else f'{fps:.1f}':>8} {'-' if not fps or not base_fps else f'{fps / base_fps:.2f}x':>7}")
        lines.append("")
        lat = r["latency_ms"]
        for engine in ("openvino", "onnxruntime"):
            if (engine, "int8") in lat:
                ratio = base_ms / lat[(engine, "int8")]
                goal = GOALS.get((r["model"], engine))
                tail = f" (goal {goal}x: {'met' if ratio >= goal else 'NOT met'})" if goal else ""
                verdicts.append(f"{r['label']}: {engine} INT8 {ratio:.2f}x ONNX Runtime FP32, engine-only{tail}")
        acc = r["accuracy"]
        if r["trained"] and "miou" in acc.get(("onnxruntime", "fp32"), {}):
            ref = acc[("onnxruntime", "fp32")]["miou"]
            verdicts.append(f"{r['label']}: mIoU drop vs ONNX Runtime FP32 ({ref:.4f}), points: " + ", ".join(
                f"{a} {b} {100 * (ref - acc[(a, b)]['miou']):+.2f}" for a, b in r["variants"] if b == "int8" and "miou" in acc.get((a, b), {})))
        if ("litert", "int8") in lat:
            verdicts.append(f"{r['label']}: LiteRT INT8 {lat[('litert', 'fp32')] / lat[('litert', 'int8')]:.2f}x LiteRT FP32 "
                            f"({lat[('litert', 'int8')]:.2f} vs {lat[('litert', 'fp32')]:.2f} ms), engine-only")
    lines += verdicts
    lines.append("mIoU: synthetic:test, trained models only; agree: share of pixels whose class matches the FP32 ONNX model "
                 "(held-out frames for trained models, the conversion's parity frames for random-weight ones)")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["default", "default512", "resnet"],
                    help="default, default512, mobile512, resnet (default: default default512 resnet)")
    ap.add_argument("--threads", type=int, default=None, help="engine-only threads (default: every core)")
    ap.add_argument("--pipeline-threads", type=int, default=None,
                    help="engine threads in the pipeline (default: the Segmenter chooses, as it does without options)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved engine-only rounds (default 7)")
    ap.add_argument("--runs", type=int, default=10, help="infers per engine per round (default 10)")
    ap.add_argument("--round-seconds", type=float, default=1.0, help="fewer infers per round for engines slower than this (default 1 s)")
    ap.add_argument("--pipeline-rounds", type=int, default=3, help="interleaved pipeline rounds (default 3; 0 skips)")
    ap.add_argument("--frames", type=int, default=60, help="frames per pipeline burst (default 60)")
    ap.add_argument("--burst-seconds", type=float, default=4.0,
                    help="fewer frames per burst (at least 10) for models whose slowest engine would take longer (default 4 s)")
    ap.add_argument("--quick", action="store_true", help="3 engine-only rounds, 2 pipeline rounds, 100 mIoU frames")
    ap.add_argument("--calib-frames", type=int, default=128, help="synthetic calibration frames (default 128)")
    ap.add_argument("--calib-frames-untrained", type=int, default=32,
                    help="at most this many for random-weight models, whose accuracy is not measured (default 32)")
    ap.add_argument("--miou-frames", type=int, default=200, help="synthetic:test frames for mIoU (default 200)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    args.threads = args.threads or len(os.sched_getaffinity(0))
    if args.quick:
        args.rounds, args.pipeline_rounds, args.miou_frames = 3, min(args.pipeline_rounds, 2), min(args.miou_frames, 100)

    import onnxruntime

    engines = available_engines()
    versions = [f"onnxruntime {onnxruntime.__version__}"]
    if "openvino" in engines:
        import nncf
        import openvino

        versions.append(f"openvino {openvino.__version__.split('-')[0]}, nncf {nncf.__version__}")
    if "litert" in engines:
        from importlib.metadata import version

        versions.append(f"ai-edge-litert {version('ai-edge-litert')}, litert-torch {version('litert-torch')}, "
                        f"ai-edge-quantizer {version('ai-edge-quantizer')}")
    print(f"CPU: {cpu_description()}; load average {load_average()}")
    print("; ".join(versions))
    missing = sorted({"openvino", "litert"} - set(engines))
    if missing:
        print(f"not measured (extras missing): {', '.join(missing)} — pip install 'edgeseg[{','.join(missing)}]'")
    results = []
    with tempfile.TemporaryDirectory(prefix="engines-cpu-") as tmp:
        work = Path(tmp)
        from runtime.sources import write_synthetic_clip

        clip = str(write_synthetic_clip(work / "clip720p.mp4", frames=args.frames + 10, size=(720, 1280)))
        for key in args.models:
            results.append(measure(key, work, engines, args, clip))
            print("\n".join(report(results[-1:], args)), flush=True)
    print("\n".join(report(results, args)))
    if args.json:
        def keyed(d):
            return {f"{k[0]}/{k[1]}" if isinstance(k, tuple) else k: v for k, v in d.items()}

        out = [{**r, "variants": [f"{a}/{b}" for a, b in r["variants"]], "latency_ms": keyed(r["latency_ms"]),
                "pipeline_fps": keyed(r["pipeline_fps"]), "accuracy": keyed(r["accuracy"]), "sizes_mb": keyed(r["sizes_mb"]),
                "runs_per_round": keyed(r["runs_per_round"]), "pipeline_threads": keyed(r["pipeline_threads"])}
               for r in results]
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
