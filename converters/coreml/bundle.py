"""A Core ML package added to an edgeseg bundle (created when the folder has no manifest)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from converters.coreml.conversion import CoreMLConverter, CoreMLResult
from converters.coreml.errors import CoreMLConversionError
from converters.coreml.schemes import COMPUTE_UNITS, INPUT_NAME, OUTPUTS, check_target, scheme_for
from edgeseg.bundle import Artifact, Bundle, BundleError, Manifest, MANIFEST, atomic_path, write_lock
from edgeseg.errors import ConversionError, option
from edgeseg.spec import Preprocess


def _same_preprocess(a: Preprocess, b: Preprocess) -> bool:
    keys = ("size", "resize", "color", "pad_value")
    return all(getattr(a, k) == getattr(b, k) for k in keys) and np.allclose(a.mean, b.mean) and np.allclose(a.std, b.std)


def convert_to_bundle(source, out: str | os.PathLike, *, precision: str = "fp16", output: str = "logits",
                      minimum_deployment_target: str = "iOS17", input_sizes: list[tuple[int, int]] | None = None,
                      compute_units: str = "all", calibration=None, metadata: dict | None = None) -> Bundle:
    """Add `model.<precision>.mlpackage` to the bundle at `out` (created if it has no manifest).

    `source` is a converters.onnx.SourceModel (or anything with .model, .labels, .palette,
    .preprocess, .name, .sha256). `compute_units` is recorded as the runtime's default. For w8a8
    the default model calibrates on its synthetic scenes when no `calibration` is given.
    """
    output = output or "logits"
    minimum_deployment_target = minimum_deployment_target or "iOS17"
    compute_units = compute_units or "all"
    scheme_for(precision)
    if compute_units not in COMPUTE_UNITS:
        raise CoreMLConversionError(f"compute_units must be one of {COMPUTE_UNITS}, got {compute_units!r}")
    check_target(precision, minimum_deployment_target)
    if output not in OUTPUTS:
        raise CoreMLConversionError(f"output must be one of {OUTPUTS}, got {output!r}")
    model = getattr(source, "model", None)
    if model is None:
        onnx_path = getattr(source, "onnx_path", None)
        raise CoreMLConversionError(
            f"Core ML conversion needs the torch model, but {getattr(source, 'name', 'the source')!r} is an ONNX file"
            + (f" ({onnx_path})" if onnx_path else "")
            + "; convert from the PyTorch model or checkpoint instead (coremltools has no ONNX frontend)"
        )
    out = Path(out)
    pre: Preprocess = source.preprocess
    bundle = None
    if (out / MANIFEST).is_file():
        bundle = Bundle.load(out)
        m = bundle.manifest
        if list(m.labels) != list(source.labels):
            raise BundleError(f"bundle {out} has labels {m.labels}, the model has {list(source.labels)}; use a new output folder")
        if m.output_kind != output:
            raise BundleError(
                f"bundle {out} gives '{m.output_kind}' outputs and the runtime reads every artifact that way; "
                f"convert with {option('output', value=m.output_kind)} or into a new output folder"
            )
        if not _same_preprocess(m.preprocess, pre):
            raise BundleError(
                f"bundle {out} was made for other preprocessing ({m.preprocess.to_dict()}) than this model's "
                f"({pre.to_dict()}); use a new output folder"
            )
    elif out.exists() and out.is_dir() and any(out.iterdir()):
        raise ConversionError(f"{out} exists and is not a bundle; choose an empty or new folder for --out")

    if calibration is None and precision == "w8a8" and getattr(source, "name", "") == "default":
        calibration = "synthetic"
    md = {"author": "edgeseg", "license": "Apache-2.0" if getattr(source, "name", "") == "default" else ""}
    info = getattr(source, "info", {}) or {}
    for k in ("author", "license", "version", "description"):
        if info.get(k):
            md[k] = info[k]
    md.update(metadata or {})
    md.setdefault("source_name", getattr(source, "name", ""))
    if getattr(source, "sha256", ""):
        md.setdefault("source_sha256", source.sha256)

    conv = CoreMLConverter(model, preprocess=pre, labels=list(source.labels), palette=list(source.palette), output=output,
                           minimum_deployment_target=minimum_deployment_target, input_sizes=input_sizes,
                           metadata=md, calibration=calibration)
    rel = f"model.{precision}.mlpackage"
    if bundle is None:
        H, W = pre.size
        manifest = Manifest(
            labels=list(source.labels), palette=[list(c) for c in source.palette], preprocess=pre,
            input_name=INPUT_NAME, output_name=output, output_kind=output, input_shape=[1, 3, H, W],
            output_shape=conv.output_shape,
            model={"name": getattr(source, "name", ""), "source_sha256": getattr(source, "sha256", ""), **info},
        )
        # a new bundle appears whole or not at all
        with write_lock(out), atomic_path(out) as tmp:
            tmp.mkdir()
            res = conv.save(precision, tmp / rel)
            bundle = Bundle.create(tmp, manifest)
            bundle.add_artifact(_artifact(res, rel, compute_units))
            bundle.save()
        return Bundle.load(out)
    res = conv.save(precision, out / rel)  # atomic on its own
    with Bundle.writing(out) as bundle:  # what other writers added meanwhile stays
        bundle.add_artifact(_artifact(res, rel, compute_units))
        bundle.save()
    return Bundle.load(out)


def _artifact(res: CoreMLResult, rel: str, compute_units: str) -> Artifact:
    v = res.validation or {}
    return Artifact(
        path=rel, backend="coreml", precision=res.precision, target=res.minimum_deployment_target,
        parity={"measured": False, "reason": "Core ML prediction needs macOS; run the macos-marked tests there"},
        metrics={"size_bytes": res.size_bytes, "weights_bytes": res.weights_bytes, "weight_dtypes": v.get("weight_dtypes", {}),
                 "max_weight_rel_rms": v.get("weights", {}).get("max_rel_rms")},
        info={
            "input_name": res.input_name, "input_type": "image", "color": v.get("color", ""),
            "input_sizes": [list(s) for s in res.input_sizes], "output_name": res.output_name,
            "output_kind": res.output, "output_shape": res.output_shape, "frontend": res.frontend,
            "compression": res.compression, "compute_units": compute_units, "seconds": res.seconds,
            "validation": {"ok": v.get("ok"), "checks": len(v.get("checks", [])), "problems": v.get("problems", [])},
        },
    )
