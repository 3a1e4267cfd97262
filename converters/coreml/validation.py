"""Checks of a package without running it (works on Linux): spec, metadata, the image input's
effective scale and bias, how the weights are stored, and the weights against the torch model."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from converters.coreml.errors import CoreMLConversionError
from converters.coreml.schemes import INPUT_NAME, OUTPUTS, SCHEMES, WEIGHT_THRESHOLD, import_ct
from converters.coreml.weights import eligible, match_torch_weights, stored_weights
from edgeseg.spec import Preprocess


def _load_program(path: Path):
    ct = import_ct()
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    spec = mlmodel.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        return mlmodel, spec, None
    prog = milproto_load(spec, spec.specificationVersion, mlmodel.weights_dir)
    return mlmodel, spec, prog


def _input_affine(func, input_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Follow the element-wise ops after the image input: per-channel (a, b, source channel) such
    that the first layer sees a * image[perm] + b."""
    var = func.inputs.get(input_name)
    if var is None:
        return None
    a, b, perm = np.ones(3), np.zeros(3), np.arange(3)

    def channel_vec(c):
        c = np.asarray(c, np.float64)
        if c.ndim == 0:
            return np.full(3, float(c))
        c = c.reshape(-1) if c.size in (1, 3) else None
        if c is None:
            return None
        return np.broadcast_to(c, (3,)).astype(np.float64)

    for _ in range(16):
        children = list(var.child_ops)
        if len(children) != 1:
            break
        op = children[0]
        t = op.op_type
        if t == "cast":
            var = op.outputs[0]
            continue
        if t in ("mul", "add", "sub", "real_div"):
            x, y = op.inputs["x"], op.inputs["y"]
            other = y if x is var else x
            c = channel_vec(other.val) if other.val is not None else None
            if c is None:
                break
            if t == "mul":
                a, b = a * c, b * c
            elif t == "add":
                b = b + c
            elif t == "sub":
                if x is var:
                    b = b - c
                else:
                    a, b = -a, c - b
            elif t == "real_div":
                if x is not var:
                    break
                a, b = a / c, b / c
            var = op.outputs[0]
            continue
        if t == "batch_norm":
            vals = {k: channel_vec(op.inputs[k].val) if op.inputs.get(k) is not None else None
                    for k in ("mean", "variance", "gamma", "beta")}
            eps = float(op.inputs["epsilon"].val) if op.inputs.get("epsilon") is not None else 1e-5
            mean = vals["mean"] if vals["mean"] is not None else np.zeros(3)
            var_ = vals["variance"] if vals["variance"] is not None else np.ones(3)
            g = vals["gamma"] if vals["gamma"] is not None else np.ones(3)
            beta = vals["beta"] if vals["beta"] is not None else np.zeros(3)
            k = g / np.sqrt(var_ + eps)
            a, b = a * k, (b - mean) * k + beta
            var = op.outputs[0]
            continue
        if t == "reverse" and list(np.atleast_1d(op.inputs["axes"].val)) in ([1], [-3]):
            a, b, perm = a[::-1], b[::-1], perm[::-1]
            var = op.outputs[0]
            continue
        break
    return a, b, perm


