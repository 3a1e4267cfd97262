"""Core ML packages: conversion, compression, metadata and spec/weight validation (all on Linux);
prediction against ONNX Runtime in the macos-marked tests."""
import json
import platform
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("coremltools")

from converters import coreml as C  # noqa: E402
from edgeseg import models  # noqa: E402
from edgeseg.bundle import Bundle, BundleError  # noqa: E402
from edgeseg.spec import Preprocess  # noqa: E402
from edgeseg.train import DEFAULT_RECIPE  # noqa: E402
from runtime.engines.base import EngineError  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.test_zoo import INSTANCE_MODELS  # noqa: E402  (their Core ML conversion is tested there)

DEFAULT_PRECISIONS = ("fp32", "fp16", "int8-weights", "palettize4")
DEFAULT_ARCH = DEFAULT_RECIPE["model"]
SMALL = Preprocess(size=(64, 64))
LABELS3 = ["background", "thing", "stuff"]
PALETTE3 = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]

# Light configurations so each zoo architecture converts in seconds; an architecture added later
# without an entry here is tried with the first of FALLBACK_KWARGS its factory accepts.
ZOO_SMALL = {
    "unet": dict(base=8, depth=3),
    "lraspp_mobilenetv3": dict(width=0.5, head_channels=32),
    "lraspp_mobilenetv3_small": dict(width=0.5, head_channels=32),
    "deeplabv3plus_resnet": dict(depth=18, width=0.25, aspp_channels=32, decoder_channels=32, low_channels=16),
    # the large MobileNetV3 encoder is covered by lraspp_mobilenetv3; the small one keeps this quick
    "deeplabv3plus_mobilenetv3": dict(variant="small", width=0.5, aspp_channels=32, decoder_channels=32, low_channels=16),
    "fastfcn_resnet": dict(depth=18, width=0.25, jpu_width=32, head_channels=32),
    "gscnn_resnet": dict(depth=18, width=0.25, aspp_channels=32, decoder_channels=32, shape_channels=16),
}
FALLBACK_KWARGS = (dict(depth=18, width=0.25), dict(width=0.25), dict(width=0.5), dict(base=8), {})


def small_zoo_model(name, num_classes=3):
    torch.manual_seed(0)
    tries = [ZOO_SMALL[name]] if name in ZOO_SMALL else list(FALLBACK_KWARGS)
    for kw in tries:
        try:
            return models.create(name, num_classes=num_classes, **kw).eval()
        except (TypeError, ValueError):
            continue
    raise AssertionError(f"no small configuration builds {name}")


@pytest.fixture(scope="module")
def default_packages(default_model, tmp_path_factory):
    model, ckpt = default_model
    out = tmp_path_factory.mktemp("coreml_default")
    pre = Preprocess.from_dict(ckpt["preprocess"])
    res = C.convert_variants(model, out, precisions=DEFAULT_PRECISIONS, preprocess=pre, labels=ckpt["labels"],
                             palette=ckpt["palette"], metadata={"author": "edgeseg tests", "license": "Apache-2.0"})
    return model, ckpt, res


