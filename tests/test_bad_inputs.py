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


# -- sources: (id, URI or how to make one, options, the error) -----------------------------------------
def _empty_folder(tmp):
    (tmp / "empty").mkdir()
    (tmp / "empty" / "notes.txt").write_text("no frames here")
    return str(tmp / "empty")


def _fake_video(tmp):
    (tmp / "clip.mp4").write_bytes(os.urandom(4096))
    return str(tmp / "clip.mp4")


SOURCES = [
    ("missing-file", "missing.mp4", {}, r"cannot open source missing\.mp4: no such file or folder"),
    ("unknown-scheme", "gopher://host/feed", {}, r"unknown source scheme 'gopher'"),
    ("empty-string", "", {}, r"--source must be a camera index, a path or a URI"),
    ("synthetic-unknown-option", "synthetic://?colour=red", {}, r"unknown options \['colour'\]"),
    ("synthetic-negative-frames", "synthetic://?frames=-1", {}, r"need frames >= 0"),
    ("synthetic-gigapixel", "synthetic://?width=100000&height=100000", {},
     r"100000x100000 = 10,000,000,000 pixels is too large \(at most 64,000,000\); ask for a smaller width and height"),
    ("camera-missing", "/dev/video99", {}, r"/dev/video99 does not exist"),
    ("csi-not-a-number", "csi://front", {}, r"expected csi://N with a sensor number"),
    ("folder-without-images", _empty_folder, {}, r"the folder has no images"),
    ("glob-without-match", "nothing-here-*.png", {}, r"the pattern matches no files"),
    ("random-bytes-as-video", _fake_video, {}, r"FFmpeg cannot decode it"),
    ("max-pixels-zero", "synthetic://?frames=1", {"max_pixels": 0}, r"max_pixels must be a positive number of pixels"),
    ("min-side-negative", "synthetic://?frames=1", {"min_side": -1}, r"min_side must be a positive number of pixels"),
]


@pytest.mark.parametrize("uri, options, expected", [pytest.param(u, o, e, id=i) for i, u, o, e in SOURCES])
def test_bad_source(tmp_path, monkeypatch, uri, options, expected):
    from edgeseg.errors import SourceError
    from runtime.sources import open_source

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match=expected):
        with open_source(uri(tmp_path) if callable(uri) else uri, **options) as src:
            list(src)


# -- frames in a folder: (id, the bad file, what it gets) -- skipped and counted, never the end of a run -
def _png(w, h, mode="1"):
    def write(path):
        from PIL import Image

        Image.new(mode, (w, h)).save(path, format="PNG")  # a 1-bit PNG: tiny file, however many pixels
    return write


FOLDER_FRAMES = [
    ("truncated-jpeg", "b.jpg", lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64), "not an image OpenCV can decode"),
    ("zero-bytes", "b.jpg", lambda p: p.write_bytes(b""), "not an image OpenCV can decode"),
    ("text-named-png", "b.png", lambda p: p.write_text("hello"), "not an image OpenCV can decode"),
    ("one-pixel", "b.png", _png(1, 1, "RGB"), "1x1 pixels is too small (at least 2 a side)"),
    ("one-pixel-high", "b.png", _png(640, 1, "RGB"), "640x1 pixels is too small"),
    ("72-megapixels", "b.png", _png(9000, 8000), "9000x8000 = 72,000,000 pixels is too large (at most 64,000,000)"),
    ("gigapixel-bomb", "b.png", _png(40000, 40000), "too large"),
]


def _good(path):
    import cv2
    import numpy as np

    cv2.imwrite(str(path), np.full((48, 64, 3), 120, np.uint8))


@pytest.mark.parametrize("name, make, reason", [pytest.param(n, m, r, id=i) for i, n, m, r in FOLDER_FRAMES])
def test_bad_frame_in_a_folder_is_skipped_and_counted(tmp_path, caplog, name, make, reason):
    from runtime.sources import open_source

    folder = tmp_path / "frames"
    folder.mkdir()
    _good(folder / "a.png")
    make(folder / name)
    _good(folder / "c.png")
    (folder / "._a.png").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork junk: not a frame at all
    with caplog.at_level("WARNING", logger="edgeseg.runtime"), open_source(str(folder)) as src:
        frames = list(src)
    assert [f.name for f in frames] == ["a.png", "c.png"] and src.corrupt == 1
    assert reason in caplog.text


@pytest.mark.parametrize("name, make, reason", [pytest.param(n, m, r, id=i) for i, n, m, r in FOLDER_FRAMES])
def test_bad_image_given_alone_is_a_clear_error(tmp_path, name, make, reason):
    from edgeseg.errors import SourceError
    from runtime.sources import open_source

    make(tmp_path / name)
    with pytest.raises(SourceError, match=re.escape(f"cannot use {tmp_path / name}: ") + ".*" + re.escape(reason)):
        with open_source(str(tmp_path / name)) as src:
            list(src)


