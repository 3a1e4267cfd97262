"""Pipeline efficiency on this CPU with ONNX Runtime, measured side by side in one run.

For the default model and for a 512x512 LR-ASPP MobileNetV3 (21 classes), on a 1280x720 clip
rendered from the synthetic scene generator into a temporary mp4:

* engine-only FPS: `infer` in a loop on one preprocessed frame, no capture, no pre/post;
* our pipeline: `Segmenter.stream(clip)`, every frame decoded, preprocessed, inferred and turned
  into a class map at frame size (capture, preprocess, infer, postprocess overlapping in threads);
* a plain OpenCV + ONNX Runtime loop doing the same work one step after the other
  (read, Preprocess.apply, session.run, bilinear upsampling of the logits, argmax), and the
  cheaper loop many hand-written apps use (argmax at model resolution, nearest upsampling:
  blocky edges, so not the same output);

each as short bursts repeated `--rounds` times, interleaved, so that other work on the machine
slows them alike; FPS are medians over rounds, ratios the median of the per-round ratios. The
engine-only figure is the best of ONNX Runtime's default threading and the pipeline's engine
configuration, so the ratio is never flattered by a slow reference.

    python benchmarks/pipeline_efficiency.py [--frames 80] [--rounds 5] [--skip-mobile] [--threads N]

This script may import torch (to export the models); the runtime it measures does not.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402


def plain_loop(bundle, clip: str, frames: int, same_output: bool, warmup: int = 5) -> float:
    """The loop an app writes by hand with OpenCV and ONNX Runtime defaults."""
    import onnxruntime as ort

    art = bundle.select("onnxruntime")
    sess = ort.InferenceSession(str(bundle.artifact_path(art)), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    pre = bundle.manifest.preprocess
    cap = cv2.VideoCapture(clip)
    n, t0 = 0, None
    try:
        while n < frames + warmup:
            ok, frame = cap.read()
            if not ok:
                break
            x = pre.apply(frame)
            logits = sess.run(None, {name: x})[0][0]
            h, w = frame.shape[:2]
            if same_output:  # bilinear logits at frame size, then argmax: our class map
                up = cv2.resize(np.ascontiguousarray(logits.transpose(1, 2, 0)), (w, h), interpolation=cv2.INTER_LINEAR)
                class_map = up.argmax(-1).astype(np.uint8)
            else:  # argmax first, nearest upsampling: cheaper, blocky edges
                class_map = cv2.resize(logits.argmax(0).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
            assert class_map.shape == (h, w)
            n += 1
            if n == warmup:
                t0 = time.perf_counter()
    finally:
        cap.release()
    return (n - warmup) / (time.perf_counter() - t0)


def engine_only_default(bundle, frame: np.ndarray, frames: int) -> float:
    """ONNX Runtime with its default threading, on one preprocessed frame."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle.artifact_path(bundle.select("onnxruntime"))), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = bundle.manifest.preprocess.apply(frame)
    for _ in range(10):
        sess.run(None, {name: x})
    t0 = time.perf_counter()
    for _ in range(frames):
        sess.run(None, {name: x})
    return frames / (time.perf_counter() - t0)


