"""INT8 that keeps its accuracy: calibration frames -> ranges -> Q/DQ per target -> accuracy before and after.

    from calibration import calibrate_bundle
    summary = calibrate_bundle("bundle/", "frames/", target="both", eval_data="voc:/data/VOC2012")

adds `model.int8.tensorrt.onnx` and/or `model.int8.cpu.onnx` to the bundle with their measured
accuracy, `quant_report.json` + `quant_report.png`, and (TensorRT target) `calibration.cache`, the
legacy TensorRT 8.x/10.x calibration cache for `model.onnx`. Layers that would cost more than the
accuracy budget stay in float (see `calibration.sensitivity`). Everything is written into a staging
folder first and moved into place at the end; the manifest is saved last, so a failure leaves the
bundle as it was.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl

from calibration.data import CalibrationError, CalibrationSet, CalibrationWarning, open_source
from calibration.quantize import METHODS, PRESETS, TARGETS, Violation, validate_tensorrt_qdq
from edgeseg.errors import option

log = logging.getLogger("edgeseg.calibration")

TRT_CACHE = "calibration.cache"
# without --eval-data, INT8 is measured on frames calibration does not use
HELD_OUT_SHARE = 0.2
MIN_HELD_OUT = 16
MIN_CALIBRATION = 16


def artifact_name(target: str) -> str:
    return f"model.int8.{target}.onnx"


def calibrate_bundle(bundle_path: str | os.PathLike, data: Any, *, method: str | None = None, target: str = "both",
                     max_miou_drop: float = 0.5, eval_data: Any = None, max_images: int = 512,
                     eval_max_images: int = 200, sensitivity: bool = True, sensitivity_frames: int = 16,
                     trt_version: str | None = None, num_bins: int | None = None, percentile: float | None = None,
                     progress: Callable[[str], None] | None = None, candidates: Callable | None = None) -> dict:
    """Quantize a bundle's FP32 ONNX model to INT8 for `target` ("tensorrt", "cpu" or "both").

    data: calibration frames (image folder, video, dataset spec such as synthetic:train, reader, arrays).
    method: activation range method (minmax, percentile, entropy); None: each is tried and the one
    whose INT8 graph loses least on the held-out frames is kept, per target.
    eval_data: held-out data for accuracy (default: synthetic:test when calibrating on synthetic
    data, the val split of a dataset, at least 16 frames of the source that calibration did not
    read, else a share of the frames held out from calibration: 20%, at least 16). Without labels
    INT8 is scored against FP32's class maps. Accuracy is always measured, and the budget enforced.
    max_miou_drop: accuracy budget in mIoU points (0.5 = half a percent); layers are kept in float
    until INT8 meets it. sensitivity: measure every layer's effect even when INT8 meets the budget
    (for the report). candidates: where the sensitivity pass and the float-layer search score
    their candidates, `candidates(evaluator, model_path, ranges_path, method, target)` -> a
    measurer (`edgeseg.cluster.calibrate.RayCandidates`: on Ray workers); default here, one at a
    time. Returns a summary; the bundle gains the artifacts and the report.
    """
    from edgeseg.bundle import Artifact, Bundle

    say = progress or (lambda msg: log.info(msg))
    t_start = time.perf_counter()
    if method is not None and method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}")
    targets = list(TARGETS) if target == "both" else [target]
    if any(t not in TARGETS for t in targets):
        raise CalibrationError(f"unknown target {target!r}; use tensorrt, cpu or both")
    budget = check_budget(max_miou_drop)
    if trt_version is not None and "tensorrt" in targets:
        from calibration.cache import trt_version_code

        trt_version_code(trt_version)
    _check_held_out(data, eval_data)

    bundle = Bundle.load(bundle_path)
    man = bundle.manifest
    fp32 = bundle.select("onnxruntime", "fp32")
    bundle.verify_artifact(fp32)
    fp32_path = bundle.artifact_path(fp32)

    import onnx

    from calibration.quantize import check_quantizable

    check_quantizable(onnx.load(str(fp32_path), load_external_data=False), where=f"{fp32_path}")

    say(f"reading calibration frames from {data}")
    calib, evalset = calibration_frames(bundle, data, eval_data, max_images=max_images, eval_max_images=eval_max_images)

    staging = bundle.staging_dir("calibrate")
    try:
        summary = _calibrate(bundle, fp32, fp32_path, calib, evalset, staging, method=method, targets=targets, budget=budget,
                             sensitivity=sensitivity, sensitivity_frames=sensitivity_frames, trt_version=trt_version,
                             num_bins=num_bins, percentile=percentile, say=say, candidates=candidates)
        _commit_locked(bundle, staging, summary, Artifact)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    say(f"done in {summary['seconds']} s")
    return summary


def check_budget(max_miou_drop) -> float:
    """The accuracy budget in mIoU points, checked."""
    try:
        budget = float(max_miou_drop)
    except (TypeError, ValueError):
        raise CalibrationError(f"{option('max_miou_drop')} must be a number of mIoU points, got {max_miou_drop!r}") from None
    if not budget >= 0:
        raise CalibrationError(f"{option('max_miou_drop')} must be >= 0 mIoU points, got {max_miou_drop}")
    return budget


def calibration_frames(bundle, data: Any, eval_data: Any = None, *, max_images: int = 512,
                       eval_max_images: int = 200) -> tuple[CalibrationSet, Any]:
    """The calibration frames through the bundle's `Preprocess`, and the held-out evaluation
    frames (an `EvalSet`; None, with a warning, when there are none). Every INT8 path uses these:
    the ONNX Q/DQ presets here, OpenVINO's NNCF and the LiteRT quantizer."""
    _check_held_out(data, eval_data)
    man = bundle.manifest
    calib = CalibrationSet(data, man.preprocess, input_name=man.input_name, max_images=max_images, warn=False)
    evalset = _eval_set(calib, data, eval_data, man.preprocess, eval_max_images)
    calib.warn_if_few()  # on the frames left for calibration
    evalset.split = _split_name(evalset, calib, data, eval_data)
    return calib, evalset