def test_a_run_over_a_folder_with_bad_frames_finishes(tmp_path, default_bundle, capsys):
    from edgeseg.cli import main

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        _good(folder / f"{i}.png")
    FOLDER_FRAMES[0][2](folder / "1b.jpg")
    _png(9000, 8000)(folder / "2b.png")
    assert main(["run", str(default_bundle.path), "--source", str(folder), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "3 frames" in out and "corrupt 2" in out, out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.png", "1.png", "2.png"]


def test_a_video_cut_short_is_reported(tmp_path, default_bundle, capsys):
    from edgeseg.cli import main
    from runtime.sources import write_synthetic_clip

    clip = write_synthetic_clip(tmp_path / "clip.avi", frames=30, size=(90, 160))
    data = clip.read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])
    stats = tmp_path / "stats.json"
    assert main(["run", str(default_bundle.path), "--source", str(tmp_path / "cut.avi"), "--stats-json", str(stats)]) == 0
    ended = json.loads(stats.read_text())["info"]["source"]["ended_early"]
    assert ended["frames_announced"] == 30 and 0 < ended["frames_decoded"] < 30
    assert f"the source ended after {ended['frames_decoded']} of the 30 frames its container announces" in capsys.readouterr().err


# -- frames handed to Segmenter.segment: (id, the frame, the error) -----------------------------------
def _frame_cases():
    import numpy as np

    huge = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (8001, 8000, 3))  # no memory behind it
    return [
        ("float-frame", np.zeros((32, 32, 3), np.float32), r"expected uint8 pixels \(0\.\.255\), got float32"),
        ("grayscale", np.zeros((32, 32), np.uint8), r"expected a colour frame \(H, W, 3\), got a single-channel array"),
        ("four-channels", np.zeros((32, 32, 4), np.uint8), r"expected 3 channels \(BGR\), got 4"),
        ("a-list", [[0, 0, 0]], r"expected a frame as a numpy array \(H, W, 3\) uint8 BGR, got list"),
        ("none", None, r"expected a frame as a numpy array .* got NoneType"),
        ("one-pixel", np.zeros((1, 1, 3), np.uint8), r"cannot segment this frame: 1x1 pixels is too small \(at least 2 a side\)"),
        ("five-dimensions", np.zeros((2, 2, 3, 1, 1), np.uint8), r"expected a frame of shape \(H, W, 3\)"),
        ("over-64-megapixels", huge, r"8000x8001 = 64,008,000 pixels is too large \(at most 64,000,000\)"),
    ]


FRAMES = _frame_cases()


@pytest.mark.parametrize("frame, expected", [pytest.param(f, e, id=i) for i, f, e in FRAMES])
def test_bad_frame_to_segment(default_bundle, frame, expected):
    from edgeseg.spec import FrameError
    from runtime.segmenter import Segmenter

    seg = _segmenter(default_bundle)
    with pytest.raises(FrameError, match=expected):
        seg.segment(frame)


_SEGMENTERS = {}


def _segmenter(bundle):
    from runtime.segmenter import Segmenter

    if bundle.path not in _SEGMENTERS:
        _SEGMENTERS[bundle.path] = Segmenter(bundle)
    return _SEGMENTERS[bundle.path]


# -- flags: (id, command line after the bundle, the error) ---------------------------------------------
FLAGS = [
    ("run-serve-port-name", ["run", "{bundle}", "--source", "synthetic://?frames=1", "--serve", "localhost:http"],
     r"--serve expects HOST:PORT or PORT"),
    ("run-serve-port-too-big", ["run", "{bundle}", "--source", "synthetic://?frames=1", "--serve", "127.0.0.1:70000"],
     r"--serve expects HOST:PORT or PORT"),
    ("run-serve-token-short", ["run", "{bundle}", "--source", "synthetic://?frames=1", "--serve", "0.0.0.0:0", "--serve-token", "abc"],
     r"an access token \(--serve-token\) is 16 to 256 characters"),
    ("run-serve-token-without-serve", ["run", "{bundle}", "--source", "synthetic://?frames=1", "--serve-token", "a" * 20],
     r"--serve-token goes with --serve HOST:PORT"),
    ("run-smoothing-1.5", ["run", "{bundle}", "--source", "synthetic://?frames=1", "--smoothing", "1.5"], r"smoothing must be in 0\.\.1"),
    ("run-threshold-2", ["run", "{bundle}", "--source", "synthetic://?frames=1", "--threshold", "2"], r"threshold is a probability in 0\.\.1"),
    ("run-keep-unknown-label", ["run", "{bundle}", "--source", "synthetic://?frames=1", "--keep", "unicorn"], r"unicorn"),
    ("run-max-megapixels-zero", ["run", "{bundle}", "--source", "synthetic://?frames=1", "--max-megapixels", "0"],
     r"--max-megapixels must be a positive number"),
    ("run-precision-missing", ["run", "{bundle}", "--source", "synthetic://?frames=1", "--precision", "int8"], r"int8"),
    ("calibrate-negative-budget", ["calibrate", "{bundle}", "--data", "synthetic:train", "--max-miou-drop", "-1"],
     r"max.miou.drop must be >= 0"),
    ("calibrate-nan-budget", ["calibrate", "{bundle}", "--data", "synthetic:train", "--max-miou-drop", "nan"],
     r"max.miou.drop must be >= 0"),
    ("build-bad-dynamic", ["build", "{bundle}", "--dynamic", "1x3x-5x5"], r"bad shape '1x3x-5x5'"),
]


