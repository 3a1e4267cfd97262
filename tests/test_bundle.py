import json

import pytest

from edgeseg.bundle import Artifact, Bundle, BundleError, Manifest, atomic_path, default_palette
from edgeseg.spec import Preprocess


def make_bundle(path):
    m = Manifest(labels=["bg", "cat"], palette=default_palette(2), preprocess=Preprocess(size=(32, 32)))
    b = Bundle.create(path, m)
    (path / "model.onnx").write_bytes(b"not really onnx")
    b.add_artifact(Artifact("model.onnx", "onnxruntime", "fp32", parity={"max_abs": 1e-6}))
    b.save()
    return b


def test_roundtrip(tmp_path):
    make_bundle(tmp_path / "b")
    b = Bundle.load(tmp_path / "b")
    assert b.manifest.labels == ["bg", "cat"]
    assert b.manifest.preprocess == Preprocess(size=(32, 32))
    art = b.select("onnxruntime")
    assert art.parity["max_abs"] == 1e-6 and len(art.sha256) == 64
    b.verify_artifact(art)


def test_broken_manifest_is_reported(tmp_path):
    make_bundle(tmp_path / "b")
    (tmp_path / "b" / "manifest.json").write_text("{ not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(tmp_path / "b")


def test_unknown_schema_and_missing_fields(tmp_path):
    b = make_bundle(tmp_path / "b")
    d = b.manifest.to_dict()
    d["schema_version"] = 99
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match="schema_version 99 is not supported"):
        Bundle.load(tmp_path / "b")
    d["schema_version"] = 1
    del d["labels"]
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match="missing required field 'labels'"):
        Bundle.load(tmp_path / "b")


def test_missing_artifact_and_checksum(tmp_path):
    b = make_bundle(tmp_path / "b")
    (tmp_path / "b" / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="does not match the checksum"):
        b.verify_artifact(b.select("onnxruntime"))
    (tmp_path / "b" / "model.onnx").unlink()
    with pytest.raises(BundleError, match="listed but missing"):
        Bundle.load(tmp_path / "b")


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="bundle not found"):
        Bundle.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.load(tmp_path / "empty")


def test_select_prefers_the_graph_quantized_for_the_backend(tmp_path):
    b = make_bundle(tmp_path / "b")
    for target in ("tensorrt", "cpu"):
        (tmp_path / "b" / f"model.int8.{target}.onnx").write_bytes(target.encode())
        b.add_artifact(Artifact(f"model.int8.{target}.onnx", "onnxruntime", "int8", target=target))
    assert b.select("onnxruntime", "int8").target == "cpu"
    assert b.select("onnxruntime", "int8", target="tensorrt").target == "tensorrt"
    assert b.select("onnxruntime").precision == "fp32"


def test_select_names_what_is_there(tmp_path):
    b = make_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match=r"no tensorrt artifact \(it has: onnxruntime/fp32\)"):
        b.select("tensorrt")


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "engine.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("build failed")
    assert list(tmp_path.iterdir()) == []
    # folders (e.g. .mlpackage) replace the old one whole
    pkg = tmp_path / "m.mlpackage"
    for content in ("old", "new"):
        with atomic_path(pkg) as tmp:
            tmp.mkdir()
            (tmp / "data").write_text(content)
    assert (pkg / "data").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["m.mlpackage"]


def test_manifest_validation():
    with pytest.raises(BundleError, match="palette has 1 colours for 2 labels"):
        Manifest(labels=["a", "b"], palette=[[0, 0, 0]], preprocess=Preprocess())
    with pytest.raises(BundleError, match="output_kind"):
        Manifest(labels=["a"], palette=[[0, 0, 0]], preprocess=Preprocess(), output_kind="boxes")
