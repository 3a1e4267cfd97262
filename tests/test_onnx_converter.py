import json

import numpy as np
import onnx
import pytest
import torch

from converters.onnx import convert, export_onnx, load_source
from converters.parity import check_parity
from edgeseg.bundle import Bundle
from edgeseg.errors import ConversionError
from edgeseg.spec import Preprocess


def test_default_model_bundle_parity(default_bundle):
    m = default_bundle.manifest
    art = default_bundle.select("onnxruntime", "fp32")
    assert m.labels == ["background", "ball", "box", "triangle", "star"]
    assert m.input_shape == [1, 3, 256, 256] and m.output_kind == "logits"
    assert art.parity["frames"] == 8
    assert art.parity["max_abs"] < 1e-3, art.parity
    assert art.parity["min_mask_agreement"] > 0.999, art.parity
    g = onnx.load(str(default_bundle.artifact_path(art)))
    meta = json.loads({p.key: p.value for p in g.metadata_props}["edgeseg"])
    assert meta["labels"] == m.labels and meta["preprocess"]["size"] == [256, 256]


def test_dynamic_uint8_argmax_graph(tmp_path, default_model):
    model, ckpt = default_model
    b = convert(str(_save(tmp_path, model, ckpt)), tmp_path / "b", dynamic=True, fold_normalization=True, argmax=True)
    m = b.manifest
    assert m.output_kind == "mask" and m.preprocess.dtype == "uint8"
    assert m.input_shape[2:] == ["height", "width"]
    assert b.select("onnxruntime").parity["mask_agreement"] > 0.999
    # other sizes run, and agree with torch at that size too
    pre = m.preprocess.replace(size=(192, 320))
    from edgeseg.data.synthetic import SyntheticScenes

    frame = SyntheticScenes(size=(200, 300), length=1, split="test")[0][0]
    from runtime.engines.onnxruntime import OnnxRuntimeEngine

    out = OnnxRuntimeEngine(b.artifact_path(b.select("onnxruntime"))).infer(pre.apply(frame))["mask"]
    assert out.shape == (1, 192, 320) and out.dtype == np.uint8
    with torch.no_grad():
        ref = model(torch.from_numpy(pre.replace(dtype="float32").apply(frame))).argmax(1).numpy()
    assert np.mean(ref == out) > 0.999


def _save(tmp_path, model, ckpt):
    from edgeseg.models import save_checkpoint

    return save_checkpoint(model, tmp_path / "ckpt.pt", labels=ckpt["labels"], palette=ckpt["palette"],
                           preprocess=Preprocess.from_dict(ckpt["preprocess"]))


def test_third_party_architecture_falls_back_to_dynamo(tmp_path):
    """Adaptive pooling to bins 3 and 6 of a 10x10 map defeats the TorchScript exporter."""
    from tests import thirdparty

    b = convert(thirdparty.make(), tmp_path / "psp", input_size=(80, 80), labels=["a", "b", "c", "d"])
    export = b.manifest.model["export"]
    assert export["exporter"] == "dynamo", export
    assert any("torchscript" in e for e in export["exporter_errors"])
    p = b.select("onnxruntime").parity
    assert p["max_abs"] < 1e-3 and p["mask_agreement"] > 0.999, p


def test_factory_torchscript_and_onnx_sources(tmp_path):
    src = load_source("tests.thirdparty:make", input_size=(96, 96))
    assert src.model is not None and len(src.labels) == 4
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1)).eval()
    ts = tmp_path / "net.torchscript"
    torch.jit.trace(net, torch.zeros(1, 3, 32, 32)).save(str(ts))
    b = convert(ts, tmp_path / "ts", input_size=(32, 32))
    assert b.manifest.model["torchscript"] == ts.name and b.manifest.num_classes == 3
    # an ONNX file re-imports with its labels and preprocessing
    b2 = convert(b.artifact_path(b.select("onnxruntime")), tmp_path / "from_onnx")
    assert b2.manifest.labels == b.manifest.labels and b2.manifest.preprocess.size == (32, 32)
    assert b2.select("onnxruntime").parity["max_abs"] < 1e-5


def test_export_is_atomic_on_failure(tmp_path):
    class Broken(torch.nn.Module):  # eigh has no ONNX translation
        def forward(self, x):
            m = x[0, 0] @ x[0, 0].T
            return torch.linalg.eigh(m).eigenvectors.reshape(1, 1, 8, 8).expand(1, 2, 8, 8)

    with pytest.raises(ConversionError, match="failed with every exporter"):
        export_onnx(Broken(), tmp_path / "m.onnx", preprocess=Preprocess(size=(8, 8)), exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, message", [
    (None, "model file not found"),
    (b"garbage bytes", "cannot read checkpoint"),
])
def test_missing_or_corrupt_model_file(tmp_path, content, message):
    path = tmp_path / "model.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(Exception, match=message) as e:
        load_source(path)
    assert isinstance(e.value, (ConversionError,)) or "ModelError" in type(e.value).__name__


def test_corrupt_onnx_and_unknown_source(tmp_path):
    bad = tmp_path / "m.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ConversionError, match="not a valid ONNX model"):
        load_source(bad)
    with pytest.raises(ConversionError, match="cannot find model"):
        load_source("no_such_thing")
    with pytest.raises(ConversionError, match="cannot import"):
        load_source("no_such_pkg.mod:factory")


def test_out_folder_that_is_not_a_bundle_is_refused(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="not a bundle"):
        convert("tests.thirdparty:make", tmp_path / "docs", input_size=(32, 32))
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"


def test_parity_detects_a_different_model(tmp_path, default_bundle):
    """The check can fail: a model with perturbed weights shows a large error."""
    from edgeseg.models import load_checkpoint
    from edgeseg.train import DEFAULT_CHECKPOINT

    model, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    with torch.no_grad():
        model.high_classifier.bias += 3.0
    p = check_parity(model, default_bundle.artifact_path(default_bundle.select("onnxruntime")), default_bundle.manifest.preprocess, frames=2)
    assert p["max_abs"] > 1.0
    assert isinstance(Bundle.load(default_bundle.path), Bundle)