@pytest.mark.parametrize("argv, expected", [pytest.param(a, e, id=i) for i, a, e in FLAGS])
def test_bad_flag(default_bundle, capsys, argv, expected):
    from edgeseg.cli import main

    status = main([a.replace("{bundle}", str(default_bundle.path)) for a in argv])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err and re.search(expected, err), err


# -- model files given to convert: (id, writer of the file, error) ----------------------------------
def _evil_checkpoint(path: Path) -> None:
    """A checkpoint whose unpickling would run a command: torch.load must refuse it unexecuted."""
    import os
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {path.parent / 'PWNED'}",))

    torch.save({"state_dict": Evil()}, path)


def _onnx_with_external_data_outside(path: Path) -> None:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((3, 3, 1, 1), np.float32), "w")
    w.data_location = TensorProto.EXTERNAL
    w.ClearField("raw_data")
    for k, v in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "36")):
        e = w.external_data.add()
        e.key, e.value = k, v
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 64, 64])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 64, 64])
    g = helper.make_graph([helper.make_node("Conv", ["input", "w"], ["logits"])], "g", [x], [y], [w])
    path.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())


MODEL_FILES = [
    ("code-running-pickle", "evil.pt", _evil_checkpoint, r"cannot read checkpoint \S*evil\.pt: UnpicklingError.*not a torch checkpoint"),
    ("truncated-onnx", "trunc.onnx", lambda p: p.write_bytes(b"\x08\x07\x12\x04abcd\x3a\xff\xff"),
     r"trunc\.onnx is not a valid ONNX model .*re-export it"),
    ("external-data-outside", "outside.onnx", _onnx_with_external_data_outside,
     r"outside\.onnx is not a valid ONNX model .*points outside the directory"),
    ("empty-checkpoint", "empty.pt", lambda p: p.write_bytes(b""), r"empty\.pt"),
]


