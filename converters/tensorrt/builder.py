"""ONNX -> serialized TensorRT engine (needs TensorRT with its builder, and a GPU).

TensorRT 10 takes precision as builder flags (FP16/INT8, weakly typed networks). TensorRT 11 removed
those flags: every network is strongly typed, so FP16 has to be a float16 ONNX graph and INT8 has to
be Q/DQ nodes in the graph. Which path is taken is decided from the installed bindings, not from
version strings. Every engine is written atomically with its header beside it (edgeseg.engine_cache).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from converters.tensorrt.preflight import check_preflight, load_onnx
from edgeseg import progress
from edgeseg.bundle import atomic_path, sha256_file
from edgeseg.engine_cache import BuildOptions, EngineHeader, Target, engine_key, header_path
from edgeseg.errors import ConversionError

log = logging.getLogger("edgeseg.tensorrt")

INSTALL_HINT = (
    "install TensorRT with its builder and pycuda on the GPU machine (pip install 'edgeseg[tensorrt]'), "
    "or copy the bundle there and run `edgeseg build` there"
)


def import_tensorrt():
    """The `tensorrt` module with its builder, or ConversionError saying what to install."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ConversionError(f"TensorRT is not installed ({e}); {INSTALL_HINT}") from None
    if not hasattr(trt, "Builder") or not hasattr(trt, "OnnxParser"):
        raise ConversionError(
            f"the installed TensorRT {getattr(trt, '__version__', '?')} has no builder/ONNX parser (a lean or "
            f"dispatch runtime); {INSTALL_HINT}"
        )
    return trt


def current_target(device: int = 0, trt=None) -> Target:
    """TensorRT version and GPU of this machine (as the runtime reads them); ConversionError when either is missing."""
    trt = trt or import_tensorrt()
    from runtime.engines.base import EngineError
    from runtime.engines.tensorrt import device_target

    try:
        return device_target(device)
    except EngineError as e:
        raise ConversionError(f"{e}; {INSTALL_HINT}") from None


def has_precision_flags(trt) -> bool:
    """TensorRT 10 takes FP16/INT8 as builder flags; TensorRT 11 removed them (strong typing only)."""
    return hasattr(trt.BuilderFlag, "FP16") and hasattr(trt.BuilderFlag, "INT8")


def uses_strong_typing(trt, strongly_typed: bool | None = None) -> bool:
    return not has_precision_flags(trt) or bool(strongly_typed)


def _network_flags(trt, strongly_typed: bool) -> int:
    # EXPLICIT_BATCH is deprecated and ignored since TensorRT 10. STRONGLY_TYPED is an opt-in on 10.x and
    # implied (the flag deprecated, ignored) on 11.x, so it is only passed where precision flags still exist.
    if strongly_typed and has_precision_flags(trt):
        flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
        if flag is None:
            raise ConversionError(f"TensorRT {trt.__version__} has no strongly typed networks; drop --strongly-typed")
        return 1 << int(flag)
    return 0