# -- the default model --------------------------------------------------------------------------
@pytest.mark.parametrize("precision", DEFAULT_PRECISIONS)
def test_default_model_package_spec(default_packages, precision):
    model, ckpt, res = default_packages
    r = res[precision]
    v = r.validation
    assert v["ok"], v["problems"]
    assert r.frontend == "torch.export" and r.path.name == f"model.{precision}.mlpackage"
    assert r.input_name == "image" and r.output_name == "logits" and r.output_shape == [1, 5, 256, 256]
    assert v["input_sizes"] == [(256, 256)] and v["color"] == "rgb"
    # normalisation folded into the graph: the effective per-channel scale is 1/(255*std)
    pre = Preprocess.from_dict(ckpt["preprocess"])
    np.testing.assert_allclose(v["image_scale"], 1 / (255 * np.asarray(pre.std)), rtol=2e-3)
    np.testing.assert_allclose(v["image_bias"], -np.asarray(pre.mean) / np.asarray(pre.std), atol=4e-3)
    n = sum(v["weight_dtypes"].values())
    expect = {"fp32": {"fp32": n}, "fp16": {"fp16": n}}.get(precision)
    if expect:
        assert v["weight_dtypes"] == expect
    else:
        key = "int8" if precision == "int8-weights" else "lut4"
        assert v["weight_dtypes"][key] >= 0.8 * n, v["weight_dtypes"]
        assert v["ops"]["constexpr_affine_dequantize" if key == "int8" else "constexpr_lut_to_dense"] == v["weight_dtypes"][key]
    # every stored weight was matched to its torch weight (BN folded where it follows a conv)
    assert v["weights"]["compared"] == n and v["weights"]["unmatched"] == 0
    assert v["weights"]["worst_error_vs_allowed"] <= 1.0


def test_default_model_sizes(default_packages):
    _, _, res = default_packages
    size = {p: r.size_bytes for p, r in res.items()}
    weights = {p: r.weights_bytes for p, r in res.items()}
    print("package / weight.bin sizes (bytes):", json.dumps(size), json.dumps(weights))
    # the weights shrink about 4x (INT8) and 8x (4-bit); biases and layers of <= 512 weights stay
    # FP16, and each package carries about 110 KB of program text
    assert weights["fp32"] / weights["fp16"] > 1.95
    assert weights["fp32"] / weights["int8-weights"] > 3.6
    assert weights["fp32"] / weights["palettize4"] > 7.0
    assert size["fp32"] / size["int8-weights"] > 3.3 and size["fp32"] / size["palettize4"] > 6.0
    assert size["palettize4"] < size["int8-weights"] < size["fp16"]


def test_default_model_metadata(default_packages):
    import coremltools as ct

    _, ckpt, res = default_packages
    m = ct.models.MLModel(str(res["palettize4"].path), skip_model_load=True)
    ud = m.user_defined_metadata
    assert json.loads(ud["labels"]) == ckpt["labels"]
    assert json.loads(ud["palette"]) == ckpt["palette"]
    assert Preprocess.from_dict(json.loads(ud["preprocess"])) == Preprocess.from_dict(ckpt["preprocess"])
    assert ud["output"] == "logits" and ud["precision"] == "palettize4"
    assert json.loads(ud["compression"])["nbits"] == 4
    assert m.author == "edgeseg tests" and m.license == "Apache-2.0" and m.version
    spec = m.get_spec()
    assert [i.name for i in spec.description.input] == ["image"]
    assert [o.name for o in spec.description.output] == ["logits"]


def test_palettized_weights_sit_at_their_nearest_table_entry(default_packages):
    """k-means tables: the 4-bit default model's error is well under uniform 4-bit quantization's."""
    _, _, res = default_packages
    v4 = res["palettize4"].validation["weights"]
    v8 = res["int8-weights"].validation["weights"]
    assert v4["worst_error_vs_allowed"] <= 1.0
    assert v8["max_rel_rms"] < 0.01 < v4["max_rel_rms"] < 0.2


def test_validation_rejects_wrong_weights_and_wrong_scheme(default_packages):
    model, ckpt, res = default_packages
    path = res["int8-weights"].path
    other = models.create(model.edgeseg_arch["name"], num_classes=5, **model.edgeseg_arch["kwargs"]).eval()
    bad = C.validate_package(path, torch_model=other)
    assert not bad["ok"] and any("match the torch weights" in p for p in bad["problems"]), bad["problems"]
    wrong = C.validate_package(res["fp16"].path, precision="int8-weights")
    assert not wrong["ok"] and any("int8" in p for p in wrong["problems"])


