"""Instance post-processing cost beside the engine's, for a 640x640 YOLO-seg layout model and a
1280x720 frame, with 1, 10 and 50 objects, measured side by side in one run:

    engine      ONNX Runtime (CPU, 2 threads) running edgeseg's yoloseg (MobileNetV3-Small, 32 prototypes)
                exported at 640x640: outputs (1, 4 + nc + 32, 8400) and (1, 32, 160, 160)
    ours        runtime.instance_postprocess: decode, class-aware NMS, each mask computed inside its
                box at prototype resolution and warped to its frame rect only
    plain       the common ONNX Runtime example: the same decode and NMS, then every object's
                prototype mask upsampled to the input, the letterbox cut, resized to the frame,
                thresholded and cropped to its box (runtime.instance_postprocess.plain_masks)

The post-processing inputs hold N known objects (boxes 40..240 px in the frame, their masks in
the prototypes) among 8400 anchors, so both ways decode the same N objects.

    python benchmarks/instance_postprocess.py [--repeats 20]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FRAME = (720, 1280)
SIZE = (640, 640)
NC, NM = 4, 32


def outputs_with(n: int, pre, rng):
    """(predictions (1, 4+NC+NM, 8400), protos (1, NM, 160, 160), frame boxes) holding n objects."""
    A = sum((SIZE[0] // s) * (SIZE[1] // s) for s in (8, 16, 32))
    lb = pre.letterbox(FRAME)
    s = lb.width / FRAME[1]
    pred = np.zeros((4 + NC + NM, A), np.float32)
    pred[0:2] = rng.uniform(0, 640, (2, A))
    pred[2:4] = 8
    pred[4:4 + NC] = 0.01  # background anchors below any threshold
    protos = rng.normal(0, 1, (NM, 160, 160)).astype(np.float32)
    boxes = []
    for k, a in enumerate(rng.choice(A, n, replace=False)):
        w, h = rng.uniform(40, 240, 2)
        x0, y0 = rng.uniform(0, FRAME[1] - w), rng.uniform(0, FRAME[0] - h)
        boxes.append((x0, y0, x0 + w, y0 + h))
        pred[0, a], pred[1, a] = (x0 + w / 2) * s + lb.left, (y0 + h / 2) * s + lb.top
        pred[2, a], pred[3, a] = w * s, h * s
        pred[4 + k % NC, a] = 0.5 + 0.4 * rng.random()
        pred[4 + NC:, a] = rng.normal(0, 1, NM)
    return pred[None], protos[None], np.array(boxes, np.float32)


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import cv2
    import torch

    from converters.instance_export import export_instance_onnx
    from edgeseg import models
    from edgeseg.instance_layout import InstanceLayout
    from edgeseg.spec import Preprocess
    from runtime.engines.onnxruntime import OnnxRuntimeEngine
    from runtime.instance_postprocess import InstancePostprocessor, plain_masks

    cv2.setNumThreads(1)
    torch.manual_seed(0)
    pre = Preprocess(size=SIZE, resize="letterbox", mean=(0, 0, 0), std=(1, 1, 1), pad_value=114)
    net = models.create("yoloseg", num_classes=NC, num_masks=NM).eval()
    layout = InstanceLayout.from_dict(net.instance_layout())
    with tempfile.TemporaryDirectory(prefix="edgeseg-bench-") as tmp:
        path = os.path.join(tmp, "yoloseg640.onnx")
        export_instance_onnx(net, path, preprocess=pre, layout=layout)
        engine = OnnxRuntimeEngine(path, threads=args.threads)
        x = pre.apply(np.random.default_rng(0).integers(0, 256, (*FRAME, 3), dtype=np.uint8))
        engine_ms = best_ms(lambda: engine.infer(x), args.repeats)
    labels = [f"c{i}" for i in range(NC)]
    post = InstancePostprocessor(labels, [[255, 0, 0]] * NC, pre, layout)
    print(f"engine-only: yoloseg 640x640 on ONNX Runtime, {args.threads} threads: {engine_ms:.2f} ms (median of {args.repeats})")
    print(f"frame {FRAME[1]}x{FRAME[0]}; post-processing on one thread, median of {args.repeats} runs\n")
    print(f"{'objects':>7} {'ours ms':>8} {'plain ms':>9} {'ours/engine':>12} {'plain/ours':>11}")
    rng = np.random.default_rng(0)
    rows = []
    for n in (1, 10, 50):
        pred, protos, _ = outputs_with(n, pre, rng)
        outs = {"predictions": pred, "protos": protos}
        r = post(outs, FRAME)
        assert len(r) == n, f"decoded {len(r)} of {n} objects"
        ours = best_ms(lambda: post(outs, FRAME), args.repeats)

        def plain():
            decoded = post._decode_yolo(outs)  # the same decode and NMS
            boxes, _, _, (_, coefs, pro) = decoded
            xyxy, _, _ = post._to_frame(boxes, FRAME)
            return plain_masks(coefs, pro, xyxy, pre, FRAME)

        plain_ms = best_ms(plain, args.repeats)
        # both give the same masks (up to pixels on the threshold's edge)
        ref = plain()
        agree = float(np.mean(ref == r.masks())) if n else 1.0
        rows.append((n, ours, plain_ms))
        print(f"{n:>7} {ours:>8.2f} {plain_ms:>9.2f} {ours / engine_ms:>11.3f}x {plain_ms / ours:>10.1f}x   (mask pixels agreeing {100 * agree:.3f}%)")
    n, ours, plain_ms = rows[-1]
    print(f"\ngoals at 50 objects: ours <= 0.25x engine: {'met' if ours <= 0.25 * engine_ms else 'NOT met'} ({ours / engine_ms:.3f}x); "
          f">= 5x faster than plain: {'met' if plain_ms >= 5 * ours else 'NOT met'} ({plain_ms / ours:.1f}x)")


if __name__ == "__main__":
    main()
