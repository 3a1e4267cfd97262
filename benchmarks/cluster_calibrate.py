"""`edgeseg calibrate` on one machine against the same calibration with its candidates on a local
Ray instance of 1 and 2 workers, side by side in one run, with what each decided.

    python benchmarks/cluster_calibrate.py                        # the outlier model, TensorRT target, budget 0.5 pts
    python benchmarks/cluster_calibrate.py --bundle my_bundle/ --budget 0.5 --rounds 3

The default source is the test suite's outlier model (tests/conftest.py: the default model with one
activation channel scaled 300x and its consumer scaled back, the same function), whose all-INT8
graph loses several points, so the per-layer sensitivity pass and the float-layer search both run.
Each round calibrates three copies of the bundle back to back (here, 1 worker, 2 workers; the
order rotates per round, so drift in the host's speed hits all alike) with the same frames,
range method and budget; medians are printed. The range computation and the FP32 scoring run
here in every case, so "search s" (the sensitivity pass and the float-layer search, the part the
workers take) is printed beside the total. The figures each run decided (float layers, final
mIoU, INT8 file) must be equal; the benchmark says whether they are.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def calibrate(bundle: Path, workers: int, args) -> dict:
    from calibration import CalibrationWarning, calibrate_bundle

    options = dict(method="minmax", target=args.target, eval_data=args.eval_data, max_images=args.frames,
                   max_miou_drop=args.budget, sensitivity_frames=8)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        if workers:
            from edgeseg.cluster.calibrate import RayCandidates

            with RayCandidates("local", workers=workers) as candidates:
                summary = calibrate_bundle(bundle, args.data, candidates=candidates, **options)
        else:
            summary = calibrate_bundle(bundle, args.data, **options)
    total = time.perf_counter() - t0
    report = json.loads((bundle / "quant_report.json").read_text())["targets"][args.target]
    art = bundle / f"model.int8.{args.target}.onnx"
    return {"total_s": total, "search_s": report["candidates"]["seconds"],  # the sensitivity pass and the search
            "float_layers": report["float_layers_names"], "final_miou": report["final"]["miou"],
            "drop_all_int8": summary["targets"][args.target]["drop_points_all_int8"],
            "candidates": report["candidates"]["candidates"], "trials": len(report["trials"]),
            "sensitivity": len(report["sensitivity"]), "sha": hashlib.sha256(art.read_bytes()).hexdigest()[:12]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", help="a bundle with an FP32 ONNX model (default: the outlier model, converted here)")
    ap.add_argument("--data", default="synthetic:train?n=64")
    ap.add_argument("--eval-data", default="synthetic:test?n=48")
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--target", default="tensorrt", choices=("tensorrt", "cpu"))
    ap.add_argument("--budget", type=float, default=0.5, help="mIoU points")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()

    from edgeseg.cluster.session import import_ray

    import_ray()
    tmp = Path(tempfile.mkdtemp(prefix="cluster-calibrate-"))
    try:
        if args.bundle:
            source = Path(args.bundle)
        else:
            from converters.onnx import convert
            from edgeseg.models import load_checkpoint
            from edgeseg.spec import Preprocess
            from edgeseg.train import DEFAULT_CHECKPOINT
            from tests.conftest import outlier_model

            default = load_checkpoint(DEFAULT_CHECKPOINT)
            source = convert(outlier_model(default)[0], tmp / "source", labels=default[1]["labels"],
                             preprocess=Preprocess.from_dict(default[1]["preprocess"])).path
        configs = {"one process": 0, "Ray, 1 worker": 1, "Ray, 2 workers": 2}
        runs: dict[str, list[dict]] = {k: [] for k in configs}
        for r in range(args.rounds):
            names = list(configs)
            names = names[r % 3:] + names[:r % 3]
            for name in names:
                copy = tmp / f"r{r}-{configs[name]}"
                shutil.copytree(source, copy, ignore=shutil.ignore_patterns("model.int8.*", "quant_report.*", "calibration.cache"))
                runs[name].append(calibrate(copy, configs[name], args))
                print(f"round {r + 1}: {name}: {runs[name][-1]['total_s']:.1f} s", file=sys.stderr)
                shutil.rmtree(copy)
        first = runs["one process"][0]
        print(f"calibrate {args.target}, {args.frames} frames of {args.data}, measured on {args.eval_data}, budget "
              f"{args.budget} pts: all layers INT8 drop {first['drop_all_int8']:.2f} pts; {first['sensitivity']} layers, "
              f"{first['trials']} search trials; {args.rounds} round(s), medians; this host has "
              f"{os.cpu_count()} CPUs")
        print(f"{'':<16} {'total s':>8} {'search s':>9} {'speed-up':>9} {'candidates':>11}  float layers  same result")
        base = statistics.median(x["search_s"] for x in runs["one process"])
        for name, rs in runs.items():
            search = statistics.median(x["search_s"] for x in rs)
            same = all((x["float_layers"], x["final_miou"], x["sha"]) == (first["float_layers"], first["final_miou"], first["sha"])
                       for x in rs)
            print(f"{name:<16} {statistics.median(x['total_s'] for x in rs):>8.1f} {search:>9.1f} {base / search:>8.2f}x "
                  f"{rs[0]['candidates']:>11}  {len(rs[0]['float_layers']):>12}  {'yes' if same else 'NO'}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