def test_validation_catches_normalisation_in_the_image_type(tmp_path):
    """The trap the package avoids: ImageType's one scale for all channels cannot express a
    per-channel std. A package made that way fails validation."""
    import coremltools as ct

    torch.manual_seed(0)
    model = Tiny().eval()
    ep = torch.export.export(model, (torch.rand(1, 3, 64, 64),)).run_decompositions({})
    std, mean = np.asarray(SMALL.std), np.asarray(SMALL.mean)
    image = ct.ImageType(name="image", shape=(1, 3, 64, 64), scale=float(1 / (255 * std.mean())),
                         bias=(-mean / std).tolist(), color_layout=ct.colorlayout.RGB)
    ml = ct.convert(ep, inputs=[image], outputs=[ct.TensorType(name="logits", dtype=np.float32)],
                    minimum_deployment_target=ct.target.iOS17, skip_model_load=True)
    ml.author, ml.version = "x", "1"
    ud = ml.user_defined_metadata
    ud.update(labels=json.dumps(LABELS3), palette=json.dumps(PALETTE3), preprocess=json.dumps(SMALL.to_dict()),
              output="logits", precision="fp16", color="rgb", output_shape="[1, 3, 64, 64]", input_sizes="[[64, 64]]")
    ml.save(str(tmp_path / "trap.mlpackage"))
    v = C.validate_package(tmp_path / "trap.mlpackage", torch_model=model)
    failed = {c["check"] for c in v["checks"] if not c["ok"]}
    assert failed == {"image scale/bias equal the preprocessing's (x/255 - mean)/std",
                      "image input: scale 1, bias 0 (normalisation folded into the graph)"}, v["problems"]
    assert v["weights"]["compared"] == 3  # the weights themselves are fine


# -- the zoo ------------------------------------------------------------------------------------
def test_default_architecture_is_the_one_converted_above(default_model):
    """The default-model tests cover its architecture in four precisions; the zoo loop skips it."""
    model, ckpt = default_model
    assert ckpt["arch"]["name"] == DEFAULT_ARCH and DEFAULT_ARCH in models.available()


@pytest.mark.parametrize("arch", [a for a in models.available() if a != DEFAULT_ARCH and a not in INSTANCE_MODELS])
def test_zoo_architecture_converts(arch, tmp_path):
    import coremltools as ct

    model = small_zoo_model(arch)
    precisions = ("fp16", "int8-weights", "palettize4")
    # one architecture also takes several input sizes (enumerated shapes) and 6-bit tables
    sizes = [(64, 64), (96, 128), (128, 64)] if arch == "unet" else None
    res = C.convert_variants(model, tmp_path, precisions=precisions + (("palettize6",) if sizes else ()),
                             preprocess=SMALL, labels=LABELS3, palette=PALETTE3, output="mask", input_sizes=sizes)
    for precision, r in res.items():
        v = r.validation
        assert v["ok"], (precision, v["problems"])
        assert r.output_shape == [1, 64, 64] and v["weights"]["unmatched"] == 0
        assert sorted(v["input_sizes"]) == sorted(sizes or [(64, 64)])
    assert res["fp16"].frontend == "torch.export"
    assert res["int8-weights"].size_bytes < res["fp16"].size_bytes
    assert res["palettize4"].size_bytes < res["int8-weights"].size_bytes
    if sizes:
        im = ct.models.MLModel(str(res["fp16"].path), skip_model_load=True).get_spec().description.input[0].type.imageType
        assert sorted((s.height, s.width) for s in im.enumeratedSizes.sizes) == sorted(sizes)
        assert (im.height, im.width) == (64, 64)
        assert res["palettize6"].validation["weight_dtypes"].get("lut6", 0) > 0


# -- third-party-style models -------------------------------------------------------------------
class PyramidPooling(nn.Module):
    """Research-code style: PSPNet-like pooling to a 3x3 grid, upsampling to sizes read from
    tensors (`F.interpolate(size=x.shape[-2:])`), a dict output."""

    def __init__(self, num_classes=3, c=16):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU(),
                                 nn.Conv2d(c, 2 * c, 3, 2, 1), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(3), nn.Conv2d(2 * c, 2 * c, 1))
        self.head = nn.Conv2d(2 * c, num_classes, 1)

    def forward(self, x):
        f = self.enc(x)
        f = f + F.interpolate(self.pool(f), size=f.shape[-2:], mode="bilinear", align_corners=False)
        return {"out": F.interpolate(self.head(f), size=x.shape[-2:], mode="bilinear", align_corners=False)}


