"""LiteRT: .tflite through litert-torch (fp32), fp16 weights and full-integer INT8 through the LiteRT
quantizer, metadata in the model, the interpreter engine, and the CLI from convert to run and
eval. Skips without the `litert` extra (pip install 'edgeseg[litert]')."""
import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert", reason="the LiteRT interpreter is not installed (pip install 'edgeseg[litert]')")
pytest.importorskip("ai_edge_quantizer", reason="the LiteRT quantizer is not installed (pip install 'edgeseg[litert]')")
pytest.importorskip("litert_torch", reason="litert-torch is not installed (pip install 'edgeseg[litert]')")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from calibration.data import CalibrationWarning  # noqa: E402
from converters.litert import add_litert, quantize_litert, read_metadata  # noqa: E402
from converters.onnx import convert  # noqa: E402
from edgeseg.bundle import Bundle  # noqa: E402
from edgeseg.errors import ConversionError  # noqa: E402
from runtime.engines.base import EngineError  # noqa: E402
from runtime.engines.litert import LiteRTEngine  # noqa: E402
from runtime.segmenter import Segmenter  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

LABELS = ["background", "ball", "box", "triangle", "star"]  # the synthetic scenes' classes


def run_cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "edgeseg.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, len(LABELS), 1),
                         nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)).eval()