def _make_progress(trt):
    """IProgressMonitor (TensorRT >= 10) that shows the builder's phases as progress bars (nested
    as TensorRT nests them) and logs them; None where the bindings lack it."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._started: dict[str, tuple[float, int]] = {}
            self._bars: dict[str, progress.Bar] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._started[phase_name] = (time.monotonic(), num_steps)
            self._bars[phase_name] = progress.bar(f"TensorRT: {phase_name}", total=num_steps, unit="steps")
            depth = 1 if parent_phase else 0
            log.info("build: %s%s (%d steps)", "  " * depth, phase_name, num_steps)

        def step_complete(self, phase_name, step):
            t0, n = self._started.get(phase_name, (time.monotonic(), 0))
            if phase_name in self._bars:
                self._bars[phase_name].update()
            if n >= 10 and (step + 1) % max(1, n // 10) == 0:
                log.info("build: %s %d/%d (%.0f s)", phase_name, step + 1, n, time.monotonic() - t0)
            return True  # never cancel

        def phase_finish(self, phase_name):
            t0, _ = self._started.pop(phase_name, (time.monotonic(), 0))
            bar = self._bars.pop(phase_name, None)
            if bar is not None:
                bar.close()
            log.info("build: %s done in %.1f s", phase_name, time.monotonic() - t0)

    return Progress()


def _io_names(model) -> str:
    ins = ", ".join(f"{i.name}{_dims(i)}" for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    outs = ", ".join(f"{o.name}{_dims(o)}" for o in model.graph.output)
    return f"inputs: {ins}; outputs: {outs}"


def _dims(vi) -> str:
    return "(" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                           for d in vi.type.tensor_type.shape.dim) + ")"


def _parser_errors(parser) -> list[str]:
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = getattr(e, "node_name", lambda: "")() or f"#{e.node()}"
        op = getattr(e, "node_operator", lambda: "")()
        out.append(f"node {node}{f' ({op})' if op else ''}: {e.desc()}")
    return out


def _network_io(trt, network) -> tuple[list[dict], list[dict]]:
    def desc(t):
        return {"name": t.name, "shape": [int(d) for d in t.shape], "dtype": str(t.dtype).split(".")[-1]}

    return ([desc(network.get_input(i)) for i in range(network.num_inputs)],
            [desc(network.get_output(i)) for i in range(network.num_outputs)])


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, options: BuildOptions,
                 target: Target | None = None) -> EngineHeader:
    """Build a serialized engine from an ONNX file and write it (atomically) with its header beside it
    (`<engine>.json`). Needs TensorRT with its builder and a GPU."""
    trt = import_tensorrt()
    target = target or current_target(options.device, trt)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    model = load_onnx(onnx_path)
    check_preflight(model, where=str(onnx_path))
    model_sha = sha256_file(onnx_path)
    strongly_typed = uses_strong_typing(trt, options.strongly_typed)
    flags_api = not strongly_typed  # weakly typed: precision comes from builder flags
    if options.precision == "fp16" and strongly_typed and not _is_float16_graph(model):
        raise ConversionError(
            f"a strongly typed TensorRT {trt.__version__} network takes FP16 only from a float16 graph, and "
            f"{onnx_path.name} is float32; "
            "make one with converters.tensorrt.to_fp16_onnx (`edgeseg build --precision fp16` does this)"
        )
    if options.precision == "int8" and not _has_qdq(model):
        raise ConversionError(
            f"{onnx_path.name} has no QuantizeLinear/DequantizeLinear nodes; INT8 engines are built from the Q/DQ graph "
            "that `edgeseg calibrate BUNDLE --target tensorrt` writes into the bundle"
        )
    if options.hardware_compatible and target.compute_capability < (8, 0):
        raise ConversionError(f"hardware-compatible engines need an Ampere or newer GPU; this one is {target.sm} ({target.gpu_name})")

    from runtime.engines.tensorrt import init_plugins, make_logger

    logger = make_logger(trt)
    init_plugins(trt, logger)  # before parsing: RoiAlign is imported as TensorRT's ROIAlign_TRT plugin
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = _parser_errors(parser) or logger.errors or ["(the parser gave no details)"]
        raise ConversionError(f"TensorRT's ONNX parser rejected {onnx_path} ({_io_names(model)}):\n  " + "\n  ".join(errors))
    inputs, outputs = _network_io(trt, network)

    config = builder.create_builder_config()
    shapes = _profile_shapes(inputs, options)
    if any(-1 in i["shape"] for i in inputs):
        profile = builder.create_optimization_profile()
        for name, (mn, opt, mx) in shapes.items():
            profile.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(profile)
    if options.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mb) << 20)
    if flags_api and options.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # INT8 Q/DQ graphs: layers left unquantized may run in FP16
    if flags_api and options.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    if not options.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default: fp32 layers would round their inputs to TF32
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if options.hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if options.optimization_level is not None:
        config.builder_optimization_level = int(options.optimization_level)
    monitor = _make_progress(trt)
    if monitor is not None:
        config.progress_monitor = monitor
    cache = _load_timing_cache(config, options.timing_cache)

    log.info("building TensorRT %s %s engine for %s on %s (%s)%s", trt.__version__, options.precision, onnx_path.name,
             target.gpu_name, target.sm, f", profile {shapes}" if shapes else "")
    t0 = time.monotonic()
    with progress.phase(f"TensorRT {options.precision} engine build"):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConversionError(
            f"TensorRT could not build an engine for {onnx_path} ({_io_names(model)}):\n  "
            + "\n  ".join(logger.errors or ["see the TensorRT messages above (run with -v)"])
        )
    log.info("engine built in %.1f s", time.monotonic() - t0)
    if options.timing_cache and cache is not None:
        _save_timing_cache(config, options.timing_cache)
    with atomic_path(engine_path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(serialized)
            fh.flush()
            os.fsync(fh.fileno())
    header = EngineHeader(
        key=engine_key(model_sha, target, options), model_sha256=model_sha, trt_version=target.trt_version,
        compute_capability=list(target.compute_capability), gpu_name=target.gpu_name, precision=options.precision,
        shapes=options.shapes, options=options.key_fields(), engine_sha256=sha256_file(engine_path),
        strongly_typed=strongly_typed, inputs=inputs, outputs=outputs,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    header.save(header_path(engine_path))
    return header


def _is_float16_graph(model) -> bool:
    from onnx import TensorProto

    return any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)


def _has_qdq(model) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def _profile_shapes(inputs: list[dict], options: BuildOptions) -> dict[str, list[list[int]]]:
    """min/opt/max per input; dynamic inputs need them, static inputs must match them."""
    known = {i["name"] for i in inputs}
    unknown = set(options.shapes) - known
    if unknown:
        raise ConversionError(f"shapes given for {sorted(unknown)}, but the model's inputs are {sorted(known)}")
    out = {}
    for i in inputs:
        name, shape = i["name"], i["shape"]
        spec = options.shapes.get(name)
        if -1 not in shape:
            if spec and any(s != shape for s in spec):
                raise ConversionError(
                    f"input {name!r} is static {tuple(shape)}, so it cannot take shapes {spec}; "
                    "re-export the model with dynamic axes (`edgeseg convert MODEL --dynamic`)"
                )
            continue
        if spec is None:
            raise ConversionError(
                f"input {name!r} has dynamic axes {tuple(shape)}; give its min/opt/max shapes "
                f"(`edgeseg build --dynamic N,C,H,W:N,C,H,W:N,C,H,W`)"
            )
        for s in spec:
            if len(s) != len(shape) or any(d != -1 and d != v for d, v in zip(shape, s)):
                raise ConversionError(f"shape {s} does not fit input {name!r} {tuple(shape)} (-1 marks dynamic axes)")
        out[name] = spec
    return out


def _load_timing_cache(config, path: str | None):
    data = b""
    if path and Path(path).is_file():
        data = Path(path).read_bytes()
        log.info("reusing timing cache %s (%d bytes)", path, len(data))
    cache = config.create_timing_cache(data)
    if cache is None and data:
        log.warning("timing cache %s is unreadable (another TensorRT version?); starting an empty one", path)
        cache = config.create_timing_cache(b"")
    # ignore_mismatch=False: a cache from another GPU or TensorRT is rejected instead of misleading tactic choice.
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False) is False:
        log.warning("timing cache %s does not match this GPU/TensorRT; building without it", path)
        return None
    return cache


def _save_timing_cache(config, path: str) -> None:
    cache = config.get_timing_cache()
    if cache is None:
        return
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(cache.serialize())
    log.info("saved timing cache %s", path)
