"""Engine cache keys, headers, stale-engine detection and the clear errors where TensorRT or a GPU is
missing — all on CPU. The builder's TensorRT 10 / 11 branching is checked against a stand-in module
that records calls (it builds nothing; real builds are in test_tensorrt_engine.py, marked tensorrt)."""
from __future__ import annotations

import enum
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters import tensorrt as ct
from converters.tensorrt import BuildOptions, EngineHeader, Target
from edgeseg.bundle import Artifact, Bundle, Manifest, default_palette, sha256_file
from edgeseg.errors import ConversionError
from edgeseg.spec import Preprocess
from runtime.engines.base import EngineError

T4 = Target("10.8.0.43", (7, 5), "Tesla T4")
L4 = Target("10.8.0.43", (8, 9), "NVIDIA L4")


def _onnx(path: Path, dynamic: bool = False, fp16: bool = False, qdq: bool = False) -> Path:
    dims = ["N", 3, "H", "W"] if dynamic else [1, 3, 16, 16]
    dtype = np.float16 if fp16 else np.float32
    inits = [numpy_helper.from_array(np.ones((2, 3, 1, 1), dtype), "w")]
    nodes = [helper.make_node("Conv", ["x" if not fp16 else "x16", "w"], ["logits" if not fp16 else "y16"], name="conv")]
    if fp16:
        nodes = ([helper.make_node("Cast", ["input"], ["x16"], to=TensorProto.FLOAT16, name="in_cast")] + nodes +
                 [helper.make_node("Cast", ["y16"], ["logits"], to=TensorProto.FLOAT, name="out_cast")])
    elif qdq:
        inits += [numpy_helper.from_array(np.array(0.02, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
        nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"], name="q"),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["x"], name="dq")] + nodes
    else:
        nodes = [helper.make_node("Identity", ["input"], ["x"], name="id")] + nodes
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], initializer=inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


# -- keys and headers ------------------------------------------------------------------------------
def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGESEG_CACHE", str(tmp_path / "c"))
    assert ct.cache_dir() == tmp_path / "c" / "engines"
    monkeypatch.delenv("EDGESEG_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ct.cache_dir() == tmp_path / "xdg" / "edgeseg" / "engines"


def test_engine_key_covers_everything_the_engine_depends_on():
    base = BuildOptions("fp16")
    key = ct.engine_key("abc", T4, base)
    assert key == ct.engine_key("abc", Target(T4.trt_version, T4.compute_capability, "another T4 name"), BuildOptions("fp16"))
    variants = [
        ct.engine_key("abd", T4, base),
        ct.engine_key("abc", Target("10.9.0.34", (7, 5)), base),
        ct.engine_key("abc", L4, base),
        ct.engine_key("abc", T4, BuildOptions("fp32")),
        ct.engine_key("abc", T4, BuildOptions("fp16", shapes={"input": [[1, 3, 64, 64], [1, 3, 256, 256], [4, 3, 512, 512]]})),
        ct.engine_key("abc", T4, BuildOptions("fp16", workspace_mb=512)),
        ct.engine_key("abc", T4, BuildOptions("fp16", version_compatible=True)),
        ct.engine_key("abc", T4, BuildOptions("fp16", optimization_level=5)),
        ct.engine_key("abc", T4, BuildOptions("fp16", tf32=False)),
    ]
    assert len({key, *variants}) == len(variants) + 1
    # The timing cache path and device index do not change the engine.
    assert key == ct.engine_key("abc", T4, BuildOptions("fp16", timing_cache="/tmp/tc", device=1))
    # Hardware-compatible engines are keyed on "Ampere or newer", not the exact GPU.
    hw = BuildOptions("fp16", hardware_compatible=True)
    assert ct.engine_key("abc", L4, hw) == ct.engine_key("abc", Target(L4.trt_version, (8, 0), "A100"), hw)


def test_build_options_validate():
    with pytest.raises(ConversionError, match="precision"):
        BuildOptions("int4")
    with pytest.raises(ConversionError, match="min <= opt <= max"):
        BuildOptions("fp16", shapes={"input": [[1, 3, 512, 512], [1, 3, 256, 256], [1, 3, 1024, 1024]]})
    with pytest.raises(ConversionError, match="workspace"):
        BuildOptions("fp16", workspace_mb=0)
    assert ct.normalize_shapes({"input": [1, 3, 8, 8]}) == {"input": [[1, 3, 8, 8]] * 3}


def _header(target: Target = T4, options: BuildOptions | None = None, model_sha: str = "m" * 64, **changes) -> EngineHeader:
    options = options or BuildOptions("fp16")
    h = EngineHeader(key=ct.engine_key(model_sha, target, options), model_sha256=model_sha, trt_version=target.trt_version,
                     compute_capability=list(target.compute_capability), gpu_name=target.gpu_name,
                     precision=options.precision, shapes=options.shapes, options=options.key_fields())
    for k, v in changes.items():
        setattr(h, k, v)
    return h


def test_stale_engine_from_another_tensorrt_or_gpu():
    h = _header()
    assert ct.stale_reasons(h, T4) == []
    (why,) = ct.stale_reasons(h, Target("10.9.0.34", (7, 5), "Tesla T4"))
    assert "TensorRT 10.8.0.43" in why and "10.9.0.34" in why
    (why,) = ct.stale_reasons(h, L4)
    assert "7.5" in why and "8.9" in why and "NVIDIA L4" in why
    assert ct.stale_reasons(h, T4, model_sha256="x" * 64) == ["built from a different ONNX model"]
    assert ct.stale_reasons(h, T4, options=BuildOptions("int8"))[0].startswith("built for fp16, int8 requested")


def test_version_and_hardware_compatible_engines():
    vc = _header(options=BuildOptions("fp16", version_compatible=True))
    assert ct.stale_reasons(vc, Target("10.9.0.34", (7, 5))) == []  # later runtime: fine
    assert ct.stale_reasons(vc, Target("10.7.0.23", (7, 5)))  # older runtime: not
    assert ct.stale_reasons(vc, Target("11.1.0.5", (7, 5))) == []  # 10 -> 11: the step TensorRT 11 documents


@pytest.mark.parametrize("built,runtime,ok", [
    ("10.8.0.43", "10.8.0.43", True), ("10.8.0.43", "10.13.2.6", True), ("11.0.0.1", "11.4.0.106", True),
    ("8.6.1.6", "10.3.0.30", True), ("8.6.1.6", "9.2.0.5", True), ("10.3.0.30", "11.1.0.5", True),
    ("10.9.0.34", "10.8.0.43", False),  # an older runtime never
    ("8.6.1.6", "11.1.0.5", False),  # two majors: not a documented step
    ("11.1.0.5", "12.0.0.1", False),  # an undocumented step
    ("9.2.0.5", "10.3.0.30", False),
    ("8.5.3.1", "8.6.1.6", False),  # version compatibility starts with 8.6
])
def test_version_compatibility_rule(built, runtime, ok):
    header = _header(target=Target(built, (8, 9)), options=BuildOptions("fp16", version_compatible=True))
    reasons = ct.stale_reasons(header, Target(runtime, (8, 9)))
    assert (reasons == []) is ok, reasons


def test_fp32_engines_are_built_without_tf32():
    assert BuildOptions("fp32").tf32 is False and BuildOptions("fp16").tf32 is True
    assert BuildOptions("fp32").key_fields()["tf32"] is False
    # an fp32 engine built before TF32 was part of the key (its header lacks it) is stale: TF32 was on
    old = _header(options=BuildOptions("fp32"))
    old.options.pop("tf32")
    assert "tf32=None (want False)" in ct.stale_reasons(old, T4, options=BuildOptions("fp32"))[0]
    hw = _header(target=L4, options=BuildOptions("fp16", hardware_compatible=True))
    assert ct.stale_reasons(hw, Target(L4.trt_version, (8, 0), "A100")) == []
    assert "Ampere" in ct.stale_reasons(hw, T4)[0]


def test_header_roundtrip_and_unknown_version(tmp_path):
    h = _header()
    h.save(tmp_path / "e.engine.json")
    assert EngineHeader.load(tmp_path / "e.engine.json") == h
    data = h.to_dict() | {"header_version": 99}
    with pytest.raises(ConversionError, match="unknown engine header version"):
        EngineHeader.from_dict(data)


def _cache_entry(directory: Path, onnx_path: Path, target: Target, options: BuildOptions, **changes) -> Path:
    sha = sha256_file(onnx_path)
    path = directory / f"{sha[:12]}-{ct.engine_key(sha, target, options)}.engine"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"serialized engine bytes")
    h = _header(target, options, sha, engine_sha256=sha256_file(path), **changes)
    h.save(ct.header_path(path))
    return path


def test_cache_entry_checks(tmp_path):
    onnx_path = _onnx(tmp_path / "m.onnx")
    sha, opts = sha256_file(onnx_path), BuildOptions("fp16")
    path = _cache_entry(tmp_path / "cache", onnx_path, T4, opts)
    assert ct.cache_entry_problem(path, T4, sha, opts) is None
    assert "8.9" in ct.cache_entry_problem(path, L4, sha, opts)
    path.write_bytes(b"something else")
    assert "checksum" in ct.cache_entry_problem(path, T4, sha, opts)
    ct.header_path(path).unlink()
    assert "no header" in ct.cache_entry_problem(path, T4, sha, opts)
    # A header copied from another TensorRT version next to the engine: detected, not trusted.
    path = _cache_entry(tmp_path / "cache2", onnx_path, T4, opts, trt_version="10.0.1.6")
    assert "TensorRT 10.0.1.6" in ct.cache_entry_problem(path, T4, sha, opts)


def test_cached_engine_reuses_valid_and_rebuilds_stale(tmp_path, monkeypatch):
    onnx_path = _onnx(tmp_path / "m.onnx")
    opts = BuildOptions("fp16")
    path = _cache_entry(tmp_path / "cache", onnx_path, T4, opts)
    built = []

    def fake_build(src, dst, options, target=None):
        built.append((Path(src), Path(dst), options.precision, target))
        return _header(target, options, sha256_file(src))

    monkeypatch.setattr(ct.builder, "build_engine", fake_build)
    got, header = ct.cached_engine(onnx_path, opts, target=T4, directory=tmp_path / "cache")
    assert got == path and header.trt_version == T4.trt_version and built == []
    # Same cache entry, but its header says another GPU built it: rebuilt in place.
    _cache_entry(tmp_path / "cache", onnx_path, T4, opts, compute_capability=[8, 6])
    got, _ = ct.cached_engine(onnx_path, opts, target=T4, directory=tmp_path / "cache")
    assert built == [(onnx_path, path, "fp16", T4)]
    ct.cached_engine(onnx_path, opts, target=T4, directory=tmp_path / "cache", rebuild=True)
    assert len(built) == 2


def test_engine_filename():
    assert ct.engine_filename(L4, BuildOptions("fp16")) == "model.sm89.trt10.8.fp16.engine"
    assert ct.engine_filename(L4, BuildOptions("int8", hardware_compatible=True, version_compatible=True)) == \
        "model.ampere_plus.trt10.8vc.int8.engine"


# -- missing TensorRT / GPU ------------------------------------------------------------------------
def _bundle(tmp_path: Path) -> Bundle:
    b = Bundle.create(tmp_path / "bundle", Manifest(labels=["bg", "fg"], palette=default_palette(2),
                                                     preprocess=Preprocess(size=(16, 16)), input_shape=[1, 3, 16, 16]))
    _onnx(b.path / "model.onnx")
    b.add_artifact(Artifact("model.onnx", "onnxruntime", "fp32"))
    b.save()
    return b


def test_missing_tensorrt_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ConversionError, match=r"TensorRT is not installed.*edgeseg\[tensorrt\]"):
        ct.import_tensorrt()
    b = _bundle(tmp_path)
    with pytest.raises(ConversionError, match="TensorRT is not installed"):
        ct.build_bundle_engine(b.path, "fp16")
    from runtime.engines.base import open_engine
    from runtime.engines.tensorrt import TensorRTEngine

    with pytest.raises(EngineError, match="TensorRT is not installed.*--backend onnxruntime"):
        TensorRTEngine.from_bundle(b)
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        open_engine(b, backend="tensorrt")


def test_lean_runtime_without_builder_is_named(monkeypatch):
    lean = types.ModuleType("tensorrt")
    lean.__version__ = "11.4.0.106"
    lean.Runtime = object
    monkeypatch.setitem(sys.modules, "tensorrt", lean)
    with pytest.raises(ConversionError, match="no builder"):
        ct.import_tensorrt()


def test_missing_gpu_is_a_clear_error(monkeypatch, tmp_path):
    trt_mod = types.ModuleType("tensorrt")
    trt_mod.__version__ = "10.8.0.43"
    monkeypatch.setitem(sys.modules, "tensorrt", trt_mod)
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(ConversionError, match="pycuda is not installed"):
        ct.current_target(0, trt_mod)
    from runtime.engines.tensorrt import TensorRTEngine

    engine_file = tmp_path / "x.engine"
    engine_file.write_bytes(b"x")
    with pytest.raises(EngineError, match="pycuda is not installed"):
        TensorRTEngine(engine_file)


def test_int8_needs_the_calibrated_graph(tmp_path):
    b = _bundle(tmp_path)
    with pytest.raises(ConversionError, match="edgeseg calibrate .* --target tensorrt"):
        ct.bundle_engine_source(b, "int8")
    _onnx(b.path / ct.INT8_GRAPH, qdq=True)
    assert ct.bundle_engine_source(b, "int8") == b.path / ct.INT8_GRAPH


def test_cli_build_without_tensorrt_exits_2(tmp_path, monkeypatch, capsys):
    from edgeseg.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    b = _bundle(tmp_path)
    assert main(["build", str(b.path), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "edgeseg build: error: TensorRT is not installed" in err
    assert main(["build", str(tmp_path / "nope")]) == 2
    assert "bundle not found" in capsys.readouterr().err


def test_cli_prepare_only_runs_preflight_on_cpu(tmp_path, capsys):
    from edgeseg.cli import main

    b = _bundle(tmp_path)
    assert main(["build", str(b.path), "--precision", "fp32", "--prepare-only"]) == 0
    assert "TensorRT preflight passed" in capsys.readouterr().out


def test_cli_dynamic_shapes_parse():
    from edgeseg.commands.build import parse_dynamic

    assert parse_dynamic(["1x3x256x256:1x3x512x512:4x3x1024x1024"]) == \
        {None: [[1, 3, 256, 256], [1, 3, 512, 512], [4, 3, 1024, 1024]]}
    assert parse_dynamic(["img=1,3,64,64"]) == {"img": [[1, 3, 64, 64]] * 3}
    with pytest.raises(ConversionError, match="NxCxHxW"):
        parse_dynamic(["1x3xbig"])


# -- builder calls on TensorRT 10 (flags) and 11 (strongly typed) -----------------------------------
class _RecordingTensorRT(types.ModuleType):
    """Stands in for the `tensorrt` module: records what the builder asks of it. Its 'engine' is a JSON
    dump of those calls, which is all the assertions below look at."""

    def __init__(self, version: str, precision_flags: bool):
        super().__init__("tensorrt")
        self.__version__ = version
        self.calls: list = []
        flags = ["VERSION_COMPATIBLE", "TF32"] + (["FP16", "INT8"] if precision_flags else [])
        self.BuilderFlag = enum.Enum("BuilderFlag", flags)
        self.NetworkDefinitionCreationFlag = enum.IntEnum(
            "NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if precision_flags else {"STRONGLY_TYPED": 0})
        self.MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE"])
        self.HardwareCompatibilityLevel = enum.Enum("HardwareCompatibilityLevel", ["NONE", "AMPERE_PLUS"])
        self.DataType = enum.Enum("DataType", ["FLOAT", "HALF"])
        rec = self

        class ILogger:
            Severity = enum.IntEnum("Severity", ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"])

            def __init__(self):
                pass

        class IProgressMonitor:
            def __init__(self):
                pass

        class Tensor:
            def __init__(self, vi):
                self.name = vi.name
                self.shape = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
                self.dtype = rec.DataType.FLOAT

        class Network:
            inputs: list = []
            outputs: list = []

            @property
            def num_inputs(self):
                return len(self.inputs)

            @property
            def num_outputs(self):
                return len(self.outputs)

            def get_input(self, i):
                return self.inputs[i]

            def get_output(self, i):
                return self.outputs[i]

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                rec.calls.append(("parse_from_file", Path(path).name))
                m = onnx.load(path)
                self.network.inputs = [Tensor(v) for v in m.graph.input]
                self.network.outputs = [Tensor(v) for v in m.graph.output]
                return True

        class Profile:
            def set_shape(self, name, mn, opt, mx):
                rec.calls.append(("set_shape", name, mn, opt, mx))

        class TimingCache:
            def serialize(self):
                return b"timing-cache"

        class Config:
            def __setattr__(self, name, value):
                rec.calls.append((name, value if not isinstance(value, IProgressMonitor) else "IProgressMonitor"))
                object.__setattr__(self, name, value)

            def set_flag(self, flag):
                rec.calls.append(("set_flag", flag.name))

            def clear_flag(self, flag):
                rec.calls.append(("clear_flag", flag.name))

            def set_memory_pool_limit(self, pool, size):
                rec.calls.append(("set_memory_pool_limit", pool.name, size))

            def add_optimization_profile(self, p):
                rec.calls.append(("add_optimization_profile",))

            def create_timing_cache(self, data):
                rec.calls.append(("create_timing_cache", bytes(data)))
                return TimingCache()

            def set_timing_cache(self, cache, ignore_mismatch):
                rec.calls.append(("set_timing_cache", ignore_mismatch))
                return True

            def get_timing_cache(self):
                return TimingCache()

        class Builder:
            def __init__(self, logger):
                assert isinstance(logger, ILogger)

            def create_network(self, flags=0):
                rec.calls.append(("create_network", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return json.dumps(rec.calls, default=str).encode()

        self.ILogger, self.IProgressMonitor, self.OnnxParser, self.Builder = ILogger, IProgressMonitor, OnnxParser, Builder

    def init_libnvinfer_plugins(self, logger, namespace):
        self.calls.append(("init_libnvinfer_plugins", namespace))
        return True


def _names(calls):
    return [c[0] for c in calls]


def test_tensorrt10_uses_precision_flags(tmp_path, monkeypatch):
    import runtime.engines.tensorrt as trt_engine

    rt = _RecordingTensorRT("10.8.0.43", precision_flags=True)
    monkeypatch.setitem(sys.modules, "tensorrt", rt)
    monkeypatch.setattr(trt_engine, "_PLUGINS_READY", False)
    opts = BuildOptions("int8", workspace_mb=256, timing_cache=str(tmp_path / "tc.bin"), version_compatible=True)
    header = ct.build_engine(_onnx(tmp_path / "q.onnx", qdq=True), tmp_path / "e.engine", opts, target=L4)
    # TensorRT's plugins are registered before parsing: the parser builds RoiAlign from one
    assert _names(rt.calls).index("init_libnvinfer_plugins") < _names(rt.calls).index("parse_from_file")
    assert ("create_network", 0) in rt.calls
    assert ("set_flag", "FP16") in rt.calls and ("set_flag", "INT8") in rt.calls
    assert ("set_flag", "VERSION_COMPATIBLE") in rt.calls
    assert ("set_memory_pool_limit", "WORKSPACE", 256 << 20) in rt.calls
    assert ("set_timing_cache", False) in rt.calls and ("progress_monitor", "IProgressMonitor") in rt.calls
    assert (tmp_path / "tc.bin").read_bytes() == b"timing-cache"
    assert "add_optimization_profile" not in _names(rt.calls)  # static input: no profile needed
    assert header.strongly_typed is False and header.precision == "int8"
    assert ("clear_flag", "TF32") not in rt.calls  # TF32 stays TensorRT's default outside fp32 engines
    assert EngineHeader.load(ct.header_path(tmp_path / "e.engine")) == header
    assert header.engine_sha256 == sha256_file(tmp_path / "e.engine")


def test_tensorrt11_is_strongly_typed(tmp_path, monkeypatch):
    rt = _RecordingTensorRT("11.4.0.106", precision_flags=False)
    monkeypatch.setitem(sys.modules, "tensorrt", rt)
    with pytest.raises(ConversionError, match="float16 graph"):
        ct.build_engine(_onnx(tmp_path / "m.onnx"), tmp_path / "e.engine", BuildOptions("fp16"), target=L4)
    assert not (tmp_path / "e.engine").exists()
    header = ct.build_engine(_onnx(tmp_path / "m16.onnx", fp16=True), tmp_path / "e.engine", BuildOptions("fp16"), target=L4)
    assert header.strongly_typed and "set_flag" not in _names(rt.calls)


def test_tensorrt10_strong_typing_on_request(tmp_path, monkeypatch):
    rt = _RecordingTensorRT("10.13.0.35", precision_flags=True)
    monkeypatch.setitem(sys.modules, "tensorrt", rt)
    with pytest.raises(ConversionError, match="float16 graph"):
        ct.build_engine(_onnx(tmp_path / "m.onnx"), tmp_path / "e.engine", BuildOptions("fp16", strongly_typed=True), target=L4)
    header = ct.build_engine(_onnx(tmp_path / "m16.onnx", fp16=True), tmp_path / "e.engine",
                             BuildOptions("fp16", strongly_typed=True), target=L4)
    assert ("create_network", 1 << 1) in rt.calls and "set_flag" not in _names(rt.calls)
    assert header.strongly_typed and header.options["strongly_typed"] is True
    assert ct.engine_key("m", L4, BuildOptions("fp16", strongly_typed=True)) != ct.engine_key("m", L4, BuildOptions("fp16"))


def test_dynamic_inputs_get_a_profile(tmp_path, monkeypatch):
    rt = _RecordingTensorRT("10.8.0.43", precision_flags=True)
    monkeypatch.setitem(sys.modules, "tensorrt", rt)
    path = _onnx(tmp_path / "d.onnx", dynamic=True)
    with pytest.raises(ConversionError, match="dynamic axes.*--dynamic"):
        ct.build_engine(path, tmp_path / "e.engine", BuildOptions("fp32"), target=L4)
    assert ("clear_flag", "TF32") not in rt.calls  # nothing was configured for the failed build
    shapes = {"input": [[1, 3, 64, 64], [1, 3, 256, 256], [2, 3, 512, 512]]}
    header = ct.build_engine(path, tmp_path / "e.engine", BuildOptions("fp32", shapes=shapes,
                                                                      hardware_compatible=True), target=L4)
    assert ("set_shape", "input", [1, 3, 64, 64], [1, 3, 256, 256], [2, 3, 512, 512]) in rt.calls
    assert ("hardware_compatibility_level", rt.HardwareCompatibilityLevel.AMPERE_PLUS) in rt.calls
    assert header.shapes == shapes and "set_flag" not in _names(rt.calls)
    assert ("clear_flag", "TF32") in rt.calls and header.options["tf32"] is False  # an fp32 engine computes in fp32
    with pytest.raises(ConversionError, match="Ampere"):
        ct.build_engine(path, tmp_path / "e2.engine", BuildOptions("fp32", shapes=shapes, hardware_compatible=True), target=T4)


def test_static_input_rejects_other_shapes(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", _RecordingTensorRT("10.8.0.43", precision_flags=True))
    with pytest.raises(ConversionError, match="static .* --dynamic"):
        ct.build_engine(_onnx(tmp_path / "s.onnx"), tmp_path / "e.engine",
                        BuildOptions("fp32", shapes={"input": [1, 3, 32, 32]}), target=L4)


def test_runtime_gpu_path_never_imports_torch():
    import subprocess

    code = ("import sys; import runtime.engines.tensorrt, runtime.cuda.kernels, converters.tensorrt, edgeseg.commands.build; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr or "torch was imported"