@pytest.mark.parametrize("name, make, expected", [pytest.param(n, m, e, id=i) for i, n, m, e in MODEL_FILES])
def test_hostile_model_file(tmp_path, capsys, name, make, expected):
    from edgeseg.cli import main

    make(tmp_path / name)
    status = main(["convert", str(tmp_path / name), "--out", str(tmp_path / "bundle"), "--labels", "a,b,c"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err and re.search(expected, err), err
    assert not (tmp_path / "PWNED").exists(), "unpickling ran code from the file"
    assert not (tmp_path / "bundle" / "manifest.json").exists()


# -- HTTP requests to the browser view: (id, server, request, status, text in the answer) ------------
TOKEN = "t0ken-" + "x" * 20


def _get(path="/", host="127.0.0.1:{port}", headers=(), method="GET", version="HTTP/1.1"):
    lines = [f"{method} {path} {version}"] + ([f"Host: {host}"] if host is not None else []) + list(headers)
    return "\r\n".join(lines) + "\r\n\r\n"


HTTP = [
    ("host-evil", "loopback", _get(host="evil.example"), 403, "this view answers to 127.0.0.1, ::1, localhost"),
    ("host-evil-with-port", "loopback", _get(host="evil.example:{port}"), 403, "this view answers to"),
    ("host-missing", "loopback", _get(host=None, version="HTTP/1.0"), 403, "a Host header is required"),
    ("host-suffix-trick", "loopback", _get(host="127.0.0.1.evil.example:{port}"), 403, "this view answers to"),
    ("host-userinfo-trick", "loopback", _get(host="localhost@evil.example:{port}"), 403, "this view answers to"),
    ("host-other-port", "loopback", _get(host="localhost:1"), 403, "port 1 is not this server's"),
    ("host-lan-ip-on-loopback", "loopback", _get(host="192.168.1.5:{port}"), 403, "this view answers to"),
    ("host-garbage", "loopback", _get(host="[::1"), 403, "the Host header is malformed"),
    ("host-ipv6-loopback", "loopback", _get(host="[::1]:{port}"), 200, "<title>"),
    ("host-localhost-capitals", "loopback", _get(host="LOCALHOST:{port}"), 200, "<title>"),
    ("post", "loopback", _get(method="POST"), 501, "Unsupported method"),
    ("path-traversal", "loopback", _get("/../../etc/passwd"), 404, "not found"),
    ("url-too-long", "loopback", _get("/" + "a" * 70000), 414, ""),
    ("stats-no-token-needed-on-loopback", "loopback", _get("/stats.json"), 200, "{"),
    ("token-missing", "network", _get(), 403, "this view needs its access token"),
    ("token-wrong", "network", _get(f"/?token={TOKEN}x"), 403, "this view needs its access token"),
    ("token-right-sets-cookie", "network", _get(f"/?token={TOKEN}"), 303, ""),
    ("token-cookie", "network", _get(headers=[f"Cookie: a=b; edgeseg_token_{{port}}={TOKEN}"]), 200, "<title>"),
    ("token-cookie-wrong", "network", _get(headers=["Cookie: edgeseg_token_{port}=nope"]), 403, "access token"),
    ("token-other-servers-cookie", "network", _get(headers=[f"Cookie: edgeseg_token_1={TOKEN}"]), 403, "access token"),
    ("token-in-query-for-stream-clients", "network", _get(f"/stats.json?token={TOKEN}"), 200, "{"),
    ("token-right-host-evil", "network", _get(f"/?token={TOKEN}", host="evil.example:{port}"), 403, "this view answers to"),
    ("ip-literal-on-wildcard-bind", "network", _get(f"/stats.json?token={TOKEN}", host="10.1.2.3:{port}"), 200, "{"),
]


@pytest.fixture(scope="module")
def servers():
    from runtime.server import FrameServer

    with FrameServer("127.0.0.1", 0, title="<script>alert(1)</script> & co") as loopback, \
            FrameServer("0.0.0.0", 0, token=TOKEN) as network:
        yield {"loopback": loopback, "network": network}


def _ask(port: int, request: str) -> tuple[int, dict, bytes]:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request.encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("server, request_text, status, text", [pytest.param(*row[1:], id=row[0]) for row in HTTP])
def test_bad_http_request(servers, server, request_text, status, text):
    srv = servers[server]
    code, headers, body = _ask(srv.port, request_text.replace("{port}", str(srv.port)))
    assert code == status, body[:300]
    assert text in body.decode("utf-8", "replace")
    # every answer, refusals and errors included, carries the protections
    assert headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in headers["content-security-policy"] and "script-src 'self'" in headers["content-security-policy"]
    assert headers["referrer-policy"] == "no-referrer" and headers["cache-control"] == "no-store"
    assert headers["server"] == "edgeseg"
    if code == 303:
        assert headers["location"] == "/"
        assert headers["set-cookie"] == f"edgeseg_token_{srv.port}={TOKEN}; HttpOnly; SameSite=Strict; Path=/"


def test_page_escapes_the_title_and_has_no_inline_script(servers):
    srv = servers["loopback"]
    _, _, body = _ask(srv.port, _get(host=f"127.0.0.1:{srv.port}"))
    page = body.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page and "<script>alert" not in page
    assert page.count("<script") == 1 and '<script src="/app.js"></script>' in page and "<style" not in page


# -- server settings: (id, FrameServer keywords, the error) ---------------------------------------------
SERVER_SETTINGS = [
    ("token-too-short", {"token": "short"}, r"an access token \(--serve-token\) is 16 to 256 characters"),
    ("token-header-injection", {"token": "a" * 20 + ";\r\nSet-Cookie: x=1"}, r"16 to 256 characters of letters, digits and \._~-"),
    ("token-not-a-string", {"token": 12345678901234567890}, r"an access token"),
]


@pytest.mark.parametrize("options, expected", [pytest.param(o, e, id=i) for i, o, e in SERVER_SETTINGS])
def test_bad_server_setting(options, expected):
    from runtime.server import FrameServer, ServerError

    with pytest.raises(ServerError, match=expected):
        FrameServer("0.0.0.0", 0, **options)


def test_network_bind_without_a_token_gets_one():
    from runtime.server import FrameServer

    with FrameServer("0.0.0.0", 0) as srv:
        assert srv.token and len(srv.token) >= 24 and srv.url.endswith(f"?token={srv.token}")
        code, _, _ = _ask(srv.port, _get(host=f"127.0.0.1:{srv.port}"))
        assert code == 403


def test_corpus_size():
    """The corpus the note reports (rows of every table in this file)."""
    tables = [v for k, v in globals().items() if k.isupper() and isinstance(v, list) and v and isinstance(v[0], tuple)]
    assert sum(map(len, tables)) >= 60