def _split_name(evalset, calib, data, eval_data) -> str:
    """Which frames INT8 is measured on, in words, for the report."""
    if eval_data is not None:
        return f"{option('eval_data')} (given)"
    if calib.held_out:
        return f"held out from the calibration frames ({calib.held_out} of {calib.held_out + len(calib)}, spread evenly)"
    if evalset.source_key == calib.source.key:
        return "frames of the calibration source that calibration did not read"
    return "another split of the calibration dataset"


def _check_held_out(data, eval_data) -> None:
    if eval_data is not None and _same_data(data, eval_data):
        raise CalibrationError(
            f"calibration and evaluation both use {data!r}; accuracy must be measured on held-out data: "
            "evaluate on another split (e.g. --data synthetic:train --eval-data synthetic:test)"
        )


def _same_data(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, (str, os.PathLike)) and isinstance(b, (str, os.PathLike)):
        na, nb = _normalize_spec(str(a)), _normalize_spec(str(b))
        return na == nb
    return False


def _normalize_spec(s: str) -> str:
    s = s.strip()
    if s.lower().startswith("synthetic"):
        rest = s[len("synthetic"):].lstrip(":")
        split, _, query = rest.partition("?")
        opts = {k: v for k, v in parse_qsl(query) if k != "n"}
        return f"synthetic:{split or '?'}:{sorted(opts.items())}"
    p = Path(s).expanduser()
    return str(p.resolve()) if p.exists() else s


