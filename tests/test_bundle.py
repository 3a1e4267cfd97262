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
    with pytest.raises(BundleError, match=r"\$\.labels: missing required field"):
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


# -- containment: the schema and the Python check agree ---------------------------------------------
PATHS = {
    "model.onnx": True, "model.int8.cpu.onnx": True, "model.fp16.mlpackage": True, "engines/model.sm89.trt10.8.fp16.engine": True,
    "model_v2+q.onnx": True, "": False, "/abs.onnx": False, "../x.onnx": False, "a/../b.onnx": False, "./m.onnx": False,
    "a//b.onnx": False, "a/": False, ".hidden": False, "a\\b.onnx": False, "C:/m.onnx": False, "m.onnx\x00": False,
    "x" * 256: False, "a b.onnx": False,
}


@pytest.mark.parametrize("path, ok", PATHS.items(), ids=[repr(p)[:30] for p in PATHS])
def test_artifact_path_rule_is_the_same_in_the_schema_and_in_python(path, ok):
    from edgeseg import schema
    from edgeseg.files import relative_path_problem

    art = {"path": path, "backend": "onnxruntime", "precision": "fp32", "sha256": "0" * 64}
    d = {**make_manifest_dict(), "artifacts": [art]}
    assert (not any(p.path == "$.artifacts[0].path" for p in schema.problems(d))) is ok
    assert (relative_path_problem(path) is None) is ok


def make_manifest_dict():
    m = Manifest(labels=["bg", "cat"], palette=default_palette(2), preprocess=Preprocess(size=(32, 32)))
    return json.loads(json.dumps(m.to_dict()))


def test_schema_is_valid_and_python_vocabularies_come_from_it():
    from jsonschema.validators import validator_for

    from edgeseg import bundle, spec
    from edgeseg.api import COREML_PRECISIONS, ONNX_PRECISIONS
    from edgeseg import instance_layout
    from edgeseg.schema import load_schema
    from runtime.engines.registry import backend_choices, backend_names

    s = load_schema()
    validator_for(s).check_schema(s)
    defs = s["$defs"]
    assert bundle.BACKENDS == tuple(defs["backend"]["enum"])
    # the engine registry and the schema name the same backends
    assert set(bundle.BACKENDS) == set(backend_names()) == {"onnxruntime", "tensorrt", "coreml", "openvino", "litert"}
    assert bundle.OUTPUT_KINDS == ("logits", "probs", "mask", "instances")
    assert bundle.TASKS == ("semantic-segmentation", "instance-segmentation")
    assert (spec.LAYOUTS, spec.DTYPES, spec.RESIZE_MODES, spec.COLOR_ORDERS) == (
        tuple(defs["layout"]["enum"]), tuple(defs["dtype"]["enum"]), tuple(defs["resize"]["enum"]), tuple(defs["color"]["enum"]))
    assert set(ONNX_PRECISIONS) | set(COREML_PRECISIONS) <= set(bundle.PRECISIONS)
    assert set(backend_choices()) - {"auto"} <= set(bundle.BACKENDS)
    layout = defs["instances"]["properties"]
    assert tuple(layout["layout"]["enum"]) == instance_layout.LAYOUTS
    assert (layout["num_classes"]["maximum"], layout["num_masks"]["maximum"], layout["max_detections"]["maximum"]) == (
        instance_layout.MAX_CLASSES, instance_layout.MAX_MASKS, instance_layout.MAX_DETECTIONS)
    # every field of the layout is in the schema (which refuses unknown ones), with the same choices
    assert set(layout) == set(instance_layout.InstanceLayout.__dataclass_fields__)
    assert tuple(layout["mask_space"]["enum"]) == instance_layout.MASK_SPACES


def test_schema_ships_with_the_package():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())
    assert "schema/*.json" in data["tool"]["setuptools"]["package-data"]["edgeseg"]
    assert "jsonschema" in " ".join(data["project"]["dependencies"])


def test_saved_manifests_are_strict_json_and_checked(tmp_path):
    b = make_bundle(tmp_path / "b")
    b.manifest.artifacts[0].parity["max_rel"] = float("inf")
    b.save()
    assert '"max_rel": null' in (tmp_path / "b" / "manifest.json").read_text()
    b.manifest.artifacts[0].backend = "tflite"
    with pytest.raises(BundleError, match=r"\$\.artifacts\[0\]\.backend = \"tflite\""):
        b.save()
    with pytest.raises(BundleError, match=r"cannot add artifact '\.\./x\.onnx': the path climbs out"):
        b.add_artifact(Artifact("../x.onnx", "onnxruntime", "fp32"))


def test_checksum_is_required_before_opening(tmp_path):
    b = make_bundle(tmp_path / "b")
    art = b.select("onnxruntime")
    art.sha256 = ""
    with pytest.raises(BundleError, match="has no sha256, so it cannot be checked"):
        b.artifact_path(art)


