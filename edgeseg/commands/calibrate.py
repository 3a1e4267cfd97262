"""edgeseg calibrate BUNDLE --data D [--method entropy] [--target tensorrt|cpu|both|openvino|litert] [--max-miou-drop 0.5] [--eval-data D2]"""
from __future__ import annotations

import argparse
import logging

ENGINE_TARGETS = ("openvino", "litert")  # engines that quantize their own format (converters/)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle folder with an FP32 ONNX model (from `edgeseg convert`)")
    p.add_argument("--data", required=True,
                   help="calibration frames: image folder, video file, or dataset spec (synthetic:train, voc:/path ...)")
    p.add_argument("--method", choices=("minmax", "percentile", "entropy"), default=None,
                   help="activation range method (default: each is tried and the one whose INT8 graph loses least on the "
                        "held-out frames is kept, per target; instance bundles: minmax, whose box outputs entropy clips: "
                        "measured mask AP 0.55 -> 0.00 with entropy, 0.50 with minmax on the default instance model)")
    p.add_argument("--target", choices=("tensorrt", "cpu", "both") + ENGINE_TARGETS, default="both",
                   help="tensorrt: symmetric int8 Q/DQ for TensorRT; cpu: uint8/int8 Q/DQ for ONNX Runtime on x86 (default both); "
                        "openvino: an NNCF INT8 IR (accuracy control within the budget); litert: full-integer INT8 .tflite "
                        "from the bundle's model.fp32.tflite (the LiteRT quantizer)")
    p.add_argument("--max-miou-drop", type=float, default=0.5, metavar="POINTS",
                   help="accuracy budget in mIoU points; layers stay in float until INT8 meets it (default 0.5)")
    p.add_argument("--max-ap-drop", type=float, default=None, metavar="POINTS",
                   help="instance bundles: accuracy budget in mask AP points (COCO, pycocotools); the nodes assembling the "
                        "outputs, then the convolutions nearest them, stay float, a few more per round, until INT8 meets it "
                        "(default 2.0)")
    p.add_argument("--eval-data", help="held-out data INT8 is measured on (default: synthetic:test for synthetic data, a "
                                       "dataset's val split, else frames of --data calibration does not use: those it "
                                       "did not read, or 20%% of them held out, at least 16; unlabelled frames are scored "
                                       "against FP32's class maps)")
    p.add_argument("--max-images", type=int, default=512, help="calibration frames to use (default 512)")
    p.add_argument("--eval-max-images", type=int, default=200, help="evaluation frames to use (default 200)")
    p.add_argument("--no-sensitivity", action="store_true",
                   help="skip the per-layer analysis when INT8 already meets the budget (faster; the report has no layer chart)")
    p.add_argument("--sensitivity-frames", type=int, default=16, help="frames for the per-layer analysis (default 16)")
    p.add_argument("--trt-version", help="TensorRT version the legacy calibration cache is for (default: installed, else 10.3.0)")
    from edgeseg.cluster.cli import add_cluster_arguments

    add_cluster_arguments(p, "--target tensorrt|cpu|both: each sensitivity and float-layer candidate on a Ray worker; same result")


def run(args) -> int:
    import warnings

    from calibration import CalibrationWarning, calibrate_bundle

    from edgeseg.bundle import Bundle

    instance = Bundle.load(args.bundle).manifest.task == "instance-segmentation"
    if args.cluster and (instance or args.target in ENGINE_TARGETS):
        from edgeseg.errors import EdgesegError

        what = "an instance bundle" if instance else f"--target {args.target} (its quantizer runs its own search)"
        raise EdgesegError(f"--cluster distributes the ONNX INT8 search (--target tensorrt, cpu or both); {what} calibrates "
                           "on this machine: drop --cluster")
    if instance:
        return _instance_int8(args)
    with warnings.catch_warnings():
        warnings.simplefilter("always", CalibrationWarning)  # printed as one line by the CLI
        if args.target in ENGINE_TARGETS:
            entry = _engine_int8(args)
            print(format_engine_summary(args.bundle, args.target, entry))
            return 1 if entry["metrics"].get("within_budget") is False else 0
        options = dict(method=args.method, target=args.target, max_miou_drop=args.max_miou_drop, eval_data=args.eval_data,
                       max_images=args.max_images, eval_max_images=args.eval_max_images, sensitivity=not args.no_sensitivity,
                       sensitivity_frames=args.sensitivity_frames, trt_version=args.trt_version, progress=steps)
        if args.cluster:
            from edgeseg.cluster.calibrate import RayCandidates

            with RayCandidates(args.cluster, workers=args.workers, worker_cpus=args.worker_cpus) as candidates:
                summary = calibrate_bundle(args.bundle, args.data, candidates=candidates, **options)
        else:
            summary = calibrate_bundle(args.bundle, args.data, **options)
    print(format_summary(summary))
    over = [t for t, s in summary["targets"].items() if s.get("within_budget") is False]
    return 1 if over else 0


def _instance_int8(args) -> int:
    """INT8 of an instance bundle, judged by mask AP (calibration.instance_int8)."""
    from calibration.data import CalibrationError
    from calibration.instance_int8 import calibrate_instance_bundle

    if args.target not in ("cpu", "tensorrt", "both"):
        raise CalibrationError("instance bundles calibrate for --target cpu, tensorrt or both")
    code = 0
    for target in (("cpu", "tensorrt") if args.target == "both" else (args.target,)):
        s = calibrate_instance_bundle(args.bundle, args.data, target=target, method=args.method or "minmax",
                                      max_ap_drop=2.0 if args.max_ap_drop is None else args.max_ap_drop, eval_data=args.eval_data,
                                      max_images=min(args.max_images, 256), eval_max_images=args.eval_max_images)
        code |= _print_instance_int8(s)
    return code