def measure(name: str, bundle, clip: str, frames: int, rounds: int, engine_options: dict) -> dict:
    """Short interleaved bursts of each measurement, so a machine shared with other work slows
    them alike; ratios are computed per round and their median reported."""
    from runtime.segmenter import Segmenter

    seg = Segmenter(bundle, **engine_options)
    cap = cv2.VideoCapture(clip)
    frame = cap.read()[1]
    cap.release()
    keys = ("engine_default", "engine_pipeline_config", "pipeline", "plain_same", "plain_cheap")
    rows: dict[str, list[float]] = {k: [] for k in keys}
    ratios: dict[str, list[float]] = {k: [] for k in ("pipeline", "plain_same", "plain_cheap")}
    splits = []
    for r in range(rounds):
        rows["engine_default"].append(engine_only_default(bundle, frame, frames))
        rows["engine_pipeline_config"].append(seg.engine_fps(frames, frame=frame))
        for _ in seg.stream(clip, max_frames=frames):
            pass
        rows["pipeline"].append(seg.stats.pipeline_fps)
        splits.append(seg.stats.summary()["stages"])
        rows["plain_same"].append(plain_loop(bundle, clip, frames, same_output=True))
        rows["plain_cheap"].append(plain_loop(bundle, clip, frames, same_output=False))
        engine = max(rows["engine_default"][-1], rows["engine_pipeline_config"][-1])
        for k in ratios:
            ratios[k].append(rows[k][-1] / engine)
        print(f"  [{name}] round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rows.items())
              + f"; pipeline/engine {ratios['pipeline'][-1]:.2f}", flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {
        "model": name, "input": list(bundle.manifest.preprocess.size), "classes": bundle.manifest.num_classes,
        "backend": seg.backend, "engine_options": engine_options or "defaults",
        "fps": {k: round(v, 2) for k, v in med.items()},
        "engine_only_fps": round(max(med["engine_default"], med["engine_pipeline_config"]), 2),
        "ratio": {k: round(statistics.median(v), 3) for k, v in ratios.items()},
        "pipeline_stage_ms_p50": {k: round(statistics.median(s[k]["p50_ms"] for s in splits), 2)
                                  for k in splits[-1] if splits[-1][k]["p50_ms"] is not None},
        "rounds": rows,
    }


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=80, help="frames per burst (default 80)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported (default 5)")
    ap.add_argument("--skip-mobile", action="store_true", help="only the default model")
    ap.add_argument("--threads", type=int, default=None, help="engine threads for the pipeline (default: the Segmenter's default)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    from converters.onnx import convert

    engine_options = {"threads": args.threads} if args.threads else {}
    print(f"cores {os.cpu_count()}, load average {load_average()}, onnxruntime + opencv {cv2.__version__}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="edgeseg-efficiency-") as tmp:
        tmp = Path(tmp)
        from runtime.sources import write_synthetic_clip

        clip = str(write_synthetic_clip(tmp / "clip720p.mp4", frames=args.frames + 20, size=(720, 1280)))
        models = [("default (LR-ASPP MobileNetV3-small, 256x256, 5 classes)", lambda out: convert("default", out))]
        if not args.skip_mobile:
            def mobile(out):
                from edgeseg.models import create

                model = create("lraspp_mobilenetv3", num_classes=21).eval()
                return convert(model, out, input_size=(512, 512))

            models.append(("LR-ASPP MobileNetV3, 512x512, 21 classes", mobile))
        for i, (name, make) in enumerate(models):
            print(f"converting {name} ...", flush=True)
            bundle = make(tmp / f"bundle{i}")
            results.append(measure(name, bundle, clip, args.frames, args.rounds, engine_options))

    print(f"\n1280x720 mp4 clip, {args.frames} frames per burst, median of {args.rounds} interleaved rounds, "
          f"load average {load_average()}")
    print(f"{'model':<58} {'engine':>8} {'pipeline':>9} {'plain':>8} {'plain*':>8}   {'ours/eng':>8} {'plain/eng':>9} {'plain*/eng':>10}")
    for r in results:
        f, q = r["fps"], r["ratio"]
        print(f"{r['model']:<58} {r['engine_only_fps']:>8.1f} {f['pipeline']:>9.1f} {f['plain_same']:>8.1f} {f['plain_cheap']:>8.1f}"
              f"   {q['pipeline']:>8.2f} {q['plain_same']:>9.2f} {q['plain_cheap']:>10.2f}")
    print("engine: best of ONNX Runtime defaults and the pipeline's engine configuration "
          "(" + "; ".join(f"{r['fps']['engine_default']:.1f} / {r['fps']['engine_pipeline_config']:.1f}" for r in results) + ")")
    print("plain: read + Preprocess.apply + run + bilinear logits + argmax, in sequence (the same class map as ours)")
    print("plain*: argmax at model resolution + nearest upsampling (cheaper, blocky edges)")
    for r in results:
        print(f"pipeline p50 ms per stage, {r['model']}: " + ", ".join(f"{k} {v}" for k, v in r["pipeline_stage_ms_p50"].items() if v is not None))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
