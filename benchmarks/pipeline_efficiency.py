"""Pipeline efficiency on this CPU with ONNX Runtime, measured side by side in one run.

For the default model and for a 512x512 LR-ASPP MobileNetV3 (21 classes), on a 1280x720 clip
rendered from the synthetic scene generator into a temporary mp4:

* engine-only FPS: `infer` in a loop on one preprocessed frame, no capture, no pre/post; the
  best of ONNX Runtime's default threading and the pipeline's engine configuration, so the
  ratio is never flattered by a slow reference;
* our pipeline: `Segmenter.stream(clip)` with no options, every frame decoded, preprocessed,
  inferred and turned into a class map at frame size (capture, preprocess, infer, postprocess
  overlapping in threads), in the configuration the Segmenter chose itself on its first stream
  (engine threads x stage priority, runtime.pipeline.Tuner; printed), and, beside it, the
  untuned configuration (`tune=False`: the engine's default threads, stages at nice 19);
* a plain OpenCV + ONNX Runtime loop doing the same work one step after the other
  (read, Preprocess.apply, session.run, bilinear upsampling of the logits, argmax), and the
  cheaper loop many hand-written apps use (argmax at model resolution, nearest upsampling:
  blocky edges, so not the same output);
* the CPU ceiling: each stage's CPU time per frame measured alone (decode, preprocess, engine,
  postprocess); at those costs this machine's cores fit at most cores / (their sum) frames per
  second, and never more than that engine alone. It is measured for the engine with its default
  threads and with the threads the pipeline chose, and the higher of the two is the ceiling our
  pipeline is held to. When the engine alone keeps every core busy, this is what stands between
  any pipeline and engine-only FPS.

Shared machines drift, so every timed burst sits between two engine-only bursts and is divided
by their mean; rounds repeat the whole sequence and medians are reported.

    python benchmarks/pipeline_efficiency.py [--frames 80] [--rounds 5] [--skip-mobile] [--threads N]

The verdict line says whether our default configuration reaches 0.95 of the CPU ceiling for each
model (`--threads` fixes the engine threads and leaves only the stage priority to tune).

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

SPIN_SETTLE_S = 0.25
GOAL = 0.95  # of the CPU ceiling


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


class EngineDefault:
    """ONNX Runtime with its default threading (spinning workers), on one preprocessed frame."""

    def __init__(self, bundle, frame: np.ndarray):
        import onnxruntime as ort

        self.sess = ort.InferenceSession(str(bundle.artifact_path(bundle.select("onnxruntime"))), providers=["CPUExecutionProvider"])
        self.feed = {self.sess.get_inputs()[0].name: bundle.manifest.preprocess.apply(frame)}

    def fps(self, frames: int) -> float:
        for _ in range(3):
            self.sess.run(None, self.feed)
        t0 = time.perf_counter()
        for _ in range(frames):
            self.sess.run(None, self.feed)
        fps = frames / (time.perf_counter() - t0)
        # its workers spin for ~60 ms after the last run: let them stop before the next burst
        time.sleep(SPIN_SETTLE_S)
        return fps


def cpu_ms_per_item(fn, items) -> float:
    """Process CPU time (every thread, so engine and decoder pools count) per call, after a warm-up."""
    for it in items[:3]:
        fn(it)
    c0 = time.process_time()
    for it in items:
        fn(it)
    return (time.process_time() - c0) / len(items) * 1000.0


class CpuCeiling:
    """Each stage's CPU per frame measured alone, and the FPS that work fits on this machine's
    cores at best: cores / (decode + preprocess + engine + postprocess)."""

    def __init__(self, seg, clip: str, frames: int):
        from runtime.postprocess import Postprocessor

        self.seg, self.clip, self.n = seg, clip, max(20, frames // 2)
        self.post = Postprocessor.from_manifest(seg.bundle.manifest)
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.rounds: list[dict] = []

    def fps(self) -> float:
        from runtime.sources import open_source

        with open_source(self.clip) as src:
            c0 = time.process_time()
            images = [src.read().image for _ in range(self.n)]
            decode = (time.process_time() - c0) / self.n * 1000.0
        pre, infer = self.seg.preprocess.apply, self.seg._infer
        inputs = [pre(f) for f in images]
        outputs = [infer(x) for x in inputs]
        hw = images[0].shape[:2]
        ms = {"decode": decode, "preprocess": cpu_ms_per_item(pre, images), "engine": cpu_ms_per_item(infer, inputs),
              "postprocess": cpu_ms_per_item(lambda o: self.post(o, hw), outputs)}
        self.rounds.append(ms)
        return self.cores * 1000.0 / sum(ms.values())

    def summary(self) -> dict:
        return {"cores": self.cores, "cpu_ms_per_frame": {k: round(statistics.median(r[k] for r in self.rounds), 2) for k in self.rounds[0]}}


def measure(name: str, bundle, clip: str, frames: int, rounds: int, engine_options: dict) -> dict:
    """Rounds of: engine, ours, engine, untuned, engine, plain, engine, plain*, engine, ceiling
    (engine's default threads), engine, ceiling (the threads ours chose), engine. Each burst's
    ratio is to the mean of the engine bursts either side of it (or to the pipeline-configured
    engine of that round, when faster)."""
    from runtime.segmenter import Segmenter

    seg = Segmenter(bundle, **engine_options)
    t0 = time.perf_counter()
    tuning = seg.tune(clip, loop=True) or {  # the bursts below run what it chose
        "chosen": {"threads": engine_options.get("threads", "engine default"), "stage_nice": seg.stats.info.get("stage_nice")}}
    print(f"  [{name}] tuned in {time.perf_counter() - t0:.1f} s on {tuning.get('trial_frames', 0)} frames: {tuning['chosen']}"
          + "".join(f"\n      {c['threads']} threads, nice {c['stage_nice']}: {c['fps']} FPS" for c in tuning.get("candidates", [])),
          flush=True)
    untuned = Segmenter(bundle, **engine_options)
    cap = cv2.VideoCapture(clip)
    frame = cap.read()[1]
    cap.release()
    engine = EngineDefault(bundle, frame)
    ceilings = {"cpu_ceiling_default_threads": CpuCeiling(untuned, clip, frames), "cpu_ceiling_chosen_threads": CpuCeiling(seg, clip, frames)}

    def stream(s, **options):
        def run():
            for _ in s.stream(clip, max_frames=frames, **options):
                pass
            return s.stats.pipeline_fps
        return run

    bursts = {
        "pipeline": stream(seg),
        "pipeline_untuned": stream(untuned, tune=False),
        "plain_same": lambda: plain_loop(bundle, clip, frames, same_output=True),
        "plain_cheap": lambda: plain_loop(bundle, clip, frames, same_output=False),
        **{k: c.fps for k, c in ceilings.items()},
    }
    fps: dict[str, list[float]] = {k: [] for k in ("engine_default", "engine_pipeline_config", *bursts)}
    ratios: dict[str, list[float]] = {k: [] for k in bursts}
    splits = []
    for r in range(rounds):
        fps["engine_pipeline_config"].append(seg.engine_fps(frames, frame=frame))
        before = engine.fps(frames)
        fps["engine_default"].append(before)
        for key, run in bursts.items():
            fps[key].append(run())
            if key == "pipeline":
                splits.append(seg.stats.summary()["stages"])
            after = engine.fps(frames)
            fps["engine_default"].append(after)
            reference = max((before + after) / 2, fps["engine_pipeline_config"][-1])
            measured = fps[key][-1]
            if key.startswith("cpu_ceiling"):  # the engine alone in that configuration bounds it too
                measured = min(measured, (seg if key.endswith("chosen_threads") else untuned).engine_fps(frames, frame=frame))
            ratios[key].append(measured / reference)
            before = after
        print(f"  [{name}] round {r + 1}: engine {fps['engine_default'][-1]:.1f} (pipeline config "
              f"{fps['engine_pipeline_config'][-1]:.1f}); " + ", ".join(f"{k} {fps[k][-1]:.1f} ({ratios[k][-1]:.2f})" for k in bursts),
              flush=True)
    seg.close()
    untuned.close()
    med = {k: statistics.median(v) for k, v in fps.items()}
    ratio = {k: round(statistics.median(v), 3) for k, v in ratios.items()}
    ratio["cpu_ceiling"] = max(ratio["cpu_ceiling_default_threads"], ratio["cpu_ceiling_chosen_threads"])
    # our pipeline against the ceiling, round by round (both are ratios to the same engine bursts)
    per_round = [p / max(a, b) for p, a, b in zip(ratios["pipeline"], ratios["cpu_ceiling_default_threads"],
                                                  ratios["cpu_ceiling_chosen_threads"])]
    return {
        "model": name, "input": list(bundle.manifest.preprocess.size), "classes": bundle.manifest.num_classes,
        "backend": seg.backend, "engine_options": engine_options or "defaults", "tuning": tuning,
        "fps": {k: round(v, 2) for k, v in med.items()},
        "engine_only_fps": round(max(med["engine_default"], med["engine_pipeline_config"]), 2),
        "ratio": ratio,
        "of_ceiling": round(statistics.median(per_round), 3), "of_ceiling_rounds": [round(x, 3) for x in per_round],
        "cpu_ceiling": {k: c.summary() for k, c in ceilings.items()},
        "pipeline_stage_ms_p50": {k: round(statistics.median(s[k]["p50_ms"] for s in splits), 2)
                                  for k in splits[-1] if splits[-1][k]["p50_ms"] is not None},
        "rounds": fps, "round_ratios": ratios,
    }


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=80, help="frames per burst (default 80)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; medians are reported (default 5)")
    ap.add_argument("--skip-mobile", action="store_true", help="only the default model")
    ap.add_argument("--threads", type=int, default=None, help="engine threads for the pipeline (default: chosen by the Segmenter)")
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

    print(f"\n1280x720 mp4 clip, {args.frames} frames per burst, median of {args.rounds} rounds, load average {load_average()}")
    print(f"{'model':<58} {'engine':>7} {'ours':>7} {'untuned':>7} {'plain':>7} {'plain*':>7}   "
          f"{'ours/eng':>8} {'untuned/eng':>11} {'plain/eng':>9} {'plain*/eng':>10} {'ceiling':>8} {'ours/ceiling':>12}")
    for r in results:
        f, q = r["fps"], r["ratio"]
        print(f"{r['model']:<58} {r['engine_only_fps']:>7.1f} {f['pipeline']:>7.1f} {f['pipeline_untuned']:>7.1f} "
              f"{f['plain_same']:>7.1f} {f['plain_cheap']:>7.1f}   {q['pipeline']:>8.2f} {q['pipeline_untuned']:>11.2f} "
              f"{q['plain_same']:>9.2f} {q['plain_cheap']:>10.2f} {q['cpu_ceiling']:>8.2f} {r['of_ceiling']:>12.2f}")
    print("engine: best of ONNX Runtime defaults and the pipeline's engine configuration "
          "(" + "; ".join(f"{r['fps']['engine_default']:.1f} / {r['fps']['engine_pipeline_config']:.1f}" for r in results) + ")")
    print("ours: Segmenter.stream with no options, in the configuration it chose on its first stream; "
          "untuned: tune=False (engine's default threads, stages at nice 19)")
    print("plain: read + Preprocess.apply + run + bilinear logits + argmax, in sequence (the same class map as ours)")
    print("plain*: argmax at model resolution + nearest upsampling (cheaper, blocky edges)")
    for r in results:
        c = r["cpu_ceiling"]
        for which, label in (("cpu_ceiling_default_threads", "engine's default threads"), ("cpu_ceiling_chosen_threads", "chosen threads")):
            print(f"ceiling, {r['model']}, {label}: CPU ms per frame, each stage alone: "
                  + ", ".join(f"{k} {v}" for k, v in c[which]["cpu_ms_per_frame"].items())
                  + f"; {c[which]['cores']} cores fit {r['ratio'][which]:.2f} of engine-only")
    for r in results:
        print(f"pipeline p50 ms per stage, {r['model']}: " + ", ".join(f"{k} {v}" for k, v in r["pipeline_stage_ms_p50"].items() if v is not None))
    for r in results:
        ok = r["of_ceiling"] >= GOAL
        print(f"verdict, {r['model']}: ours {r['of_ceiling']:.2f} of the CPU ceiling (rounds {r['of_ceiling_rounds']}), "
              f"chosen {r['tuning']['chosen']}: goal {GOAL}: {'met' if ok else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
