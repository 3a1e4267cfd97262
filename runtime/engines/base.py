"""The engine protocol and backend selection."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
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
    """Create the engine for a bundle artifact. `options` go to the backend (threads, compute_units, ...).
    The artifact's own inputs and outputs are checked against the manifest first (`check_engine_io`)."""
    chosen, why = resolve_backend(backend, bundle, precision)
    log.info("backend %s (%s)", chosen, why)
    engine = get_backend(chosen).engine_class().from_bundle(bundle, precision=precision, **options)
    try:
        check_engine_io(bundle, engine)
    except BaseException:
        engine.close()
        raise
    return engine


# -- the manifest against the artifact's own graph ------------------------------------------------
def check_engine_io(bundle, engine) -> None:
    """Raise EngineError unless the engine's own inputs and outputs (read from the artifact's graph)
    are what the manifest says the runtime feeds and reads: one input with the manifest's name,
    shape and the preprocessing dtype, and the manifest's output with a dtype that fits its kind.
    An artifact's `info` may name its own tensors (a CoreML package's `image` input)."""
    m = bundle.manifest
    art = _artifact_of(bundle, engine)
    info = (art.info if art is not None else None) or {}
    where = f"bundle {bundle.path}, artifact {art.path if art is not None else getattr(engine, 'path', '?')}"
    fix = "the manifest does not describe this model: re-create the bundle with `edgeseg convert`"
    pre = m.preprocess
    want_in = (info.get("input_name") or m.input_name, list(m.input_shape) or list(pre.input_shape), np.dtype(pre.dtype))
    inputs = list(engine.inputs)
    if len(inputs) != 1:
        raise EngineError(f"{where}: the model has {len(inputs)} inputs ({_describe_all(inputs)}), the runtime feeds one: "
                          f"{_describe(*want_in)}; {fix}")
    got = inputs[0]
    if (got.name != want_in[0] or _dims_differ(got.shape, want_in[1]) or _dims_differ(got.shape, pre.input_shape)
            or np.dtype(got.dtype) != want_in[2]):
        raise EngineError(f"{where}: the manifest and the model disagree on the input: manifest {_describe(*want_in)}, "
                          f"model {_describe(got.name, got.shape, got.dtype)}; {fix}")
    kind = info.get("output_kind") or m.output_kind
    if kind == "instances":  # several outputs, named by the instance layout
        names = {o.name for o in engine.outputs}
        missing = [n for n in ((m.instances or {}).get("outputs") or {}).values() if n not in names]
        if missing:
            raise EngineError(f"{where}: the manifest's instance layout reads outputs {missing}, the model has "
                              f"{_describe_all(engine.outputs)}; {fix}")
        return
    want_out = (info.get("output_name") or m.output_name, list(info.get("output_shape") or m.output_shape))
    found = next((o for o in engine.outputs if o.name == want_out[0]), None)
    if found is None:
        raise EngineError(f"{where}: the manifest reads output {_describe(*want_out, kind)}, the model has "
                          f"{_describe_all(engine.outputs)}; {fix}")
    dtype = np.dtype(found.dtype)
    fits = {"logits": dtype.kind == "f", "probs": dtype.kind == "f", "mask": dtype.kind in "iu"}.get(kind, True)
    if _dims_differ(found.shape, want_out[1]) or not fits:
        raise EngineError(f"{where}: the manifest and the model disagree on the output: manifest {_describe(*want_out, kind)}, "
                          f"model {_describe(found.name, found.shape, found.dtype)}; {fix}")


def _artifact_of(bundle, engine):
    path = getattr(engine, "path", None)
    if path is None:
        return None
    try:
        real = Path(path).resolve()
    except OSError:
        return None
    return next((a for a in bundle.manifest.artifacts if (bundle.path / a.path).resolve() == real), None)


def _static(d) -> int | None:
    return int(d) if isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 else None


def _dims_differ(got, want) -> bool:
    """Shapes that cannot be the same tensor: another rank, or a fixed size on both sides that differs
    (named or -1 axes match anything)."""
    if not want:
        return False
    got, want = list(got), list(want)
    return len(got) != len(want) or any(_static(a) and _static(b) and _static(a) != _static(b) for a, b in zip(got, want))


def _describe(name, shape, what) -> str:
    dims = [d if _static(d) or isinstance(d, str) else "?" for d in shape]
    return f"{name!r} {dims} {what}"


def _describe_all(tensors) -> str:
    return ", ".join(_describe(t.name, t.shape, np.dtype(t.dtype)) for t in tensors) or "none"
