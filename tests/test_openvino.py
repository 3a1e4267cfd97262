"""OpenVINO: IR conversion (fp32/fp16/int8 with NNCF), accuracy control on edgeseg's mIoU, the
engine, `auto` choosing it, and the CLI from convert to run and eval. Skips without the
`openvino` extra (pip install 'edgeseg[openvino]')."""
import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

openvino = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'edgeseg[openvino]')")
pytest.importorskip("nncf", reason="NNCF is not installed (pip install 'edgeseg[openvino]')")

from calibration.data import CalibrationWarning  # noqa: E402
from converters.openvino import add_openvino, read_metadata  # noqa: E402
from edgeseg.bundle import Bundle  # noqa: E402
from edgeseg.errors import ConversionError  # noqa: E402
from runtime.engines.base import EngineError  # noqa: E402
from runtime.engines.openvino import OpenVINOEngine  # noqa: E402
from runtime.segmenter import Segmenter  # noqa: E402
from tests.conftest import ROOT  # noqa: E402


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "edgeseg.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ov_bundle(default_bundle, tmp_path_factory):
    """The default model's bundle with an FP32 and an FP16 IR."""
    path = tmp_path_factory.mktemp("openvino") / "b"
    shutil.copytree(default_bundle.path, path)
    add_openvino(path, "fp32")
    add_openvino(path, "fp16")
    return Bundle.load(path)


def test_fp32_ir_matches_onnx_and_carries_the_metadata(ov_bundle):
    art = ov_bundle.select("openvino", "fp32")
    assert art.path == "model.fp32.openvino" and art.sha256
    assert art.parity["max_abs"] < 1e-4 and art.parity["mask_agreement"] == 1.0
    assert art.info["inference_precision"] == "f32"  # not the CPU's bf16 default
    meta = read_metadata(ov_bundle.artifact_path(art) / "model.xml")
    man = ov_bundle.manifest
    assert meta["labels"] == man.labels and meta["palette"] == man.palette
    assert meta["preprocess"] == man.preprocess.to_dict() and meta["output_kind"] == "logits"


def test_fp16_ir_is_smaller_and_agrees(ov_bundle):
    fp32, fp16 = ov_bundle.select("openvino", "fp32"), ov_bundle.select("openvino", "fp16")
    assert fp16.metrics["size_bytes"] < 0.6 * fp32.metrics["size_bytes"]
    assert fp16.parity["mask_agreement"] > 0.999


def test_auto_picks_openvino_on_x86_and_segments(ov_bundle, rng):
    import platform

    seg = Segmenter(ov_bundle)
    if platform.machine() in ("x86_64", "AMD64"):
        assert seg.backend == "openvino", seg.backend_reason
    frame = rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)
    ov = Segmenter(ov_bundle, backend="openvino", threads=1).segment(frame).class_map
    ort = Segmenter(ov_bundle, backend="onnxruntime").segment(frame).class_map
    assert ov.shape == (120, 200) and np.mean(ov == ort) > 0.999


def test_engine_inputs_outputs_and_bad_options(ov_bundle):
    path = ov_bundle.artifact_path(ov_bundle.select("openvino", "fp32"))
    e = OpenVINOEngine(path, device="AUTO", threads=1)
    man = ov_bundle.manifest
    assert e.inputs[0].name == man.input_name and e.inputs[0].shape == tuple(man.input_shape)
    assert e.outputs[0].name == man.output_name
    with pytest.raises(EngineError, match="expects float32"):
        e.infer(np.zeros(man.input_shape, np.float64))
    with pytest.raises(EngineError, match="device must be one of CPU, GPU, NPU, AUTO"):
        OpenVINOEngine(path, device="TPU")
    if "NPU" not in openvino.Core().available_devices:
        with pytest.raises(EngineError, match="finds no NPU device .* use device=CPU or AUTO"):
            OpenVINOEngine(path, device="NPU")
    with pytest.raises(EngineError, match="threads must be a whole number"):
        OpenVINOEngine(path, threads=0)
    with pytest.raises(EngineError, match="OpenVINO IR not found"):
        OpenVINOEngine(path.parent / "missing")
    with pytest.raises(EngineError, match="unknown: spinning"):
        OpenVINOEngine.from_bundle(ov_bundle, spinning=False)