def _eval_set(calib: CalibrationSet, data, eval_data, pre, eval_max_images):
    from calibration.evaluate import load_eval_set

    if eval_data is not None:
        ev = load_eval_set(eval_data, pre, max_images=eval_max_images, exclude_hashes=calib.hashes)
        if ev.source_key and ev.source_key == calib.source.key:
            raise CalibrationError(f"evaluation data {eval_data!r} is the calibration source ({calib.description}); "
                                   "use a held-out split or other footage")
        return ev
    if isinstance(data, str) and data.strip().lower().startswith("synthetic"):
        split, opts = _synthetic_split(data)
        held_out = "val" if split == "test" else "test"
        query = "&".join(f"{k}={v}" for k, v in opts.items() if k != "n")
        return load_eval_set(f"synthetic:{held_out}{'?' + query if query else ''}", pre, max_images=eval_max_images,
                             exclude_hashes=calib.hashes)
    spec = calib.source.spec
    if calib.source.kind == "dataset" and isinstance(spec, str) and calib.source.labelled:
        # a dataset with splits: its validation split is the held-out data
        try:
            ev = load_eval_set(spec, pre, max_images=eval_max_images, split="val", exclude_hashes=calib.hashes)
            if ev.source_key != calib.source.key:
                return ev
        except CalibrationError as e:
            log.info("no validation split in %s (%s); evaluating on unused frames", spec, e)
    most = max(int(eval_max_images or 0), MIN_HELD_OUT)
    unused = calib.unused_indices()
    if len(unused) >= MIN_HELD_OUT:  # the source has frames calibration did not read: measure on those
        return load_eval_set(calib.source, pre, indices=unused, max_images=most, exclude_hashes=calib.hashes)
    # else a deterministic share of the calibration frames is held out to measure INT8 on
    n = len(calib)
    k = max(MIN_HELD_OUT, min(math.ceil(HELD_OUT_SHARE * n), most))
    if n - k < MIN_CALIBRATION:
        raise CalibrationError(
            f"{calib.description}: {n} frames are too few to calibrate and to measure INT8 on frames calibration did not "
            f"see: holding out {k} (at least {MIN_HELD_OUT}, {HELD_OUT_SHARE:.0%}) leaves {n - k}, fewer than "
            f"{MIN_CALIBRATION}; give at least {MIN_HELD_OUT + MIN_CALIBRATION} frames (more is better), or held-out frames "
            f"with {option('eval_data')}"
        )
    return calib.hold_out(k)


def _synthetic_split(spec: str):
    rest = spec.strip()[len("synthetic"):].lstrip(":")
    split, _, query = rest.partition("?")
    return split or "train", dict(parse_qsl(query))


