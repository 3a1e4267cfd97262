"""FP16 graphs made on CPU and checked in ONNX Runtime against the FP32 graph."""
from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.tensorrt import DEFAULT_FP32_OPS, FP16_GRAPH, prepare_fp16, to_fp16_onnx
from edgeseg.bundle import Artifact, Bundle, Manifest, default_palette
from edgeseg.errors import ConversionError
from edgeseg.spec import Preprocess

pytest.importorskip("onnxconverter_common")


@pytest.fixture(scope="module")
def zoo_onnx(tmp_path_factory):
    """A real segmentation network (LR-ASPP MobileNetV3-small, random weights) exported at 64x64."""
    torch = pytest.importorskip("torch")
    from edgeseg.models import create

    torch.manual_seed(0)
    model = create("lraspp_mobilenetv3_small", num_classes=5).eval()
    path = tmp_path_factory.mktemp("fp16") / "model.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 64, 64),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"])
    return path


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0], sess


def test_fp16_graph_matches_fp32_in_onnxruntime(zoo_onnx, tmp_path, rng):
    dst = to_fp16_onnx(zoo_onnx, tmp_path / "m16.onnx")
    m16 = onnx.load(str(dst))
    assert sum(t.data_type == TensorProto.FLOAT16 for t in m16.graph.initializer) > 10  # weights really are float16
    x = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
    ref, _ = _run(zoo_onnx, x)
    out, sess = _run(dst, x)
    assert sess.get_inputs()[0].type == "tensor(float)" and sess.get_outputs()[0].type == "tensor(float)"
    assert out.dtype == np.float32
    err = np.abs(out - ref).max()
    assert 0 < err < 0.05 * max(1.0, np.abs(ref).max())  # float16 rounding is visible, but small
    assert np.mean(out.argmax(1) == ref.argmax(1)) > 0.99


def test_sensitive_ops_stay_float32(zoo_onnx, tmp_path):
    m16 = onnx.shape_inference.infer_shapes(onnx.load(str(to_fp16_onnx(zoo_onnx, tmp_path / "m16.onnx"))))
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(m16.graph.value_info) + list(m16.graph.input)}
    blocked = [n for n in m16.graph.node if n.op_type in DEFAULT_FP32_OPS]
    assert blocked, "the model has ReduceMean (squeeze-excitation) nodes"
    for n in blocked:
        assert types.get(n.input[0]) == TensorProto.FLOAT, f"{n.name} runs in float16"
    convs = [n for n in m16.graph.node if n.op_type == "Conv"]
    assert all(types.get(n.input[0]) == TensorProto.FLOAT16 for n in convs)


def test_output_of_a_blocked_op_stays_float32(tmp_path, rng):
    # The graph ends in Resize, which the converter blocks: keep_io_types must still give float32 out.
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    g = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Softmax", ["c"], ["p"], axis=1),
         helper.make_node("Resize", ["p", "", "scales"], ["logits"], mode="linear")],
        "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 16, 16])], initializer=[w, scales])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    dst = to_fp16_onnx(src, tmp_path / "m16.onnx")
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    out, sess = _run(dst, x)
    assert sess.get_outputs()[0].type == "tensor(float)"
    np.testing.assert_allclose(out, _run(src, x)[0], atol=5e-3)


def test_keep_io_types_false_gives_float16_io(zoo_onnx, tmp_path):
    m16 = onnx.load(str(to_fp16_onnx(zoo_onnx, tmp_path / "m16.onnx", keep_io_types=False)))
    assert m16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16


def test_prepare_fp16_records_parity_in_the_bundle(zoo_onnx, tmp_path):
    labels = ["background", "a", "b", "c", "d"]
    bundle = Bundle.create(tmp_path / "bundle", Manifest(labels=labels, palette=default_palette(5),
                                                          preprocess=Preprocess(size=(64, 64)), input_shape=[1, 3, 64, 64]))
    (bundle.path / "model.onnx").write_bytes(zoo_onnx.read_bytes())
    bundle.add_artifact(Artifact("model.onnx", "onnxruntime", "fp32"))
    bundle.save()
    art = prepare_fp16(bundle.path, frames=2)
    assert art.path == FP16_GRAPH and art.precision == "fp16" and art.backend == "onnxruntime"
    reloaded = Bundle.load(bundle.path)
    (fp16,) = reloaded.find("onnxruntime", "fp16")
    assert fp16.parity["frames"] == 2 and fp16.parity["mask_agreement"] > 0.98
    assert 0 < fp16.parity["max_abs"] < 0.5
    reloaded.verify_artifact(fp16)
    assert reloaded.select("onnxruntime").precision == "fp32"  # the default stays the most accurate


def test_missing_converter_package_is_a_clear_error(zoo_onnx, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxconverter_common", None)
    with pytest.raises(ConversionError, match="pip install onnxconverter-common"):
        to_fp16_onnx(zoo_onnx, tmp_path / "m16.onnx")
    assert not (tmp_path / "m16.onnx").exists()