def test_damaged_ir_is_refused(ov_bundle, tmp_path):
    shutil.copytree(ov_bundle.artifact_path(ov_bundle.select("openvino", "fp32")), tmp_path / "ir")
    (tmp_path / "ir" / "model.xml").write_text("<net><garbage")
    with pytest.raises(EngineError, match="OpenVINO cannot load .*damaged"):
        OpenVINOEngine(tmp_path / "ir")


def test_bad_precision_and_missing_calibration(ov_bundle):
    with pytest.raises(ConversionError, match="not available for OpenVINO"):
        add_openvino(ov_bundle.path, "int4")
    with pytest.raises(ConversionError, match="INT8 needs calibration frames"):
        add_openvino(ov_bundle.path, "int8")


def test_int8_within_budget_with_measured_accuracy(ov_bundle, tmp_path):
    path = tmp_path / "b"
    shutil.copytree(ov_bundle.path, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        entry = add_openvino(path, "int8", calib="synthetic:train?n=48", max_images=48, eval_max_images=48)
    m = entry["metrics"]
    assert m["accuracy_measured"] and m["metric"] == "miou" and m["eval_frames"] == 48
    assert m["within_budget"] and abs(m["miou_drop_points"]) < 0.5, m
    assert set(m["per_class_iou_int8"]) == set(ov_bundle.manifest.labels)
    assert m["agreement_with_fp32"] > 0.99 and entry["info"]["quantizers"] > 10
    assert m["size_bytes"] < 0.5 * ov_bundle.select("openvino", "fp32").metrics["size_bytes"]
    b = Bundle.load(path)
    assert b.select("openvino", "int8").metrics["miou_int8"] == m["miou_int8"]
    assert not [p for p in path.iterdir() if p.name.startswith(".")]  # no staging left behind


def _tiny_bundle(out):
    import torch
    from torch import nn

    from converters.onnx import convert

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 3, 1)).eval()
    return convert(net, out, labels=["a", "b", "c"], input_size=(32, 32), parity_frames=2)


def test_accuracy_control_returns_layers_to_float(tmp_path):
    """Frames without labels: INT8 is scored against the FP32 class maps. With half the drop of the
    all-INT8 model as the budget, NNCF's accuracy control must return layers to float, and the
    shipped IR, measured again by the engine, must meet it."""
    bundle = _tiny_bundle(tmp_path / "tiny")
    frames = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        plain = add_openvino(bundle.path, "int8", calib=frames, max_images=16, max_miou_drop=100)["metrics"]
        drop = plain["miou_drop_points"]
        assert plain["metric"] == "miou_vs_fp32" and plain["eval_frames"] == 24 and drop > 0 and not plain["float_layers"]
        entry = add_openvino(bundle.path, "int8", calib=frames, max_images=16, max_miou_drop=drop / 2)
    m = entry["metrics"]
    assert entry["info"]["method"] == "nncf.quantize_with_accuracy_control"
    assert m["miou_drop_points_all_layers_int8"] == pytest.approx(drop)
    assert m["float_layers"] and m["within_budget"] and m["miou_drop_points"] <= drop / 2, m


@pytest.mark.parametrize("budget, message", [("-1", "must be >= 0"), ("x", "argument --max-miou-drop")])
def test_cli_rejects_a_bad_budget(ov_bundle, budget, message):
    r = run_cli("calibrate", str(ov_bundle.path), "--data", "synthetic:train", "--target", "openvino", "--max-miou-drop", budget)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_cli_convert_run_eval(tmp_path, capsys):
    """The issue's path, in this process: convert the default model to an INT8 IR, stream it with
    OpenVINO (chosen by auto), evaluate it against FP32."""
    from edgeseg.cli import main

    out = tmp_path / "b"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        assert main(["convert", "default", "--to", "openvino", "--precision", "int8", "--calib", "synthetic:train?n=64",
                     "--eval-data", "synthetic:test?n=50", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model.int8.openvino" in printed and "pts vs FP32" in printed
    assert main(["run", str(out), "--source", "synthetic://?frames=8", "--stats-json", str(tmp_path / "s.json")]) == 0
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["info"]["backend"] == "openvino" and stats["info"]["precision"] == "int8"
    assert main(["eval", str(out), "--data", "synthetic:test?n=40", "--json", str(tmp_path / "e.json")]) == 0
    rows = {(x["backend"], x["precision"]): x for x in json.loads((tmp_path / "e.json").read_text())["results"]}
    assert abs(rows[("openvino", "int8")]["miou_drop_points"]) < 0.5, rows
    assert rows[("openvino", "int8")]["agreement_with_fp32"] > 0.99
