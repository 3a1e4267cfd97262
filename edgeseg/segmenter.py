"""`edgeseg.Segmenter`: the runtime's Segmenter, plus building what the bundle lacks.

    seg = edgeseg.Segmenter("bundle/")                          # runs what the bundle holds
    seg = edgeseg.Segmenter("bundle/", build_missing=True)      # + a TensorRT engine for this GPU

The runtime (runtime.segmenter.Segmenter) only opens artifacts a bundle already has, so that a
device app needs neither the converters nor onnx tooling. This layer sits above it: with
`build_missing=True`, when TensorRT and a GPU are present (and TensorRT is wanted: backend "auto"
or "tensorrt") but no engine of the bundle fits this GPU and TensorRT release, it builds one into
the engine cache (converters.tensorrt; the bundle is not modified, later runs reuse the cached
engine) and runs that. `edgeseg build BUNDLE` builds it into the bundle instead.
"""
from __future__ import annotations

import logging

from edgeseg.bundle import Bundle
from runtime.segmenter import Segmenter as RuntimeSegmenter

log = logging.getLogger("edgeseg")


def build_missing_engine(bundle: Bundle, backend: str = "auto", precision: str | None = None, device: int = 0,
                         slots: int = 1, **build_options):
    """(a TensorRT engine built into or taken from the engine cache, why), or (None, why not) when
    TensorRT is not wanted or not present, or the bundle already has an engine that fits."""
    if backend not in ("auto", "tensorrt"):
        return None, f"backend {backend} requested"
    from runtime.engines import tensorrt as trt_engine

    ok, why = trt_engine.available()
    if not ok:
        return None, why
    if trt_engine.bundle_problem(bundle, precision) is None:
        return None, "the bundle has an engine for this GPU"
    from converters.tensorrt import cached_bundle_engine
    from runtime.engines.base import EngineError
    from edgeseg.errors import ConversionError

    try:
        path, header = cached_bundle_engine(bundle, precision or "fp16", device=device, **build_options)
    except ConversionError as e:
        raise EngineError(str(e)) from None
    engine = trt_engine.TensorRTEngine(path, precision=header.precision, device=device, header=header.to_dict(), slots=slots)
    return engine, f"built for {header.gpu_name} (TensorRT {header.trt_version}) into the engine cache: {path}"


class Segmenter(RuntimeSegmenter):
    """runtime.segmenter.Segmenter with `build_missing`: see the module docstring. Build options
    for the engine (workspace_mb, shapes, optimization_level, strongly_typed, tf32, timing_cache ...)
    go in `build_options`; everything else is as the runtime's Segmenter."""

    def __init__(self, bundle, backend: str = "auto", precision: str | None = None, *, build_missing: bool = False,
                 build_options: dict | None = None, device: int = 0, **options):
        bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        engine = None
        if build_missing:
            engine, why = build_missing_engine(bundle, backend, precision, device=device, **(build_options or {}))
            if engine is None:
                log.info("no engine built: %s", why)
            else:
                options.update(engine=engine, backend_reason=why)
        if engine is None and device:
            options["device"] = device
        super().__init__(bundle, backend, precision, **options)


__all__ = ["Segmenter", "build_missing_engine"]