def validate_package(path: str | os.PathLike, torch_model=None, precision: str | None = None) -> dict:
    """Check a package without running it (works on Linux).

    Checks: ML Program; one image input named 'image' with the declared colour order and sizes;
    the output's name, type and shape; labels/palette/preprocess metadata; the normalisation ops
    after the input against the preprocessing (the effective image scale and bias); that the
    weights are stored as the precision says (counting dtypes and constexpr ops); and, given the
    torch model, that each stored weight matches a torch weight within the scheme's error:
    INT8/INT4 within half a quantization step, palettized weights at their nearest table entry,
    FP16 as numpy's cast of the same weights rounds them (subnormals included), allowing a
    per-output-channel factor where batch norm was folded.
    Returns {'ok', 'problems', 'checks', 'weight_dtypes', 'ops', 'weights', ...}.
    """
    path = Path(path)
    checks: list[dict] = []

    def check(name: str, ok: bool, detail: str = ""):
        checks.append({"check": name, "ok": bool(ok), "detail": detail})
        return ok

    if not path.exists():
        raise CoreMLConversionError(f"package not found: {path}")
    ct = import_ct()
    mlmodel, spec, prog = _load_program(path)
    report: dict[str, Any] = {"path": str(path), "checks": checks}
    check("model type is ML Program", prog is not None, spec.WhichOneof("Type"))
    ud = dict(spec.description.metadata.userDefined)
    precision = precision or ud.get("precision")
    report["precision"] = precision
    scheme = SCHEMES.get(precision or "")
    check("precision is known", scheme is not None, str(precision))

    # metadata
    labels = palette = pre = None
    try:
        labels = json.loads(ud["labels"])
        palette = json.loads(ud["palette"])
        pre = Preprocess.from_dict(json.loads(ud["preprocess"]))
        check("metadata: labels, palette, preprocess", len(labels) > 0 and len(palette) == len(labels),
              f"{len(labels)} labels, {len(palette)} colours")
    except (KeyError, ValueError, TypeError) as e:
        check("metadata: labels, palette, preprocess", False, f"missing or unreadable: {e}")
    meta = spec.description.metadata
    check("metadata: author, licence, version", bool(meta.author) and bool(meta.versionString),
          f"author={meta.author!r} license={meta.license!r} version={meta.versionString!r}")
    output = ud.get("output", "")
    color = ud.get("color", pre.color if pre else "rgb")
    report.update(labels=labels, output=output, color=color)

    # input
    inputs = list(spec.description.input)
    ok = check("one input named 'image'", len(inputs) == 1 and inputs[0].name == INPUT_NAME, ", ".join(i.name for i in inputs))
    if ok:
        itype = inputs[0].type
        is_image = itype.WhichOneof("Type") == "imageType"
        check("input is an image", is_image, itype.WhichOneof("Type"))
        if is_image:
            im = itype.imageType
            space = ct.proto.FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(im.colorSpace)
            check("input colour order", space == color.upper(), f"{space} (expected {color.upper()})")
            sizes_meta = [tuple(s) for s in json.loads(ud.get("input_sizes", "[]"))]
            enum = [(s.height, s.width) for s in im.enumeratedSizes.sizes]
            declared = enum or [(im.height, im.width)]
            report["input_sizes"] = declared
            if pre is not None:
                check("default input size is the preprocessing size", (im.height, im.width) == tuple(pre.size),
                      f"{im.height}x{im.width} vs {pre.size[0]}x{pre.size[1]}")
            if sizes_meta:
                check("input sizes match the metadata", sorted(declared) == sorted(sizes_meta),
                      f"{declared} vs {sizes_meta}")

    # output
    outputs = list(spec.description.output)
    ok = check("one output named after its kind", len(outputs) == 1 and outputs[0].name == output and output in OUTPUTS,
               ", ".join(o.name for o in outputs) + f" (kind {output!r})")
    if ok:
        arr = outputs[0].type.multiArrayType
        dt = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(arr.dataType)
        want = "INT32" if output == "mask" else "FLOAT32"
        check("output data type", dt == want, f"{dt} (expected {want})")
        shape = list(arr.shape)
        meta_shape = json.loads(ud.get("output_shape", "[]"))
        if shape and meta_shape:
            check("output shape", shape == meta_shape, f"{shape} vs metadata {meta_shape}")
        if labels and meta_shape and output != "mask":
            check("output has one channel per label", len(meta_shape) == 4 and meta_shape[1] == len(labels),
                  f"{meta_shape} for {len(labels)} labels")
        report["output_shape"] = shape or meta_shape

    if prog is None:
        report["problems"] = [f"{c['check']}: {c['detail']}" for c in checks if not c["ok"]]
        report["ok"] = not report["problems"]
        return report

    func = prog.functions["main"]
    ops: dict[str, int] = {}
    for op in func.operations:
        ops[op.op_type] = ops.get(op.op_type, 0) + 1
    report["ops"] = dict(sorted(ops.items()))
    report["opset"] = spec.mlProgram.functions["main"].opset  # CoreML7 = iOS17, CoreML8 = iOS18

    # the image input's effective scale and bias (ImageType scale/bias plus the folded normalisation)
    if pre is not None:
        aff = _input_affine(func, INPUT_NAME)
        if aff is None:
            check("image scale/bias", False, "the image input is not in the program")
        else:
            a, b, perm = aff
            flip = color != pre.color
            std, mean = np.asarray(pre.std), np.asarray(pre.mean)
            want_a, want_b = 1.0 / (255.0 * std), -mean / std
            want_perm = np.arange(3)[::-1] if flip else np.arange(3)
            ok = (np.allclose(a, want_a, rtol=2e-3, atol=0) and np.allclose(b, want_b, rtol=0, atol=2e-3 * max(1, np.abs(want_b).max()))
                  and list(perm) == list(want_perm))
            report["image_scale"] = [round(float(v), 7) for v in a]
            report["image_bias"] = [round(float(v), 5) for v in b]
            check("image scale/bias equal the preprocessing's (x/255 - mean)/std", ok,
                  f"scale {report['image_scale']} bias {report['image_bias']} (expected {np.round(want_a, 7).tolist()} / {np.round(want_b, 5).tolist()})")
        # ML Programs keep no preprocessing fields in the spec: coremltools inserts an ImageType's
        # scale and bias as ops named '<input>__scaled__' / '<input>__biased__'
        scale, bias = 1.0, [0.0, 0.0, 0.0]
        for op in func.operations:
            if op.op_type not in ("mul", "add") or not op.outputs:
                continue
            out = op.outputs[0].name
            consts = [v.val for v in op.inputs.values() if v.val is not None]
            if not consts:
                continue
            if out.startswith(f"{INPUT_NAME}__scaled__"):
                scale = np.asarray(consts[0], np.float64).reshape(-1).tolist()
            elif out.startswith(f"{INPUT_NAME}__biased__"):
                bias = np.asarray(consts[0], np.float64).reshape(-1).tolist()
        report["image_type_scale"], report["image_type_bias"] = scale, bias
        check("image input: scale 1, bias 0 (normalisation folded into the graph)",
              np.allclose(scale, 1.0) and np.allclose(bias, 0.0), f"scale {scale}, bias {bias}")

    # weights
    weights = stored_weights(func)
    dtypes: dict[str, int] = {}
    for w in weights:
        dtypes[w["storage"]] = dtypes.get(w["storage"], 0) + 1
    report["weight_dtypes"] = dict(sorted(dtypes.items()))
    if scheme is not None:
        big = [w for w in weights if eligible(w, scheme)]
        if scheme.kind == "none":
            want = scheme.compute
            bad = [w["name"] for w in weights if w["kind"] != "float" or w["storage"] != want]
            check(f"all weights stored {want}", not bad and bool(weights), f"{report['weight_dtypes']}" + (f"; not {want}: {bad[:4]}" if bad else ""))
        elif scheme.kind == "linear":
            want = f"int{scheme.nbits}"
            bad = [w["name"] for w in big if w["kind"] != "affine" or w["storage"] not in (want, f"u{want}")]
            check(f"weights over {WEIGHT_THRESHOLD} elements are {want}", not bad and bool(big),
                  f"{report['weight_dtypes']}" + (f"; not {want}: {bad[:4]}" if bad else ""))
        elif scheme.kind == "lut":
            want = f"lut{scheme.nbits}"
            bad = [w["name"] for w in big if w["storage"] != want]
            check(f"weights over {WEIGHT_THRESHOLD} elements are palettized to {scheme.nbits} bits", not bad and bool(big),
                  f"{report['weight_dtypes']}" + (f"; not {want}: {bad[:4]}" if bad else ""))
            if scheme.granularity == "per_grouped_channel":
                def groups(w):
                    lut = np.asarray(w["lut"]) if w.get("lut") is not None else np.zeros(1)
                    return int(np.prod(lut.shape[:-2])) if lut.ndim > 2 else 1

                axis = lambda w: 1 if w["op_type"] == "conv_transpose" else 0  # noqa: E731
                grouped = [w for w in big if groups(w) == w["shape"][axis(w)] // scheme.group_size]
                check(f"one look-up table per {scheme.group_size} output channels", len(grouped) == len(big),
                      f"{len(grouped)} of {len(big)} weights")
        elif scheme.kind == "w8a8":
            bad = [w["name"] for w in big if w["kind"] != "affine" or "int8" not in w["storage"]]
            check("weights are int8", not bad and bool(big), f"{report['weight_dtypes']}" + (f"; not int8: {bad[:4]}" if bad else ""))
            nq, ndq = ops.get("quantize", 0), ops.get("dequantize", 0)
            check("activations are quantized (quantize/dequantize ops)", nq > 0 and ndq > 0, f"{nq} quantize, {ndq} dequantize")
        if scheme.kind in ("none", "linear", "lut"):
            check("no activation quantization ops", ops.get("quantize", 0) == 0, f"{ops.get('quantize', 0)} quantize ops")

    # weights against the torch model
    if torch_model is not None:
        summary, failures = match_torch_weights(weights, torch_model, scheme)
        report["weights"] = summary
        matched, unmatched = summary["compared"], summary["unmatched"]
        check("stored weights match the torch weights within the scheme's error", not failures and matched > 0,
              f"{matched} matched, {unmatched} without a same-shaped torch weight" + (f"; {'; '.join(failures[:3])}" if failures else ""))

    report["problems"] = [f"{c['check']}: {c['detail']}" for c in checks if not c["ok"]]
    report["ok"] = not report["problems"]
    return report
