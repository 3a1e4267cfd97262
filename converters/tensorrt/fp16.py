"""Float16 ONNX graphs for strongly typed TensorRT networks (TensorRT 11 takes FP16 only from the
graph), on the CPU: onnxconverter-common's float16 conversion with accuracy-sensitive ops kept float32.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

from converters.tensorrt.preflight import load_onnx
from edgeseg.bundle import atomic_path
from edgeseg.errors import ConversionError

log = logging.getLogger("edgeseg.tensorrt")


# Ops whose float16 range or accumulation loses accuracy (exp overflow, long reductions, variance):
# they stay float32, with casts around them. The converter's own block list (ops lacking float16
# kernels in ONNX Runtime, Resize among them) is always added.
DEFAULT_FP32_OPS = (
    "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
    "LayerNormalization", "InstanceNormalization", "GroupNormalization", "Exp", "Log", "Pow", "Sqrt",
)


def _require_float16_converter():
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise ConversionError(
            "FP16 graph conversion needs the onnxconverter-common package: pip install onnxconverter-common"
        ) from None
    return float16


def to_fp16_onnx(src, dst: str | os.PathLike, keep_float32_ops: Iterable[str] = DEFAULT_FP32_OPS,
                 keep_io_types: bool = True) -> Path:
    """Write a float16 copy of an ONNX graph (weights and activations), keeping `keep_float32_ops` in
    float32. With keep_io_types the graph still takes and returns float32, so preprocessing and
    postprocessing do not change. Returns `dst`."""
    import onnx
    from onnx import TensorProto

    float16 = _require_float16_converter()
    model = onnx.ModelProto()
    model.CopyFrom(load_onnx(src))  # never modify a caller's ModelProto
    _name_nodes(model.graph)
    fp32_outputs = {o.name for o in model.graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT}
    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(keep_float32_ops))
    import warnings

    with warnings.catch_warnings():
        # The converter warns once per weight it clamps to float16's range; the count is logged instead.
        warnings.simplefilter("ignore")
        converted = float16.convert_float_to_float16(model, keep_io_types=keep_io_types, op_block_list=block)
    if keep_io_types:
        _restore_float32_outputs(converted, fp32_outputs)
    try:
        onnx.checker.check_model(converted)
    except onnx.checker.ValidationError as e:
        raise ConversionError(f"the float16 graph is invalid: {str(e).splitlines()[0]}") from None
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        onnx.save(converted, str(tmp))
    n16 = sum(1 for t in converted.graph.initializer if t.data_type == TensorProto.FLOAT16)
    log.info("wrote float16 graph %s (%d float16 weights; float32 kept for %s)", dst, n16, ", ".join(block))
    return dst


def _name_nodes(graph) -> None:
    """Give unnamed nodes unique names: the converter names its Cast nodes after the node they serve,
    and unnamed nodes would produce clashing casts."""
    used = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def _restore_float32_outputs(model, fp32_outputs: set[str]) -> None:
    """keep_io_types leaves an output float16 when its producer is a blocked (float32) op: the converter
    appends a Cast to float16 there. Make such outputs float32 again."""
    from onnx import TensorProto, helper

    producers = {o: n for n in model.graph.node for o in n.output}
    for out in model.graph.output:
        tt = out.type.tensor_type
        if out.name not in fp32_outputs or tt.elem_type == TensorProto.FLOAT:
            continue
        node = producers.get(out.name)
        if node is not None and node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to":
                    a.i = TensorProto.FLOAT
        else:
            half = out.name + "_fp16"
            if node is not None:
                node.output[list(node.output).index(out.name)] = half
            model.graph.node.append(helper.make_node("Cast", [half], [out.name], to=TensorProto.FLOAT,
                                                     name=f"{out.name}_to_float32"))
        tt.elem_type = TensorProto.FLOAT


def fp16_parity(fp32_onnx, fp16_onnx, preprocess, frames: int | list = 4, output_kind: str = "logits") -> dict:
    """Parity of a float16 graph with its float32 source, both run in ONNX Runtime on the same frames."""
    from converters.parity import check_parity

    return check_parity(str(fp32_onnx), str(fp16_onnx), preprocess, frames=frames, output_kind=output_kind)
