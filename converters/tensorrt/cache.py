"""The engine cache: one engine per (model, TensorRT, GPU, options) key, reused while its header and
checksum still match, rebuilt otherwise. Keys, headers and the cache location live in
edgeseg.engine_cache, which the runtime reads too.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from converters.tensorrt import builder
from edgeseg.bundle import sha256_file
from edgeseg.engine_cache import BuildOptions, EngineHeader, Target, cache_dir, engine_key, header_path, stale_reasons
from edgeseg.errors import ConversionError

log = logging.getLogger("edgeseg.tensorrt")


def cached_engine(onnx_path: str | os.PathLike, options: BuildOptions, *, rebuild: bool = False,
                  target: Target | None = None, directory: str | os.PathLike | None = None) -> tuple[Path, EngineHeader]:
    """The engine for `onnx_path` built with `options` on this machine, from the cache or freshly built.

    A cached engine is used only when its header matches the model hash, TensorRT version, GPU and
    options, and the engine file still has the checksum the header recorded; otherwise it is rebuilt.
    """
    target = target or builder.current_target(options.device)
    model_sha = sha256_file(onnx_path)
    key = engine_key(model_sha, target, options)
    directory = Path(directory) if directory else cache_dir()
    path = directory / f"{model_sha[:12]}-{key}.engine"
    if not rebuild:
        reason = cache_entry_problem(path, target, model_sha, options)
        if reason is None:
            log.info("using cached engine %s", path)
            return path, EngineHeader.load(header_path(path))
        if path.exists() or header_path(path).exists():
            log.warning("rebuilding cached engine %s: %s", path, reason)
    header = builder.build_engine(onnx_path, path, options, target=target)
    return path, header


def cache_entry_problem(path: Path, target: Target, model_sha256: str, options: BuildOptions) -> str | None:
    """None when the engine at `path` can be loaded on `target`, else why not."""
    hp = header_path(path)
    if not path.is_file():
        return "no engine"
    if not hp.is_file():
        return "the engine has no header, so what it was built for is unknown"
    try:
        header = EngineHeader.load(hp)
    except ConversionError as e:
        return str(e)
    reasons = stale_reasons(header, target, model_sha256=model_sha256, options=options)
    if reasons:
        return "; ".join(reasons)
    if header.engine_sha256 and sha256_file(path) != header.engine_sha256:
        return "the engine file does not match its header's checksum (damaged or replaced)"
    return None
