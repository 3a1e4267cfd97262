"""INT8 from a folder of camera-like frames, with no held-out data given: does it keep its accuracy?

    python benchmarks/int8_demo_frames.py                  # 60 frames, targets cpu and tensorrt
    python benchmarks/int8_demo_frames.py --frames 60 --workdir /tmp/int8-demo --keep

Takes `--frames` frames spread over the demo clip (`edgeseg demo`'s synthetic 640x360 clip, seed 7,
300 frames), writes them as PNG files to a folder, converts the default model, and runs

    edgeseg calibrate BUNDLE --data FRAMES --target both          (no --eval-data)

so calibration holds out a share of those frames and measures INT8 against FP32 on them. It prints
what calibration chose and measured (range method per target, agreement with FP32 on the held-out
frames, mIoU drop against FP32's class maps, layers kept in float), then scores every graph on
labelled scenes calibration never saw:

    edgeseg eval BUNDLE --data 'synthetic:test?n=200'

and prints mIoU of FP32 and of each INT8 graph with the drop against the 0.5-point budget. Every
command is printed as run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO_CLIP = "synthetic://?frames=300&width=640&height=360&seed=7"  # what `edgeseg demo` streams by default
BUDGET = 0.5


def write_frames(folder: Path, n: int) -> list[str]:
    """`n` frames spread evenly over the demo clip, as PNG files."""
    import cv2

    from calibration.data import sample_indices
    from runtime.sources import open_source

    folder.mkdir(parents=True, exist_ok=True)
    wanted = set(sample_indices(300, n))
    names = []
    with open_source(DEMO_CLIP) as src:
        for f in src:
            if f.index in wanted:
                name = f"demo_{f.index:03d}.png"
                cv2.imwrite(str(folder / name), f.image)
                names.append(name)
    return names


def edgeseg(*args, label: str) -> tuple[str, float]:
    cmd = [sys.executable, "-m", "edgeseg", *map(str, args)]
    print(f"$ edgeseg {' '.join(_quote(a) for a in map(str, args))}", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode not in (0, 1):  # 1: a target over budget, reported below
        sys.exit(f"{label} failed (status {p.returncode}):\n{p.stderr[-3000:]}")
    return p.stdout, seconds


def _quote(a: str) -> str:
    return f"'{a}'" if any(c in a for c in "?&* ") else a


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=60, help="frames taken from the demo clip (default 60)")
    ap.add_argument("--eval", default="synthetic:test?n=200", help="labelled data for `edgeseg eval` (default synthetic:test?n=200)")
    ap.add_argument("--workdir", type=Path, help="where the frames and the bundle go (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="int8-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    frames, bundle = work / "frames", work / "bundle"
    try:
        names = write_frames(frames, args.frames)
        print(f"{len(names)} frames of the demo clip ({DEMO_CLIP}) -> {frames} ({names[0]} ... {names[-1]})")
        if bundle.exists():
            shutil.rmtree(bundle)
        edgeseg("convert", "default", "--out", bundle, label="convert")
        out, secs = edgeseg("calibrate", bundle, "--data", frames, "--target", "both", label="calibrate")
        print(out.rstrip())
        report = json.loads((bundle / "quant_report.json").read_text())
        ev, cal = report["evaluation"], report["calibration"]
        print(f"\ncalibration ({secs:.0f} s): {cal['frames']} calibration frames; INT8 measured on {ev['frames']} frames, "
              f"{ev['split']} (labelled: {ev['labelled']})")
        for t, e in report["targets"].items():
            trials = ", ".join(f"{m} {r['miou_drop_points']:.2f}" for m, r in e.get("method_trials", {}).items())
            final = e["final"]
            print(f"  {t:<9} method {e['method']:<10} (all-INT8 drop per method, pts: {trials or 'forced'}); held-out agreement "
                  f"{100 * final['agreement_with_fp32']:.2f}%, drop {final['miou_drop_points']:.2f} pts vs FP32 maps, "
                  f"{len(e['float_layers_names'])} layer(s) in float{': ' + ', '.join(e['float_layers_names']) if e['float_layers_names'] else ''}"
                  f"; within budget: {e['within_budget']}")
        result_path = work / "eval.json"
        edgeseg("eval", bundle, "--data", args.eval, "--json", result_path, label="eval")
        result = json.loads(result_path.read_text())
        print(f"\n{result['data']} ({result['frames']} labelled frames, not seen by calibration):")
        fp32 = next(r for r in result["results"] if r["precision"] == "fp32")
        print(f"  {'fp32':<26} mIoU {fp32['miou']:.4f}")
        worst = 0.0
        for r in result["results"]:
            if r["precision"] == "int8" and r["backend"] == "onnxruntime":
                drop = 100 * (fp32["miou"] - r["miou"])
                worst = max(worst, drop)
                print(f"  {r['path']:<26} mIoU {r['miou']:.4f}  drop {drop:+.2f} pts  agreement with FP32 "
                      f"{100 * r['agreement_with_fp32']:.2f}%  {'within' if drop <= BUDGET else 'OVER'} the {BUDGET}-point budget")
        return 0 if worst <= BUDGET else 1
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