def test_third_party_model_with_size_from_input_upsampling(tmp_path):
    torch.manual_seed(0)
    model = PyramidPooling().eval()
    r = C.convert_coreml(model, tmp_path / "p.mlpackage", preprocess=SMALL, labels=LABELS3, palette=PALETTE3,
                         precision="int8-weights", output="probs")
    v = r.validation
    assert r.frontend == "torch.export" and v["ok"], v["problems"]
    assert r.output_shape == [1, 3, 64, 64] and v["output_shape"] == [1, 3, 64, 64]
    assert v["weight_dtypes"] == {"fp16": 2, "int8": 2}  # the 32x16x3x3 and 32x32 convs exceed the threshold
    # Core ML pools to a fixed grid only at a known input size: several sizes are refused up front
    with pytest.raises(C.DynamicShapeError) as e:
        C.convert_coreml(model, tmp_path / "q.mlpackage", preprocess=SMALL, labels=LABELS3, palette=PALETTE3,
                         input_sizes=[(64, 64), (96, 96)])
    assert e.value.layer == "pool.0 (AdaptiveAvgPool2d)" and "input_sizes=[(64, 64)]" in str(e.value)
    assert not (tmp_path / "q.mlpackage").exists()


# -- clear errors, nothing half-written ---------------------------------------------------------
class Erfinv(nn.Module):
    def forward(self, y):
        return torch.erfinv(torch.tanh(y))


class UsesErfinv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.post = Erfinv()

    def forward(self, x):
        return self.post(self.conv(x))


def test_unsupported_op_names_the_layer(tmp_path):
    with pytest.raises(C.UnsupportedOpError) as e:
        C.convert_coreml(UsesErfinv().eval(), tmp_path / "u.mlpackage", preprocess=SMALL, labels=LABELS3, palette=PALETTE3)
    assert e.value.op == "erfinv" and e.value.layer == "post (Erfinv)"
    assert "register_torch_op" in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("precision,target,needs", [
    ("palettize4", "iOS15", "iOS16"), ("int8-weights", "macOS12", "iOS16"), ("w8a8", "iOS16", "iOS17"),
    ("int4-weights", "iOS17", "iOS18"), ("palettize4-grouped", "iOS17", "iOS18"), ("fp16", "iOS14", "iOS15"),
])
def test_deployment_target_too_old(tmp_path, precision, target, needs):
    model = small_zoo_model("unet")
    with pytest.raises(C.DeploymentTargetError) as e:
        C.convert_coreml(model, tmp_path / "t.mlpackage", preprocess=SMALL, labels=LABELS3, palette=PALETTE3,
                         precision=precision, minimum_deployment_target=target)
    assert precision in str(e.value) and needs in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path):
    model = small_zoo_model("unet")
    kw = dict(preprocess=SMALL, labels=LABELS3, palette=PALETTE3)
    with pytest.raises(C.DynamicShapeError, match="not multiples of 8.*72x64"):
        C.convert_coreml(model, tmp_path / "a.mlpackage", input_sizes=[(64, 64), (70, 64)], **kw)
    with pytest.raises(C.CoreMLConversionError, match="unknown Core ML precision"):
        C.convert_coreml(model, tmp_path / "a.mlpackage", precision="int3", **kw)
    with pytest.raises(C.CoreMLConversionError, match="output must be one of"):
        C.convert_coreml(model, tmp_path / "a.mlpackage", output="scores", **kw)
    with pytest.raises(C.DeploymentTargetError, match="unknown minimum_deployment_target"):
        C.convert_coreml(model, tmp_path / "a.mlpackage", minimum_deployment_target="android", **kw)
    with pytest.raises(C.CoreMLConversionError, match="palette has 2 colours for 3 labels"):
        C.convert_coreml(model, tmp_path / "a.mlpackage", preprocess=SMALL, labels=LABELS3, palette=PALETTE3[:2])
    with pytest.raises(C.CoreMLConversionError, match="must end in .mlpackage"):
        C.convert_coreml(model, tmp_path / "a.mlmodel", **kw)
    with pytest.raises(C.CoreMLConversionError, match="w8a8 needs calibration frames"):
        C.convert_coreml(model, tmp_path / "a.mlpackage", precision="w8a8", **kw)
    assert list(tmp_path.iterdir()) == []