def _calibrate(bundle, fp32, fp32_path: Path, calib, evalset, staging: Path, *, method, targets, budget, sensitivity,
               sensitivity_frames, trt_version, num_bins, percentile, say, candidates=None) -> dict:
    import functools

    import onnx

    from calibration.cache import scales_from_ranges, write_trt_cache
    from calibration.quantize import compute_ranges, ensure_opset, opset_of, preset, quantized_nodes
    from calibration.report import REPORT_JSON, REPORT_PNG, write_json, write_png
    from calibration.sensitivity import Evaluator, LocalMeasurer, MixedPrecisionResult, layer_sensitivity, search_mixed_precision
    from converters.parity import check_parity

    man = bundle.manifest
    pre = man.preprocess
    work = staging / "work"
    work.mkdir()
    # ONNX Runtime's calibrator writes files beside the model it is given: give it one in the staging
    # folder, so concurrent calibrations of a bundle (or a killed one) leave nothing in the bundle itself
    local = work / "fp32.onnx"
    try:
        os.link(fp32_path, local)
    except OSError:  # no hard links on this file system
        shutil.copyfile(fp32_path, local)
    model_path = ensure_opset(local, work / "fp32.opset13.onnx")
    op_types = {n.name: n.op_type for n in onnx.load(str(model_path), load_external_data=False).graph.node}
    methods = [method] if method else list(METHODS)
    ranges_paths, all_ranges, calib_seconds = {}, {}, {}
    for m in methods:
        t0 = time.perf_counter()
        say(f"computing {m} ranges over {len(calib)} frames")
        ranges_paths[m] = work / f"ranges.{m}.json"
        all_ranges[m] = compute_ranges(model_path, calib, m, ranges_paths[m], num_bins=num_bins, percentile=percentile,
                                       workdir=work)
        calib_seconds[m] = round(time.perf_counter() - t0, 1)
    say(f"scoring FP32 on {len(evalset)} held-out frames ({evalset.description})")
    evaluator = Evaluator(evalset, pre, man.labels, man.output_kind, fp32_path, sensitivity_frames)

    report = {
        "bundle": str(bundle.path), "method": method or "measured per target",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "calibration": {"data": calib.description, "frames": len(calib), "first_frames": calib.names[:5],
                        "held_out_frames": calib.held_out, "seconds": calib_seconds},
        "evaluation": {"data": evalset.description, "frames": len(evalset), "split": evalset.split,
                       "first_frames": evalset.names[:5], "labelled": evalset.labelled,
                       "sensitivity_frames": len(evaluator.sens_set), "dropped_calibration_overlap": evalset.dropped_overlap,
                       "note": ("not used for calibration; every figure below (methods, mixed-precision search, final) "
                                "is measured on these frames" + ("" if evalset.labelled else
                                                                 ", against the FP32 class maps since they have no labels"))},
        "metric": evaluator.metric,
        "fp32": evaluator.reference,
        "targets": {},
        "artifacts": [],
    }
    artifacts = []
    chosen: dict[str, str] = {}
    for t in targets:
        p = preset(t)
        out = staging / artifact_name(t)
        trials = {}
        if len(methods) > 1:  # each range method's all-INT8 graph, measured; the least accuracy lost wins
            for m in methods:
                _quantize_to(model_path, ranges_paths[m], m, t, out)
                trials[m] = evaluator.measure(out)
                say(f"{t}: {m} ranges, all layers INT8: mIoU drop {trials[m]['miou_drop_points']:.2f} pts, "
                    f"agreement with FP32 {100 * trials[m]['agreement_with_fp32']:.2f}%")
            best = min(methods, key=lambda m: (round(trials[m]["miou_drop_points"], 6), -trials[m]["agreement_with_fp32"]))
        else:
            best = methods[0]
        chosen[t] = best
        quantize = functools.partial(_quantize_to, model_path, ranges_paths[best], best, t)
        say(f"{t}: quantizing with {best} ranges ({p.description})")
        quantize(out)
        qnodes = quantized_nodes(out)
        if not qnodes:
            raise CalibrationError(f"ONNX Runtime found no layer of {fp32_path} to quantize for {t}; "
                                   "the model has no INT8-capable layers: deploy it in FP32/FP16")
        entry: dict[str, Any] = {"artifact": artifact_name(t), "method": best,
                                 "method_chosen_by": "--method" if method else f"measured on the {len(evalset)} held-out frames",
                                 "method_trials": {m: {k: r[k] for k in ("miou", "miou_drop_points", "agreement_with_fp32")}
                                                   for m, r in trials.items()},
                                 "preset": p.to_dict(), "quantized_layers": len(qnodes), "budget_points": budget}
        full = trials.get(best) or evaluator.measure(out)
        say(f"{t}: all layers INT8: mIoU {full['miou']:.4f} vs FP32 {evaluator.reference['miou']:.4f} "
            f"(drop {full['miou_drop_points']:.2f} pts, budget {budget:.2f})")
        needs_search = full["miou_drop_points"] > budget
        sens = []
        measurer = (candidates(evaluator, model_path, ranges_paths[best], best, t) if candidates
                    else LocalMeasurer(evaluator, quantize, work))
        t_search = time.perf_counter()
        if sensitivity or needs_search:
            where = f" on {measurer.parallel} workers" if measurer.parallel > 1 else ""
            say(f"{t}: measuring the sensitivity of {len(qnodes)} quantized layers{where}")
            sens = layer_sensitivity(measurer, qnodes, op_types, progress=say)
        result: MixedPrecisionResult = search_mixed_precision(evaluator, measurer, sens, full, budget, t, progress=say)
        if result.float_layers:
            quantize(out, nodes_to_exclude=result.float_layer_names)
            result.final = evaluator.measure(out)  # the shipped file's own figures
            result.within_budget = result.final["miou_drop_points"] <= budget + 1e-9
        entry.update(result.to_dict())
        # where the sensitivity pass and the search scored their candidates, and how long they took
        entry["candidates"] = {**measurer.stats(), "seconds": round(time.perf_counter() - t_search, 2)}
        entry["float_layers_names"] = result.float_layer_names
        say(f"{t}: {len(result.float_layers)} layer(s) kept in float -> mIoU {result.final['miou']:.4f} "
            f"(drop {result.final['miou_drop_points']:.2f} pts){'' if result.within_budget else ' — OVER BUDGET'}")
        violations: list[Violation] = []
        if t == "tensorrt":
            violations = validate_tensorrt_qdq(out)
            if violations:
                raise CalibrationError("the TensorRT Q/DQ graph breaks TensorRT's rules (a quantizer change?):\n  "
                                       + "\n  ".join(str(v) for v in violations[:10]))
            entry["validator"] = "passed"
        parity = check_parity(fp32_path, out, pre, frames=8, output_kind=man.output_kind)
        entry["parity_vs_fp32"] = parity
        metrics = artifact_metrics(evaluator, result, calib, budget)
        info = {"method": best, "preset": p.to_dict(), "opset": opset_of(out), "quantized_layers": len(qnodes),
                "calibration_frames": len(calib), "calibration_data": calib.description, "source": fp32.path}
        if t == "tensorrt":
            info["trt_calibration_cache"] = TRT_CACHE
        artifacts.append({"name": artifact_name(t), "target": t, "parity": parity, "metrics": metrics, "info": info})
        report["targets"][t] = entry

    files = [a["name"] for a in artifacts]
    if "tensorrt" in targets:
        cache_info = write_trt_cache(staging / TRT_CACHE, scales_from_ranges(all_ranges[chosen["tensorrt"]]), trt_version)
        cache_info.update(path=TRT_CACHE, applies_to=fp32.path,
                          note="legacy implicit INT8 (TensorRT 8.x/10.x): trtexec --onnx=model.onnx --int8 --calib=calibration.cache")
        report["trt_calibration_cache"] = cache_info
        files.append(TRT_CACHE)
    report["artifacts"] = files[:]
    write_json(report, staging / REPORT_JSON)
    write_png(report, staging / REPORT_PNG)
    files += [REPORT_JSON, REPORT_PNG]
    return {
        "bundle": str(bundle.path), "method": report["method"], "methods": chosen, "budget_points": budget, "files": files,
        "artifacts": artifacts,
        "report": REPORT_JSON, "report_png": REPORT_PNG, "calibration": report["calibration"], "evaluation": report["evaluation"],
        "fp32": report["fp32"], "trt_calibration_cache": report.get("trt_calibration_cache"),
        "targets": {t: _target_summary(e) for t, e in report["targets"].items()},
    }


