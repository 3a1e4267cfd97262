"""Model registry and checkpoints: `create(name, num_classes=..., **kw)`, `available()`.

A checkpoint is a dict saved with torch.save: the architecture name and its keyword arguments,
the weights, and what deployment needs (labels, palette, preprocessing), so
`edgeseg convert model.pt` rebuilds the network without the user's code.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from edgeseg.errors import EdgesegError, option

_REGISTRY: dict[str, Callable[..., Any]] = {}
_DOCS: dict[str, str] = {}
_TASKS: dict[str, str] = {}
CHECKPOINT_FORMAT = "edgeseg-checkpoint-1"


class ModelError(EdgesegError, ValueError):
    """An unknown architecture or an unreadable checkpoint."""


def register(name: str, task: str = "semantic-segmentation"):
    """Decorator: register a factory `f(num_classes, **kw) -> nn.Module` under `name`; `task` is
    what its networks do (semantic-segmentation | instance-segmentation), known before building one."""

    def deco(fn):
        if name in _REGISTRY:
            raise ModelError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        _TASKS[name] = task
        _DOCS[name] = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        return fn

    return deco


def available() -> list[str]:
    """Names of the registered architectures."""
    return sorted(_REGISTRY)


def task(name: str) -> str:
    """The task of a registered architecture, or of 'default' (semantic)."""
    if name == DEFAULT:
        return "semantic-segmentation"
    if name not in _REGISTRY:
        raise unknown_model(name)
    return _TASKS[name]


def describe() -> dict[str, str]:
    return {k: _DOCS[k] for k in available()}


DEFAULT = "default"  # the embedded trained model (edgeseg/assets/default.pt), an lraspp_mobilenetv3_small


def names() -> list[str]:
    """Every model name `edgeseg convert` and `edgeseg train --model` accept: 'default' and the zoo."""
    return [DEFAULT, *available()]


def suggest(name: str) -> str:
    """'did you mean 'unet'? available: default, ...' for a name that is none of `names()`."""
    import difflib

    close = difflib.get_close_matches(str(name), names(), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{hint}available: {', '.join(names())}"


def unknown_model(name: str) -> ModelError:
    return ModelError(f"unknown model {name!r}; {suggest(name)}")


def create(name: str, num_classes: int = 21, **kw):
    """Build a zoo model by name."""
    if name not in _REGISTRY:
        raise unknown_model(name)
    if int(num_classes) < 1:
        raise ModelError(f"{option('num_classes')} must be >= 1, got {num_classes}")
    model = _REGISTRY[name](num_classes=int(num_classes), **kw)
    # backbone weights end up in the state_dict: a checkpoint must not need the file again
    arch_kw = {k: v for k, v in kw.items() if k != "backbone_weights"}
    model.edgeseg_arch = {"name": name, "num_classes": int(num_classes), "kwargs": arch_kw}
    return model


def save_checkpoint(model, path: str | os.PathLike, *, labels=None, palette=None, preprocess=None, extra=None) -> Path:
    """Save a zoo model with what deployment needs; written atomically."""
    import torch

    from edgeseg.bundle import atomic_path

    arch = getattr(model, "edgeseg_arch", None)
    if arch is None:
        raise ModelError("save_checkpoint needs a model built with edgeseg.models.create(...)")
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "labels": list(labels) if labels is not None else None,
        "palette": palette,
        "preprocess": preprocess.to_dict() if hasattr(preprocess, "to_dict") else preprocess,
        "extra": extra or {},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint dict, with clear errors for missing, corrupt or foreign files."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged files
        raise ModelError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
            "the file is damaged or not a torch checkpoint (re-save it with edgeseg.models.save_checkpoint)"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(
            f"{path} is not an edgeseg checkpoint (no 'format': {CHECKPOINT_FORMAT!r}); "
            "for a plain state_dict, build the model in code and pass it to edgeseg.convert, "
            "or name a factory as package.module:function"
        )
    return ckpt


def load_checkpoint(path: str | os.PathLike):
    """Rebuild a zoo model from a checkpoint. Returns (model in eval mode, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    arch = ckpt["arch"]
    model = create(arch["name"], num_classes=arch["num_classes"], **arch.get("kwargs", {}))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise ModelError(f"{path}: weights do not fit architecture {arch['name']}: {str(e).splitlines()[0]}") from None
    return model.eval(), ckpt
