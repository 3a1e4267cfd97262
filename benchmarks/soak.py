"""Soak: 10,000 frames from a synthetic source through the full runtime; memory must stay flat.

Resident memory (VmRSS) is sampled after a warm-up (allocator pools, ONNX Runtime arenas and
OpenCV buffers reach their steady size in the first few hundred frames) and then every 1,000
frames; the run passes when the last sample is within 5% of the first.

    python benchmarks/soak.py [--frames 10000] [--bundle DIR] [--width 640 --height 360]

Without --bundle the default model is converted first (that step imports torch; the soak itself
runs the torch-free runtime).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=500, help="frames before the first memory sample (default 500)")
    ap.add_argument("--bundle", help="bundle to run (default: convert the default model)")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--smoothing", type=float, default=0.5, help="exercise the smoothing state too (default 0.5)")
    ap.add_argument("--tolerance", type=float, default=0.05)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="edgeseg-soak-") as tmp:
        bundle = args.bundle
        if bundle is None:
            from converters.onnx import convert

            bundle = convert("default", Path(tmp) / "bundle").path
        from runtime.segmenter import Segmenter

        seg = Segmenter(bundle, smoothing=args.smoothing)
        source = f"synthetic://?frames=0&width={args.width}&height={args.height}&seed=3"
        samples: list[tuple[int, int]] = []
        t0 = time.perf_counter()
        for r in seg.stream(source, max_frames=args.frames):
            i = r.frame_index + 1
            r.overlay()  # exercise the drawing path an app would use
            if i == args.warmup or (i > args.warmup and i % 1000 == 0) or i == args.frames:
                samples.append((i, rss_kb()))
                print(f"frame {i:>6}: RSS {samples[-1][1] / 1024:.1f} MiB, {seg.stats.pipeline_fps or 0:.1f} FPS", flush=True)
        wall = time.perf_counter() - t0
    (f0, m0), (f1, m1) = samples[0], samples[-1]
    change = (m1 - m0) / m0
    peak = max(m for _, m in samples)
    print(f"\n{f1} frames in {wall:.0f} s; RSS {m0 / 1024:.1f} MiB at frame {f0} -> {m1 / 1024:.1f} MiB at frame {f1} "
          f"({100 * change:+.2f}%), peak {peak / 1024:.1f} MiB")
    print(seg.stats.format())
    ok = abs(change) <= args.tolerance
    print("PASS: memory flat within {:.0f}%".format(100 * args.tolerance) if ok else "FAIL: memory grew")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