def _quantize_to(model_path, ranges_path, method, target, out, nodes_to_exclude=(), nodes_to_quantize=None):
    from calibration.quantize import quantize_model

    return quantize_model(model_path, out, ranges_path, method, target, nodes_to_exclude=nodes_to_exclude,
                          nodes_to_quantize=nodes_to_quantize)


def artifact_metrics(evaluator, result, calib, budget) -> dict:
    """The figures an INT8 artifact carries in the manifest (`metrics`), from any quantizer's result."""
    m: dict[str, Any] = {"calibration_frames": len(calib), "max_miou_drop_points": budget}
    if evaluator is None or result is None:
        m.update(accuracy_measured=False, float_layers=[])
        return m
    ref, final, full = evaluator.reference, result.final, result.full_int8
    m.update(
        accuracy_measured=True, metric=evaluator.metric, eval_data=evaluator.evalset.description,
        eval_frames=len(evaluator.evalset),
        miou_fp32=ref["miou"], miou_int8=final["miou"], miou_drop_points=final["miou_drop_points"],
        miou_all_layers_int8=full["miou"], miou_drop_points_all_layers_int8=full["miou_drop_points"],
        pixel_accuracy_fp32=ref["pixel_accuracy"], pixel_accuracy_int8=final["pixel_accuracy"],
        per_class_iou_fp32=ref["per_class_iou"], per_class_iou_int8=final["per_class_iou"],
        agreement_with_fp32=final["agreement_with_fp32"], float_layers=result.float_layer_names,
        within_budget=result.within_budget,
    )
    return m


