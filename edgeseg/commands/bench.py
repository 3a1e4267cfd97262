"""edgeseg bench BUNDLE — engine-only FPS and pipeline FPS of a bundle, side by side, in one run.

Engine-only: `infer` in a loop on one preprocessed frame. Pipeline: the full runtime (decode,
preprocess, infer, postprocess to a class map at frame size) on a source, by default a 720p clip
rendered from the synthetic scene generator into a temporary file, after the Segmenter has chosen
its configuration on a first pass (CPU engines: runtime.pipeline.Tuner). Imports no torch."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from edgeseg.commands.run import add_backend_argument, add_stage_nice_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle folder")
    p.add_argument("--frames", type=int, default=200, metavar="N", help="frames to time (default 200)")
    p.add_argument("--source", help="source to stream (default: a 1280x720 synthetic clip written to a temporary file)")
    add_backend_argument(p)
    p.add_argument("--precision", help="artifact precision (default: the most accurate)")
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: the engine's choice)")
    add_stage_nice_argument(p)
    p.add_argument("--stats-json", metavar="PATH", help="also write the pipeline's timings as JSON")


def run(args) -> int:
    from runtime.segmenter import Segmenter
    from runtime.sources import write_synthetic_clip

    options = {"threads": args.threads} if args.threads else {}
    seg = Segmenter(args.bundle, backend=args.backend, precision=args.precision, **options)
    print(f"backend {seg.backend} ({seg.backend_reason}), precision {seg.precision}, input {seg.preprocess.size}")
    frames = max(10, int(args.frames))
    with tempfile.TemporaryDirectory(prefix="edgeseg-bench-") as tmp:
        source = args.source
        if source is None:
            source = str(write_synthetic_clip(Path(tmp) / "clip720p.mp4", frames=frames + 10, size=(720, 1280)))
        options = {} if args.stage_nice is None else {"stage_nice": args.stage_nice}
        # a CPU engine's first frames choose engine threads and stage priority; time what they chose
        tuning = seg.tune(source, **options, **({"loop": True} if args.source is None else {}))
        if tuning:
            print("tuned on {trial_frames} frames: ".format(**tuning) + ", ".join(
                f"{c['threads']} threads/nice {c['stage_nice']}: {max(c['fps']) if c['fps'] else '-'} FPS" for c in tuning["candidates"])
                + f" -> {tuning['chosen']}")
        engine = seg.engine_fps(frames)
        for _ in seg.stream(source, max_frames=frames, stats_path=args.stats_json, **options):
            pass
    s = seg.stats.summary()
    print(seg.stats.format())
    pipe = s["pipeline_fps"] or 0.0
    print(f"engine-only {engine:.1f} FPS (infer in a loop)")
    print(f"pipeline    {pipe:.1f} FPS on {source if args.source else 'a 1280x720 clip'} ({s['frames_out']} frames)")
    print(f"ratio       {pipe / engine:.2f} of engine-only")
    return 0
