"""edgeseg run BUNDLE --source S — stream a source through a bundle: overlay to a window, a file
or the browser, per-stage timings on request. Imports no torch."""
from __future__ import annotations

import argparse
import sys
import time

from edgeseg.errors import EdgesegError, interrupt_status
from edgeseg.spec import MAX_FRAME_PIXELS
from runtime.engines.registry import backend_choices


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle folder (from `edgeseg convert`)")
    p.add_argument("--source", required=True,
                   help="0 or /dev/video0 (camera), csi://0, a video file, rtsp:// or http:// stream, an image folder or glob, "
                        "an image, or synthetic://?frames=300")
    p.add_argument("--out", metavar="PATH", help="write the overlay: video (.mp4/.avi), image folder, or image file")
    p.add_argument("--show", action="store_true", help="show a window (needs a display)")
    p.add_argument("--serve", metavar="HOST:PORT", help="serve the live view to a browser (loopback unless a host is given)")
    p.add_argument("--serve-token", metavar="TOKEN",
                   help="access token of the browser view (16+ characters of letters, digits and ._~-); "
                        "default: generated and printed when --serve binds to a non-loopback address")
    add_backend_argument(p)
    p.add_argument("--precision", help="artifact precision to run (fp32, fp16, int8 ...; default: the most accurate)")
    p.add_argument("--frames", type=int, default=None, metavar="N", help="stop after N frames")
    p.add_argument("--smoothing", type=float, default=0.0, metavar="X", help="temporal smoothing 0..1 (0 off; 0.6 steadies flicker)")
    p.add_argument("--threshold", type=float, default=None, help="pixels less confident than this become background")
    p.add_argument("--keep", nargs="+", metavar="LABEL", help="show only these classes")
    p.add_argument("--ignore", nargs="+", metavar="LABEL", help="hide these classes")
    p.add_argument("--alpha", type=float, default=0.5, metavar="A", help="overlay opacity 0..1 (default 0.5)")
    p.add_argument("--mode", default="blend", choices=("blend", "fill", "contour"), help="overlay style")
    p.add_argument("--legend", action="store_true", help="draw the classes present, their colours and pixel shares on the overlay")
    p.add_argument("--loop", action="store_true",
                   help="replay a video file, image folder or synthetic clip until Ctrl-C (handy with --serve)")
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: the engine's choice)")
    p.add_argument("--build-missing", action="store_true",
                   help="with TensorRT and a GPU but no engine of the bundle built for them: build one into the engine "
                        "cache first (the bundle stays as it is; `edgeseg build` adds it to the bundle instead)")
    p.add_argument("--max-megapixels", type=float, default=MAX_FRAME_PIXELS / 1e6, metavar="MP",
                   help=f"frames larger than this are skipped and counted as corrupt (default {MAX_FRAME_PIXELS / 1e6:g}; "
                        "a single image given alone is refused)")
    add_stage_nice_argument(p)
    p.add_argument("--stats", action="store_true", help="print per-stage timings at the end")
    p.add_argument("--stats-json", metavar="PATH", help="write timings as JSON (rewritten every few seconds)")
    from edgeseg.cluster.cli import add_run_arguments

    add_run_arguments(p)


