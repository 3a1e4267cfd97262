"""`edgeseg build BUNDLE`: build a TensorRT engine for a bundle on this GPU and add it to the bundle.

    edgeseg build bundle/ --precision fp16
    edgeseg build bundle/ --precision int8                      # after `edgeseg calibrate --target tensorrt`
    edgeseg build bundle/ --dynamic 1x3x256x256:1x3x512x512:4x3x1024x1024 --timing-cache ~/trt.cache
    edgeseg build bundle/ --prepare-only                        # CPU: preflight + float16 graph with parity

The operator preflight runs first; with TensorRT missing, --prepare-only still does every CPU step
so the bundle only needs the final build on the GPU machine.
"""
from __future__ import annotations

import argparse
import logging
import re

from edgeseg.errors import ConversionError

log = logging.getLogger("edgeseg.build")


def _shape(text: str) -> list[int]:
    dims = [d for d in re.split(r"[x,]", text.strip()) if d]
    if not dims or not all(d.isdigit() and int(d) > 0 for d in dims):
        raise ConversionError(f"bad shape {text!r}: write it as NxCxHxW, e.g. 1x3x512x512")
    return [int(d) for d in dims]


def parse_dynamic(specs: list[str] | None) -> dict | None:
    """--dynamic [NAME=]MIN:OPT:MAX (each NxCxHxW) -> {name or None: [min, opt, max]}."""
    if not specs:
        return None
    out = {}
    for spec in specs:
        name, _, ranges = spec.rpartition("=")
        parts = ranges.split(":")
        if len(parts) == 1:
            parts = parts * 3
        if len(parts) != 3:
            raise ConversionError(f"bad --dynamic {spec!r}: give MIN:OPT:MAX shapes, e.g. 1x3x256x256:1x3x512x512:4x3x1024x1024")
        out[name or None] = [_shape(p) for p in parts]
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle folder (from `edgeseg convert`)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp16",
                        help="engine precision (int8 needs `edgeseg calibrate --target tensorrt` first; default fp16)")
    parser.add_argument("--workspace", type=int, metavar="MB", help="limit TensorRT's builder workspace (MB)")
    parser.add_argument("--dynamic", action="append", metavar="[INPUT=]MIN:OPT:MAX",
                        help="optimization profile for a model exported with dynamic axes; shapes as NxCxHxW")
    parser.add_argument("--timing-cache", metavar="PATH", help="load and update a TensorRT timing cache (faster rebuilds)")
    parser.add_argument("--version-compatible", action="store_true",
                        help="engine that also runs on later TensorRT versions (slower)")
    parser.add_argument("--hardware-compatible", action="store_true",
                        help="engine that runs on any Ampere or newer GPU (slower)")
    parser.add_argument("--strongly-typed", action="store_true",
                        help="TensorRT 10: take precision from the graph (float16 graph / Q/DQ) instead of builder "
                             "flags; always the case on TensorRT 11")
    parser.add_argument("--optimization-level", type=int, choices=range(6), metavar="0-5",
                        help="builder optimization level (TensorRT default 3)")
    parser.add_argument("--device", type=int, default=0, help="CUDA device index")
    parser.add_argument("--rebuild", action="store_true", help="ignore the engine cache")
    parser.add_argument("--parity-frames", type=int, default=4, help="frames for the parity check against FP32 (0: skip)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="only the CPU steps: operator preflight and (fp16) the float16 graph with its parity")


def _resolve_dynamic(dynamic: dict | None, bundle) -> dict | None:
    if not dynamic:
        return None
    if None in dynamic:
        unnamed = dynamic.pop(None)
        dynamic[bundle.manifest.input_name] = unnamed
    return dynamic


def run(args: argparse.Namespace) -> int:
    from converters import tensorrt as trt_conv
    from edgeseg.bundle import Bundle

    bundle = Bundle.load(args.bundle)
    dynamic = _resolve_dynamic(parse_dynamic(args.dynamic), bundle)
    if args.prepare_only:
        return _prepare(bundle, args.precision)
    art = trt_conv.build_bundle_engine(
        bundle, args.precision, workspace_mb=args.workspace, shapes=dynamic, timing_cache=args.timing_cache,
        version_compatible=args.version_compatible, hardware_compatible=args.hardware_compatible,
        optimization_level=args.optimization_level, strongly_typed=args.strongly_typed or None, device=args.device,
        rebuild=args.rebuild,
        parity_frames=args.parity_frames,
    )
    parity = ", ".join(f"{k} {v:.4g}" for k, v in art.parity.items() if isinstance(v, float))
    print(f"{bundle.path / art.path}: TensorRT {art.info.get('trt_version')} {art.precision} engine for "
          f"{art.info.get('gpu_name')} (sm{''.join(map(str, art.info.get('compute_capability', [])))})"
          + (f"; parity vs FP32: {parity}" if parity else ""))
    return 0


def _prepare(bundle, precision: str) -> int:
    from converters import tensorrt as trt_conv

    if precision == "int8":
        source = trt_conv.bundle_engine_source(bundle, "int8")
    else:
        source = bundle.artifact_path(trt_conv.fp32_artifact(bundle))
    warnings = trt_conv.check_preflight(source, where=str(source))
    print(f"{source}: TensorRT preflight passed" + (f" with {len(warnings)} warning(s)" if warnings else ""))
    for w in warnings:
        print(f"  {w}")
    if precision == "fp16":
        art = trt_conv.prepare_fp16(bundle)
        trt_conv.check_preflight(bundle.artifact_path(art), where=art.path)
        print(f"{bundle.path / art.path}: float16 graph, parity vs FP32 in ONNX Runtime: "
              + ", ".join(f"{k} {v:.4g}" for k, v in art.parity.items() if isinstance(v, float)))
    print("build the engine on the GPU machine with: edgeseg build " + str(bundle.path) + f" --precision {precision}")
    return 0
