"""Preflight: TensorRT ONNX-parser support checked on CPU, on small hand-built graphs and a real export."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.tensorrt import Problem, check_preflight, preflight
from edgeseg.errors import ConversionError


def _graph(nodes, initializers=(), opset=17, inputs=None, outputs=None, domains=()):
    inputs = inputs or [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])]
    outputs = outputs or [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)]
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(g, opset_imports=imports)


def _conv_resize(**resize_attrs):
    w = numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Resize", ["r", "", "scales"], ["logits"], name="up", **resize_attrs),
    ]
    return _graph(nodes, [w, scales], outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 64, 64])])


def _errors(problems):
    return [p for p in problems if p.severity == "error"]


def test_supported_graph_has_no_problems():
    m = _conv_resize(mode="linear", coordinate_transformation_mode="half_pixel")
    onnx.checker.check_model(m)
    assert preflight(m) == []


def test_resize_modes_are_checked_and_named():
    m = _conv_resize(mode="cubic", coordinate_transformation_mode="tf_crop_and_resize", antialias=1)
    problems = preflight(m)
    assert len(problems) == 3 and all(p.node == "up" and p.op == "Resize" for p in problems)
    text = "\n".join(str(p) for p in problems)
    assert "'cubic'" in text and "tf_crop_and_resize" in text and "antialias" in text
    assert all(p.fix for p in problems)


def test_resize_nearest_mode_and_aspect_policy():
    m = _conv_resize(mode="nearest", nearest_mode="round_prefer_floor", keep_aspect_ratio_policy="not_larger")
    problems = _errors(preflight(m))
    assert [p.message for p in problems] == ["keep_aspect_ratio_policy 'not_larger' is not supported"]
    assert _errors(preflight(_conv_resize(mode="nearest", nearest_mode="floor"))) == []


def test_unsupported_op_is_named_with_a_fix():
    nodes = [helper.make_node("Unique", ["input"], ["logits"], name="uniq")]
    (p,) = preflight(_graph(nodes))
    assert (p.node, p.op, p.severity) == ("uniq", "Unique", "error")
    assert "not supported" in p.message and "outside the network" in p.fix


def test_onnxruntime_quantization_ops_point_to_qdq():
    nodes = [helper.make_node("DynamicQuantizeLinear", ["input"], ["q", "s", "z"], name="dq")]
    (p,) = preflight(_graph(nodes, outputs=[helper.make_tensor_value_info("q", TensorProto.UINT8, None)]))
    assert p.op == "DynamicQuantizeLinear" and "--target tensorrt" in p.fix


def test_custom_domain_op():
    nodes = [helper.make_node("FusedConv", ["input"], ["logits"], name="fc", domain="com.microsoft")]
    (p,) = preflight(_graph(nodes, domains=["com.microsoft"]))
    assert p.op == "com.microsoft::FusedConv" and "ONNX Runtime" in p.fix


def test_opset_range():
    nodes = [helper.make_node("Relu", ["input"], ["logits"], name="relu")]
    low = preflight(_graph(nodes, opset=7))
    assert [(p.op, p.severity) for p in low] == [("opset", "error")] and "opset 17" in low[0].fix
    high = preflight(_graph(nodes, opset=26))
    assert [(p.op, p.severity) for p in high] == [("opset", "warning")]


def test_quantize_zero_points_must_be_symmetric_int8():
    def qdq(zp):
        inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(zp, "z")]
        nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"], name="q"),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["logits"], name="dq")]
        return _graph(nodes, inits)

    assert preflight(qdq(np.array(0, np.int8))) == []
    asym = preflight(qdq(np.array(3, np.int8)))
    assert {p.node for p in asym} == {"q", "dq"} and all("zero point" in p.message for p in asym)
    unsigned = preflight(qdq(np.array(0, np.uint8)))
    assert [p.node for p in unsigned] == ["q"] and "int8" in unsigned[0].message


def test_pooling_restrictions():
    nodes = [helper.make_node("MaxPool", ["input"], ["logits", "idx"], name="mp", kernel_shape=[2, 2]),
             helper.make_node("AveragePool", ["input"], ["a"], name="ap1d", kernel_shape=[2])]
    msgs = {(p.node, p.message) for p in preflight(_graph(nodes))}
    assert ("mp", "MaxPool's Indices output is not supported") in msgs
    assert ("ap1d", "1D pooling is not supported (2D or 3D only)") in msgs


def test_subgraphs_are_checked():
    then_g = helper.make_graph([helper.make_node("Unique", ["input"], ["t"], name="inner")], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Relu", ["input"], ["e"], name="ok")], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    cond = numpy_helper.from_array(np.array(True), "cond")
    nodes = [helper.make_node("If", ["cond"], ["logits"], name="branch", then_branch=then_g, else_branch=else_g)]
    assert [(p.node, p.op) for p in preflight(_graph(nodes, [cond]))] == [("inner", "Unique")]


def test_check_preflight_raises_with_every_error(tmp_path):
    m = _graph([helper.make_node("Unique", ["input"], ["u"], name="a"),
                helper.make_node("Compress", ["u", "input"], ["logits"], name="b")])
    path = tmp_path / "bad.onnx"
    onnx.save(m, str(path))
    with pytest.raises(ConversionError) as e:
        check_preflight(path, where=str(path))
    assert "node 'a' (Unique)" in str(e.value) and "node 'b' (Compress)" in str(e.value) and str(path) in str(e.value)


def test_unreadable_file(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(ConversionError, match="not a readable ONNX model"):
        preflight(bad)
    with pytest.raises(ConversionError, match="not found"):
        preflight(tmp_path / "missing.onnx")


def test_problem_text_names_node_op_and_fix():
    p = Problem("up", "Resize", "mode 'cubic' is not supported", "use bilinear")
    assert str(p) == "error: node 'up' (Resize): mode 'cubic' is not supported; fix: use bilinear"


def test_zoo_model_export_passes(tmp_path):
    torch = pytest.importorskip("torch")
    from edgeseg.models import create

    model = create("lraspp_mobilenetv3_small", num_classes=5).eval()
    path = tmp_path / "lraspp.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 64, 64),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"])
    assert _errors(preflight(path)) == []


def test_roi_align_names_the_plugin_tensorrt_builds_it_from():
    def graph(**attrs):
        nodes = [helper.make_node("RoiAlign", ["input", "rois", "idx"], ["logits"], name="pool", output_height=7,
                                  output_width=7, sampling_ratio=2, **attrs)]
        inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32]),
                  helper.make_tensor_value_info("rois", TensorProto.FLOAT, [10, 4]),
                  helper.make_tensor_value_info("idx", TensorProto.INT64, [10])]
        return _graph(nodes, inputs=inputs)

    (p,) = preflight(graph(coordinate_transformation_mode="half_pixel"))
    assert p.severity == "warning" and p.node == "pool" and "ROIAlign_TRT plugin" in p.message
    assert "init_libnvinfer_plugins" in p.fix
    problems = preflight(graph(coordinate_transformation_mode="align_corners"))
    assert [e.message for e in _errors(problems)] == ["coordinate_transformation_mode 'align_corners' is not an ONNX RoiAlign mode"]
