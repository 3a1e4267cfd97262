"""Any segmentation network -> ONNX -> bundle.

    from converters.onnx import convert
    bundle = convert("default", "bundle/")                       # the embedded default model
    bundle = convert("runs/unet.pt", "bundle/", dynamic=True)    # a zoo checkpoint
    bundle = convert(my_module, "bundle/", labels=[...])         # any nn.Module

Sources: an `nn.Module`, `default`, an edgeseg checkpoint, a TorchScript file, an ONNX file, or a
factory `package.module:function`. Export tries the TorchScript exporter first (about 20x faster
here) and falls back to the dynamo exporter, which handles what TorchScript cannot (adaptive
pooling to sizes that do not divide the input, for one). The graph is simplified with onnxsim and
checked against torch on real-looking frames; the figures go into the manifest.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeseg.bundle import Artifact, Bundle, Manifest, atomic_path, default_palette, sha256_file, write_lock
from edgeseg import progress
from edgeseg.errors import ConversionError, option
from edgeseg.spec import Preprocess

log = logging.getLogger("edgeseg.convert")

DEFAULT_OPSET = 17
META_KEY = "edgeseg"  # ONNX metadata_props key holding labels, palette and preprocessing


@dataclass
class SourceModel:
    """A model to convert, with what deployment needs to know about it."""

    name: str
    model: Any = None  # torch.nn.Module in eval mode, or None for an ONNX source
    onnx_path: Path | None = None
    labels: list[str] = field(default_factory=list)
    palette: list[list[int]] = field(default_factory=list)
    preprocess: Preprocess = field(default_factory=Preprocess)
    sha256: str = ""
    info: dict = field(default_factory=dict)


# -- loading -------------------------------------------------------------------------------

def bundle_out(out) -> Path:
    """The --out folder of a conversion: new, empty, or a bundle to add to; anything else is refused."""
    out = Path(out)
    if out.exists() and not (out / "manifest.json").exists() and any(out.iterdir()):
        raise ConversionError(f"{out} exists and is not a bundle; choose an empty or new folder for --out")
    return out


def load_source(source, *, labels: list[str] | None = None, preprocess: Preprocess | None = None,
                input_size: tuple[int, int] | None = None, model_args: dict | None = None) -> SourceModel:
    """Resolve what the user named into a SourceModel (see the module docstring for the forms)."""
    with progress.phase("load model"):
        src = _load(source, model_args or {}, labels)
    if preprocess is not None:
        src.preprocess = preprocess
    if input_size is not None:
        src.preprocess = src.preprocess.replace(size=tuple(input_size))
    if labels is not None:
        src.labels = list(labels)
    if not src.labels:
        src.labels = [f"class_{i}" for i in range(_count_classes(src))]
    if len(src.palette) != len(src.labels):
        src.palette = default_palette(len(src.labels))
    return src


def _load(source, model_args: dict, labels: list[str] | None = None) -> SourceModel:
    import torch

    if isinstance(source, SourceModel):
        return source
    if isinstance(source, torch.nn.Module):
        name = type(source).__name__
        return SourceModel(name, source.eval(), sha256=_state_hash(source))
    if not isinstance(source, (str, os.PathLike)):
        raise ConversionError(f"cannot convert a {type(source).__name__}; pass an nn.Module, a file path or 'package.module:factory'")
    text = str(source)
    if text == "default":
        from edgeseg.train import DEFAULT_CHECKPOINT

        if not DEFAULT_CHECKPOINT.is_file():
            raise ConversionError(f"the default model is missing from the installation ({DEFAULT_CHECKPOINT}); reinstall edgeseg")
        return _from_checkpoint(DEFAULT_CHECKPOINT, name="default")
    path = Path(text)
    if path.suffix.lower() == ".onnx" or (path.is_file() and _looks_like_onnx(path)):
        return _from_onnx(path)
    if path.exists() or path.suffix.lower() in (".pt", ".pth", ".ckpt", ".torchscript"):
        if not path.is_file():
            raise ConversionError(f"model file not found: {path}")
        return _from_torch_file(path)
    if ":" in text and not os.sep in text.split(":")[0]:
        return _from_factory(text, model_args)
    from edgeseg import models

    if text in models.available():
        return _from_zoo(text, model_args, labels)
    raise ConversionError(
        f"cannot find model {text!r}: no such file and no such model name; {models.suggest(text)}; "
        "or pass a checkpoint (.pt), TorchScript or ONNX file, or a factory package.module:function"
    )


def _looks_like_onnx(path: Path) -> bool:
    return path.suffix.lower() == ".onnx"


def _from_checkpoint(path: Path, name: str | None = None) -> SourceModel:
    from edgeseg.models import load_checkpoint

    model, ckpt = load_checkpoint(path)
    pre = Preprocess.from_dict(ckpt["preprocess"]) if ckpt.get("preprocess") else Preprocess()
    return SourceModel(
        name or path.stem, model, labels=list(ckpt.get("labels") or []), palette=ckpt.get("palette") or [],
        preprocess=pre, sha256=sha256_file(path), info={"architecture": ckpt["arch"], "checkpoint": path.name},
    )


def _from_torch_file(path: Path) -> SourceModel:
    import torch

    from edgeseg.models.registry import CHECKPOINT_FORMAT, ModelError

    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:2] == b"PK":  # zip: torch.save or TorchScript
        try:
            module = torch.jit.load(str(path), map_location="cpu")
            return SourceModel(path.stem, module.eval(), sha256=sha256_file(path), info={"torchscript": path.name})
        except RuntimeError:
            pass  # not TorchScript: an ordinary torch.save archive
    try:
        return _from_checkpoint(path)
    except ModelError as e:
        if CHECKPOINT_FORMAT in str(e) or "not an edgeseg checkpoint" in str(e):
            raise ConversionError(str(e)) from None
        raise ConversionError(str(e)) from None


def _from_onnx(path: Path) -> SourceModel:
    import onnx

    if not path.is_file():
        raise ConversionError(f"ONNX file not found: {path}")
    try:
        m = onnx.load(str(path))
        onnx.checker.check_model(m)
    except Exception as e:
        raise ConversionError(f"{path} is not a valid ONNX model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); re-export it") from None
    meta = {p.key: p.value for p in m.metadata_props}
    src = SourceModel(path.stem, None, onnx_path=path, sha256=sha256_file(path), info={"onnx": path.name})
    if META_KEY in meta:
        d = json.loads(meta[META_KEY])
        src.labels, src.palette = d.get("labels", []), d.get("palette", [])
        if d.get("preprocess"):
            src.preprocess = Preprocess.from_dict(d["preprocess"])
        if d.get("task") == "instance-segmentation":
            src.info.update(task="instance-segmentation", instances=d.get("instances"))
    elif _is_ultralytics(meta):
        from converters.yolo_import import read_ultralytics

        src.labels, src.preprocess, layout = read_ultralytics(m, meta, str(path))
        src.info.update(task="instance-segmentation", instances=layout.to_dict(), format="ultralytics-yolo-seg")
    else:
        dims = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
        if len(dims) == 4 and dims[2] > 0 and dims[3] > 0:
            src.preprocess = Preprocess(size=(dims[2], dims[3]))
    return src


def _is_ultralytics(meta: dict) -> bool:
    from converters.yolo_import import is_ultralytics

    return is_ultralytics(meta)


def _from_zoo(name: str, model_args: dict, labels: list[str] | None) -> SourceModel:
    from edgeseg import models

    kwargs = dict(model_args)
    num_classes = int(kwargs.pop("num_classes", len(labels) if labels else 21))
    try:
        model = models.create(name, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ConversionError(f"model {name} does not take the options {sorted(kwargs)}: {e}") from None
    warnings.warn(f"{name} is converted with untrained weights: its masks mean nothing until it is trained "
                  f"(`edgeseg train --model {name} ...`, then convert the checkpoint); this checks the export and the speed")
    return SourceModel(name, model.eval(), sha256=_state_hash(model), info={"architecture": model.edgeseg_arch})


def _from_factory(spec: str, model_args: dict) -> SourceModel:
    import torch

    module_name, _, attr = spec.partition(":")
    module = _import_from_cwd(module_name, spec)
    factory = getattr(module, attr, None)
    if factory is None:
        import difflib

        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
        close = difflib.get_close_matches(attr, public, n=3, cutoff=0.6)
        raise ConversionError(f"{module_name} has no attribute {attr!r}"
                              + (f"; did you mean {' or '.join(f'{module_name}:{c}' for c in close)}?" if close else ""))
    model = factory(**model_args) if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
    if not isinstance(model, torch.nn.Module):
        raise ConversionError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    src = SourceModel(attr, model.eval(), sha256=_state_hash(model), info={"factory": spec})
    pre = getattr(model, "edgeseg_preprocess", None)
    if isinstance(pre, Preprocess):
        src.preprocess = pre
    return src


def _import_from_cwd(module_name: str, spec: str):
    """Import the factory's module with the current folder importable, as `python -m` and uvicorn do
    (the `edgeseg` script's own folder is on sys.path instead)."""
    import sys

    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        top = module_name.split(".")[0]
        if e.name and module_name.startswith(e.name):
            raise ConversionError(
                f"cannot import {module_name!r} for factory {spec!r}: no module {e.name!r} in {cwd} or on the Python path; "
                f"run from the folder that holds {top}/ (or {top}.py), or add that folder to PYTHONPATH"
            ) from None
        raise ConversionError(f"cannot import {module_name!r} for factory {spec!r}: {e}; install the package it needs") from None
    except ImportError as e:
        raise ConversionError(f"cannot import {module_name!r} for factory {spec!r}: {e}") from None
    except Exception as e:  # the user's module failed while importing: say where, not a traceback of ours
        raise ConversionError(f"importing {module_name!r} for factory {spec!r} failed: {type(e).__name__}: {_first_line(e)}") from None
    finally:
        if added:
            sys.path.remove(cwd)


def _state_hash(model) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _count_classes(src: SourceModel) -> int:
    if src.model is not None and getattr(src.model, "task", None) == "instance-segmentation":
        return int(src.model.num_classes)
    if src.model is not None:
        return int(_torch_logits(_OutputAdapter(src.model), np.zeros(src.preprocess.input_shape, np.float32)).shape[1])
    import onnx

    m = onnx.load(str(src.onnx_path), load_external_data=False)
    dims = [d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim]
    if len(dims) >= 2 and dims[1] > 0:
        return dims[1] if len(dims) == 4 else int(dims[1])
    raise ConversionError(f"cannot tell the number of classes of {src.onnx_path}; name the labels with {option('labels')}")


# -- export --------------------------------------------------------------------------------
def _torch():
    import torch

    return torch


class _OutputAdapter:
    """Turns dict / tuple / list outputs into the logits tensor (key 'out' or the first)."""

    def __new__(cls, model):
        torch = _torch()

        class Adapter(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                y = self.inner(x)
                if isinstance(y, dict):
                    y = y["out"] if "out" in y else next(iter(y.values()))
                elif isinstance(y, (tuple, list)):
                    y = y[0]
                return y

        return Adapter(model)


def _export_wrapper(model, pre: Preprocess, fold_normalization: bool, argmax: bool):
    """The network as deployed: optional uint8 input with normalisation inside, optional ArgMax."""
    torch = _torch()
    if isinstance(model, torch.jit.ScriptModule):
        # A loaded TorchScript module cannot be traced inside another module; it exports as it is.
        if fold_normalization or argmax:
            raise ConversionError("a TorchScript model exports as it is: --fold-normalization and --argmax need "
                                  "the Python model (an edgeseg checkpoint or package.module:factory)")
        return model
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    class Deployed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = _OutputAdapter(inner)
            self.register_buffer("mean", mean)
            self.register_buffer("inv_std", inv_std)

        def forward(self, x):
            if fold_normalization:
                x = (x.float() - self.mean) * self.inv_std
            y = self.inner(x)
            if argmax:
                y = y.argmax(1).to(torch.uint8)
            return y

    return Deployed(model).eval()


def export_onnx(model, path: str | os.PathLike, *, preprocess: Preprocess, dynamic: bool = False,
                opset: int = DEFAULT_OPSET, simplify: bool = True, fold_normalization: bool = False,
                argmax: bool = False, input_name: str = "input", output_name: str | None = None,
                metadata: dict | None = None, exporter: str = "auto") -> dict:
    """Export a torch model to ONNX (written atomically). Returns facts about the export.

    dynamic: H and W (and batch) become symbolic; else the graph is fixed at preprocess.size.
    fold_normalization: the graph takes uint8 pixels and normalises inside (dtype uint8 input).
    argmax: the graph ends with ArgMax and returns a uint8 class map (output kind "mask").
    exporter: "auto" (TorchScript, then dynamo), "torchscript" or "dynamo".
    """
    torch = _torch()
    path = Path(path)
    output_name = output_name or ("mask" if argmax else "logits")
    wrapped = _export_wrapper(model, preprocess, fold_normalization, argmax)
    # a real-looking frame: the TorchScript exporter traces, and constant folding sees real values
    dummy = torch.from_numpy(preprocess.replace(dtype="uint8" if fold_normalization else "float32").apply(_sample_frame(preprocess)))
    order = {"auto": ["torchscript", "dynamo"], "torchscript": ["torchscript"], "dynamo": ["dynamo"]}.get(exporter)
    if order is None:
        raise ConversionError(f"exporter must be auto, torchscript or dynamo, got {exporter!r}")
    errors = []
    with atomic_path(path) as tmp:
        for which in order:
            try:
                with progress.phase(f"export ({which} exporter)"):
                    _run_exporter(which, wrapped, dummy, tmp, opset, dynamic, input_name, output_name)
                used = which
                break
            except Exception as e:  # each exporter fails in its own way; keep the messages
                errors.append(f"{which}: {type(e).__name__}: {error_summary(e)}")
                log.info("exporter %s failed: %s", which, errors[-1])
                tmp.unlink(missing_ok=True)
        else:
            raise ConversionError("ONNX export failed with every exporter:\n  " + "\n  ".join(errors))
        import onnx

        m = onnx.load(str(tmp))
        _rename_io(m, input_name, output_name)
        simplified = False
        if simplify:
            with progress.phase("simplify (onnxsim)"):
                m, simplified = _simplify(m)
        meta = {"preprocess": preprocess.to_dict(), **(metadata or {})}
        if fold_normalization:
            meta["preprocess"] = preprocess.replace(dtype="uint8").to_dict()
        _set_metadata(m, {META_KEY: json.dumps(meta)})
        onnx.checker.check_model(m)
        onnx.save(m, str(tmp))
    return {
        "exporter": used, "exporter_errors": errors, "opset": _opset(m), "simplified": simplified, "dynamic": dynamic,
        "nodes": len(m.graph.node), "input": _io_desc(m.graph.input[0]), "output": _io_desc(m.graph.output[0]),
    }


def _run_exporter(which, model, dummy, path, opset, dynamic, input_name, output_name):
    torch = _torch()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if which == "torchscript":
            out_axes = {0: "batch", 1: "out_height", 2: "out_width"} if output_name == "mask" else {0: "batch", 2: "out_height", 3: "out_width"}
            axes = {input_name: {0: "batch", 2: "height", 3: "width"}, output_name: out_axes} if dynamic else None
            torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=opset, input_names=[input_name],
                              output_names=[output_name], dynamic_axes=axes, do_constant_folding=True)
        else:
            shapes = None
            if dynamic:
                Dim = torch.export.Dim
                # multiples of 32 keep every stride-32 network's shapes integral
                shapes = ({0: Dim("batch", min=1, max=64), 2: 32 * Dim("h32", min=1, max=128), 3: 32 * Dim("w32", min=1, max=128)},)
            torch.onnx.export(model, (dummy,), str(path), dynamo=True, opset_version=max(opset, 18), input_names=[input_name],
                              output_names=[output_name], dynamic_shapes=shapes, external_data=False)


def _simplify(m):
    import onnxsim

    try:
        sm, ok = onnxsim.simplify(m)
    except Exception as e:  # onnxsim is an optimisation: keep the unsimplified graph
        log.warning("onnxsim could not simplify the graph (%s); keeping it as exported", _first_line(e))
        return m, False
    if not ok:
        log.warning("onnxsim's check of the simplified graph failed; keeping it as exported")
        return m, False
    return sm, True


def _rename_io(m, input_name: str, output_name: str) -> None:
    """Both exporters should honour the names; make sure, since the runtime relies on them."""
    renames = {m.graph.input[0].name: input_name, m.graph.output[0].name: output_name}
    for old, new in renames.items():
        if old == new:
            continue
        for node in m.graph.node:
            node.input[:] = [new if n == old else n for n in node.input]
            node.output[:] = [new if n == old else n for n in node.output]
    m.graph.input[0].name, m.graph.output[0].name = input_name, output_name


def _set_metadata(m, props: dict) -> None:
    keep = [p for p in m.metadata_props if p.key not in props]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    for k, v in props.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v


def _opset(m) -> int:
    return max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


def _io_desc(vi) -> dict:
    import onnx

    t = vi.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    return {"name": vi.name, "shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name}


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# lines exporters add around the cause: advice, log hints, progress, pointers to stack traces
_NOISE = re.compile(r"^(-\s|\[torch\.onnx\]|Traceback|File \"|For (more|extended|C\+\+)|If you (suspect|would like)|"
                    r"The error above|\(Refer to|Refer to|Set TORCH|Please (consider|feel free|report))")
_EXPORT_FAILED = re.compile(r"^Failed to (export|convert|decompose|translate) the model")


def error_summary(e: BaseException | str, limit: int = 500, lines: int = 3) -> str:
    """What went wrong, readable on one screen: colour codes stripped, the exporters' own
    boilerplate (next-step advice, log hints) skipped for the cause they summarise, at most `lines`
    meaningful lines, cut at a sentence or word end (never mid-word) when longer than `limit`."""
    text = _ANSI.sub("", str(e)).replace("\r", "")
    # ONNX Runtime: "[ONNXRuntimeError] : 1 : FAIL : ..." and the C++ source location before the message
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"/\S*onnxruntime\S*:\d+ [^(\s]+\([^)]*\)\s*", "", text)
    if "## Exception summary" in text:  # the dynamo exporter: the cause follows this heading
        text = text.split("## Exception summary", 1)[1]
    kept = []
    for line in (s.strip() for s in text.splitlines()):
        if not line or line.startswith("#") or _NOISE.match(line) or _EXPORT_FAILED.match(line):
            continue
        line = re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>:\s*", r"\1: ", line)
        kept.append(line)
        if len(kept) == lines:
            break
    out = " ".join(kept) or (type(e).__name__ if isinstance(e, BaseException) else "")
    if len(out) <= limit:
        return out
    cut = out[:limit]
    end = max(cut.rfind(". "), cut.rfind("; "))
    cut = cut[:end + 1] if end > limit // 2 else cut[:cut.rfind(" ")] if " " in cut else cut
    return cut.rstrip() + " …"


def _first_line(e: BaseException) -> str:
    return error_summary(e, limit=300, lines=1)


def _sample_frame(pre: Preprocess) -> np.ndarray:
    from edgeseg.data.synthetic import SyntheticScenes

    return SyntheticScenes(size=pre.size, length=1, split="test")[0][0]


def _torch_logits(model, batch: np.ndarray) -> np.ndarray:
    torch = _torch()
    with torch.no_grad():
        return model(torch.from_numpy(batch)).float().numpy()


# -- bundle --------------------------------------------------------------------------------
def convert(source, out: str | os.PathLike, *, dynamic: bool = False, fold_normalization: bool = False,
            argmax: bool = False, opset: int = DEFAULT_OPSET, simplify: bool = True, labels: list[str] | None = None,
            preprocess: Preprocess | None = None, input_size: tuple[int, int] | None = None,
            parity_frames: int = 8, model_args: dict | None = None, exporter: str = "auto", instance_tail: bool = False,
            max_detections: int | None = None) -> Bundle:
    """Convert a model into a bundle with `model.onnx`, checked for parity. Replaces `out` atomically.
    Instance models (and YOLO-seg-layout ONNX files) go through `converters.instance_export`;
    `instance_tail` puts their NMS and mask assembly in the graph."""
    from converters.parity import check_parity

    src = load_source(source, labels=labels, preprocess=preprocess, input_size=input_size, model_args=model_args)
    if src.info.get("task") == "instance-segmentation" or getattr(src.model, "task", None) == "instance-segmentation":
        from converters.instance_export import convert_instances

        return convert_instances(src, out, instance_tail=instance_tail, fold_normalization=fold_normalization, opset=opset,
                                 simplify=simplify, max_detections=max_detections, dynamic=dynamic, argmax=argmax)
    if instance_tail:
        raise ConversionError(f"{option('instance_tail')} applies to instance-segmentation models; {src.name} is semantic")
    out = bundle_out(out)
    pre = src.preprocess
    with write_lock(out), atomic_path(out) as tmp:
        tmp.mkdir()
        onnx_path = tmp / "model.onnx"
        meta = {"labels": src.labels, "palette": src.palette}
        if src.model is not None:
            facts = export_onnx(src.model, onnx_path, preprocess=pre, dynamic=dynamic, opset=opset, simplify=simplify,
                                fold_normalization=fold_normalization, argmax=argmax, metadata=meta, exporter=exporter)
        else:
            facts = _import_onnx(src.onnx_path, onnx_path, simplify, meta, pre)
        deployed_pre = pre.replace(dtype="uint8") if fold_normalization else pre
        reference = _export_wrapper(src.model, pre, fold_normalization, argmax) if src.model is not None else src.onnx_path
        kind = "mask" if argmax else "logits"
        parity = check_parity(reference, onnx_path, deployed_pre, frames=parity_frames, output_kind=kind)
        info = {"opset": facts["opset"]}
        if facts["dynamic"]:
            info["sizes_checked"] = _check_dynamic(reference if src.model is not None else None, onnx_path, deployed_pre, kind,
                                                   facts)
        manifest = Manifest(
            labels=src.labels, palette=src.palette, preprocess=deployed_pre,
            input_name=facts["input"]["name"], output_name=facts["output"]["name"],
            output_kind="mask" if argmax else "logits",
            input_shape=facts["input"]["shape"], output_shape=facts["output"]["shape"],
            model={"name": src.name, "source_sha256": src.sha256, **src.info, "export": facts},
        )
        bundle = Bundle.create(tmp, manifest)
        bundle.add_artifact(Artifact("model.onnx", "onnxruntime", "fp32", parity=parity, info=info))
        bundle.save()
    log.info("wrote bundle %s", out)
    return Bundle.load(out)


def _check_dynamic(reference, onnx_path: Path, pre: Preprocess, output_kind: str, facts: dict) -> list[dict]:
    """A dynamic graph must hold at sizes other than the export size: refuse it, listing each size
    and what went wrong there, when it fails or disagrees with the reference at any of them.
    (An imported ONNX file is run at the sizes its symbolic axes allow.)"""
    from converters.parity import check_sizes, dynamic_sizes, format_sizes

    shape = facts["input"]["shape"]
    sizes = dynamic_sizes(pre.size)
    if len(shape) == 4:
        fixed = lambda i: isinstance(shape[i], int) and shape[i] > 0  # noqa: E731
        sizes = [(b, h, w) for b, h, w in sizes
                 if (b == 1 or not fixed(0)) and (h == pre.size[0] or not fixed(2)) and (w == pre.size[1] or not fixed(3))]
    exporter = facts["exporter"]
    with progress.phase("check dynamic sizes"):
        result = check_sizes(reference, onnx_path, pre, output_kind, sizes=sizes)
    if not result["ok"]:
        advice = ("the graph keeps sizes of the export as constants (a pooling kernel, the indices of adaptive pooling "
                  "or a reshape computed from the traced size): export at the one size you deploy (without --dynamic, "
                  "--input-size H W)" + (", try --exporter dynamo" if exporter == "torchscript" else "")
                  + ", or compute shapes in the model from tensor sizes (x.shape[-2:] as they are, no int())")
        if reference is None:
            advice = "the ONNX file does not run at every size its symbolic axes allow: re-export it, or convert it at one size"
        raise ConversionError(f"the --dynamic export ({exporter} exporter) does not hold at every size:\n  "
                              f"{format_sizes(result)}\n{advice}")
    return [{k: r[k] for k in ("batch", "size", "max_abs", "mask_agreement") if k in r} for r in result["sizes"]]


def _import_onnx(src_path: Path, dst: Path, simplify: bool, meta: dict, pre: Preprocess) -> dict:
    import onnx

    m = onnx.load(str(src_path))
    simplified = False
    if simplify:
        with progress.phase("simplify (onnxsim)"):
            m, simplified = _simplify(m)
    existing = {p.key: p.value for p in m.metadata_props}
    merged = json.loads(existing.get(META_KEY, "{}"))
    merged.update(meta)
    merged["preprocess"] = pre.to_dict()
    _set_metadata(m, {META_KEY: json.dumps(merged)})
    onnx.save(m, str(dst))
    return {"exporter": "onnx-file", "opset": _opset(m), "simplified": simplified, "nodes": len(m.graph.node),
            "dynamic": any(not d.HasField("dim_value") for d in m.graph.input[0].type.tensor_type.shape.dim),
            "input": _io_desc(m.graph.input[0]), "output": _io_desc(m.graph.output[0])}