def _target_summary(e: dict) -> dict:
    full, final = e.get("full_int8") or {}, e.get("final") or {}
    return {
        "artifact": e["artifact"], "quantized_layers": e["quantized_layers"], "float_layers": e.get("float_layers_names", []),
        "miou_fp32": (e.get("reference") or {}).get("miou"), "miou_all_int8": full.get("miou"),
        "drop_points_all_int8": full.get("miou_drop_points"), "miou_int8": final.get("miou"),
        "drop_points": final.get("miou_drop_points"), "agreement_with_fp32": final.get("agreement_with_fp32"),
        "within_budget": e.get("within_budget"), "validator": e.get("validator"), "method": e.get("method"),
        "method_trials": e.get("method_trials") or {},
        "parity_mask_agreement": (e.get("parity_vs_fp32") or {}).get("mask_agreement"),
    }


def _commit_locked(bundle, staging: Path, summary: dict, Artifact) -> None:
    """`_commit` under the bundle's write lock, into the manifest as it is now on disk (what another
    writer added meanwhile stays), unless the FP32 model was replaced while calibrating."""
    from edgeseg.bundle import Bundle

    source = bundle.select("onnxruntime", "fp32")
    with Bundle.writing(bundle.path) as current:
        if not any(a.path == source.path and a.sha256 == source.sha256 for a in current.find("onnxruntime", "fp32")):
            raise CalibrationError(f"{bundle.path / source.path} was replaced while calibrating (by another `edgeseg convert`?); "
                                   "the INT8 graphs would not match it: run `edgeseg calibrate` again")
        _commit(current, staging, summary, Artifact)


def _commit(bundle, staging: Path, summary: dict, Artifact) -> None:
    """Move the staged files into the bundle (each atomically), then record them and save the manifest."""
    from edgeseg.bundle import atomic_path

    for name in summary["files"]:
        with atomic_path(bundle.path / name) as tmp:
            os.replace(staging / name, tmp)
    for a in summary["artifacts"]:
        bundle.add_artifact(Artifact(a["name"], "onnxruntime", "int8", parity=a["parity"], metrics=a["metrics"],
                                     target=a["target"], info=a["info"]))
    previous = bundle.manifest.metrics.get("quantization") or {}
    targets = dict(previous.get("targets") or {})  # targets calibrated earlier keep their entry
    targets.update({t: {k: s[k] for k in ("artifact", "within_budget", "drop_points", "float_layers")}
                    for t, s in summary["targets"].items()})
    for t, m in summary["methods"].items():
        targets[t]["method"] = m
    bundle.manifest.metrics["quantization"] = {
        "method": summary["method"], "report": summary["report"], "report_png": summary["report_png"],
        "budget_points": summary["budget_points"],
        "trt_calibration_cache": TRT_CACHE if summary.get("trt_calibration_cache") else previous.get("trt_calibration_cache"),
        "targets": targets,
    }
    bundle.save()


def __getattr__(name):
    # heavier parts load on first use
    if name in ("evaluate_bundle", "evaluate_checkpoint", "format_table", "load_eval_set"):
        from calibration import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module 'calibration' has no attribute {name!r}")


__all__ = ["calibrate_bundle", "calibration_frames", "check_budget", "artifact_metrics", "CalibrationSet", "CalibrationError", "CalibrationWarning", "open_source", "Violation",
           "validate_tensorrt_qdq", "PRESETS", "METHODS", "TARGETS", "artifact_name", "evaluate_bundle",
           "evaluate_checkpoint", "format_table", "load_eval_set"]
