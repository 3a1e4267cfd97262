"""ONNX -> TensorRT, split by concern:

    preflight.py   the ONNX parser's operator table; what it will reject, checked on the CPU
    fp16.py        float16 graphs (TensorRT 11 takes FP16 only from the graph), on the CPU
    builder.py     ONNX -> serialized engine + header (TensorRT 10 flags / TensorRT 11 strong typing)
    cache.py       the engine cache: reuse while the header still matches, rebuild otherwise
    bundle.py      which graph of a bundle an engine comes from; build into the bundle or the cache

    from converters.tensorrt import preflight, to_fp16_onnx, build_bundle_engine
    problems = preflight("bundle/model.onnx")               # CPU: what TensorRT's ONNX parser will reject
    to_fp16_onnx("bundle/model.onnx", "model.fp16.onnx")    # CPU: float16 graph, sensitive ops kept float32
    art = build_bundle_engine("bundle/", precision="fp16")  # GPU + TensorRT: engine added to the bundle

Engine headers, cache keys and the cache location are shared with the runtime, which reads them
to decide whether an engine fits the machine: edgeseg.engine_cache. Everything that touches
TensorRT imports it lazily, so preflight and FP16 conversion run on machines without a GPU.
"""
from converters.tensorrt.builder import (
    INSTALL_HINT, build_engine, current_target, has_precision_flags, import_tensorrt, uses_strong_typing,
)
from converters.tensorrt.bundle import (
    FP16_GRAPH, INT8_GRAPH, add_fp16_artifact, build_bundle_engine, bundle_engine_source, cached_bundle_engine,
    default_shapes, engine_filename, fp32_artifact, prepare_fp16,
)
from converters.tensorrt.cache import cache_entry_problem, cached_engine
from converters.tensorrt.fp16 import DEFAULT_FP32_OPS, fp16_parity, to_fp16_onnx
from converters.tensorrt.preflight import SUPPORTED_OPS, Problem, check_preflight, load_onnx, preflight
from edgeseg.engine_cache import (
    PRECISIONS, BuildOptions, EngineHeader, Target, cache_dir, engine_key, header_path, normalize_shapes, stale_reasons,
)

__all__ = [
    "Problem", "preflight", "check_preflight", "load_onnx", "SUPPORTED_OPS", "DEFAULT_FP32_OPS", "to_fp16_onnx",
    "fp16_parity", "prepare_fp16", "add_fp16_artifact", "fp32_artifact", "INSTALL_HINT", "import_tensorrt",
    "current_target", "has_precision_flags", "uses_strong_typing", "build_engine", "cached_engine", "cache_entry_problem",
    "engine_filename", "bundle_engine_source", "default_shapes", "build_bundle_engine", "cached_bundle_engine",
    "FP16_GRAPH", "INT8_GRAPH", "PRECISIONS", "BuildOptions", "EngineHeader", "Target", "cache_dir", "engine_key",
    "header_path", "normalize_shapes", "stale_reasons",
]
