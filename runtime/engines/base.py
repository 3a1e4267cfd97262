"""The engine protocol and backend selection."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from edgeseg.errors import EdgesegError
from runtime.engines.registry import auto_order, get_backend

log = logging.getLogger("edgeseg.runtime")


class EngineError(EdgesegError, RuntimeError):
    """An engine that cannot be created or run; the message says what is missing and what to do."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple  # ints; -1 or a string for dynamic axes
    dtype: np.dtype


@runtime_checkable
class Engine(Protocol):
    """What every backend offers. GPU engines also accept device buffers (see their docs)."""

    backend: str
    precision: str

    @property
    def inputs(self) -> list[TensorInfo]: ...

    @property
    def outputs(self) -> list[TensorInfo]: ...

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class EngineIO:
    """`inputs` and `outputs` of an engine, from the `_inputs` / `_outputs` it reads when it loads."""

    _inputs: list[TensorInfo]
    _outputs: list[TensorInfo]

    @property
    def inputs(self) -> list[TensorInfo]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorInfo]:
        return self._outputs


def resolve_backend(backend: str, bundle, precision: str | None = None) -> tuple[str, str]:
    """Map 'auto' to a concrete backend (runtime.engines.registry says in which order); returns
    (backend, why). A named backend is only checked to exist: opening it says what is missing."""
    if backend != "auto":
        return get_backend(backend).name, "requested"
    skipped, tried = [], []  # every backend passed over / those the bundle had an artifact for
    for b in auto_order():
        why_not = b.missing_artifact(bundle, precision)
        if why_not is None:
            why_not = b.platform_problem()
            if why_not is None:
                ok, why = b.available()
                why_not = b.bundle_problem(bundle, precision) if ok else why
                if why_not is None:
                    return b.name, "; ".join([why, *tried])
            tried.append(f"not {b.name}: {why_not}")
        skipped.append(f"not {b.name}: {why_not}")
    have = ", ".join(f"{a.backend}/{a.precision}" for a in bundle.manifest.artifacts) or "none"
    raise EngineError(f"bundle {bundle.path} has no artifact this machine can run (it has: {have}); "
                      + "; ".join(skipped) + ". Add one with `edgeseg convert` (ONNX runs everywhere)")


def open_engine(bundle, backend: str = "auto", precision: str | None = None, **options: Any) -> Engine:
    """Create the engine for a bundle artifact. `options` go to the backend (threads, compute_units, ...)."""
    chosen, why = resolve_backend(backend, bundle, precision)
    log.info("backend %s (%s)", chosen, why)
    return get_backend(chosen).engine_class().from_bundle(bundle, precision=precision, **options)
