import json
import re

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


@pytest.mark.parametrize("factory, failure", [
    ("make_baked", r"batch 1 at 32x32: disagrees with the reference: mask agreement"),
    ("make_constant_reshape", r"batch 1 at 32x32: Fail: .*Reshape.*cannot be reshaped"),
])
def test_dynamic_export_that_holds_only_at_its_export_size_is_refused(tmp_path, factory, failure):
    from tests import thirdparty

    with pytest.raises(ConversionError) as e:
        convert(getattr(thirdparty, factory)(), tmp_path / "b", dynamic=True, input_size=(64, 64), labels=["a", "b", "c"])
    msg = str(e.value)
    assert "does not hold at every size" in msg and re.search(failure, msg), msg
    # every size is listed, the export size among them (it passes there)
    for size in ("batch 1 at 64x64: ok", "batch 1 at 32x32", "batch 1 at 96x96", "batch 1 at 64x96", "batch 2 at 64x64"):
        assert size in msg, msg
    assert "export at the one size you deploy" in msg
    assert "[ONNXRuntimeError]" not in msg and "onnxruntime_src" not in msg  # the cause, not the C++ location
    assert not (tmp_path / "b").exists()


def test_dynamic_export_that_holds_is_checked_at_every_size(tmp_path):
    from tests import thirdparty

    b = convert(thirdparty.make_global_pooling(), tmp_path / "b", dynamic=True, input_size=(64, 64), labels=list("abcd"))
    checked = b.select("onnxruntime").info["sizes_checked"]
    assert [(r["batch"], tuple(r["size"])) for r in checked] == [(1, (64, 64)), (1, (32, 32)), (1, (96, 96)), (1, (64, 96)), (2, (64, 64))]
    assert all(r["max_abs"] < 1e-3 and r["mask_agreement"] > 0.999 for r in checked), checked


def test_dynamic_sizes():
    from converters.parity import dynamic_sizes

    assert dynamic_sizes((256, 256)) == [(1, 256, 256), (1, 128, 128), (1, 384, 384), (1, 256, 384), (2, 256, 256)]
    assert dynamic_sizes((32, 64)) == [(1, 32, 64), (1, 32, 32), (1, 64, 96), (1, 64, 32), (2, 32, 64)]
    assert dynamic_sizes((32, 32))[1] == (1, 16, 16)  # below the stride when the export size is already the smallest


# the dynamo exporter's message for a data-dependent branch (torch 2.13), colour codes included
DYNAMO_FAILURE = (
    "Failed to export the model with torch.export. \x1b[96mThis is step 1/3\x1b[0m of exporting the model to ONNX. Next steps:\n"
    "- Modify the model code for `torch.export.export` to succeed. Refer to https://pytorch.org/docs/stable/generated/exportdb/index.html for more information.\n"
    "- Debug `torch.export.export` and submit a PR to PyTorch.\n"
    "- Create an issue in the PyTorch GitHub repository against the \x1b[96m*torch.export*\x1b[0m component and attach the full error stack as well as reproduction scripts.\n\n"
    "## Exception summary\n\n"
    "<class 'torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode'>: Could not guard on data-dependent expression zuf0 > 0.0 (unhinted: zuf0 > 0.0).  (Size-like symbols: none)\n\n"
    "consider using data-dependent friendly APIs such as guard_or_false, guard_or_true and statically_known_true.\n"
    "Caused by: (net.py:4 in forward)\n"
    "For more information, run with TORCH_LOGS=\"dynamic\"\n"
    "For extended logs when we create symbols, also add TORCHDYNAMO_EXTENDED_DEBUG_CREATE_SYMBOL=\"zuf0\"\n"
    "If you suspect the guard was triggered from C++, add TORCHDYNAMO_EXTENDED_DEBUG_CPP=1\n\n"
    "The error above occurred when calling torch.export.export. If you would like to view some more information about this error, "
    "and get a list of all other errors that may occur in your export call, you can replace your `export()` call with `draft_export()`.\n\n"
    "(Refer to the full stack trace above for more information.)"
)


def test_exporter_failure_shows_the_cause():
    from converters.onnx import error_summary

    s = error_summary(RuntimeError(DYNAMO_FAILURE))
    assert "\x1b" not in s and "[96m" not in s
    assert s.startswith("GuardOnDataDependentSymNode: Could not guard on data-dependent expression zuf0 > 0.0")
    assert "Caused by: (net.py:4 in forward)" in s
    assert "Next steps" not in s and "TORCH_LOGS" not in s and "draft_export" not in s
    # too long: cut where a sentence or a word ends, and marked
    long = error_summary("\x1b[31mThe first sentence explains the failure. " + "then words go on and on " * 40 + "\x1b[0m", limit=70)
    assert long == "The first sentence explains the failure. …"
    words = error_summary("one " + "abcdefgh " * 40, limit=60)
    assert words.endswith(" …") and all(w in ("one", "abcdefgh", "…") for w in words.split())


def test_every_exporter_failing_names_each_cause(tmp_path):
    class Broken(torch.nn.Module):  # eigh has no ONNX translation
        def forward(self, x):
            m = x[0, 0] @ x[0, 0].T
            return torch.linalg.eigh(m).eigenvectors.reshape(1, 1, 8, 8).expand(1, 2, 8, 8)

    with pytest.raises(ConversionError) as e:
        export_onnx(Broken(), tmp_path / "m.onnx", preprocess=Preprocess(size=(8, 8)), exporter="torchscript")
    msg = str(e.value)
    assert "\x1b" not in msg and "linalg_eigh" in msg, msg
