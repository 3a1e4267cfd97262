"""INT8 for instance bundles: calibration frames through the bundle's own `Preprocess`, activation
ranges and Q/DQ graphs from `calibration.quantize` (the presets of the semantic path), accuracy
before and after as COCO mask AP (pycocotools, `calibration.instance_accuracy`), and a
mixed-precision fallback: while INT8 loses more than `max_ap_drop` mask AP points, nodes are
kept in float, a few more each round: first those that assemble the outputs (the Concat of box
pixels with 0..1 scores, which one INT8 scale cannot serve both), then the convolutions nearest
the outputs (heads, prototype branch). Measured on the default instance model: all-INT8 lost
7.4 mask AP points, with the 8 output-assembly nodes in float 0.4.

    summary = calibrate_instance_bundle("bundle/", "synthetic:train?n=64", target="cpu", max_ap_drop=2.0)
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from calibration.data import CalibrationError
from calibration.instance_accuracy import _images, score_engine

ROUNDS = 4  # fallback rounds
STEP = 4  # convolutions kept in float per round


class _Frames:
    """Preprocessed frames as ONNX Runtime's calibration reader (chunked: set_range / rewind)."""

    def __init__(self, arrays: list, input_name: str):
        self.arrays, self.input_name = arrays, input_name
        self.start, self.stop, self.i = 0, len(arrays), 0

    def __len__(self):
        return len(self.arrays)

    def set_range(self, start: int, stop: int) -> None:
        self.start, self.stop, self.i = start, min(stop, len(self.arrays)), start

    def rewind(self) -> None:
        self.set_range(0, len(self.arrays))

    def get_next(self):
        if self.i >= self.stop:
            return None
        self.i += 1
        return {self.input_name: self.arrays[self.i - 1]}


def _fallback_order(model_path) -> list[str]:
    """Conv nodes ordered by how close they are to the graph outputs (fewest nodes between)."""
    import onnx

    g = onnx.load(str(model_path), load_external_data=False).graph
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    depth: dict[str, int] = {}

    def dist(name: str, seen=()) -> int:
        if name in outputs:
            return 0
        if name in depth:
            return depth[name]
        d = min((1 + min((dist(o, seen) for o in u.output), default=10**6) for u in users.get(name, [])), default=10**6)
        depth[name] = d
        return d

    import sys

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    # first the nodes that assemble the outputs (Concat, Transpose ...: one scale would cover box
    # coordinates in pixels and scores in 0..1 alike), then the convolutions, nearest first
    tail = [n for n in g.node if n.op_type != "Conv" and dist(n.output[0]) <= 2]
    convs = [n for n in g.node if n.op_type == "Conv"]
    return [n.name for n in tail] + [n.name for n in sorted(convs, key=lambda n: dist(n.output[0]))]


def calibrate_instance_bundle(bundle_path, data, *, target: str = "cpu", method: str = "minmax", max_ap_drop: float = 2.0,
                              eval_data=None, max_images: int = 64, eval_max_images: int = 100) -> dict:
    """Add `model.int8.<target>.onnx` to an instance bundle; returns AP before/after and what stayed float."""
    from calibration.quantize import compute_ranges, quantize_model
    from edgeseg.bundle import Artifact, Bundle, atomic_path
    from runtime.engines.onnxruntime import OnnxRuntimeEngine

    if isinstance(max_ap_drop, bool) or not isinstance(max_ap_drop, (int, float)) or not 0 <= max_ap_drop <= 100:
        raise CalibrationError(f"--max-ap-drop is in mask AP points, 0..100; got {max_ap_drop!r}")
    bundle = Bundle.load(bundle_path)
    m = bundle.manifest
    if m.task != "instance-segmentation":
        raise CalibrationError(f"{bundle.path} is a {m.task} bundle; use `edgeseg calibrate` without --max-ap-drop")
    fp32 = bundle.select("onnxruntime", "fp32")
    src = bundle.artifact_path(fp32)
    reader, idx = _images(data, max_images, "train")
    frames = [m.preprocess.apply(reader[int(i)][0]) for i in idx]
    eval_spec = eval_data or (data.split("?")[0].replace(":train", "") + ":test?n=200" if isinstance(data, str) and data.startswith("synthetic") else None)
    if eval_spec is None:
        raise CalibrationError("INT8 accuracy is measured on held-out labelled data: give --eval-data (synthetic:test, coco:...)")
    ev_reader, ev_idx = _images(eval_spec, eval_max_images, "test")
    before = score_engine(OnnxRuntimeEngine(src).infer, m, ev_reader, ev_idx, desc="fp32 AP")
    staging = bundle.staging_dir("calibrate-instances")
    ranges = staging / "ranges.cache"
    compute_ranges(src, _Frames(frames, m.input_name), method, ranges, workdir=staging)
    name = f"model.int8.{target}.onnx"
    candidates = _fallback_order(src)
    excluded: list[str] = []
    rounds = []
    for r in range(ROUNDS + 1):
        out = staging / name
        quantize_model(src, out, ranges, method, target, nodes_to_exclude=excluded)
        after = score_engine(OnnxRuntimeEngine(out).infer, m, ev_reader, ev_idx, desc=f"int8 AP ({len(excluded)} float nodes)")
        drop = 100.0 * (before["mask"]["AP"] - after["mask"]["AP"])
        rounds.append({"float_nodes": len(excluded), "mask_AP": after["mask"]["AP"], "drop_points": drop})
        if drop <= max_ap_drop or r == ROUNDS:
            break
        excluded = candidates[: len(excluded) + STEP]
    metrics = {"mask_AP_fp32": before["mask"]["AP"], "mask_AP50_fp32": before["mask"]["AP50"],
               "mask_AP_int8": after["mask"]["AP"], "mask_AP50_int8": after["mask"]["AP50"],
               "box_AP_int8": after["box"]["AP"], "ap_drop_points": drop, "max_ap_drop": float(max_ap_drop),
               "within_budget": bool(drop <= max_ap_drop), "float_layers": excluded, "rounds": rounds,
               "eval_images": int(len(ev_idx)), "calibration_frames": len(frames), "method": method}
    with Bundle.writing(bundle.path) as current:
        with atomic_path(current.path / name) as tmp:
            os.replace(staging / name, tmp)
        current.add_artifact(Artifact(name, "onnxruntime", "int8", metrics=metrics, target=target,
                                      info={"calibration": str(data), "eval_data": str(eval_spec)}))
        current.save()
    import shutil

    shutil.rmtree(staging, ignore_errors=True)
    return {"artifact": name, **metrics}


__all__ = ["calibrate_instance_bundle"]
