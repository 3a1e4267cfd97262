"""INT8 calibration: accuracy before/after on held-out data, mixed precision, TensorRT Q/DQ rules,
the legacy TensorRT cache, and bad input that must leave a bundle untouched."""
from __future__ import annotations

import json
import shutil
import struct
import warnings
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration import CalibrationError, CalibrationSet, CalibrationWarning, calibrate_bundle
from calibration.cache import read_trt_cache, scale_hex, scales_from_ranges, trt_version_code, write_trt_cache
from calibration.data import sample_indices
from calibration.evaluate import evaluate_bundle, evaluate_checkpoint
from calibration.quantize import validate_tensorrt_qdq
from edgeseg.bundle import Artifact, Bundle, Manifest, default_palette
from edgeseg.data.synthetic import SyntheticScenes
from edgeseg.spec import Preprocess
from tests.conftest import outlier_model

BUDGET = 0.5  # mIoU points
CALIB = "synthetic:train?n=64"  # calibration split
HELD_OUT = "synthetic:test?n=48"  # evaluation split: never seen by calibration


def snapshot(path: Path) -> tuple[bytes, list[str]]:
    """The manifest bytes and every entry of the folder (hidden ones included)."""
    return (path / "manifest.json").read_bytes(), sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def bundle_copy(default_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(default_bundle.path, dst)
    return dst


@pytest.fixture(scope="module")
def calibrated(default_bundle, tmp_path_factory):
    """The default model calibrated for both targets. Percentile ranges: ONNX Runtime's entropy search
    costs about a minute of Python per model whatever the frame count, too slow for the test run."""
    dst = tmp_path_factory.mktemp("calibrated") / "bundle"
    shutil.copytree(default_bundle.path, dst)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)  # 64 frames: the "fewer than 100" advice
        summary = calibrate_bundle(dst, CALIB, method="percentile", target="both", eval_data=HELD_OUT, max_images=64,
                                   sensitivity=False)
    return dst, summary


# -- the default model ------------------------------------------------------------------------
def test_default_model_int8_keeps_accuracy_on_held_out_data(calibrated):
    path, summary = calibrated
    bundle = Bundle.load(path)
    assert summary["evaluation"]["data"].startswith("synthetic:test")
    fp32_miou = summary["fp32"]["miou"]
    assert fp32_miou > 0.3, f"the default model should segment the synthetic scenes (mIoU {fp32_miou:.3f})"
    for target in ("tensorrt", "cpu"):
        art = bundle.find("onnxruntime", "int8", target)
        assert len(art) == 1, f"no {target} artifact in {[a.path for a in bundle.manifest.artifacts]}"
        m = art[0].metrics
        assert m["accuracy_measured"] and m["metric"] == "miou"
        assert m["miou_drop_points"] <= BUDGET, f"{target}: INT8 lost {m['miou_drop_points']:.2f} mIoU points"
        assert m["within_budget"] is True
        assert set(m["per_class_iou_int8"]) == set(bundle.manifest.labels)
        bundle.verify_artifact(art[0])
    # the recorded figures are those of the shipped files, run again in ONNX Runtime
    result = evaluate_bundle(bundle, HELD_OUT, max_images=None)
    rows = {r["target"] or r["precision"]: r for r in result["results"]}
    assert rows["fp32"]["miou"] == pytest.approx(fp32_miou, abs=1e-9)
    for target in ("tensorrt", "cpu"):
        art = bundle.find("onnxruntime", "int8", target)[0]
        assert rows[target]["miou"] == pytest.approx(art.metrics["miou_int8"], abs=1e-9)
        assert rows[target]["miou_drop_points"] <= BUDGET
        assert rows[target]["agreement_with_fp32"] == pytest.approx(art.metrics["agreement_with_fp32"], abs=1e-9)


def test_tensorrt_graph_follows_tensorrt_rules(calibrated):
    path, summary = calibrated
    q = onnx.load(str(path / "model.int8.tensorrt.onnx"))
    assert validate_tensorrt_qdq(q) == []
    assert summary["targets"]["tensorrt"]["validator"] == "passed"
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    # the cpu preset is a different layout (uint8 activations), which the validator must reject
    rules = {v.rule for v in validate_tensorrt_qdq(str(path / "model.int8.cpu.onnx"))}
    assert {"uint8", "zero_point", "int32_bias"} <= rules


