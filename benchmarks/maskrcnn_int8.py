"""Mask R-CNN INT8 through the calibration package, with held-out COCO AP before and after.

A trained checkpoint is exported to ONNX (RoiAlign and NonMaxSuppression inside), its activation
ranges are computed by `calibration.quantize.compute_ranges` on synthetic training scenes pushed
through the deployment preprocessing (`calibration.data.CalibrationSet`), and each preset's Q/DQ
graph is written by `calibration.quantize.quantize_model` (`cpu`: U8S8 for ONNX Runtime on x86;
`tensorrt`: symmetric INT8). Every graph runs on ONNX Runtime over the same held-out scenes, its
outputs go through the runtime's instance post-processing, and pycocotools scores them
(`edgeseg.instance_metrics`), beside the torch model itself.

    python benchmarks/maskrcnn_int8.py runs/maskrcnn.pt --eval-data 'synthetic:test?n=200&size=128'
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from instance_models import export  # noqa: E402


def score(infer, reader, pre, labels, palette, layout) -> dict:
    """COCO AP of `infer(x) -> {output name: array}` over an instance reader."""
    from edgeseg.instance_metrics import InstanceEvaluator
    from runtime.instance_postprocess import InstancePostprocessor

    post = InstancePostprocessor(labels, palette, pre, layout)
    ev = InstanceEvaluator(labels)
    for i in range(len(reader)):
        img, ann = reader[i]
        ev.add(post(infer(pre.apply(img)), img.shape[:2]), ann)
    return ev.summary()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a Mask R-CNN checkpoint from `edgeseg train`")
    ap.add_argument("--eval-data", default="synthetic:test?n=200&size=128", help="held-out instance data")
    ap.add_argument("--calib-data", default="synthetic:train?n=128&size=128", help="calibration scenes")
    ap.add_argument("--method", default="minmax", choices=("minmax", "percentile", "entropy"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from calibration.data import CalibrationSet
    from calibration.quantize import compute_ranges, quantize_model
    from edgeseg import models
    from edgeseg.bundle import default_palette
    from edgeseg.data import open_instances
    from edgeseg.spec import Preprocess
    from runtime.engines.onnxruntime import OnnxRuntimeEngine

    torch.set_num_threads(args.threads)
    model, ckpt = models.load_checkpoint(args.checkpoint)
    labels = list(ckpt["labels"])
    palette = ckpt.get("palette") or default_palette(len(labels))
    pre = Preprocess.from_dict(ckpt["preprocess"])
    layout = model.instance_layout()
    names = list(layout["outputs"].values())
    reader = open_instances(args.eval_data, split="test")
    calib_reader = open_instances(args.calib_data, split="train")
    frames = [calib_reader[i][0] for i in range(len(calib_reader))]

    def torch_infer(x):
        with torch.no_grad():
            return {n: o.numpy() for n, o in zip(names, model(torch.from_numpy(x)))}

    rows = {}
    with tempfile.TemporaryDirectory(prefix="edgeseg-maskrcnn-int8-") as tmp:
        tmp = Path(tmp)
        fp32 = tmp / "model.onnx"
        export(model, fp32, pre.size)
        t0 = time.perf_counter()
        compute_ranges(fp32, CalibrationSet(frames, pre), args.method, tmp / "ranges.json", workdir=tmp)
        graphs = {"torch": None, "onnxruntime fp32": fp32}
        for target in ("cpu", "tensorrt"):
            graphs[f"onnxruntime int8 ({target} Q/DQ)"] = quantize_model(fp32, tmp / f"model.int8.{target}.onnx",
                                                                          tmp / "ranges.json", args.method, target)
        print(f"calibrated on {len(frames)} scenes of {args.calib_data} ({args.method}) and quantized in "
              f"{time.perf_counter() - t0:.0f} s")
        for name, path in graphs.items():
            if path is None:
                infer = torch_infer
            else:
                engine = OnnxRuntimeEngine(path, threads=args.threads)
                infer = engine.infer
            t0 = time.perf_counter()
            s = score(infer, reader, pre, labels, palette, layout)
            rows[name] = (s, time.perf_counter() - t0)

    print(f"held-out: {len(reader)} scenes of {args.eval_data}; COCO AP by pycocotools")
    print(f"{'model':<34}{'mask AP50':>10}{'mask AP':>9}{'box AP50':>10}{'drop AP50':>11}{'s':>6}")
    ref = rows["onnxruntime fp32"][0]["mask"]["AP50"]
    for name, (s, secs) in rows.items():
        drop = (ref - s["mask"]["AP50"]) * 100
        print(f"{name:<34}{s['mask']['AP50']:>10.4f}{s['mask']['AP']:>9.4f}{s['box']['AP50']:>10.4f}{drop:>10.2f}p{secs:>6.0f}")
    return 0 if np.isfinite(ref) else 1


if __name__ == "__main__":
    raise SystemExit(main())