# -- iOS18 schemes and W8A8 ---------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Conv2d(32, 3, 1)
        self.input_multiple = 2

    def forward(self, x):
        return F.interpolate(self.head(self.body(x)), scale_factor=2, mode="bilinear", align_corners=False)


def test_ios18_grouped_and_blockwise_schemes(tmp_path):
    torch.manual_seed(0)
    res = C.convert_variants(Tiny().eval(), tmp_path, precisions=("int4-weights", "palettize4-grouped"), preprocess=SMALL,
                             labels=LABELS3, palette=PALETTE3, minimum_deployment_target="iOS18")
    for r in res.values():
        assert r.validation["ok"], r.validation["problems"]
        assert r.validation["opset"] == "CoreML8"
    # the 3x32 head has too few elements to compress
    assert res["int4-weights"].validation["weight_dtypes"] == {"fp16": 1, "int4": 2}
    assert res["palettize4-grouped"].validation["weight_dtypes"] == {"fp16": 1, "lut4": 2}


def test_w8a8_calibrated_on_the_torch_side(tmp_path, rng):
    torch.manual_seed(0)
    model = Tiny().eval()
    frames = [rng.integers(0, 256, (80, 96, 3), dtype=np.uint8) for _ in range(4)]
    r = C.convert_coreml(model, tmp_path / "w.mlpackage", preprocess=SMALL, labels=LABELS3, palette=PALETTE3,
                         precision="w8a8", calibration=frames, output="mask")
    v = r.validation
    assert v["ok"], v["problems"]
    assert r.frontend == "torch.jit.trace" and "calibrated on 4 frames" in " ".join(r.notes)
    assert v["ops"]["quantize"] >= 3 and v["ops"]["dequantize"] >= 3
    assert v["weight_dtypes"] == {"int8": 3}


# -- bundles ------------------------------------------------------------------------------------
def _source(model=None, name="tiny"):
    if model is None:
        torch.manual_seed(0)
        model = Tiny().eval()
    return SimpleNamespace(model=model, labels=LABELS3, palette=PALETTE3, preprocess=SMALL, name=name,
                           sha256="0" * 64, info={})


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml_bundle") / "b"
    C.convert_to_bundle(_source(), out, precision="palettize4", output="mask", compute_units="cpu_and_ne")
    return out


def test_convert_to_bundle_creates_then_adds(tiny_bundle, tmp_path):
    import shutil

    b = Bundle.load(tiny_bundle)
    m = b.manifest
    assert m.input_name == "image" and m.output_kind == "mask" and m.output_shape == [1, 64, 64]
    art = b.select("coreml", "palettize4")
    assert art.path == "model.palettize4.mlpackage" and art.target == "iOS17"
    assert art.metrics["size_bytes"] == C.package_size(tiny_bundle / art.path) and art.info["compute_units"] == "cpu_and_ne"
    assert 0 < art.metrics["weights_bytes"] < art.metrics["size_bytes"]
    assert not (tiny_bundle / art.path / "executorch_debug_handle_mapping.json").exists()
    assert art.info["validation"]["ok"] and not art.parity["measured"]
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    b = C.convert_to_bundle(_source(), out, precision="int8-weights", output="mask")
    assert sorted(a.precision for a in b.find("coreml")) == ["int8-weights", "palettize4"]
    b.verify_artifact(b.select("coreml", "int8-weights"))
    b.verify_artifact(b.select("coreml", "palettize4"))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.int8-weights.mlpackage", "model.palettize4.mlpackage"]