def test_report_and_legacy_cache_come_from_the_same_ranges(calibrated):
    path, summary = calibrated
    report = json.loads((path / "quant_report.json").read_text())
    assert set(report["targets"]) == {"tensorrt", "cpu"}
    assert report["calibration"]["frames"] == 64
    assert (path / "quant_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header, scales = read_trt_cache(path / "calibration.cache")
    assert header == f"TRT-{trt_version_code(summary['trt_calibration_cache']['trt_version'])}-EntropyCalibration2"
    fp32 = onnx.load(str(path / "model.onnx"))
    conv_outputs = [n.output[0] for n in fp32.graph.node if n.op_type == "Conv"]
    assert "input" in scales and all(o in scales for o in conv_outputs)
    # the TensorRT Q/DQ graph quantizes its input with the scale the cache gives TensorRT 8/10
    q = onnx.load(str(path / "model.int8.tensorrt.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    qin = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    assert float(inits[qin.input[1]]) == pytest.approx(scales["input"], rel=1e-6)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["metrics"]["quantization"]["trt_calibration_cache"] == "calibration.cache"


def test_eval_cli_scores_every_artifact(calibrated, tmp_path, capsys):
    from edgeseg.cli import main

    path, _ = calibrated
    out = tmp_path / "eval.json"
    assert main(["eval", str(path), "--data", "synthetic:val?n=8", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "per-class IoU" in printed and "int8" in printed
    result = json.loads(out.read_text())
    assert {r["precision"] for r in result["results"]} == {"fp32", "int8"}
    assert len(result["results"]) == 3


def test_checkpoint_and_bundle_evaluate_alike(default_bundle):
    from edgeseg.train import DEFAULT_CHECKPOINT

    torch_result = evaluate_checkpoint(DEFAULT_CHECKPOINT, "synthetic:val?n=6")
    onnx_result = evaluate_bundle(default_bundle, "synthetic:val?n=6")
    assert torch_result["results"][0]["miou"] == pytest.approx(onnx_result["results"][0]["miou"], abs=2e-3)


# -- mixed precision on a model with outlier activations -------------------------------------------
def test_mixed_precision_repairs_an_outlier_layer(default_model, tmp_path):
    import torch

    from converters.onnx import convert

    model, channel = outlier_model(default_model)
    pre = Preprocess.from_dict(default_model[1]["preprocess"])
    x = torch.from_numpy(pre.apply(SyntheticScenes(size=pre.size, length=1, split="test")[0][0]))
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), default_model[0](x).numpy(), atol=1e-3)  # same function
    bundle = convert(model, tmp_path / "outlier", labels=default_model[1]["labels"], preprocess=pre)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        summary = calibrate_bundle(bundle.path, CALIB, method="minmax", target="tensorrt", eval_data=HELD_OUT,
                                   max_images=64, max_miou_drop=BUDGET, sensitivity_frames=8)
    t = summary["targets"]["tensorrt"]
    # plain per-tensor min-max INT8 loses more than 2 points ...
    assert t["drop_points_all_int8"] > 2.0, t
    # ... and keeping the fewest sensitive layers in float brings it back within the budget
    assert t["drop_points"] <= BUDGET, t
    assert t["within_budget"] is True
    assert 1 <= len(t["float_layers"]) < t["quantized_layers"] // 4
    assert any("high_classifier" in n or "cbr" in n for n in t["float_layers"]), t["float_layers"]
    art = Bundle.load(bundle.path).find("onnxruntime", "int8", "tensorrt")[0]
    assert art.metrics["float_layers"] == t["float_layers"]
    assert art.metrics["miou_drop_points_all_layers_int8"] > 2.0
    report = json.loads((bundle.path / "quant_report.json").read_text())["targets"]["tensorrt"]
    assert len(report["sensitivity"]) == t["quantized_layers"]
    for f in report["float_layers"]:
        assert "quantized alone" in f["reason"] and f["drop_points_if_quantized"] is not None
    # the mixed-precision graph is still a valid TensorRT Q/DQ graph
    assert validate_tensorrt_qdq(str(bundle.path / "model.int8.tensorrt.onnx")) == []


# -- the TensorRT validator on hand-built graphs ---------------------------------------------------
def _qdq_conv_graph(*, zp_dtype=TensorProto.INT8, zp_value=0, per_channel=True, int32_bias=False,
                    dynamic_scale=False, opset=17) -> onnx.ModelProto:
    """input -> Q -> DQ -> Conv(weight DQ, bias) -> output, with knobs for each TensorRT rule."""
    cout, cin = 4, 3
    np_zp = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8}[zp_dtype]
    w = np.random.default_rng(0).integers(-100, 100, (cout, cin, 3, 3)).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(zp_value, np_zp), "x_zp"),
        numpy_helper.from_array(w, "w_q"),
        numpy_helper.from_array(np.full(cout if per_channel else 1, 0.01, np.float32).reshape(-1 if per_channel else ()), "w_scale"),
        numpy_helper.from_array(np.zeros(cout if per_channel else (), np.int8), "w_zp"),
    ]
    nodes = []
    scale_name = "x_scale"
    if dynamic_scale:
        nodes.append(helper.make_node("ReduceMax", ["input"], ["dyn_scale"], name="scale_from_data", keepdims=0))
        scale_name = "dyn_scale"
    nodes += [
        helper.make_node("QuantizeLinear", ["input", scale_name, "x_zp"], ["x_q"], name="q_input"),
        helper.make_node("DequantizeLinear", ["x_q", scale_name, "x_zp"], ["x_dq"], name="dq_input"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="dq_weight",
                         **({"axis": 0} if per_channel else {})),
    ]
    conv_inputs = ["x_dq", "w_dq"]
    if int32_bias:
        inits += [numpy_helper.from_array(np.zeros(cout, np.int32), "b_q"),
                  numpy_helper.from_array(np.full(cout, 0.0002, np.float32), "b_scale")]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_scale"], ["b_dq"], name="dq_bias", axis=0))
        conv_inputs.append("b_dq")
    nodes.append(helper.make_node("Conv", conv_inputs, ["output"], name="conv", pads=[1, 1, 1, 1]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, cin, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, cout, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_validator_passes_a_tensorrt_graph_and_names_each_violation():
    good = _qdq_conv_graph()
    onnx.checker.check_model(good)
    assert validate_tensorrt_qdq(good) == []

    found = {(v.node, v.rule) for v in validate_tensorrt_qdq(_qdq_conv_graph(zp_dtype=TensorProto.UINT8, zp_value=128))}
    assert {("q_input", "uint8"), ("q_input", "zero_point"), ("dq_input", "uint8"), ("dq_input", "zero_point")} <= found
    found = {(v.node, v.rule) for v in validate_tensorrt_qdq(_qdq_conv_graph(per_channel=False))}
    assert ("dq_weight", "per_tensor_weight") in found
    found = {(v.node, v.rule) for v in validate_tensorrt_qdq(_qdq_conv_graph(int32_bias=True))}
    assert ("dq_bias", "int32_bias") in found
    found = {(v.node, v.rule) for v in validate_tensorrt_qdq(_qdq_conv_graph(dynamic_scale=True))}
    assert {("q_input", "dynamic_scale"), ("dq_input", "dynamic_scale")} <= found
    found = {(v.node, v.rule) for v in validate_tensorrt_qdq(_qdq_conv_graph(opset=12))}
    assert ("<model>", "opset") in found
    # every message says which node and what to do
    v = validate_tensorrt_qdq(_qdq_conv_graph(per_channel=False))[0]
    assert "dq_weight" in str(v) and "per-channel" in v.message


# -- the legacy TensorRT cache ---------------------------------------------------------------------------
def test_legacy_cache_format(tmp_path):
    from onnxruntime.quantization import CalibrationMethod, TensorsData

    # TensorRT's encoding: big-endian float32 bits; 1/127 (amax 1.0) is 3c010204, 1.0 is 3f800000
    assert scale_hex(1 / 127) == "3c010204" and scale_hex(1.0) == "3f800000"
    assert trt_version_code("8.6.1") == 8601 and trt_version_code("10.3.0") == 100300 and trt_version_code("7.2") == 7200
    with pytest.raises(CalibrationError, match="Q/DQ"):
        trt_version_code("11.0")
    ranges = TensorsData(CalibrationMethod.MinMax, {
        "input": (np.array(-2.0, np.float32), np.array(1.0, np.float32)),
        "/stem/Conv_output_0": (np.array(0.0, np.float32), np.array(127.0, np.float32)),
        "dead": (np.array(0.0, np.float32), np.array(0.0, np.float32)),
    })
    scales = scales_from_ranges(ranges)
    assert scales["input"] == pytest.approx(2.0 / 127) and scales["/stem/Conv_output_0"] == pytest.approx(1.0)
    assert scales["dead"] > 0
    info = write_trt_cache(tmp_path / "c.cache", scales, trt_version="8.6.1")
    text = (tmp_path / "c.cache").read_text().splitlines()
    assert text[0] == "TRT-8601-EntropyCalibration2" == info["header"]
    assert "/stem/Conv_output_0: 3f800000" in text
    line = next(l for l in text if l.startswith("input: "))
    assert struct.unpack(">f", bytes.fromhex(line.split(": ")[1]))[0] == pytest.approx(2.0 / 127, rel=1e-7)
    header, back = read_trt_cache(tmp_path / "c.cache")
    assert back == pytest.approx(scales, rel=1e-7)


# -- calibration frames ------------------------------------------------------------------------
def _write_frames(folder: Path, n: int, size=(48, 64), channels: int = 3, dtype=np.uint8) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    scenes = SyntheticScenes(size=size, length=n, split="train")
    paths = []
    for i in range(n):
        img = scenes[i][0]
        if channels == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2BGRA)
        elif channels == 1:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        if dtype == np.uint16:
            img = img.astype(np.uint16) * 257
        p = folder / f"frame_{i:03d}.png"
        cv2.imwrite(str(p), img)
        paths.append(p)
    return paths


def test_calibration_set_is_deterministic_spread_and_uses_the_runtime_preprocessing(tmp_path):
    pre = Preprocess(size=(32, 32))
    files = _write_frames(tmp_path / "frames", 30)
    with pytest.warns(CalibrationWarning, match="fewer than 100"):
        a = CalibrationSet(tmp_path / "frames", pre, max_images=10)
    with pytest.warns(CalibrationWarning):
        b = CalibrationSet(tmp_path / "frames", pre, max_images=10)
    assert len(a) == 10 and a.indices == b.indices == sample_indices(30, 10)
    assert a.indices[0] < 3 and a.indices[-1] > 26  # spread over the whole folder
    np.testing.assert_array_equal(a.inputs[0], pre.apply(cv2.imread(str(files[a.indices[0]]))))
    batch = a.get_next()
    assert set(batch) == {"input"} and batch["input"].shape == (1, 3, 32, 32)
    a.set_range(8, 20)
    assert sum(1 for _ in iter(a.get_next, None)) == 2
    # a video: frames spread from start to end, read with OpenCV
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for img in (cv2.imread(str(f)) for f in files):
        writer.write(img)
    writer.release()
    with pytest.warns(CalibrationWarning):
        v = CalibrationSet(video, pre, max_images=6)
    assert len(v) == 6 and v.names[0].endswith("#2") and v.names[-1].endswith("#27")
    # arrays
    frames = np.stack([cv2.imread(str(f)) for f in files[:5]])
    with pytest.warns(CalibrationWarning):
        arr = CalibrationSet(frames, pre, max_images=512)
    assert len(arr) == 5


# -- bad input leaves the bundle as it was -------------------------------------------------------------
@pytest.mark.parametrize("case", ["empty", "corrupt", "missing", "rgba", "gray", "16bit"])
def test_bad_calibration_frames_are_clear_errors_and_change_nothing(bundle_copy, tmp_path, case):
    folder = tmp_path / "frames"
    if case == "empty":
        folder.mkdir()
        expect = "no images"
    elif case == "corrupt":
        _write_frames(folder, 3)
        (folder / "frame_001.png").write_bytes(b"not a png at all")
        expect = "frame_001.png"
    elif case == "missing":
        folder = tmp_path / "nowhere"
        expect = "not found"
    elif case == "rgba":
        _write_frames(folder, 3, channels=4)
        expect = "4 channels"
    elif case == "gray":
        _write_frames(folder, 3, channels=1)
        expect = "1 channel"
    else:
        _write_frames(folder, 3, dtype=np.uint16)
        expect = "uint16"
    before = snapshot(bundle_copy)
    with pytest.raises(CalibrationError, match=expect) as err:
        calibrate_bundle(bundle_copy, folder, target="both", eval_data=HELD_OUT)
    if case in ("corrupt", "rgba", "gray", "16bit"):
        assert "frame_00" in str(err.value)  # the message names the file
    assert snapshot(bundle_copy) == before


def test_calibrating_and_evaluating_on_the_same_data_is_refused(bundle_copy):
    before = snapshot(bundle_copy)
    with pytest.raises(CalibrationError, match="held-out"):
        calibrate_bundle(bundle_copy, "synthetic:test?n=8", eval_data="synthetic:test?n=16")
    with pytest.raises(CalibrationError, match="held-out"), warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        # same frames under different spellings: caught by content
        calibrate_bundle(bundle_copy, "synthetic:val?n=8", eval_data="synthetic:val?n=8&seed=0")
    assert snapshot(bundle_copy) == before


def test_model_without_quantizable_layers_is_refused(tmp_path):
    """A graph of element-wise ops only: INT8 would add conversions and nothing else."""
    path = tmp_path / "elementwise"
    path.mkdir()
    inits = [numpy_helper.from_array(np.full((1, 3, 1, 1), 2.0, np.float32), "k")]
    nodes = [helper.make_node("Mul", ["input", "k"], ["m"], name="mul"), helper.make_node("Relu", ["m"], ["logits"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 16, 16])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path / "model.onnx"))
    labels = ["a", "b", "c"]
    bundle = Bundle.create(path, Manifest(labels=labels, palette=default_palette(3), preprocess=Preprocess(size=(16, 16)),
                                          input_shape=[1, 3, 16, 16], output_shape=[1, 3, 16, 16]))
    bundle.add_artifact(Artifact("model.onnx", "onnxruntime", "fp32"))
    bundle.save()
    before = snapshot(path)
    with pytest.raises(CalibrationError, match="no layer INT8 can compute"):
        calibrate_bundle(path, "synthetic:train?n=4")
    assert snapshot(path) == before


