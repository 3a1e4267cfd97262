"""edgeseg demo — the whole path on the embedded default model: convert it to ONNX, stream a
synthetic clip through the runtime, write `overlay.mp4` (H.264, with a legend of the classes) and
`stats.json`, print the timings. `--task instance` does the same with the embedded instance model
(yoloseg): one colour per tracked object, a caption with its label, score and track id."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from edgeseg.commands.run import add_backend_argument, consume, describe_sink


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=("semantic", "instance"), default="semantic",
                   help="semantic (default: the class map model) or instance (the yoloseg model: objects with masks, tracked)")
    p.add_argument("--source", default=None, help="frame source URI (default: a synthetic 640x360 clip)")
    p.add_argument("--frames", type=int, default=300, help="frames to process (default 300)")
    p.add_argument("--out", default="edgeseg-demo", help="output folder (default ./edgeseg-demo)")
    p.add_argument("--show", action="store_true", help="also show a window (needs a display)")
    p.add_argument("--serve", metavar="HOST:PORT", help="also serve the live view to a browser")
    add_backend_argument(p)
    p.add_argument("--smoothing", type=float, default=0.0, help="temporal smoothing strength 0..1")
    p.add_argument("--no-legend", dest="legend", action="store_false",
                   help="no legend of the classes present on the overlay (shown by default)")


def run(args) -> int:
    from edgeseg.bundle import Bundle, BundleError, sha256_file
    from edgeseg.train import DEFAULT_CHECKPOINT

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    instance = getattr(args, "task", "semantic") == "instance"
    if instance:
        from edgeseg.train_default_instance import DEFAULT_INSTANCE_CHECKPOINT as checkpoint
    else:
        checkpoint = DEFAULT_CHECKPOINT
    bundle_dir = out / ("bundle-instance" if instance else "bundle")
    source_sha = sha256_file(checkpoint)
    t0 = time.perf_counter()
    try:
        bundle = Bundle.load(bundle_dir)
        fresh = bundle.manifest.model.get("source_sha256") != source_sha
    except BundleError:
        fresh = True
    if fresh:
        from converters.onnx import convert

        print(f"converting the default {'instance ' if instance else ''}model to ONNX ...", flush=True)
        bundle = convert(str(checkpoint) if instance else "default", bundle_dir)
    art = bundle.select("onnxruntime", "fp32")
    p = art.parity
    if instance:
        print(f"bundle {bundle_dir} ({'converted' if fresh else 'up to date'} in {time.perf_counter() - t0:.1f} s): "
              f"ONNX parity {p.get('matched')}/{p.get('detections_reference')} objects matched, "
              f"min mask IoU {p.get('min_mask_iou', float('nan')):.4f}")
    else:
        print(f"bundle {bundle_dir} ({'converted' if fresh else 'up to date'} in {time.perf_counter() - t0:.1f} s): "
              f"ONNX parity max|Δlogit| {p.get('max_abs', float('nan')):.2e}, mask agreement {100 * p.get('mask_agreement', 0):.2f}%")

    from runtime.segmenter import Segmenter

    source = args.source or f"synthetic://?frames={args.frames}&width=640&height=360&seed=7"
    seg = Segmenter(bundle, backend=args.backend) if instance else Segmenter(bundle, backend=args.backend, smoothing=args.smoothing)
    print(f"backend {seg.backend} ({seg.backend_reason}); streaming {source}", flush=True)
    video, stats_path = out / "overlay.mp4", out / "stats.json"
    stream = seg.stream(source, show=args.show, save=str(video), serve=args.serve, max_frames=args.frames,
                        stats_path=str(stats_path), legend=args.legend)
    n, status = consume(stream, seg, args.frames)
    print(seg.stats.format())
    print(f"{n} frames -> {video}{describe_sink(stream, str(video))}\nstats -> {stats_path}")
    if status:
        return status
    summary = json.loads(stats_path.read_text())
    if not n:
        print("no frames were processed; check --source")
        return 1
    return 0 if summary else 1
