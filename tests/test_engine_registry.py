"""The one table of backends: every backend list derives from it, `auto` follows its order, and a
new backend is one module plus one registry line."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from edgeseg.bundle import Artifact, Bundle, BundleError, Manifest, default_palette
from edgeseg.spec import Preprocess
from runtime.engines import registry
from runtime.engines.base import EngineError, EngineIO, TensorInfo, open_engine, resolve_backend

KNOWN = ("onnxruntime", "tensorrt", "coreml", "openvino", "litert")


def _bundle(tmp_path, *artifacts: tuple[str, str, str]) -> Bundle:
    b = Bundle.create(tmp_path / "bundle", Manifest(labels=["bg", "fg"], palette=default_palette(2),
                                                     preprocess=Preprocess(size=(8, 8))))
    for path, backend, precision in artifacts:
        (b.path / path).write_bytes(b"x")
        b.add_artifact(Artifact(path, backend, precision))
    b.save()
    return Bundle.load(b.path)


def test_the_table_names_every_known_backend():
    assert sorted(registry.backend_names()) == sorted(KNOWN)
    assert registry.backend_choices() == ("auto", *registry.backend_names())
    order = [b.name for b in registry.auto_order()]
    assert order.index("tensorrt") < order.index("openvino") < order.index("onnxruntime")
    assert order.index("coreml") < order.index("onnxruntime")
    with pytest.raises(EngineError, match="unknown backend 'tflite'; choose one of auto, "):
        registry.get_backend("tflite")


@pytest.mark.parametrize("command", ["run", "bench", "demo"])
def test_cli_backend_choices_come_from_the_registry(command):
    import argparse
    import importlib

    p = argparse.ArgumentParser()
    importlib.import_module(f"edgeseg.commands.{command}").add_arguments(p)
    (action,) = [a for a in p._actions if a.dest == "backend"]
    assert tuple(action.choices) == registry.backend_choices()


def test_cli_rejects_an_unknown_backend(capsys):
    from edgeseg.cli import main

    with pytest.raises(SystemExit) as e:
        main(["run", "bundle", "--source", "0", "--backend", "tflite"])
    assert e.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err


def test_manifest_backends_come_from_the_registry(tmp_path):
    b = _bundle(tmp_path, *[(f"m.{n}", n, "fp32") for n in KNOWN])
    assert {a.backend for a in b.manifest.artifacts} == set(KNOWN)
    d = json.loads((b.path / "manifest.json").read_text())
    d["artifacts"][0]["backend"] = "tvm"
    (b.path / "manifest.json").write_text(json.dumps(d))
    # the manifest schema lists the registry's names (tests/test_bundle.py keeps them equal)
    with pytest.raises(BundleError, match=r"\$\.artifacts\[0\]\.backend = \"tvm\": 'tvm' is not one of .*a newer edgeseg may know more"):
        Bundle.load(b.path)


def test_select_prefers_the_backends_quantization_target(tmp_path):
    b = _bundle(tmp_path, ("a.onnx", "onnxruntime", "int8"), ("b.onnx", "onnxruntime", "int8"))
    b.manifest.artifacts[0].target, b.manifest.artifacts[1].target = "tensorrt", "cpu"
    assert registry.get_backend("onnxruntime").quant_target == "cpu"
    assert b.select("onnxruntime", "int8").path == "b.onnx"


def test_auto_on_this_machine(tmp_path):
    b = _bundle(tmp_path, ("model.onnx", "onnxruntime", "fp32"), ("model.sm89.trt10.8.fp16.engine", "tensorrt", "fp16"))
    name, why = resolve_backend("auto", b)
    ok, trt_why = registry.get_backend("tensorrt").available()
    if not ok:  # no TensorRT or GPU here: ONNX Runtime, saying why not TensorRT
        assert name == "onnxruntime" and f"not tensorrt: {trt_why}" in why
    assert resolve_backend("tensorrt", b) == ("tensorrt", "requested")
    with pytest.raises(EngineError, match="unknown backend"):
        resolve_backend("tflite", b)


def test_auto_follows_the_table(tmp_path, monkeypatch):
    import runtime.engines.tensorrt as trt_mod

    b = _bundle(tmp_path, ("model.onnx", "onnxruntime", "fp32"), ("e.engine", "tensorrt", "fp16"))
    monkeypatch.setattr(trt_mod, "available", lambda: (True, "a GPU (stand-in)"))
    monkeypatch.setattr(trt_mod, "bundle_problem", lambda bundle, precision: None)
    assert resolve_backend("auto", b) == ("tensorrt", "a GPU (stand-in)")
    # an engine built for another GPU: auto moves on, and says why
    monkeypatch.setattr(trt_mod, "bundle_problem", lambda bundle, precision: "e.engine: built for compute capability 7.5")
    name, why = resolve_backend("auto", b)
    assert name == "onnxruntime" and "not tensorrt: e.engine: built for compute capability 7.5" in why
    # a precision only one backend has
    assert resolve_backend("auto", b, "fp32")[0] == "onnxruntime"


def test_auto_without_a_runnable_artifact_names_each_reason(tmp_path, monkeypatch):
    b = _bundle(tmp_path, ("model.mlpackage", "coreml", "fp16"))
    monkeypatch.setattr(registry.platform, "system", lambda: "Linux")
    with pytest.raises(EngineError) as e:
        resolve_backend("auto", b)
    msg = str(e.value)
    assert "it has: coreml/fp16" in msg and "not coreml: runs only on Darwin (this is Linux)" in msg
    assert "not onnxruntime: the bundle has no onnxruntime artifact" in msg and "edgeseg convert" in msg


def test_openvino_is_automatic_on_x86_only(tmp_path, monkeypatch):
    b = _bundle(tmp_path, ("model.onnx", "onnxruntime", "fp32"), ("model.xml", "openvino", "int8"))
    ov = registry.get_backend("openvino")
    monkeypatch.setattr(registry.Backend, "available",
                        lambda self: (True, f"{self.name} (stand-in)") if self.name == "openvino" else (False, "absent"))
    monkeypatch.setattr(registry.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(registry.Backend, "bundle_problem", lambda self, bundle, precision=None: None)
    assert resolve_backend("auto", b)[0] == "openvino"
    monkeypatch.setattr(registry.platform, "machine", lambda: "aarch64")
    assert ov.platform_problem().startswith("used automatically only on x86_64")
    with pytest.raises(EngineError, match="not openvino: used automatically only on x86_64"):
        resolve_backend("auto", b)  # and onnxruntime is "absent" in this stand-in


class _EchoEngine(EngineIO):
    backend = "echo"
    precision = "fp32"

    def __init__(self, path):
        self.path = path
        self._inputs = [TensorInfo("input", (1, 3, 8, 8), np.dtype(np.float32))]
        self._outputs = [TensorInfo("logits", (1, 2, 8, 8), np.dtype(np.float32))]

    @classmethod
    def from_bundle(cls, bundle, precision=None, **options):
        return cls(bundle.artifact_path(bundle.select("echo", precision)))

    def infer(self, batch):
        return {"logits": np.concatenate([-batch[:, :1], batch[:, :1]], axis=1)}

    def close(self):
        pass


def test_a_new_backend_is_one_module_and_one_line(tmp_path, monkeypatch):
    module = types.ModuleType("runtime.engines.echo")
    module.EchoEngine = _EchoEngine
    module.available = lambda: (True, "always")
    monkeypatch.setitem(sys.modules, "runtime.engines.echo", module)
    entry = registry.Backend("echo", "runtime.engines.echo", "EchoEngine", ("echo",), auto=-1)
    monkeypatch.setattr(registry, "BACKENDS", (*registry.BACKENDS, entry))
    monkeypatch.setitem(registry._BY_NAME, "echo", entry)
    b = _bundle(tmp_path, ("model.onnx", "onnxruntime", "fp32"), ("model.echo", "echo", "fp32"))
    assert resolve_backend("auto", b) == ("echo", "always")
    engine = open_engine(b)
    assert isinstance(engine, _EchoEngine) and engine.path == b.path / "model.echo"
    from runtime.segmenter import Segmenter

    seg = Segmenter(b)
    assert seg.backend == "echo"
    r = seg.segment(np.full((16, 16, 3), 200, np.uint8))
    assert r.class_map.shape == (16, 16)


def test_missing_backend_module_is_reported(tmp_path, monkeypatch):
    entry = registry.Backend("ghost", "runtime.engines.ghost_does_not_exist", "GhostEngine", ("ghost",), auto=None)
    ok, why = entry.available()
    assert not ok and "not part of this edgeseg installation" in why
    with pytest.raises(EngineError, match="backend 'ghost' is not part of this edgeseg installation"):
        entry.engine_class()