@pytest.fixture(scope="module")
def lt_bundle(tmp_path_factory):
    """A small network's bundle with model.fp32.tflite and model.int8.tflite (calibrated on
    labelled synthetic frames, so the INT8 accuracy is measured)."""
    net = small_net()
    bundle = convert(net, tmp_path_factory.mktemp("litert") / "b", labels=LABELS, input_size=(48, 48), parity_frames=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        add_litert(bundle, net, "int8", calib="synthetic:train?n=24", eval_data="synthetic:test?n=16",
                   max_images=24, eval_max_images=16)
    return Bundle.load(bundle.path)


def test_fp32_model_matches_onnx_with_the_manifest_names(lt_bundle):
    art = lt_bundle.select("litert", "fp32")
    man = lt_bundle.manifest
    assert art.path == "model.fp32.tflite" and art.parity["max_abs"] < 1e-4 and art.parity["mask_agreement"] == 1.0
    assert art.info["signature"] == "serving_default" and art.info["input"] == man.input_name
    assert art.info["outputs"] == [man.output_name]
    e = LiteRTEngine(lt_bundle.artifact_path(art), threads=1)
    assert e.inputs[0].name == man.input_name and e.inputs[0].shape == tuple(man.input_shape)
    assert e.outputs[0].name == man.output_name and e.outputs[0].shape == tuple(man.output_shape)


def test_metadata_in_the_model(lt_bundle):
    man = lt_bundle.manifest
    for precision in ("fp32", "int8"):
        meta = read_metadata(lt_bundle.artifact_path(lt_bundle.select("litert", precision)))
        assert meta["labels"] == LABELS and meta["palette"] == man.palette
        assert meta["preprocess"] == man.preprocess.to_dict() and meta["input"] == man.input_name


def test_int8_is_full_integer_and_measured(lt_bundle):
    from ai_edge_litert.interpreter import Interpreter

    art = lt_bundle.select("litert", "int8")
    it = Interpreter(model_path=str(lt_bundle.artifact_path(art)))
    assert it.get_input_details()[0]["dtype"] == np.int8 and it.get_output_details()[0]["dtype"] == np.int8
    q = art.info["input_quantization"]
    assert q["scale"] > 0 and -128 <= q["zero_point"] <= 127
    m = art.metrics
    assert m["accuracy_measured"] and m["metric"] == "miou" and m["eval_frames"] == 16
    assert set(m["per_class_iou_int8"]) == set(LABELS) and 0 <= m["agreement_with_fp32"] <= 1
    assert isinstance(m["within_budget"], bool)
    # the engine hides the integer interface: float in, float out, close to FP32
    e = LiteRTEngine(lt_bundle.artifact_path(art), threads=1)
    assert e.inputs[0].dtype == np.float32 and e.outputs[0].dtype == np.float32
    assert art.parity["mask_agreement"] > 0.9


def test_fp16_weights(lt_bundle, tmp_path):
    path = tmp_path / "b"
    shutil.copytree(lt_bundle.path, path)
    entry = quantize_litert(path, "fp16")
    fp32 = Bundle.load(path).select("litert", "fp32")
    assert entry["artifact"] == "model.fp16.tflite" and entry["parity"]["mask_agreement"] > 0.999
    assert entry["metrics"]["size_bytes"] < fp32.metrics["size_bytes"]


def test_segmenter_streams_with_litert(lt_bundle, rng):
    frame = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    lt = Segmenter(lt_bundle, backend="litert", precision="fp32", threads=1)
    assert lt.backend == "litert" and lt.precision == "fp32"
    ort = Segmenter(lt_bundle, backend="onnxruntime")
    assert np.mean(lt.segment(frame).class_map == ort.segment(frame).class_map) > 0.999
    assert Segmenter(lt_bundle).backend != "litert"  # auto ranks LiteRT last: ONNX Runtime is there


def test_engine_errors(lt_bundle, tmp_path):
    path = lt_bundle.artifact_path(lt_bundle.select("litert", "fp32"))
    e = LiteRTEngine(path)
    with pytest.raises(EngineError, match="expects float32"):
        e.infer(np.zeros(lt_bundle.manifest.input_shape, np.float64))
    with pytest.raises(EngineError, match="threads must be a whole number"):
        LiteRTEngine(path, threads=0)
    with pytest.raises(EngineError, match="LiteRT model not found"):
        LiteRTEngine(tmp_path / "missing.tflite")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00" * 256)
    with pytest.raises(EngineError, match="LiteRT cannot load .*not a LiteRT model"):
        LiteRTEngine(bad)
    with pytest.raises(EngineError, match="unknown: device"):
        LiteRTEngine.from_bundle(lt_bundle, device="GPU")


def test_conversion_errors(lt_bundle, default_bundle, tmp_path):
    with pytest.raises(ConversionError, match="starts from the PyTorch network"):
        add_litert(lt_bundle.path, None)
    with pytest.raises(ConversionError, match="not available for LiteRT"):
        add_litert(lt_bundle.path, small_net(), "int4")
    with pytest.raises(ConversionError, match="INT8 needs calibration frames"):
        add_litert(lt_bundle.path, small_net(), "int8")
    b = tmp_path / "onnx-only"
    shutil.copytree(default_bundle.path, b)
    with pytest.raises(ConversionError, match="no LiteRT FP32 model to quantize.*--to litert"):
        quantize_litert(b, "int8", calib="synthetic:train?n=4")
    onnx_file = default_bundle.artifact_path(default_bundle.select("onnxruntime", "fp32"))
    r = run_cli("convert", str(onnx_file), "--to", "litert", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "starts from the PyTorch network" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("convert", "default", "--to", "litert", "--dynamic", "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "--dynamic does not apply to --to litert" in r.stderr


def test_cli_convert_run_eval(tmp_path, capsys):
    """The issue's path, in this process (litert-torch is imported once) on the small network: convert
    to a full-integer .tflite, stream it with LiteRT, evaluate every artifact against FP32. The
    default model's INT8 accuracy through this path is what benchmarks/engines_cpu.py reports."""
    from edgeseg.cli import main

    out = tmp_path / "b"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        assert main(["convert", "tests.test_litert:small_net", "--input-size", "48", "48", "--labels", ",".join(LABELS),
                     "--to", "litert", "--precision", "int8", "--calib", "synthetic:train?n=16",
                     "--eval-data", "synthetic:test?n=16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model.fp32.tflite" in printed and "model.int8.tflite" in printed and "pts vs FP32" in printed
    assert main(["run", str(out), "--source", "synthetic://?frames=8", "--backend", "litert", "--precision", "int8",
                 "--stats-json", str(tmp_path / "s.json")]) == 0
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["info"]["backend"] == "litert" and stats["info"]["precision"] == "int8" and stats["frames_out"] == 8
    assert main(["eval", str(out), "--data", "synthetic:test?n=16", "--json", str(tmp_path / "e.json")]) == 0
    rows = {(x["backend"], x["precision"]): x for x in json.loads((tmp_path / "e.json").read_text())["results"]}
    assert rows[("litert", "fp32")]["agreement_with_fp32"] > 0.9999
    assert rows[("litert", "int8")]["agreement_with_fp32"] > 0.9 and "per_class_iou" in rows[("litert", "int8")]


def test_int8_with_operators_left_in_float(lt_bundle, tmp_path):
    path = tmp_path / "b"
    shutil.copytree(lt_bundle.path, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        with pytest.raises(ConversionError, match="unknown LiteRT operator 'HARDSWISH'.*HARD_SWISH"):
            quantize_litert(path, "int8", calib="synthetic:train?n=8", max_images=8, float_ops=("HARDSWISH",))
        entry = quantize_litert(path, "int8", calib="synthetic:train?n=8", max_images=8, eval_max_images=8,
                                float_ops=("RESIZE_BILINEAR",))
    assert entry["info"]["float_ops"] == ["RESIZE_BILINEAR"] and "in float" in entry["info"]["recipe"]
    assert entry["parity"]["mask_agreement"] > 0.9
