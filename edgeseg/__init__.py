"""edgeseg: put a trained segmentation network on an edge device.

    import edgeseg
    bundle = edgeseg.convert("default", out="bundle")          # nn.Module, checkpoint, ONNX
    seg = edgeseg.Segmenter("bundle")
    for result in seg.stream("synthetic://"):
        print(result.timings)

The public API is resolved lazily (PEP 562): `import edgeseg` imports neither torch nor a runtime.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Preprocess": ("edgeseg.spec", "Preprocess"),
    "Bundle": ("edgeseg.bundle", "Bundle"),
    "Manifest": ("edgeseg.bundle", "Manifest"),
    "load_bundle": ("edgeseg.bundle", "Bundle.load"),
    "convert": ("edgeseg.api", "convert"),
    "calibrate": ("edgeseg.api", "calibrate"),
    "Segmenter": ("edgeseg.segmenter", "Segmenter"),  # the runtime's, plus build_missing=True
    "SegmentationResult": ("runtime.postprocess", "SegmentationResult"),
    "BatchSegmenter": ("edgeseg.cluster.batch", "BatchSegmenter"),
    "models": ("edgeseg.models", None),
    "losses": ("edgeseg.losses", None),
    "metrics": ("edgeseg.metrics", None),
    "data": ("edgeseg.data", None),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'edgeseg' has no attribute {name!r}")
    module, attr = _LAZY[name]
    obj = importlib.import_module(module)
    for part in (attr.split(".") if attr else []):
        obj = getattr(obj, part)
    globals()[name] = obj
    return obj


def __dir__():
    return sorted(__all__)
