"""What writing the overlay video costs per frame: H.264 through PyAV (what `--out x.mp4` writes)
against OpenCV's mp4v (the fallback without PyAV), side by side on the same frames, alternating
rounds so a drifting host affects both alike; file sizes too.

    python benchmarks/video_writer.py [--frames 120] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2  # noqa: E402

import runtime.sinks as sinks  # noqa: E402
from runtime.sources import open_source  # noqa: E402


def write(frames, path: Path, h264: bool) -> tuple[float, int, str]:
    saved = sinks.h264_encoder
    if not h264:
        sinks.h264_encoder = lambda: (None, "measuring OpenCV's writer")
    try:
        sink = sinks.VideoSink(path, fps=30)
    finally:
        sinks.h264_encoder = saved
    t0 = time.perf_counter()
    for f in frames:
        sink.write(f)
    sink.close()
    return (time.perf_counter() - t0) * 1000 / len(frames), path.stat().st_size, sink.codec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if sinks.h264_encoder()[0] is None:
        raise SystemExit(f"no H.264 encoder: {sinks.h264_encoder()[1]}")
    clip = [f.image for f in open_source(f"synthetic://?frames={args.frames}&width=640&height=360&seed=7")]
    import logging

    logging.getLogger("edgeseg.runtime").setLevel(logging.ERROR)  # the fallback's warning, expected here
    print(f"{args.frames} frames, {args.rounds} alternating rounds, ms per frame (median) and file size")
    with tempfile.TemporaryDirectory() as tmp:
        for name, frames in (("640x360", clip), ("1280x720", [cv2.resize(f, (1280, 720)) for f in clip])):
            ms = {True: [], False: []}
            size, codec = {}, {}
            for r in range(args.rounds):
                for h264 in (True, False):
                    t, size[h264], codec[h264] = write(frames, Path(tmp) / f"{name}-{r}-{h264}.mp4", h264)
                    ms[h264].append(t)
            a, b = statistics.median(ms[True]), statistics.median(ms[False])
            print(f"{name:>9}  {codec[True]:<16} {a:6.2f} ms  {size[True] / 1e6:6.2f} MB   |   "
                  f"{codec[False]:<12} {b:6.2f} ms  {size[False] / 1e6:6.2f} MB   |   H.264 / mp4v time {a / b:.2f}, "
                  f"size {size[True] / size[False]:.2f}")


if __name__ == "__main__":
    main()