# -- portable manifests ---------------------------------------------------------------------------
def test_manifest_keeps_no_absolute_path_of_this_machine(tmp_path):
    from edgeseg.files import strip_local_paths

    b = make_bundle(tmp_path / "b")
    b.manifest.model.update(checkpoint=str(tmp_path / "runs" / "unet.pt"), note=f"from {tmp_path}/frames (40 images)")
    b.manifest.labels = ["/m/01g317", "cat"]
    b.save()
    text = (tmp_path / "b" / "manifest.json").read_text()
    assert str(tmp_path) not in text
    m = Bundle.load(tmp_path / "b").manifest
    assert m.model["checkpoint"] == "unet.pt" and m.model["note"] == "from frames (40 images)"
    assert m.labels == ["/m/01g317", "cat"]  # not a path of this machine, and labels are kept as given
    assert strip_local_paths(["rtsp://cam/stream", "/m/01g317", "a/b"]) == ["rtsp://cam/stream", "/m/01g317", "a/b"]


# -- one writer at a time ---------------------------------------------------------------------------
def test_two_writers_keep_each_others_artifacts(tmp_path):
    import threading

    path = tmp_path / "b"
    make_bundle(path)
    stale = Bundle.load(path)  # read before the other writer adds its artifact
    inside = threading.Event()
    release = threading.Event()

    def other_writer():
        with Bundle.writing(path) as b:
            inside.set()
            (path / "model.xml").write_bytes(b"ir")
            b.add_artifact(Artifact("model.xml", "openvino", "int8"))
            b.save()
            release.wait(10)

    t = threading.Thread(target=other_writer)
    t.start()
    assert inside.wait(10)
    waited = []
    with pytest.raises(BundleError, match=r"still being written by another edgeseg command after 0 s"):
        with Bundle.writing(path, timeout=0.01):
            pass
    release.set()
    with Bundle.writing(path) as b:  # waits for the other writer, then re-reads
        waited.append([a.path for a in b.manifest.artifacts])
        (path / "model.tflite").write_bytes(b"tfl")
        b.add_artifact(Artifact("model.tflite", "litert", "fp32"))
        b.save()
    t.join()
    assert waited == [["model.onnx", "model.xml"]]
    assert [a.path for a in Bundle.load(path).manifest.artifacts] == ["model.onnx", "model.xml", "model.tflite"]
    assert [a.path for a in stale.manifest.artifacts] == ["model.onnx"]


def test_write_lock_is_reentrant_and_says_when_it_waits(tmp_path, caplog):
    import subprocess
    import sys
    import time

    from edgeseg.bundle import write_lock

    path = tmp_path / "b"
    make_bundle(path)
    with write_lock(path), write_lock(path):  # the same thread may nest writes
        pass
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from edgeseg.bundle import write_lock\n"
        f"with write_lock({str(path)!r}):\n    print('locked', flush=True); time.sleep(1.5)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with caplog.at_level("WARNING", logger="edgeseg.bundle"), write_lock(path):
            waited = time.monotonic() - t0
    finally:
        holder.wait(10)
    assert waited > 0.3
    assert "is being written by another edgeseg command; waiting for it to finish" in caplog.text


# -- temporaries ----------------------------------------------------------------------------------
def test_temporaries_carry_one_prefix_and_stale_ones_go_on_the_next_write(tmp_path):
    import os
    import subprocess
    import sys

    from edgeseg.files import TMP_PREFIX, temp_prefix

    path = tmp_path / "b"
    make_bundle(path)
    with atomic_path(path / "model.xml") as tmp:
        assert tmp.parent.name.startswith(temp_prefix()) and tmp.parent.parent == path
        tmp.write_bytes(b"x")
    # a writer that died (its pid is gone) left a staging folder and a half file; a live one has its own
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    mine = temp_prefix("calibrate-")
    theirs = mine.replace(f"-{os.getpid()}-", f"-{dead_pid}-")
    (path / f"{theirs}x1").mkdir()
    (path / f"{theirs}x1" / "model.int8.cpu.onnx").write_bytes(b"half")
    (tmp_path / f"{theirs}b-x2").write_bytes(b"half")
    (path / f"{mine}live").mkdir()
    (path / f"{TMP_PREFIX}{dead_pid}-ffffffff-elsewhere").mkdir()  # another machine's: not ours to judge
    with Bundle.writing(path):
        pass
    left = sorted(p.name for p in path.iterdir() if p.name.startswith(TMP_PREFIX))
    assert left == sorted([f"{mine}live", f"{TMP_PREFIX}{dead_pid}-ffffffff-elsewhere"])
    assert not any(p.name.startswith(theirs) for p in tmp_path.iterdir())


def test_a_folder_moved_aside_by_a_killed_writer_is_put_back(tmp_path):
    import os
    import subprocess
    import sys

    from edgeseg.files import temp_prefix

    path = tmp_path / "b"
    make_bundle(path)
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    aside = tmp_path / (temp_prefix().replace(f"-{os.getpid()}-", f"-{dead_pid}-").rstrip("-") + ".old.b")
    os.replace(path, aside)  # killed between the two renames of a folder replacement
    with Bundle.writing(path) as b:
        assert [a.path for a in b.manifest.artifacts] == ["model.onnx"]
    assert not aside.exists()