def add_backend_argument(p: argparse.ArgumentParser) -> None:
    """--backend, with the choices of runtime.engines.registry (shared by run, bench and demo)."""
    p.add_argument("--backend", default="auto", choices=backend_choices(),
                   help="engine (default auto: the first the machine and the bundle allow, in the order "
                        "TensorRT, CoreML on macOS, OpenVINO on x86, ONNX Runtime, LiteRT)")


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
    from edgeseg.cluster.cli import run_batch, wants_batch

    if wants_batch(args):
        return run_batch(args, _labels)
    if args.build_missing:  # the layer above the runtime, which may import the converters
        from edgeseg.segmenter import Segmenter
    else:
        from runtime.segmenter import Segmenter
    from runtime.server import check_token

    if args.serve_token is not None:
        if not args.serve:
            raise EdgesegError("--serve-token goes with --serve HOST:PORT (the browser view it protects)")
        check_token(args.serve_token)
    options = {"threads": args.threads} if args.threads else {}
    if args.build_missing:
        options["build_missing"] = True
    seg = Segmenter(args.bundle, backend=args.backend, precision=args.precision, smoothing=args.smoothing,
                    keep=_labels(args.keep), ignore=_labels(args.ignore), threshold=args.threshold, **options)
    print(f"backend {seg.backend} ({seg.backend_reason}), precision {seg.precision}, frames on the {seg.frame_path}",
          file=sys.stderr, flush=True)
    why = int8_choice(seg)
    if why:
        print(why, file=sys.stderr, flush=True)
    source_options = source_defaults(args.source, serve=bool(args.serve), loop=args.loop)
    if args.stage_nice is not None:
        source_options["stage_nice"] = args.stage_nice
    if not args.max_megapixels > 0:
        raise EdgesegError(f"--max-megapixels must be a positive number, got {args.max_megapixels}")
    source_options["max_pixels"] = int(args.max_megapixels * 1e6)
    stream = seg.stream(args.source, show=args.show, save=args.out, serve=args.serve, max_frames=args.frames,
                        stats_path=args.stats_json, alpha=args.alpha, mode=args.mode, legend=args.legend,
                        serve_token=args.serve_token, **source_options)
    if args.serve:
        server = next(s for s in stream.sinks if hasattr(s, "server")).server
        print(f"browser view: {server.url}  (Ctrl-C to stop)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    n, status = consume(stream, seg, args.frames)
    summary = seg.stats.summary()
    if args.stats:
        print(seg.stats.format())
    else:
        fps = summary["pipeline_fps"]
        print(f"{n} frames in {time.perf_counter() - t0:.1f} s, pipeline {fps if fps is not None else '-'} FPS, "
              f"engine-only {summary['engine_fps'] if summary['engine_fps'] is not None else '-'} FPS, "
              f"dropped {summary['dropped']}, corrupt {summary['corrupt']}")
    ended = ((summary.get("info") or {}).get("source") or {}).get("ended_early")
    if ended:
        print(f"the source ended after {ended['frames_decoded']} of the {ended['frames_announced']} frames its container "
              "announces: the file is truncated or damaged", file=sys.stderr)
    if args.out:
        print(f"overlay -> {args.out}{describe_sink(stream, args.out)}")
    if args.stats_json:
        print(f"stats -> {args.stats_json}")
    if n == 0 and status == 0:
        print("no frames were processed: the source delivered nothing", file=sys.stderr)
        return 1
    return status


def source_defaults(source: str, serve: bool, loop: bool) -> dict:
    """Source options the command line implies: --loop replays; a synthetic clip served to a
    browser without frames= runs until Ctrl-C (paced like a camera) instead of ending after 300."""
    options = {"loop": True} if loop else {}
    text = str(source).strip()
    if serve and not loop and text.lower().startswith("synthetic:"):
        from urllib.parse import parse_qsl, urlparse

        query = dict(parse_qsl(urlparse(text).query))
        if "frames" not in query:
            options["frames"] = 0
            options.setdefault("live", query.get("live", "1") not in ("0", "false", "no", "off"))
    return options


def consume(stream, seg, max_frames: int | None = None) -> tuple[int, int]:
    """Iterate a stream to its end with a progress bar (frames of the total when the source has
    one, FPS, ETA; for a live source frames, FPS and drops). Returns (frames, exit status)."""
    from edgeseg import progress

    total = getattr(stream.source, "frame_count", None)
    if max_frames:
        total = min(total, max_frames) if total else max_frames
    live = getattr(stream.source, "live", False)
    n, status = 0, 0
    try:
        with stream, progress.bar("frames", total=None if live else total, unit="frames", rate_label="FPS") as bar:
            for _ in stream:
                n += 1
                bar.update()
                if live and n % 30 == 0:
                    bar.note(f"dropped {seg.stats.counters.get('dropped', 0)}")
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (the stream closed: outputs finalised, stats written)
        status = interrupt_status(e)
        print("terminated" if status == 143 else "interrupted", file=sys.stderr)
    return n, status


def int8_choice(seg) -> str | None:
    """Which INT8 graph the engine runs and why, when the bundle has one per target."""
    from runtime.engines.registry import get_backend

    if seg.precision != "int8":
        return None
    graphs = seg.bundle.find(seg.backend, "int8")
    if len(graphs) < 2:
        return None
    chosen = seg.bundle.select(seg.backend, "int8")
    what = (chosen.info.get("preset") or {}).get("description") or f"quantized for {chosen.target}"
    why = (f"the graph quantized for {seg.backend}" if chosen.target == get_backend(seg.backend).quant_target
           else f"no graph is quantized for {seg.backend}; this is the first")
    others = ", ".join(f"{a.path} (for {a.target})" for a in graphs if a is not chosen)
    return f"int8: running {chosen.path} ({what}): {why}; not {others}"


def describe_sink(stream, out: str) -> str:
    codec = next((getattr(s, "codec", None) for s in stream.sinks if getattr(s, "uri", None) == str(out)), None)
    return f" ({codec})" if codec else ""
