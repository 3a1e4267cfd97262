"""The one table of backends.

Everything that lists backends derives from `BACKENDS`: `open_engine` and `resolve_backend`
(runtime.engines.base), the manifest's artifact check and `Bundle.select` (edgeseg.bundle), and
every CLI `--backend` choice list (`backend_choices()`). Adding a backend is one module under
runtime/engines/ and one line here; nothing else changes.

A backend module defines, and imports its engine library only inside them (so naming a module
here costs nothing until it is used):

- the engine class named by `engine`, with `from_bundle(bundle, precision=None, **options)`;
- `available() -> (ok, why)`: whether the library and its device are present on this machine;
- optionally `bundle_problem(bundle, precision) -> str | None`: why none of the bundle's
  artifacts can run here although the library is present (a TensorRT engine built for another
  GPU), so that `auto` moves on to the next backend instead of failing.

`auto` tries the backends by `auto` rank (lowest first) that the platform allows and the bundle
has an artifact for, and takes the first whose probes pass: TensorRT (a GPU and an engine built
for it) > CoreML on macOS > OpenVINO on x86 when the bundle has an OpenVINO IR > ONNX Runtime >
LiteRT.
"""
from __future__ import annotations

import importlib
import platform
from dataclasses import dataclass
from typing import Callable

X86 = ("x86_64", "AMD64", "i386", "i686")


@dataclass(frozen=True)
class Backend:
    name: str  # the manifest's artifact `backend` and the --backend choice
    module: str  # runtime.engines.<file>
    engine: str  # engine class in `module`
    artifacts: tuple[str, ...]  # artifact backends it runs, preferred first
    auto: int | None  # rank in `auto`, lowest first; None: only when asked for by name
    systems: tuple[str, ...] = ()  # platform.system() values where `auto` considers it (empty: any)
    machines: tuple[str, ...] = ()  # platform.machine() values where `auto` considers it (empty: any)
    quant_target: str | None = None  # the calibration target whose INT8 graph it prefers (Bundle.select)

    def load_module(self):
        return importlib.import_module(self.module)

    def engine_class(self):
        try:
            return getattr(self.load_module(), self.engine)
        except (ImportError, AttributeError) as e:
            from runtime.engines.base import EngineError

            raise EngineError(f"backend {self.name!r} is not part of this edgeseg installation ({e})") from None

    def available(self) -> tuple[bool, str]:
        """(usable, why) from the module's `available()`; never raises."""
        try:
            probe: Callable[[], tuple[bool, str]] = getattr(self.load_module(), "available")
        except (ImportError, AttributeError) as e:
            return False, f"backend {self.name!r} is not part of this edgeseg installation ({e})"
        try:
            return probe()
        except Exception as e:  # a probe must not take `auto` down with it
            return False, f"probing {self.name} failed: {e}"

    def missing_artifact(self, bundle, precision: str | None = None) -> str | None:
        """None when `bundle` has an artifact this backend runs (of `precision`), else what is missing."""
        if any(a.backend in self.artifacts and (precision is None or a.precision == precision)
               for a in bundle.manifest.artifacts):
            return None
        return f"the bundle has no {'/'.join(self.artifacts)}{f' {precision}' if precision else ''} artifact"

    def bundle_problem(self, bundle, precision: str | None = None) -> str | None:
        """The module's `bundle_problem` (why no artifact fits this machine), where it has one.
        Call it after `available()`: it may query the device."""
        try:
            check = getattr(self.load_module(), "bundle_problem", None)
        except ImportError as e:
            return f"backend {self.name!r} is not part of this edgeseg installation ({e})"
        return check(bundle, precision) if check is not None else None

    def platform_problem(self) -> str | None:
        system, machine = platform.system(), platform.machine()
        if self.systems and system not in self.systems:
            return f"runs only on {'/'.join(self.systems)} (this is {system})"
        if self.machines and machine not in self.machines:
            return f"used automatically only on {'/'.join(self.machines)} (this is {machine}); ask for it by name"
        return None


BACKENDS: tuple[Backend, ...] = (
    Backend("tensorrt", "runtime.engines.tensorrt", "TensorRTEngine", ("tensorrt",), auto=0, quant_target="tensorrt"),
    Backend("coreml", "runtime.engines.coreml", "CoreMLEngine", ("coreml",), auto=1, systems=("Darwin",)),
    Backend("openvino", "runtime.engines.openvino", "OpenVINOEngine", ("openvino",), auto=2, machines=X86, quant_target="cpu"),
    Backend("onnxruntime", "runtime.engines.onnxruntime", "OnnxRuntimeEngine", ("onnxruntime",), auto=3, quant_target="cpu"),
    Backend("litert", "runtime.engines.litert", "LiteRTEngine", ("litert",), auto=4),
)

_BY_NAME = {b.name: b for b in BACKENDS}


def backend_names() -> tuple[str, ...]:
    """Every backend name, as manifests and --backend spell them."""
    return tuple(_BY_NAME)


def backend_choices() -> tuple[str, ...]:
    """The CLI's --backend choices: auto first, then every backend."""
    return ("auto", *_BY_NAME)


def get_backend(name: str) -> Backend:
    try:
        return _BY_NAME[name]
    except KeyError:
        from runtime.engines.base import EngineError

        raise EngineError(f"unknown backend {name!r}; choose one of {', '.join(backend_choices())}") from None


def auto_order() -> list[Backend]:
    return sorted((b for b in BACKENDS if b.auto is not None), key=lambda b: b.auto)


__all__ = ["Backend", "BACKENDS", "backend_names", "backend_choices", "get_backend", "auto_order"]