def test_convert_to_bundle_errors(tiny_bundle, tmp_path):
    onnx_only = SimpleNamespace(model=None, onnx_path="m.onnx", labels=LABELS3, palette=PALETTE3, preprocess=SMALL,
                                name="m.onnx", sha256="")
    with pytest.raises(C.CoreMLConversionError, match="needs the torch model.*ONNX file"):
        C.convert_to_bundle(onnx_only, tmp_path / "b")
    with pytest.raises(C.CoreMLConversionError, match="compute_units"):
        C.convert_to_bundle(_source(), tmp_path / "b", compute_units="gpu")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.txt").write_text("x")
    with pytest.raises(C.ConversionError, match="not a bundle"):
        C.convert_to_bundle(_source(), junk)
    assert not (tmp_path / "b").exists()
    other = _source()
    other.labels = ["x", "y", "z"]
    before = (tiny_bundle / "manifest.json").read_text()
    with pytest.raises(BundleError, match="labels"):
        C.convert_to_bundle(other, tiny_bundle, precision="fp16")
    with pytest.raises(BundleError, match="gives 'mask' outputs"):
        C.convert_to_bundle(_source(), tiny_bundle, precision="fp16", output="logits")
    with pytest.raises(BundleError, match="other preprocessing"):
        C.convert_to_bundle(SimpleNamespace(**{**vars(_source()), "preprocess": SMALL.replace(size=(96, 96))}),
                            tiny_bundle, precision="fp16", output="mask")
    assert (tiny_bundle / "manifest.json").read_text() == before


# -- k-means look-up tables ---------------------------------------------------------------------
def test_kmeans_lut_nearest_entries_and_error(rng):
    w = rng.normal(0, 0.05, (64, 32, 3, 3)).astype(np.float16)
    lut, idx = C.kmeans_lut(w, 4)
    assert lut.shape == (16,) and lut.dtype == np.float16 and idx.dtype == np.uint8 and idx.size == w.size
    deq = lut[idx].reshape(w.shape).astype(np.float64)
    dist = np.abs(w.reshape(-1, 1).astype(np.float64) - lut.astype(np.float64)[None])
    assert np.all(idx == dist.argmin(1)) or np.allclose(dist[np.arange(w.size), idx], dist.min(1))
    uniform = np.linspace(w.min(), w.max(), 16)
    uerr = np.abs(w.reshape(-1, 1) - uniform[None]).min(1)
    assert np.sqrt(np.mean((deq - w) ** 2)) < 0.8 * np.sqrt(np.mean(uerr**2))
    few = np.array([0.5, -0.25, 0.5, 0.0], np.float16)
    lut, idx = C.kmeans_lut(few, 4)
    assert np.array_equal(lut[idx], few)


