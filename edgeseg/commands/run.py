"""edgeseg run BUNDLE --source S — stream a source through a bundle: overlay to a window, a file
or the browser, per-stage timings on request. Imports no torch."""
from __future__ import annotations

import argparse
import sys
import time

BACKENDS = ("auto", "onnxruntime", "tensorrt", "coreml")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle folder (from `edgeseg convert`)")
    p.add_argument("--source", required=True,
                   help="0 or /dev/video0 (camera), csi://0, a video file, rtsp:// or http:// stream, an image folder or glob, "
                        "an image, or synthetic://?frames=300")
    p.add_argument("--out", metavar="PATH", help="write the overlay: video (.mp4/.avi), image folder, or image file")
    p.add_argument("--show", action="store_true", help="show a window (needs a display)")
    p.add_argument("--serve", metavar="HOST:PORT", help="serve the live view to a browser (loopback unless a host is given)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="engine (default auto: TensorRT if usable, else ONNX Runtime)")
    p.add_argument("--precision", help="artifact precision to run (fp32, fp16, int8 ...; default: the most accurate)")
    p.add_argument("--frames", type=int, default=None, metavar="N", help="stop after N frames")
    p.add_argument("--smoothing", type=float, default=0.0, metavar="X", help="temporal smoothing 0..1 (0 off; 0.6 steadies flicker)")
    p.add_argument("--threshold", type=float, default=None, help="pixels less confident than this become background")
    p.add_argument("--keep", nargs="+", metavar="LABEL", help="show only these classes")
    p.add_argument("--ignore", nargs="+", metavar="LABEL", help="hide these classes")
    p.add_argument("--alpha", type=float, default=0.5, metavar="A", help="overlay opacity 0..1 (default 0.5)")
    p.add_argument("--mode", default="blend", choices=("blend", "fill", "contour"), help="overlay style")
    p.add_argument("--loop", action="store_true", help="repeat a file or folder source (handy with --serve)")
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: the engine's choice)")
    add_stage_nice_argument(p)
    p.add_argument("--stats", action="store_true", help="print per-stage timings at the end")
    p.add_argument("--stats-json", metavar="PATH", help="write timings as JSON (rewritten every few seconds)")


def add_stage_nice_argument(p: argparse.ArgumentParser) -> None:
    """--stage-nice, shared with `edgeseg bench`; None leaves the pipeline's default."""
    p.add_argument("--stage-nice", type=int, default=None, metavar="N",
                   help="how much lower than the engine capture, preprocessing and postprocessing run, 0..19 "
                        "(default 19: the engine is never preempted by them; 0 where other programs need the CPU too)")


def _labels(values):
    if not values:
        return None
    return [int(v) if v.isdigit() else v for v in values]


def run(args) -> int:
    from runtime.segmenter import Segmenter

    options = {"threads": args.threads} if args.threads else {}
    seg = Segmenter(args.bundle, backend=args.backend, precision=args.precision, smoothing=args.smoothing,
                    keep=_labels(args.keep), ignore=_labels(args.ignore), threshold=args.threshold, **options)
    print(f"backend {seg.backend} ({seg.backend_reason}), precision {seg.precision}", file=sys.stderr, flush=True)
    stream_options = {"loop": True} if args.loop else {}
    if args.stage_nice is not None:
        stream_options["stage_nice"] = args.stage_nice
    stream = seg.stream(args.source, show=args.show, save=args.out, serve=args.serve, max_frames=args.frames,
                        stats_path=args.stats_json, alpha=args.alpha, mode=args.mode, **stream_options)
    if args.serve:
        server = next(s for s in stream.sinks if hasattr(s, "server")).server
        print(f"browser view: {server.url}  (Ctrl-C to stop)", file=sys.stderr, flush=True)
    n, status, t0, last = 0, 0, time.perf_counter(), time.perf_counter()
    try:
        with stream:
            for _ in stream:
                n += 1
                now = time.perf_counter()
                if sys.stderr.isatty() and now - last > 1.0:
                    last = now
                    fps = seg.stats.pipeline_fps
                    print(f"\r{n} frames, {fps or 0:.1f} FPS", end="", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        status = 130
        print("\ninterrupted", file=sys.stderr)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    summary = seg.stats.summary()
    if args.stats:
        print(seg.stats.format())
    else:
        fps = summary["pipeline_fps"]
        print(f"{n} frames in {time.perf_counter() - t0:.1f} s, pipeline {fps if fps is not None else '-'} FPS, "
              f"engine-only {summary['engine_fps'] if summary['engine_fps'] is not None else '-'} FPS, "
              f"dropped {summary['dropped']}, corrupt {summary['corrupt']}")
    if args.out:
        print(f"overlay -> {args.out}")
    if args.stats_json:
        print(f"stats -> {args.stats_json}")
    if n == 0 and status == 0:
        print("no frames were processed: the source delivered nothing", file=sys.stderr)
        return 1
    return status