def _print_instance_int8(s: dict) -> int:
    print(f"{s['artifact']}: mask AP {s['mask_AP_fp32']:.4f} (FP32) -> {s['mask_AP_int8']:.4f} (INT8), "
          f"{s['ap_drop_points']:+.2f} points drop, budget {s['max_ap_drop']:.2f}: "
          f"{'within' if s['within_budget'] else 'OVER'}; {len(s['float_layers'])} nodes kept float; "
          f"mask AP50 {s['mask_AP50_fp32']:.4f} -> {s['mask_AP50_int8']:.4f} on {s['eval_images']} images")
    return 0 if s["within_budget"] else 1


def steps(message: str) -> None:
    """Calibration's step messages: between the progress bars on a terminal, in the log otherwise (-v)."""
    from edgeseg import progress

    if progress.enabled():
        progress.write(f"  {message}")
    else:
        logging.getLogger("edgeseg.calibration").info(message)


def _engine_int8(args) -> dict:
    options = dict(calib=args.data, eval_data=args.eval_data, max_miou_drop=args.max_miou_drop, max_images=args.max_images,
                   eval_max_images=args.eval_max_images, report=steps)
    if args.target == "openvino":
        from converters.openvino import add_openvino

        return add_openvino(args.bundle, "int8", **options)
    from converters.litert import quantize_litert

    return quantize_litert(args.bundle, "int8", **options)


def format_engine_summary(bundle: str, target: str, e: dict) -> str:
    """An OpenVINO or LiteRT INT8 artifact: accuracy against FP32, per class, and parity."""
    m, info = e["metrics"], e["info"]
    lines = [f"{bundle}: {target} INT8 ({info.get('method') or info.get('recipe')}) from {m['calibration_frames']} frames "
             f"of {info.get('calibration_data')}"]
    p = e["parity"]
    parity = f"parity vs FP32 ONNX on {p['frames']} frames: mask agreement {100 * p['mask_agreement']:.2f}%, max |Δlogit| {p.get('max_abs', float('nan')):.3g}"
    if not m.get("accuracy_measured"):
        return "\n".join(lines + ["accuracy not measured (no held-out frames); pass --eval-data", parity, f"wrote {e['artifact']}"])
    ok = "ok" if m["within_budget"] else "MISSED"
    lines += [f"evaluated on {m['eval_frames']} held-out frames of {m['eval_data']} ({m['metric']}); budget {m['max_miou_drop_points']:.2f} pts",
              f"{'artifact':<26} {'FP32':>7} {'all INT8':>9} {'final':>7} {'drop pts':>8} {'agree':>7} {'float layers':>12}  budget",
              f"{e['artifact']:<26} {m['miou_fp32']:>7.4f} {m['miou_all_layers_int8']:>9.4f} {m['miou_int8']:>7.4f} "
              f"{m['miou_drop_points']:>8.2f} {m['agreement_with_fp32']:>7.4f} {len(m['float_layers']):>12}  {ok}"]
    lines += [f"{'':<9} float: {name}" for name in m["float_layers"]]
    lines += ["", f"{'class':<16} {'FP32 IoU':>9} {'INT8 IoU':>9}"]
    for label, v in m["per_class_iou_fp32"].items():
        q = m["per_class_iou_int8"].get(label)
        lines.append(f"{label[:16]:<16} {'n/a' if v is None else f'{v:.4f}':>9} {'n/a' if q is None else f'{q:.4f}':>9}")
    return "\n".join(lines + ["", parity, f"wrote {e['artifact']}"])


def format_summary(s: dict) -> str:
    ev, cal = s["evaluation"], s["calibration"]
    lines = [f"{s['bundle']}: ranges from {cal['frames']} frames of {cal['data']}"]
    what = "mIoU" if ev.get("labelled") else "mIoU against FP32's class maps (no labels)"
    lines.append(f"measured on {ev['frames']} frames: {ev.get('split') or ev['data']} ({what}); budget {s['budget_points']:.2f} pts")
    head = (f"{'target':<9} {'artifact':<26} {'method':<10} {'FP32':>7} {'all INT8':>9} {'final':>7} {'drop pts':>8} {'agree':>7} "
            f"{'float layers':>12}  budget")
    lines += [head, "-" * len(head)]
    for t, r in s["targets"].items():
        f = lambda v, spec=".4f": "-" if v is None else format(v, spec)  # noqa: E731
        ok = {True: "met", False: "MISSED", None: "-"}[r.get("within_budget")]
        lines.append(f"{t:<9} {r['artifact']:<26} {r.get('method') or '-':<10} {f(r['miou_fp32']):>7} {f(r['miou_all_int8']):>9} "
                     f"{f(r['miou_int8']):>7} {f(r['drop_points'], '.2f'):>8} {f(r['agreement_with_fp32']):>7} "
                     f"{len(r['float_layers']):>12}  {ok}")
        for m, tr in (r.get("method_trials") or {}).items():
            lines.append(f"{'':<9} {m} ranges, all INT8: drop {tr['miou_drop_points']:.2f} pts, agreement {tr['agreement_with_fp32']:.4f}"
                         + ("  <- kept" if m == r.get("method") else ""))
        for name in r["float_layers"]:
            lines.append(f"{'':<9} float: {name}")
        if r.get("validator"):
            lines.append(f"{'':<9} TensorRT Q/DQ rules: {r['validator']}")
    if s.get("trt_calibration_cache"):
        c = s["trt_calibration_cache"]
        lines.append(f"legacy TensorRT cache: {c['path']} ({c['header']}, {c['tensors']} tensors) for {c['applies_to']}")
    lines.append(f"report: {s['report']}, {s['report_png']}")
    return "\n".join(lines)
