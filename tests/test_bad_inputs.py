"""Hostile inputs, one table per kind: each row is one input a user (or an attacker) can hand edgeseg
and the exact error, or the safe behaviour, it must get. No row may end in a traceback or a hang.

To add a case, add a row to the table of its kind; `test_corpus_size` counts the rows.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeseg.bundle import Artifact, Bundle, BundleError, Manifest, default_palette
from edgeseg.spec import Preprocess

ROOT = Path(__file__).resolve().parents[1]
SHA = "0" * 64


def fake_bundle(path: Path) -> Path:
    """A small valid bundle whose model file is not a real model (enough for manifest checks)."""
    m = Manifest(labels=["bg", "cat"], palette=default_palette(2), preprocess=Preprocess(size=(32, 32)),
                 input_shape=[1, 3, 32, 32], output_shape=[1, 2, 32, 32], model={"name": "tiny"})
    b = Bundle.create(path, m)
    (path / "model.onnx").write_bytes(b"model bytes")
    b.add_artifact(Artifact("model.onnx", "onnxruntime", "fp32"))
    b.save()
    return path


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _write(path: Path, d) -> None:
    (path / "manifest.json").write_text(d if isinstance(d, str) else json.dumps(d))


def put(dotted: str, value):
    """A mutation that sets `dotted` (e.g. "preprocess.size.0", "artifacts.0.sha256") to `value`."""
    def apply(d):
        *parents, last = [int(p) if p.isdigit() else p for p in dotted.split(".")]
        for p in parents:
            d = d[p]
        d[last] = value
    return apply


def drop(dotted: str):
    def apply(d):
        *parents, last = [int(p) if p.isdigit() else p for p in dotted.split(".")]
        for p in parents:
            d = d[p]
        del d[last]
    return apply


def deep(levels: int):
    def apply(d):
        node = d["model"]
        for _ in range(levels):
            node["x"] = {}
            node = node["x"]
    return apply


# -- manifests: (id, mutation of the parsed manifest, the error it gets) -----------------------------
MANIFESTS = [
    ("not-an-object", lambda d: [1, 2], r"expected a JSON object, got list"),
    ("schema-version-99", put("schema_version", 99), r"schema_version 99 is not supported by this edgeseg \(expects 1\)"),
    ("schema-version-string", put("schema_version", "1"), r"schema_version '1' is not supported"),
    ("missing-labels", drop("labels"), r"\$\.labels: missing required field \(expected class names"),
    ("missing-artifacts", drop("artifacts"), r"\$\.artifacts: missing required field"),
    ("empty-labels", put("labels", []), r"\$\.labels = \[\]: \[\] should be non-empty"),
    ("duplicate-labels", put("labels", ["bg", "bg"]), r"\$\.labels = \[\"bg\", \"bg\"\]: .*non-unique elements"),
    ("label-not-a-string", put("labels.1", 7), r"\$\.labels\[1\] = 7: 7 is not of type 'string'"),
    ("label-too-long", put("labels.1", "x" * 300), r"\$\.labels\[1\] = \"x+\.\.\.: not allowed \(expected 1 to 256 characters"),
    ("label-with-markup", put("labels.1", "<img src=x onerror=alert(1)>"), r"\$\.labels\[1\] = \"<img src=x.*: not allowed \(expected .*no < or >"),
    ("label-control-char", put("labels.1", "cat\u0007"), r"\$\.labels\[1\] = \"cat\\u0007\": not allowed"),
    ("too-many-labels", lambda d: d.update(labels=[f"c{i}" for i in range(5000)], palette=[[0, 0, 0]] * 5000),
     r"\$\.(labels|palette) = .*is too long"),
    ("palette-short", put("palette", [[0, 0, 0]]), r"\$\.palette has 1 colours for 2 labels; give one \[R, G, B\] per label"),
    ("palette-channel-256", put("palette.1", [0, 256, 0]), r"\$\.palette\[1\]\[1\] = 256: 256 is greater than the maximum of 255"),
    ("palette-channel-negative", put("palette.1", [0, -1, 0]), r"\$\.palette\[1\]\[1\] = -1: -1 is less than the minimum of 0"),
    ("palette-pair", put("palette.1", [0, 0]), r"\$\.palette\[1\] = \[0, 0\]: \[0, 0\] is too short"),
    ("palette-float", put("palette.1", [0.5, 0, 0]), r"\$\.palette\[1\]\[0\] = 0.5: 0.5 is not of type 'integer'"),
    ("size-zero", put("preprocess.size", [0, 32]), r"\$\.preprocess\.size\[0\] = 0: 0 is less than the minimum of 1"),
    ("size-huge", put("preprocess.size", [32, 10**9]), r"\$\.preprocess\.size\[1\] = 1000000000: .*greater than the maximum of 16384"),
    ("size-one-value", put("preprocess.size", [32]), r"\$\.preprocess\.size = \[32\]: \[32\] is too short"),
    ("std-zero", put("preprocess.std", [0.2, 0, 0.2]), r"\$\.preprocess\.std\[1\] = 0: 0 is less than or equal to the minimum of 0"),
    ("std-negative", put("preprocess.std", [0.2, -1, 0.2]), r"\$\.preprocess\.std\[1\] = -1: .*minimum of 0"),
    ("mean-two-values", put("preprocess.mean", [0.5, 0.5]), r"\$\.preprocess\.mean = \[0.5, 0.5\]: .*is too short"),
    ("mean-string", put("preprocess.mean", ["a", 0.5, 0.5]), r"\$\.preprocess\.mean\[0\] = \"a\": 'a' is not of type 'number'"),
    ("mean-nan", lambda d: d["preprocess"].update(mean=[float("nan"), 0.5, 0.5]),
     r"\$\.preprocess\.mean\[0\] = nan: JSON has no NaN or Infinity"),
    ("std-infinity", lambda d: d["preprocess"].update(std=[float("inf"), 0.2, 0.2]),
     r"\$\.preprocess\.std\[0\] = inf: JSON has no NaN or Infinity"),
    ("layout-unknown", put("preprocess.layout", "nchw4"), r"\$\.preprocess\.layout = \"nchw4\": 'nchw4' is not one of \['nchw', 'nhwc'\]"),
    ("dtype-float64", put("preprocess.dtype", "float64"), r"\$\.preprocess\.dtype = \"float64\": 'float64' is not one of"),
    ("resize-unknown", put("preprocess.resize", "crop"), r"\$\.preprocess\.resize = \"crop\": 'crop' is not one of"),
    ("preprocess-extra-field", put("preprocess.gamma", 2.2), r"\$\.preprocess = .*unknown field\(s\) 'gamma'"),
    ("pad-value-300", put("preprocess.pad_value", 300), r"\$\.preprocess\.pad_value = 300: 300 is greater than the maximum of 255"),
    ("output-kind-unknown", put("output_kind", "heatmap"), r"\$\.output_kind = \"heatmap\": 'heatmap' is not one of \['logits', 'probs', 'mask', 'instances'\]"),
    ("task-unknown", put("task", "detection"), r"\$\.task = \"detection\": 'detection' is not one of"),
    ("top-level-typo", put("lables", ["a"]), r"\$ = .*unknown field\(s\) 'lables'"),
    ("input-shape-zero", put("input_shape", [1, 3, 0, 32]), r"\$\.input_shape\[2\] = 0: not allowed \(expected a dimension"),
    ("input-shape-negative", put("input_shape", [-1, 3, 32, 32]), r"\$\.input_shape\[0\] = -1: not allowed"),
    ("input-shape-rank-9", put("input_shape", [1] * 9), r"\$\.input_shape = .*is too long"),
    ("input-shape-vs-preprocess", put("input_shape", [1, 3, 64, 64]),
     r"input_shape \[1, 3, 64, 64\] does not fit preprocess \(size \[32, 32\].*dimension 2 is 64, preprocessing makes 32"),
    ("input-name-markup", put("input_name", "in\"put<"), r"\$\.input_name = .*: not allowed"),
    ("model-name-script", put("model.name", "<script>alert(1)</script>"),
     r"\$\.model\.name = \"<script>alert\(1\)</script>\": not allowed \(expected 1 to 256 characters, no control characters and no < or >\)"),
    ("model-name-number", put("model.name", 5), r"\$\.model\.name = 5: 5 is not of type 'string'"),
    ("source-sha-bad", put("model.source_sha256", "xyz"), r"\$\.model\.source_sha256 = \"xyz\": not allowed"),
    ("artifacts-not-a-list", put("artifacts", {"path": "model.onnx"}), r"\$\.artifacts = .*is not of type 'array'"),
    ("artifact-backend-unknown", put("artifacts.0.backend", "tflite"),
     r"\$\.artifacts\[0\]\.backend = \"tflite\": 'tflite' is not one of \['onnxruntime', 'tensorrt', 'coreml', 'openvino', 'litert'\]"),
    ("artifact-precision-unknown", put("artifacts.0.precision", "int3"), r"\$\.artifacts\[0\]\.precision = \"int3\": 'int3' is not one of"),
    ("artifact-sha-empty", put("artifacts.0.sha256", ""),
     r"\$\.artifacts\[0\]\.sha256 = \"\": not allowed \(expected sha256 of the file .*64 lowercase hex digits; required\)"),
    ("artifact-sha-missing", drop("artifacts.0.sha256"), r"\$\.artifacts\[0\]\.sha256: missing required field"),
    ("artifact-sha-uppercase", put("artifacts.0.sha256", "A" * 64), r"\$\.artifacts\[0\]\.sha256 = \"A+\": not allowed"),
    ("artifact-path-absolute", put("artifacts.0.path", "/etc/passwd"),
     r"\$\.artifacts\[0\]\.path = \"/etc/passwd\": not allowed \(expected a relative path inside the bundle folder"),
    ("artifact-path-dotdot", put("artifacts.0.path", "../outside.onnx"), r"\$\.artifacts\[0\]\.path = \"\.\./outside\.onnx\": not allowed"),
    ("artifact-path-inner-dotdot", put("artifacts.0.path", "a/../../x.onnx"), r"\$\.artifacts\[0\]\.path = \"a/\.\./\.\./x\.onnx\": not allowed"),
    ("artifact-path-backslash", put("artifacts.0.path", "..\\outside.onnx"), r"\$\.artifacts\[0\]\.path = .*: not allowed"),
    ("artifact-path-windows-drive", put("artifacts.0.path", "C:/models/m.onnx"), r"\$\.artifacts\[0\]\.path = \"C:/models/m\.onnx\": not allowed"),
    ("artifact-path-empty", put("artifacts.0.path", ""), r"\$\.artifacts\[0\]\.path = \"\": not allowed"),
    ("artifact-path-dot-slash", put("artifacts.0.path", "./model.onnx"), r"\$\.artifacts\[0\]\.path = \"\./model\.onnx\": not allowed"),
    ("artifact-path-trailing-slash", put("artifacts.0.path", "model.onnx/"), r"\$\.artifacts\[0\]\.path = \"model\.onnx/\": not allowed"),
    ("artifact-path-nul", put("artifacts.0.path", "model.onnx\u0000.txt"), r"\$\.artifacts\[0\]\.path = .*: not allowed"),
    ("artifact-path-hidden", put("artifacts.0.path", ".edgeseg-lock"), r"\$\.artifacts\[0\]\.path = \"\.edgeseg-lock\": not allowed"),
    ("artifact-extra-field", put("artifacts.0.url", "http://evil.example/m.onnx"), r"\$\.artifacts\[0\] = .*unknown field\(s\) 'url'"),
    ("too-many-artifacts", lambda d: d.update(artifacts=d["artifacts"] * 300), r"\$\.artifacts = .*is too long"),
    ("nested-too-deep", deep(80), r"\$\.model\.x\.x.*: nested deeper than 64 levels"),
]


@pytest.mark.parametrize("mutate, expected", [pytest.param(m, e, id=i) for i, m, e in MANIFESTS])
def test_bad_manifest(tmp_path, mutate, expected):
    b = fake_bundle(tmp_path / "b")
    d = _manifest(b)
    d = mutate(d) or d
    _write(b, json.dumps(d))  # Python writes NaN/Infinity as a lenient parser would read them
    with pytest.raises(BundleError, match=expected) as e:
        Bundle.load(b)
    assert str(e.value).startswith(str(b / "manifest.json"))


# -- manifest files: (id, how to make the file, the error) --------------------------------------------
def _text(text):
    return lambda b: (b / "manifest.json").write_text(text)


def _fifo(b):
    (b / "manifest.json").unlink()
    os.mkfifo(b / "manifest.json")


def _huge(b):
    with open(b / "manifest.json", "wb") as f:
        f.truncate(9 << 20)  # sparse: 9 MiB of zeros


def _outside(b):
    (b.parent / "elsewhere.json").write_text((b / "manifest.json").read_text())
    (b / "manifest.json").unlink()
    (b / "manifest.json").symlink_to(b.parent / "elsewhere.json")


def _folder(b):
    (b / "manifest.json").unlink()
    (b / "manifest.json").mkdir()


MANIFEST_FILES = [
    ("not-json", _text("{ not json"), r"manifest\.json is not valid JSON"),
    ("empty-file", _text(""), r"manifest\.json is not valid JSON"),
    ("not-utf8", lambda b: (b / "manifest.json").write_bytes(b"\xff\xfe{}"), r"manifest\.json is not valid JSON"),
    ("json-nesting-bomb", _text("[" * 200000 + "]" * 200000), r"nested too deeply to be a manifest"),
    ("fifo", _fifo, r"the manifest .*manifest\.json is not a regular file \(a FIFO\)"),
    ("larger-than-8-mib", _huge, r"the manifest .*manifest\.json is 9437184 bytes, more than the 8388608 allowed"),
    ("symlink-outside", _outside, r"the manifest 'manifest\.json' is refused: it is a symlink to .*elsewhere\.json, outside"),
    ("a-folder", _folder, r"the manifest .*manifest\.json is not a regular file \(a folder\)"),
]


@pytest.mark.parametrize("make, expected", [pytest.param(m, e, id=i) for i, m, e in MANIFEST_FILES])
def test_bad_manifest_file(tmp_path, make, expected):
    b = fake_bundle(tmp_path / "b")
    make(b)
    with pytest.raises(BundleError, match=expected):
        Bundle.load(b)


# -- artifacts on disk: (id, how to make it, the error at load or when opened) -----------------------
def _symlink_out(b):
    (b.parent / "outside.onnx").write_bytes((b / "model.onnx").read_bytes())
    (b / "model.onnx").unlink()
    (b / "model.onnx").symlink_to(b.parent / "outside.onnx")


def _symlink_dev_zero(b):
    (b / "model.onnx").unlink()
    (b / "model.onnx").symlink_to("/dev/zero")


def _artifact_fifo(b):
    (b / "model.onnx").unlink()
    os.mkfifo(b / "model.onnx")


def _tampered(b):
    (b / "model.onnx").write_bytes(b"other bytes")


def _missing(b):
    (b / "model.onnx").unlink()


def _folder_with_link(b):
    pkg = b / "model.fp16.mlpackage"
    pkg.mkdir()
    (pkg / "weights.bin").write_bytes(b"w")
    (pkg / "leak").symlink_to("/etc/hostname")
    d = _manifest(b)
    d["artifacts"].append({"path": pkg.name, "backend": "coreml", "precision": "fp16", "sha256": SHA})
    _write(b, d)


def _replaced_by_folder(b):
    (b / "model.onnx").unlink()
    (b / "model.onnx").mkdir()
    os.mkfifo(b / "model.onnx" / "pipe")


ARTIFACTS = [
    ("symlink-outside", _symlink_out, "load", r"artifact 'model\.onnx' is refused: it is a symlink to .*outside\.onnx, outside"),
    ("symlink-dev-zero", _symlink_dev_zero, "load", r"artifact 'model\.onnx' is refused: it is a symlink to /dev/zero"),
    ("fifo", _artifact_fifo, "load", r"artifact 'model\.onnx' is a FIFO, not a file"),
    ("missing", _missing, "load", r"artifact 'model\.onnx' is listed but missing from the bundle"),
    ("folder-with-symlink", _folder_with_link, "load", r"artifact 'model\.fp16\.mlpackage' contains leak, which is a symlink"),
    ("folder-with-fifo", _replaced_by_folder, "load", r"artifact 'model\.onnx' contains pipe, which is a FIFO"),
    ("checksum-mismatch", _tampered, "open", r"model\.onnx does not match the checksum in the manifest"),
]


@pytest.mark.parametrize("make, when, expected", [pytest.param(m, w, e, id=i) for i, m, w, e in ARTIFACTS])
def test_bad_artifact(tmp_path, make, when, expected):
    b = fake_bundle(tmp_path / "b")
    make(b)
    with pytest.raises(BundleError, match=expected):
        bundle = Bundle.load(b)
        assert when == "open", "the problem must be caught when the bundle loads"
        bundle.artifact_path(bundle.manifest.artifacts[0])


def test_symlink_inside_the_bundle_is_fine(tmp_path):
    b = fake_bundle(tmp_path / "b")
    (b / "models").mkdir()
    os.replace(b / "model.onnx", b / "models" / "v1.onnx")
    (b / "model.onnx").symlink_to("models/v1.onnx")
    bundle = Bundle.load(b)
    assert bundle.artifact_path(bundle.manifest.artifacts[0]) == b / "model.onnx"


# -- the manifest against the model's own graph: (id, manifest change, the error when it opens) -------
def _resize(d):
    d["preprocess"]["size"] = [128, 128]
    d["input_shape"] = [1, 3, 128, 128]


ENGINE_IO = [
    ("input-size", _resize, r"disagree on the input: manifest 'input' \[1, 3, 128, 128\] float32, model 'input' \[1, 3, 256, 256\] float32"),
    ("input-name", put("input_name", "images"), r"disagree on the input: manifest 'images' .*, model 'input' "),
    ("input-dtype", put("preprocess.dtype", "uint8"), r"disagree on the input: manifest 'input' \[1, 3, 256, 256\] uint8, model 'input' \[1, 3, 256, 256\] float32"),
    ("output-name", put("output_name", "probs"), r"the manifest reads output 'probs' \[1, 5, 256, 256\] logits, the model has 'logits' \[1, 5, 256, 256\] float32"),
    ("output-shape", put("output_shape", [1, 7, 256, 256]), r"disagree on the output: manifest 'logits' \[1, 7, 256, 256\] logits, model 'logits' \[1, 5, 256, 256\] float32"),
    ("output-kind-mask", put("output_kind", "mask"), r"disagree on the output: manifest 'logits' \[1, 5, 256, 256\] mask, model 'logits' \[1, 5, 256, 256\] float32"),
]


@pytest.mark.parametrize("mutate, expected", [pytest.param(m, e, id=i) for i, m, e in ENGINE_IO])
def test_manifest_that_does_not_describe_the_model(tmp_path, default_bundle, mutate, expected):
    from runtime.engines import EngineError, open_engine

    b = tmp_path / "b"
    shutil.copytree(default_bundle.path, b)
    d = _manifest(b)
    mutate(d)
    _write(b, d)
    with pytest.raises(EngineError, match=expected) as e:
        open_engine(Bundle.load(b), "onnxruntime")
    assert "artifact model.onnx" in str(e.value) and "re-create the bundle with `edgeseg convert`" in str(e.value)


# -- the CLI refuses them too: `run` and `inspect` in a subprocess, exit 2, one clear line ----------
def _cli_cases():
    def script_name(b):
        put("model.name", "<script>alert(1)</script>")(d := _manifest(b))
        _write(b, d)

    def path_to(value):
        def make(b):
            put("artifacts.0.path", value(b) if callable(value) else value)(d := _manifest(b))
            _write(b, d)
        return make

    def empty_sha(b):
        put("artifacts.0.sha256", "")(d := _manifest(b))
        _write(b, d)

    return [
        ("script-model-name", script_name, r"\$\.model\.name = \"<script>alert\(1\)</script>\": not allowed"),
        ("dotdot-artifact", path_to("../outside.onnx"), r"\$\.artifacts\[0\]\.path = \"\.\./outside\.onnx\": not allowed"),
        ("absolute-artifact", path_to(lambda b: str(b.parent / "outside.onnx")), r"\$\.artifacts\[0\]\.path = \"/.*outside\.onnx\": not allowed"),
        ("symlinked-artifact", _symlink_out, r"artifact 'model\.onnx' is refused: it is a symlink to .*outside\.onnx, outside"),
        ("empty-checksum", empty_sha, r"\$\.artifacts\[0\]\.sha256 = \"\": not allowed"),
    ]


CLI_BUNDLES = _cli_cases()


@pytest.mark.parametrize("command", ["run", "inspect"])
@pytest.mark.parametrize("make, expected", [pytest.param(m, e, id=i) for i, m, e in CLI_BUNDLES])
def test_cli_refuses_hostile_bundle(tmp_path, default_bundle, command, make, expected):
    b = tmp_path / "b"
    shutil.copytree(default_bundle.path, b)
    (tmp_path / "outside.onnx").write_bytes((b / "model.onnx").read_bytes())
    make(b)
    args = [str(b)] + (["--source", "synthetic://?frames=2"] if command == "run" else [])
    p = subprocess.run([sys.executable, "-m", "edgeseg.cli", command, *args], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"edgeseg {command}: error: "), p.stderr
    assert re.search(expected, lines[0]), lines[0]


def test_corpus_size():
    """The corpus the note reports (rows of every table in this file)."""
    tables = [v for k, v in globals().items() if k.isupper() and isinstance(v, list) and v and isinstance(v[0], tuple)]
    assert sum(map(len, tables)) >= 60
