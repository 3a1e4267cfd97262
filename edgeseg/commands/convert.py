"""edgeseg convert MODEL --to onnx|coreml|openvino|litert [--precision P] --out BUNDLE"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgeseg.api import COREML_PRECISIONS, LITERT_PRECISIONS, ONNX_PRECISIONS, OPENVINO_PRECISIONS, TARGETS
from edgeseg.errors import ConversionError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="'default' (the embedded trained model), a zoo architecture (untrained: unet, lraspp_mobilenetv3 ...), "
                                 "a checkpoint (.pt), TorchScript, ONNX file, or package.module:factory (from the current folder)")
    p.add_argument("--to", choices=TARGETS, default="onnx",
                   help="onnx (ONNX Runtime, and TensorRT via `edgeseg build`), coreml (iPhone, Mac), openvino (Intel CPU, "
                        "GPU, NPU) or litert (Android); openvino and litert artifacts are added beside model.onnx; default onnx")
    p.add_argument("--precision", default=None,
                   help=f"onnx: {', '.join(ONNX_PRECISIONS)} (default fp32); coreml: {', '.join(COREML_PRECISIONS)} (default fp16); "
                        f"openvino: {', '.join(OPENVINO_PRECISIONS)}; litert: {', '.join(LITERT_PRECISIONS)} (default fp32)")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), help="network input size (default: the model's)")
    p.add_argument("--dynamic", action="store_true", help="symbolic batch, height and width")
    p.add_argument("--fold-normalization", action="store_true", help="uint8 input; normalisation inside the graph")
    p.add_argument("--argmax", action="store_true", help="end the graph with ArgMax (uint8 class map output)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17; the dynamo exporter needs 18 or more)")
    p.add_argument("--labels", help="labels file (one per line) or comma-separated names")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="keyword for a factory (repeatable)")
    p.add_argument("--instance-tail", action="store_true",
                   help="instance models (yoloseg): put score filter, class-aware NMS (ONNX NonMaxSuppression), a fixed top-K "
                        "(--max-detections) and mask assembly at prototype resolution in the graph, so the engine returns "
                        "ready objects; default: raw outputs, post-processed by the runtime")
    p.add_argument("--max-detections", type=int, default=None,
                   help="with --instance-tail: the fixed number of object rows the graph returns (default: the model's, 100)")
    p.add_argument("--exporter", choices=("auto", "torchscript", "dynamo"), default="auto",
                   help="torch's ONNX exporter (default auto: TorchScript, then dynamo if it fails)")
    q = p.add_argument_group("int8")
    q.add_argument("--calib", help="calibration frames: image folder, video or dataset spec (needed for int8)")
    q.add_argument("--method", choices=("minmax", "percentile", "entropy"), default=None,
                   help="onnx: activation range method (default: each is tried, the one that loses least on the held-out frames is kept)")
    q.add_argument("--target", choices=("tensorrt", "cpu", "both"), default="both",
                   help="onnx: INT8 graph for TensorRT, for ONNX Runtime on x86 CPUs, or both (default)")
    q.add_argument("--eval-data", help="held-out data to measure INT8 accuracy on (default as for `edgeseg calibrate`: "
                                       "else 20%% of the --calib frames, at least 16, are held out)")
    q.add_argument("--max-miou-drop", type=float, default=0.5,
                   help="accuracy budget in mIoU points (onnx: layers stay float until it holds; openvino: NNCF's "
                        "accuracy control; litert: reported, the LiteRT quantizer has no fallback)")
    c = p.add_argument_group("coreml")
    c.add_argument("--output", choices=("logits", "probs", "mask"), default="logits", help="CoreML output kind")
    c.add_argument("--deployment-target", default="iOS17", help="minimum deployment target (iOS16, iOS17, iOS18, macOS14 ...)")
    c.add_argument("--coreml-size", nargs=2, type=int, action="append", metavar=("H", "W"),
                   help="an extra input size the package accepts (repeatable: enumerated shapes)")


def parse_labels(text: str | None) -> list[str] | None:
    if not text:
        return None
    path = Path(text)
    if path.is_file():
        labels = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        labels = [s.strip() for s in text.split(",") if s.strip()]
    if not labels:
        raise ConversionError(f"no labels found in {text!r}; give a file with one label per line or 'a,b,c'")
    return labels


def parse_model_args(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConversionError(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run(args) -> int:
    from edgeseg.api import convert

    precision = args.precision or ("fp16" if args.to == "coreml" else "fp32")
    kw = dict(labels=parse_labels(args.labels), model_args=parse_model_args(args.model_arg))
    if args.input_size:
        kw["input_size"] = tuple(args.input_size)
    if args.to != "coreml":
        if args.to == "litert" and args.dynamic:
            raise ConversionError("--dynamic does not apply to --to litert: LiteRT models here have a fixed input size "
                                  "(XNNPACK plans for it); convert with --input-size H W instead")
        kw.update(dynamic=args.dynamic, fold_normalization=args.fold_normalization, argmax=args.argmax,
                  opset=args.opset, exporter=args.exporter)
        if args.instance_tail or args.max_detections is not None:
            if args.max_detections is not None and not args.instance_tail:
                raise ConversionError("--max-detections sizes the in-graph tail; add --instance-tail")
            kw.update(instance_tail=True, max_detections=args.max_detections)
        bundle = convert(args.model, args.out, to=args.to, precision=precision, calib=args.calib, eval_data=args.eval_data,
                         calib_method=args.method, calib_target=args.target, max_miou_drop=args.max_miou_drop, **kw)
    else:
        if args.coreml_size:
            kw["input_sizes"] = [tuple(s) for s in args.coreml_size]
        bundle = convert(args.model, args.out, to="coreml", precision=precision, output=args.output,
                         minimum_deployment_target=args.deployment_target, calib=args.calib, **kw)
    print(f"wrote {bundle.path}")
    for art in bundle.manifest.artifacts:
        print("  " + describe_artifact(art))
    over = [a.path for a in bundle.manifest.artifacts if a.metrics.get("within_budget") is False]
    if over:
        print(f"over the {args.max_miou_drop:.2f}-point accuracy budget: {', '.join(over)}")
    return 1 if over else 0


def describe_artifact(art) -> str:
    parts = [f"{art.path:<36} {art.backend:<12} {art.precision:<12}"]
    if art.target:
        parts.append(f"target={art.target}")
    p = art.parity
    if "matched" in p:  # instance parity: objects matched one to one, mask IoU per match
        parts.append(f"objects matched {p['matched']}/{p['detections_reference']} (converted {p['detections']}), "
                     f"min mask IoU {p['min_mask_iou']:.4f}, {'pass' if p.get('ok') else 'FAIL'}")
    if "max_abs" in p:
        parts.append(f"max|Δlogit|={p['max_abs']:.2e}")
    if "mask_agreement" in p:
        parts.append(f"mask agreement={100 * p['mask_agreement']:.2f}%")
    m = art.metrics
    if "miou" in m:
        parts.append(f"mIoU={m['miou']:.4f}")
    if m.get("miou_int8") is not None:
        parts.append(f"mIoU={m['miou_int8']:.4f} ({-m['miou_drop_points']:+.2f} pts vs FP32)")
    if "size_bytes" in m:
        parts.append(f"size={m['size_bytes'] / 1e6:.2f} MB")
    info = art.info or {}
    if info.get("signature"):  # LiteRT: what an app calls
        q = info.get("input_quantization")
        dtype = info.get("input_dtype", "") + (f" scale {q['scale']:.6g} zero point {q['zero_point']}" if q else "")
        parts.append(f"signature {info['signature']}: {info.get('input')} ({dtype}) -> {', '.join(info.get('outputs') or [])}")
    return "  ".join(parts)