def test_cli_reports_user_errors_with_status_2(bundle_copy, tmp_path, capsys):
    from edgeseg.cli import main

    (tmp_path / "empty").mkdir()
    before = snapshot(bundle_copy)
    assert main(["calibrate", str(bundle_copy), "--data", str(tmp_path / "empty")]) == 2
    assert "no images in calibration folder" in capsys.readouterr().err
    assert snapshot(bundle_copy) == before


# -- no held-out data given: a share of the calibration frames is held out ----------------------------
def _tiny_bundle(path: Path) -> Path:
    import torch
    from torch import nn

    from converters.onnx import convert

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1)).eval()
    return convert(net, path, labels=["a", "b", "c"], input_size=(32, 32), parity_frames=2).path


def test_without_eval_data_frames_are_held_out_and_measured(tmp_path):
    path = _tiny_bundle(tmp_path / "tiny")
    frames = tmp_path / "frames"
    _write_frames(frames, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        summary = calibrate_bundle(path, frames, target="cpu", sensitivity=False, max_miou_drop=100)
    ev = summary["evaluation"]
    assert summary["calibration"]["frames"] == 24 and ev["frames"] == 16 and not ev["labelled"]
    assert ev["split"].startswith("held out from the calibration frames (16 of 40")
    t = summary["targets"]["cpu"]
    assert set(t["method_trials"]) == {"minmax", "percentile", "entropy"}  # chosen by measurement
    best = min(t["method_trials"].values(), key=lambda r: r["miou_drop_points"])
    assert t["method_trials"][t["method"]]["miou_drop_points"] == best["miou_drop_points"]
    assert t["within_budget"] is True and t["agreement_with_fp32"] is not None
    report = json.loads((path / "quant_report.json").read_text())
    assert report["evaluation"]["frames"] == 16 and report["calibration"]["held_out_frames"] == 16
    held, used = set(report["evaluation"]["first_frames"]), set(report["calibration"]["first_frames"])
    assert held and not held & used
    # a budget of 0 is enforced on the held-out frames: the float-layer search runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        strict = calibrate_bundle(path, frames, method="minmax", target="cpu", sensitivity=False, max_miou_drop=0.0)
    s = strict["targets"]["cpu"]
    assert s["method"] == "minmax" and s["method_trials"] == {}
    assert s["drop_points_all_int8"] > 0 and (s["float_layers"] or s["within_budget"] is False), s


def test_too_few_frames_to_calibrate_and_measure_is_refused(tmp_path):
    path = _tiny_bundle(tmp_path / "tiny")
    frames = tmp_path / "frames"
    _write_frames(frames, 20)
    before = snapshot(path)
    with pytest.raises(CalibrationError, match=r"20 frames are too few .* give at least 32 frames .*eval_data"):
        calibrate_bundle(path, frames, target="cpu")
    assert snapshot(path) == before
