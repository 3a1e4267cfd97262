"""Importing ONNX files in the Ultralytics YOLO-seg layout (what `yolo export format=onnx` writes
for a segmentation model).

    output0  (1, 4 + nc + nm, anchors)   cx, cy, w, h in input pixels, nc class scores, nm coefficients
    output1  (1, nm, H/4, W/4)           mask prototypes
    metadata names  "{0: 'person', 1: 'bicycle'}"   (a Python dict literal)
             imgsz  "[640, 640]"                     (a list literal)
             task   "segment", stride "32"

The file converts into a bundle with its labels, the letterbox preprocessing Ultralytics trains
with (RGB, 0..1, grey 114 padding) and the `yolo` instance layout, and runs through the same
post-processing as edgeseg's own yoloseg. Metadata is untrusted: literals are parsed with
`ast.literal_eval` only (never evaluated), bounded in size, and checked for type and range; a
bad field is refused naming it.
"""
from __future__ import annotations

import ast

from edgeseg.errors import ConversionError
from edgeseg.instance_layout import MAX_CLASSES, MAX_MASKS, InstanceLayout

MAX_META_CHARS = 1_000_000  # a names literal for 10,000 classes fits easily
MAX_LABEL_CHARS = 200
MAX_SIDE = 8192
PAD_VALUE = 114  # Ultralytics' letterbox grey


def is_ultralytics(meta: dict) -> bool:
    """Metadata as Ultralytics writes it (names and task), without edgeseg's own."""
    return "names" in meta and "task" in meta


def _literal(meta: dict, key: str, where: str):
    text = meta.get(key)
    if text is None:
        raise ConversionError(f"{where}: the metadata has no {key!r}; an Ultralytics export writes names, imgsz, task and stride")
    if len(text) > MAX_META_CHARS:
        raise ConversionError(f"{where}: metadata {key!r} is {len(text)} characters long (at most {MAX_META_CHARS}); "
                              "this is not an Ultralytics export")
    try:
        return ast.literal_eval(text)  # literals only: no names, calls or attribute access are evaluated
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ConversionError(f"{where}: metadata {key!r} is not a Python literal ({text[:80]!r}); it must be written as "
                              "Ultralytics writes it (names: {0: 'person', ...}, imgsz: [640, 640])") from None


def parse_names(meta: dict, where: str) -> list[str]:
    """The class names, in id order: a dict {0: 'a', 1: 'b'} (or a list) with ids 0..n-1."""
    names = _literal(meta, "names", where)
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise ConversionError(f"{where}: metadata 'names' must be a non-empty dict of class id -> name, got {type(names).__name__}")
    if len(names) > MAX_CLASSES:
        raise ConversionError(f"{where}: metadata 'names' has {len(names)} classes (at most {MAX_CLASSES})")
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in names) or sorted(names) != list(range(len(names))):
        raise ConversionError(f"{where}: metadata 'names' must map the ids 0..{len(names) - 1} to names, got ids "
                              f"{sorted(map(repr, names))[:6]}")
    labels = []
    for k in range(len(names)):
        v = names[k]
        if not isinstance(v, str) or not v.strip() or len(v) > MAX_LABEL_CHARS or any(c in v for c in "\n\r\0"):
            raise ConversionError(f"{where}: class {k}'s name {str(v)[:40]!r} must be a one-line string of 1..{MAX_LABEL_CHARS} characters")
        labels.append(v.strip())
    return labels


def parse_imgsz(meta: dict, where: str) -> tuple[int, int]:
    v = _literal(meta, "imgsz", where)
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v, v]
    if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_SIDE for s in v):
        raise ConversionError(f"{where}: metadata 'imgsz' must be [height, width] with sides 1..{MAX_SIDE}, got {str(v)[:60]!r}")
    return int(v[0]), int(v[1])


def parse_stride(meta: dict, where: str) -> int:
    v = _literal(meta, "stride", where) if "stride" in meta else 32
    if isinstance(v, (list, tuple)) and v:
        v = max(v)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 128:
        raise ConversionError(f"{where}: metadata 'stride' must be an integer 1..128, got {str(v)[:40]!r}")
    return v


def _dims(vi) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]


def read_ultralytics(m, meta: dict, where: str):
    """(labels, Preprocess, InstanceLayout) of an Ultralytics YOLO-seg ONNX model, checked against its graph."""
    from edgeseg.spec import Preprocess

    task = meta.get("task")
    if task != "segment":
        raise ConversionError(f"{where}: an Ultralytics {str(task)[:20]!r} model; edgeseg imports segmentation models "
                              "(task 'segment': export one with `yolo export model=yolo11n-seg.pt format=onnx`)")
    labels = parse_names(meta, where)
    H, W = parse_imgsz(meta, where)
    stride = parse_stride(meta, where)
    if H % stride or W % stride:
        raise ConversionError(f"{where}: imgsz {[H, W]} is not a multiple of the stride {stride}")
    inputs, outputs = list(m.graph.input), list(m.graph.output)
    init = {t.name for t in m.graph.initializer}
    inputs = [i for i in inputs if i.name not in init]
    if len(inputs) != 1 or len(outputs) != 2:
        raise ConversionError(f"{where}: a YOLO-seg export has one input and two outputs (output0, output1); this graph has "
                              f"{len(inputs)} and {len(outputs)}")
    din, d0, d1 = _dims(inputs[0]), _dims(outputs[0]), _dims(outputs[1])
    if len(din) != 4 or din[1] != 3 or din[2:] != [H, W]:
        raise ConversionError(f"{where}: input {inputs[0].name!r} has shape {din}; the metadata's imgsz means (1, 3, {H}, {W}) "
                              "(export with a fixed imgsz; dynamic=True exports are not supported)")
    nc = len(labels)
    if len(d0) != 3 or len(d1) != 4 or not isinstance(d0[1], int) or not isinstance(d1[1], int):
        raise ConversionError(f"{where}: outputs of shapes {d0} and {d1}; the YOLO-seg layout is (1, 4 + classes + masks, anchors) "
                              "and (1, masks, H/4, W/4)")
    nm = d1[1]
    if d0[1] != 4 + nc + nm:
        raise ConversionError(f"{where}: {outputs[0].name!r} has {d0[1]} rows, but 4 box + {nc} classes (from 'names') + {nm} "
                              f"mask coefficients (from {outputs[1].name!r}) make {4 + nc + nm}; the names do not fit the model")
    if not 1 <= nm <= MAX_MASKS:
        raise ConversionError(f"{where}: {nm} mask prototypes (at most {MAX_MASKS})")
    pre = Preprocess(size=(H, W), resize="letterbox", color="rgb", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), pad_value=PAD_VALUE)
    layout = InstanceLayout("yolo", nc, nm, outputs={"predictions": outputs[0].name, "protos": outputs[1].name},
                            score_threshold=0.25, iou_threshold=0.7, max_detections=300)
    return labels, pre, layout


__all__ = ["is_ultralytics", "read_ultralytics", "parse_names", "parse_imgsz", "parse_stride"]
