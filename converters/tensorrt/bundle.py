"""TensorRT and bundles: the graph an engine is built from (FP32, the float16 graph, the calibrated
Q/DQ graph), building it into the bundle with its measured parity, or into the cache only.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

from converters.tensorrt import builder, cache
from converters.tensorrt.fp16 import DEFAULT_FP32_OPS, fp16_parity, to_fp16_onnx
from converters.tensorrt.preflight import check_preflight, load_onnx
from edgeseg.bundle import Artifact, Bundle, BundleError, atomic_path
from edgeseg.engine_cache import BuildOptions, EngineHeader, Target
from edgeseg.errors import ConversionError

log = logging.getLogger("edgeseg.tensorrt")

INT8_GRAPH = "model.int8.tensorrt.onnx"  # the Q/DQ graph the calibration step writes for TensorRT
FP16_GRAPH = "model.fp16.onnx"


def prepare_fp16(bundle: Bundle | str | os.PathLike, keep_float32_ops: Iterable[str] = DEFAULT_FP32_OPS,
                 frames: int = 4, save: bool = True) -> Artifact:
    """Add `model.fp16.onnx` (float16 graph, float32 I/O) to a bundle with its parity against FP32 in
    ONNX Runtime. TensorRT 11 builds FP16 engines from this graph. save: under the bundle's write
    lock, into the manifest as it is on disk (a Bundle passed in gets that manifest)."""
    if not save:
        return _add_fp16(bundle if isinstance(bundle, Bundle) else Bundle.load(bundle), keep_float32_ops, frames)
    with Bundle.writing(bundle.path if isinstance(bundle, Bundle) else bundle) as current:
        art = _add_fp16(current, keep_float32_ops, frames)
        current.save()
    if isinstance(bundle, Bundle):
        bundle.manifest = current.manifest
    return art


def _add_fp16(bundle: Bundle, keep_float32_ops: Iterable[str], frames: int) -> Artifact:
    src = fp32_artifact(bundle)
    dst = bundle.path / FP16_GRAPH
    to_fp16_onnx(bundle.artifact_path(src), dst, keep_float32_ops=keep_float32_ops)
    parity = fp16_parity(bundle.artifact_path(src), dst, bundle.manifest.preprocess, frames=frames,
                         output_kind=bundle.manifest.output_kind)
    log.info("float16 graph parity vs float32 (ONNX Runtime): %s", parity)
    art = Artifact(FP16_GRAPH, "onnxruntime", "fp16", parity=parity,
                   info={"source": src.path, "float32_ops": sorted(keep_float32_ops), "io": "float32"})
    return bundle.add_artifact(art)


add_fp16_artifact = prepare_fp16  # the name edgeseg.api uses


def fp32_artifact(bundle: Bundle) -> Artifact:
    """The bundle's float32 ONNX model (checksum verified): the source of every engine but INT8."""
    try:
        art = bundle.select("onnxruntime", "fp32")
    except BundleError:
        raise ConversionError(f"bundle {bundle.path} has no float32 ONNX model; re-create it with `edgeseg convert`") from None
    bundle.verify_artifact(art)
    return art


def engine_filename(target: Target, options: BuildOptions) -> str:
    """model.<gpu>.<trt>.<precision>.engine, e.g. model.sm89.trt10.8.fp16.engine"""
    gpu = "ampere_plus" if options.hardware_compatible else target.sm
    major_minor = ".".join(re.findall(r"\d+", target.trt_version)[:2])
    trt_tag = f"trt{major_minor}" + ("vc" if options.version_compatible else "")
    return f"model.{gpu}.{trt_tag}.{options.precision}.engine"


def bundle_engine_source(bundle: Bundle, precision: str, trt=None, strongly_typed: bool | None = None) -> Path:
    """The ONNX graph an engine of `precision` is built from (making the float16 graph if needed)."""
    if precision == "int8":
        found = [a for a in bundle.find(precision="int8", target="tensorrt") if a.path.endswith(".onnx")]
        path = bundle.artifact_path(found[0]) if found else bundle.path / INT8_GRAPH
        if not path.is_file():
            raise ConversionError(
                f"bundle {bundle.path} has no TensorRT INT8 graph ({INT8_GRAPH}); quantize it first with "
                f"`edgeseg calibrate {bundle.path} --target tensorrt`"
            )
        if found:
            bundle.verify_artifact(found[0])
        return path
    src = fp32_artifact(bundle)
    if precision == "fp16" and trt is not None and builder.uses_strong_typing(trt, strongly_typed):
        fp16 = bundle.find("onnxruntime", "fp16")
        if fp16 and bundle.artifact_path(fp16[0]).is_file():
            bundle.verify_artifact(fp16[0])
            return bundle.artifact_path(fp16[0])
        return bundle.artifact_path(prepare_fp16(bundle))
    return bundle.artifact_path(src)