# -- runtime engine -----------------------------------------------------------------------------
def test_engine_module_imports_neither_torch_nor_coremltools():
    code = ("import sys, runtime.engines.coreml; "
            "print(','.join(m for m in ('torch', 'coremltools') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_batch_to_images_undoes_preprocessing(rng):
    from runtime.engines.coreml import batch_to_images

    frame = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    for pre in (SMALL, SMALL.replace(color="bgr", layout="nhwc"), SMALL.replace(dtype="uint8")):
        img = batch_to_images(pre.apply(frame), pre)
        ref = np.clip(np.rint(pre.resize_image(frame)), 0, 255)
        assert img.shape == (1, 64, 64, 3) and img.dtype == np.uint8
        assert np.abs(img.astype(int) - ref).max() <= 1


@pytest.mark.skipif(platform.system() == "Darwin", reason="checks the error Linux and Windows users get")
def test_engine_off_macos_is_a_clear_error(tiny_bundle):
    from runtime.engines.base import open_engine
    from runtime.engines.coreml import CoreMLEngine

    b = Bundle.load(tiny_bundle)
    with pytest.raises(EngineError, match="only on macOS.*onnxruntime"):
        open_engine(b, backend="coreml", compute_units="cpu_only")
    with pytest.raises(EngineError, match="compute_units must be one of"):
        CoreMLEngine.from_bundle(b, compute_units="npu")
    with pytest.raises(EngineError, match="unknown options: providers"):
        CoreMLEngine.from_bundle(b, providers=["CPUExecutionProvider"])
    with pytest.raises(EngineError, match="only on macOS"):
        CoreMLEngine(b.artifact_path(b.select("coreml")), preprocess=SMALL, output_name="mask")


# -- macOS: prediction -------------------------------------------------------------------------
@pytest.mark.macos
@pytest.mark.parametrize("precision,agreement", [("fp16", 0.99), ("int8-weights", 0.98), ("palettize4", 0.9)])
def test_macos_masks_match_onnxruntime(default_bundle, tmp_path, precision, agreement):
    import shutil

    from converters.onnx import load_source
    from converters.parity import parity_frames
    from runtime.engines.coreml import CoreMLEngine
    from runtime.engines.onnxruntime import OnnxRuntimeEngine

    out = tmp_path / "b"
    shutil.copytree(default_bundle.path, out)
    b = C.convert_to_bundle(load_source("default"), out, precision=precision)
    pre = b.manifest.preprocess
    ort = OnnxRuntimeEngine(b.artifact_path(b.select("onnxruntime")))
    for units in ("cpu_only", "all"):
        eng = CoreMLEngine.from_bundle(b, precision=precision, compute_units=units)
        for frame in parity_frames(pre, 4):
            x = pre.apply(frame)
            ref = ort.infer(x)[ort.outputs[0].name].argmax(1)
            got = eng.infer(x)["logits"].argmax(1)
            assert got.shape == ref.shape
            assert np.mean(got == ref) >= agreement, (precision, units)
            # the image path gives the same answer as the batch path
            resized = np.clip(np.rint(pre.resize_image(frame)), 0, 255).astype(np.uint8)
            bgr = resized[..., ::-1] if pre.color == "rgb" else resized
            assert np.mean(eng.infer_image(np.ascontiguousarray(bgr))["logits"].argmax(1) == got) > 0.999


@pytest.mark.macos
def test_macos_mask_output_and_enumerated_sizes(tmp_path, default_model):
    import coremltools as ct
    from PIL import Image

    model, ckpt = default_model
    pre = Preprocess.from_dict(ckpt["preprocess"])
    r = C.convert_coreml(model, tmp_path / "m.mlpackage", preprocess=pre, labels=ckpt["labels"], palette=ckpt["palette"],
                         output="mask", input_sizes=[(256, 256), (192, 320)])
    m = ct.models.MLModel(str(r.path))
    for h, w in [(256, 256), (192, 320)]:
        img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = m.predict({"image": Image.fromarray(img)})["mask"]
        with torch.no_grad():
            ref = model(torch.from_numpy(((img / 255.0 - pre.mean) / pre.std).astype(np.float32).transpose(2, 0, 1)[None]))
        assert mask.shape == (1, h, w)
        assert np.mean(mask == ref.argmax(1).numpy()) > 0.98


# -- FP16 weights: judged by what FP16 casting itself does ------------------------------------------
def _laplace(shape, scale):
    return torch.distributions.Laplace(0.0, scale).sample(shape)


def resnet_statistics_stack(seed=0):
    """Conv stacks with the weight statistics of trained FCN-ResNet50 / DeepLabV3 (torchvision cannot
    be imported here): a stem whose batch norms have tiny variances (folded weights in the tens to
    hundreds), deep 3x3 / 1x1 / depthwise blocks with small weights and small gammas (folded maxima
    of a few 1e-3, so many values in FP16's subnormal range below 6.1e-5), and a classifier."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False), nn.BatchNorm2d(64), nn.Hardswish(),
        nn.Conv2d(64, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 3, 1))
    net[0].weight.data = _laplace(net[0].weight.shape, 0.1)
    net[1].running_var.data = torch.logspace(-6, -2, 32)
    net[1].weight.data = torch.rand(32) + 0.5
    for conv, bn in ((net[3], net[4]), (net[6], net[7]), (net[9], net[10])):
        conv.weight.data = _laplace(conv.weight.shape, 0.002)
        bn.weight.data = torch.rand(bn.num_features) * 0.25 + 0.05
        bn.running_var.data = torch.rand(bn.num_features) * 1.5 + 0.5
    net[12].weight.data = _laplace(net[12].weight.shape, 0.01)
    return net.eval()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast", "ignore:invalid value encountered in spacing")
def test_fp16_error_is_judged_against_plain_casting():
    from converters.coreml.weights import fp16_error, fp16_steps_from_cast

    ref = np.array([1e-9, -2.9e-8, 3e-6, -1.3e-5, 5e-5, 0.01, -0.3, 300.0, 6.0e4, 7.0e4, 0.0])  # flush, subnormal, normal, overflow
    cast = ref.astype(np.float16).astype(np.float64)
    assert cast[0] == 0 and np.isinf(cast[9])
    err, allowed = fp16_error(cast, ref)
    assert np.max(err / allowed) <= 1.0 and fp16_steps_from_cast(cast, ref) == 0.0
    # a fixed relative tolerance (2 half-steps of |w|) refuses what casting does to subnormals
    assert np.max(np.abs(cast - ref)[2:5] / (2.0**-10 * np.abs(ref[2:5]))) > 1.5
    # the neighbour of a value near half-way passes; two steps off, or a subnormal flushed to 0, do not
    step = np.spacing(np.abs(ref.astype(np.float16))).astype(np.float64)
    for i, wrong in ((3, cast[3] + 2 * np.sign(ref[3]) * step[3]), (2, 0.0), (6, cast[6] * (1 + 2.0**-8)), (9, 65504.0)):
        bad = cast.copy()
        bad[i] = wrong
        err, allowed = fp16_error(bad, ref)
        assert np.max(err / allowed) > 1.0, i
    mid = np.array([1.0 + 2.0**-11])  # exactly half-way between two FP16 values
    err, allowed = fp16_error(np.array([1.0 + 2.0**-10]), mid)
    assert np.max(err / allowed) <= 1.0


def test_fp16_package_of_resnet_statistics_weights_validates(tmp_path):
    net = resnet_statistics_stack()
    folded = [(c.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(-1, 1, 1, 1)).detach().numpy()
              for c, bn in ((net[0], net[1]), (net[3], net[4]), (net[6], net[7]), (net[9], net[10]))]
    tiny = sum(int(np.sum((np.abs(w) < 6.1e-5) & (w != 0))) for w in folded)
    assert tiny > 1000 and max(float(np.abs(w).max()) for w in folded) > 50  # subnormal-range and large values
    r = C.convert_coreml(net, tmp_path / "r.mlpackage", preprocess=Preprocess(size=(32, 32)), labels=LABELS3,
                         palette=PALETTE3, precision="fp16", output="logits")
    v = r.validation
    assert v["ok"], v["problems"]
    assert v["weights"]["compared"] == 5 and v["weights"]["bn_folded"] == 4, v["weights"]
    assert v["weights"]["max_fp16_steps_from_cast"] <= 1.0, v["weights"]  # as plain casting (FP32 folding: one step)
    # the check still fails: the same package against weights changed by about 0.3%, weight by weight
    with torch.no_grad():
        net[9].weight.mul_(1 + 0.003 * torch.randn(net[9].weight.shape))
    changed = C.validate_package(r.path, torch_model=net, precision="fp16")
    assert not changed["ok"] and any("allowed error vs 9.weight" in p for p in changed["problems"]), changed["problems"]