def default_shapes(bundle: Bundle, onnx_path: Path) -> dict[str, list[list[int]]]:
    """A single-shape profile from the bundle's preprocessing for dynamic inputs (batch 1, input size)."""
    model = load_onnx(onnx_path)
    init = {t.name for t in model.graph.initializer}
    out = {}
    pre = bundle.manifest.preprocess
    for vi in model.graph.input:
        if vi.name in init:
            continue
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            continue
        shape = list(pre.input_shape)
        if len(dims) != len(shape):
            raise ConversionError(f"input {vi.name!r} has rank {len(dims)}; give its shapes explicitly")
        out[vi.name] = [shape, shape, shape]
    return out


def _plan(bundle: Bundle, precision: str, device: int, shapes: Mapping[str, Any] | None,
          **options) -> tuple[Path, BuildOptions, Target]:
    """The graph to build from, the build options and this machine's target (TensorRT and the GPU)."""
    trt = builder.import_tensorrt()
    target = builder.current_target(device, trt)
    source = bundle_engine_source(bundle, precision, trt, options.get("strongly_typed"))
    check_preflight(source, where=str(source))
    opts = BuildOptions(precision=precision, shapes=dict(shapes) if shapes else default_shapes(bundle, source),
                        device=device, **options)
    return source, opts, target


def cached_bundle_engine(bundle: Bundle, precision: str = "fp16", *, device: int = 0,
                         shapes: Mapping[str, Any] | None = None, rebuild: bool = False,
                         **options) -> tuple[Path, EngineHeader]:
    """The bundle's engine for this machine, built into the engine cache (or taken from it) without
    touching the bundle: what `Segmenter(..., build_missing=True)` runs. `options`: BuildOptions fields."""
    source, opts, target = _plan(bundle, precision, device, shapes, **options)
    log.info("TensorRT %s engine for %s from the engine cache (built on first use)", precision, bundle.path)
    return cache.cached_engine(source, opts, rebuild=rebuild, target=target)


def build_bundle_engine(bundle_path: str | os.PathLike | Bundle, precision: str = "fp16", *,
                        workspace_mb: int | None = None, shapes: Mapping[str, Any] | None = None,
                        timing_cache: str | os.PathLike | None = None, version_compatible: bool = False,
                        hardware_compatible: bool = False, optimization_level: int | None = None,
                        strongly_typed: bool | None = None, tf32: bool | None = None, device: int = 0,
                        rebuild: bool = False, parity_frames: int = 4) -> Artifact:
    """Build (or take from the cache) the TensorRT engine of a bundle, copy it into the bundle as
    `model.<gpu>.<trt>.<precision>.engine`, measure its parity against the FP32 ONNX model, and record it."""
    bundle = bundle_path if isinstance(bundle_path, Bundle) else Bundle.load(bundle_path)
    source, options, target = _plan(
        bundle, precision, device, shapes, workspace_mb=workspace_mb, version_compatible=version_compatible,
        hardware_compatible=hardware_compatible, optimization_level=optimization_level, strongly_typed=strongly_typed,
        tf32=tf32, timing_cache=str(timing_cache) if timing_cache else None)
    cached, header = cache.cached_engine(source, options, rebuild=rebuild, target=target)
    name = engine_filename(target, options)
    dest = bundle.path / name
    with atomic_path(dest) as tmp:
        shutil.copyfile(cached, tmp)
    parity = {}
    if parity_frames:
        from converters.parity import check_parity
        from runtime.engines.tensorrt import TensorRTEngine

        engine = TensorRTEngine(dest, precision=precision, device=device, header=header.to_dict())
        try:
            parity = check_parity(str(bundle.artifact_path(fp32_artifact(bundle))), engine, bundle.manifest.preprocess,
                                  frames=parity_frames, output_kind=bundle.manifest.output_kind)
        finally:
            engine.close()
        log.info("engine parity vs FP32 ONNX: %s", parity)
    art = Artifact(name, "tensorrt", precision, parity=parity, target=header.key,
                   info={**header.to_dict(), "source": source.name})
    with Bundle.writing(bundle.path) as current:  # what other writers added meanwhile stays
        current.add_artifact(art)
        current.save()
    return art
