"""Instance-segmentation networks -> ONNX -> bundle (task instance-segmentation, output kind
instances, the output layout recorded).

    convert("runs/yoloseg.pt", "bundle/")                      # raw yolo layout: NMS and masks in the runtime
    convert("runs/yoloseg.pt", "bundle/", instance_tail=True)  # the tail inside the graph

Any torch module with `task = "instance-segmentation"` and `instance_layout()` converts: the
`yolo` layout (edgeseg's yoloseg) and the `detections` layout (Mask R-CNN, NMS already inside).
`instance_tail` appends to a `yolo` network, in the graph: the best class per anchor, a score
filter, class-aware NMS (ONNX `NonMaxSuppression` on boxes offset per class, as torchvision's
batched NMS), the `max_detections` best (`TopK`: a fixed-size answer) and mask assembly at
prototype resolution (coefficients x prototypes, sigmoid, cropped to the box plus `mask_margin`
prototype pixels). The engine then returns the `detections` layout, ready to paste.

Parity is judged on what users see: the detections of the converted graph and of the torch
network (both through the runtime's post-processing, at frame size) are matched one to one, and
every object must be found by both with mask IoU >= 0.99 (`instance_parity`).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np

from edgeseg import progress
from edgeseg.errors import ConversionError
from edgeseg.instance_layout import OUTPUT_ROLES, InstanceLayout
from edgeseg.spec import Preprocess

log = logging.getLogger("edgeseg.convert")
MASK_IOU_MIN = 0.99  # parity: per matched object
TAIL_OPSET = 17


def is_instance_model(model) -> bool:
    return getattr(model, "task", None) == "instance-segmentation" and callable(getattr(model, "instance_layout", None))


def _torch():
    import torch

    return torch


def tail_module(body, layout: InstanceLayout, max_detections: int | None = None, score_threshold: float | None = None,
                iou_threshold: float | None = None, mask_margin: int = 1):
    """`body` (a yolo-layout network) with the post-processing tail: returns boxes (1, K, 4),
    scores (1, K), classes (1, K) float, masks (1, K, h, w) - the `detections` layout."""
    torch = _torch()
    from edgeseg.models.detection import nms_topk, offset_by_group

    K = int(max_detections or layout.max_detections)
    conf = float(layout.score_threshold if score_threshold is None else score_threshold)
    iou = float(layout.iou_threshold if iou_threshold is None else iou_threshold)
    nc, nm = layout.num_classes, layout.num_masks

    class Tail(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            pred, protos = self.inner(x)
            h, w = int(protos.shape[-2]), int(protos.shape[-1])
            H, W = int(x.shape[-2]), int(x.shape[-1])
            p = pred.transpose(1, 2)  # (1, A, C)
            cxcy, wh = p[..., 0:2], p[..., 2:4]
            boxes = torch.cat([cxcy - wh / 2, cxcy + wh / 2], -1)
            scores, cls = p[..., 4 : 4 + nc].max(-1)
            coefs = p[..., 4 + nc : 4 + nc + nm]
            span = float(max(H, W) * 4 + 1)  # greater than any coordinate a box can reach
            idx, valid = nms_topk(offset_by_group(boxes, cls, span), scores, iou, K, score_threshold=conf)
            live = valid.to(p.dtype)
            kb = boxes.gather(1, idx[..., None].expand(-1, -1, 4)) * live[..., None]
            ks = scores.gather(1, idx) * live
            kc = cls.gather(1, idx).to(p.dtype) * live
            kcoef = coefs.gather(1, idx[..., None].expand(-1, -1, nm))
            masks = torch.sigmoid(torch.matmul(kcoef, protos.reshape(1, nm, h * w))).reshape(1, K, h, w)
            # crop to each box (+ margin) in prototype pixels: a pixel centre inside the widened box stays
            sx, sy = w / W, h / H
            xs = (torch.arange(w, dtype=p.dtype) + 0.5).reshape(1, 1, 1, w)
            ys = (torch.arange(h, dtype=p.dtype) + 0.5).reshape(1, 1, h, 1)
            x0 = (kb[..., 0] * sx - mask_margin)[..., None, None]
            x1 = (kb[..., 2] * sx + mask_margin)[..., None, None]
            y0 = (kb[..., 1] * sy - mask_margin)[..., None, None]
            y1 = (kb[..., 3] * sy + mask_margin)[..., None, None]
            f = p.dtype  # products of 0/1 floats, not boolean ands: Core ML's converter takes these
            inside = (xs >= x0).to(f) * (xs <= x1).to(f) * (ys >= y0).to(f) * (ys <= y1).to(f)
            masks = masks * inside * live[..., None, None]
            return kb, ks, kc, masks

    module = Tail(body).eval()
    out_layout = InstanceLayout("detections", nc, nm, outputs={r: r for r in OUTPUT_ROLES["detections"]},
                                score_threshold=conf, iou_threshold=iou, max_detections=K, mask_margin=int(mask_margin))
    return module, out_layout


def _deployed(model, pre: Preprocess, fold_normalization: bool):
    torch = _torch()
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    class Deployed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.register_buffer("mean", mean)
            self.register_buffer("inv_std", inv_std)

        def forward(self, x):
            if fold_normalization:
                x = (x.float() - self.mean) * self.inv_std
            return tuple(self.inner(x))

    return Deployed(model).eval()


def export_instance_onnx(model, path, *, preprocess: Preprocess, layout: InstanceLayout, fold_normalization: bool = False,
                         opset: int = TAIL_OPSET, simplify: bool = True, metadata: dict | None = None,
                         input_name: str = "input") -> dict:
    """Export an instance network with its outputs named by `layout` (written atomically)."""
    torch = _torch()
    import onnx

    from converters.onnx import META_KEY, _first_line, _io_desc, _opset, _sample_frame, _set_metadata, _simplify
    from edgeseg.bundle import atomic_path

    names = [layout.outputs[r] for r in OUTPUT_ROLES[layout.layout]]
    wrapped = _deployed(model, preprocess, fold_normalization)
    dummy = torch.from_numpy(preprocess.replace(dtype="uint8" if fold_normalization else "float32").apply(_sample_frame(preprocess)))
    path = Path(path)
    with atomic_path(path) as tmp:
        errors = []
        for which in ("torchscript", "dynamo"):
            try:
                with progress.phase(f"export ({which} exporter)"), warnings.catch_warnings(), \
                        contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    if which == "torchscript":
                        torch.onnx.export(wrapped, (dummy,), str(tmp), dynamo=False, opset_version=opset, input_names=[input_name],
                                          output_names=names, do_constant_folding=True)
                    else:
                        torch.onnx.export(wrapped, (dummy,), str(tmp), dynamo=True, opset_version=max(opset, 18),
                                          input_names=[input_name], output_names=names, external_data=False)
                used = which
                break
            except Exception as e:
                errors.append(f"{which}: {type(e).__name__}: {_first_line(e)}")
                tmp.unlink(missing_ok=True)
        else:
            raise ConversionError("ONNX export failed with every exporter:\n  " + "\n  ".join(errors))
        m = onnx.load(str(tmp))
        if [o.name for o in m.graph.output] != names:
            raise ConversionError(f"the exported graph's outputs are {[o.name for o in m.graph.output]}, expected {names}")
        simplified = False
        if simplify:
            with progress.phase("simplify (onnxsim)"):
                m, simplified = _simplify(m)
        pre_out = preprocess.replace(dtype="uint8") if fold_normalization else preprocess
        meta = {"preprocess": pre_out.to_dict(), "task": "instance-segmentation", "instances": layout.to_dict(), **(metadata or {})}
        _set_metadata(m, {META_KEY: json.dumps(meta)})
        onnx.checker.check_model(m)
        onnx.save(m, str(tmp))
    return {"exporter": used, "exporter_errors": errors, "opset": _opset(m), "simplified": simplified, "dynamic": False,
            "nodes": len(m.graph.node), "input": _io_desc(m.graph.input[0]), "outputs": [_io_desc(o) for o in m.graph.output],
            "ops": sorted({n.op_type for n in m.graph.node})}


# -- parity ----------------------------------------------------------------------------------------
def parity_scenes(pre: Preprocess, n: int = 6, seed: int = 0) -> list:
    """Held-out synthetic instance scenes at 1.5x the input size (resizing exercised)."""
    from edgeseg.data.synthetic import SyntheticInstances

    H, W = pre.size
    ds = SyntheticInstances(size=(int(H * 1.5), int(W * 1.5)), length=n, seed=seed, split="test")
    return [ds[i][0] for i in range(n)]


def _runner(model, layout: InstanceLayout):
    """frame batch -> outputs by name, for a torch module, an ONNX path or an engine."""
    if hasattr(model, "infer"):
        return model.infer
    if isinstance(model, (str, Path)):
        from runtime.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(model).infer
    torch = _torch()
    names = [layout.outputs[r] for r in OUTPUT_ROLES[layout.layout]]

    def run(x):
        with torch.no_grad():
            out = model(torch.from_numpy(x))
        return {n: v.numpy() for n, v in zip(names, out)}

    return run


def instance_parity(reference, ref_layout: InstanceLayout, test, test_layout: InstanceLayout, pre: Preprocess, labels,
                    frames: int | list = 6, test_pre: Preprocess | None = None) -> dict:
    """Detections of `test` against `reference` on the same frames, through the runtime's
    post-processing at frame size: matched one to one (same class, box IoU >= 0.5), mask IoU per
    match. `ok` when every object is found by both and each match has mask IoU >= 0.99."""
    from edgeseg.bundle import default_palette
    from runtime.instance_postprocess import InstancePostprocessor
    from runtime.instances import mask_iou, match

    imgs = parity_scenes(pre, frames) if isinstance(frames, int) else frames
    palette = default_palette(len(labels))
    test_pre = test_pre or pre
    # the reference's thresholds on both sides: a tail graph keeps what its baked thresholds keep
    conf = max(ref_layout.score_threshold, test_layout.score_threshold)
    post_ref = InstancePostprocessor(labels, palette, pre, ref_layout, conf=conf)
    post_test = InstancePostprocessor(labels, palette, test_pre, test_layout, conf=conf)
    run_ref, run_test = _runner(reference, ref_layout), _runner(test, test_layout)
    n_ref = n_test = matched = 0
    ious, box_err = [], 0.0
    for img in progress.iterate(imgs, "parity check", unit="frames"):
        a = post_ref(run_ref(pre.apply(img)), img.shape[:2])
        b = post_test(run_test(test_pre.apply(img)), img.shape[:2])
        pairs = match(a, b, iou=0.5)
        n_ref, n_test, matched = n_ref + len(a), n_test + len(b), matched + len(pairs)
        for i, j in pairs:
            ious.append(mask_iou(a, i, b, j))
            box_err = max(box_err, float(np.abs(a.xyxy[i] - b.xyxy[j]).max()))
    out = {"frames": len(imgs), "detections_reference": n_ref, "detections": n_test, "matched": matched,
           "min_mask_iou": float(min(ious)) if ious else float("nan"), "mean_mask_iou": float(np.mean(ious)) if ious else float("nan"),
           "max_box_error_px": box_err}
    out["ok"] = bool(matched == n_ref == n_test and (not ious or out["min_mask_iou"] >= MASK_IOU_MIN))
    return out


# -- bundle -----------------------------------------------------------------------------------------
def convert_instances(src, out, *, instance_tail: bool = False, fold_normalization: bool = False, opset: int = TAIL_OPSET,
                      simplify: bool = True, parity_frames: int = 6, max_detections: int | None = None,
                      dynamic: bool = False, argmax: bool = False, **_ignored):
    """An instance `SourceModel` (converters.onnx) -> bundle with model.onnx, checked for parity."""
    from edgeseg.bundle import Artifact, Bundle, Manifest, atomic_path, write_lock

    if dynamic:
        raise ConversionError("instance models export at a fixed input size (the anchor grid is a constant of it); "
                              "drop --dynamic and give --input-size H W")
    if argmax:
        raise ConversionError("--argmax makes a semantic class map; instance models return objects (drop --argmax)")
    if src.model is None:
        return _convert_instance_onnx(src, out, instance_tail=instance_tail, simplify=simplify, parity_frames=parity_frames,
                                      fold_normalization=fold_normalization)
    model = src.model
    layout = InstanceLayout.from_dict(model.instance_layout())
    if layout.num_classes != len(src.labels):
        raise ConversionError(f"the model has {layout.num_classes} classes but {len(src.labels)} labels were given")
    multiple = getattr(model, "input_multiple", 1)
    if any(s % multiple for s in src.preprocess.size):
        raise ConversionError(f"input size {list(src.preprocess.size)}: {src.name} needs multiples of {multiple} (--input-size H W)")
    pre = src.preprocess
    graph, graph_layout = model, layout
    if instance_tail:
        if layout.layout != "yolo":
            raise ConversionError(f"--instance-tail adds NMS and mask assembly to yolo-layout networks; this one's outputs are "
                                  f"the {layout.layout!r} layout, which has them already")
        torch = _torch()
        with torch.no_grad():
            anchors = int(model(torch.zeros(1, 3, *pre.size))[0].shape[-1])
        K = int(max_detections or layout.max_detections)
        if not 1 <= K <= 3000:
            raise ConversionError(f"--max-detections must be 1..3000 (TensorRT's TopK limit is below 3840), got {K}")
        # NMS cannot keep more rows than there are anchors: a small input has fewer than K
        graph, graph_layout = tail_module(model, layout, max_detections=min(K, anchors))
    from converters.onnx import bundle_out

    out = bundle_out(out)
    deployed_pre = pre.replace(dtype="uint8") if fold_normalization else pre
    with write_lock(out), atomic_path(out) as tmp:
        tmp.mkdir()
        onnx_path = tmp / "model.onnx"
        facts = export_instance_onnx(graph, onnx_path, preprocess=pre, layout=graph_layout, fold_normalization=fold_normalization,
                                     opset=opset, simplify=simplify, metadata={"labels": src.labels, "palette": src.palette})
        reference = _deployed(model, pre, fold_normalization)
        parity = instance_parity(reference, layout, onnx_path, graph_layout, deployed_pre, src.labels, parity_frames)
        if not parity["ok"]:
            log.warning("instance parity below the bar: %s", parity)
        first = facts["outputs"][0]
        manifest = Manifest(
            labels=src.labels, palette=src.palette, preprocess=deployed_pre, input_name=facts["input"]["name"],
            output_name=first["name"], output_kind="instances", task="instance-segmentation", instances=graph_layout.to_dict(),
            input_shape=facts["input"]["shape"], output_shape=first["shape"],
            model={"name": src.name, "source_sha256": src.sha256, **src.info, "export": facts, "instance_tail": bool(instance_tail)},
        )
        bundle = Bundle.create(tmp, manifest)
        bundle.add_artifact(Artifact("model.onnx", "onnxruntime", "fp32", parity=parity, info={"opset": facts["opset"]}))
        bundle.save()
    return Bundle.load(out)


def _convert_instance_onnx(src, out, *, instance_tail: bool, simplify: bool, parity_frames: int, fold_normalization: bool):
    """An instance ONNX file (an Ultralytics YOLO-seg export, or one edgeseg wrote) -> bundle."""
    from converters.onnx import _import_onnx
    from edgeseg.bundle import Artifact, Bundle, Manifest, atomic_path, write_lock

    if instance_tail:
        raise ConversionError("--instance-tail builds NMS and mask assembly from the PyTorch network; an ONNX file converts as "
                              "it is and the runtime does its post-processing (convert the edgeseg checkpoint for the in-graph tail)")
    if fold_normalization:
        raise ConversionError("--fold-normalization rewrites the PyTorch network's input; an ONNX file converts as it is")
    try:
        layout = InstanceLayout.from_dict(src.info.get("instances"), where=f"{src.onnx_path} instance layout")
    except Exception as e:
        raise ConversionError(str(e)) from None
    if layout.num_classes != len(src.labels):
        raise ConversionError(f"{src.onnx_path} has {layout.num_classes} classes but {len(src.labels)} labels were given")
    from converters.onnx import bundle_out

    out = bundle_out(out)
    pre = src.preprocess
    with write_lock(out), atomic_path(out) as tmp:
        tmp.mkdir()
        onnx_path = tmp / "model.onnx"
        meta = {"labels": src.labels, "palette": src.palette, "task": "instance-segmentation", "instances": layout.to_dict()}
        facts = _import_onnx(src.onnx_path, onnx_path, simplify, meta, pre)
        import onnx

        g = onnx.load(str(onnx_path), load_external_data=False).graph
        from converters.onnx import _io_desc

        outputs = [_io_desc(o) for o in g.output]
        missing = [n for n in layout.outputs.values() if n not in {o["name"] for o in outputs}]
        if missing:
            raise ConversionError(f"{src.onnx_path}: its layout names outputs {missing} that the graph does not have")
        parity = instance_parity(src.onnx_path, layout, onnx_path, layout, pre, src.labels, parity_frames)
        first = next(o for o in outputs if o["name"] == next(iter(layout.outputs.values())))
        manifest = Manifest(
            labels=src.labels, palette=src.palette, preprocess=pre, input_name=facts["input"]["name"], output_name=first["name"],
            output_kind="instances", task="instance-segmentation", instances=layout.to_dict(), input_shape=facts["input"]["shape"],
            output_shape=first["shape"], model={"name": src.name, "source_sha256": src.sha256,
                                                **{k: v for k, v in src.info.items() if k not in ("task", "instances")},
                                                "export": {**facts, "outputs": outputs}},
        )
        bundle = Bundle.create(tmp, manifest)
        bundle.add_artifact(Artifact("model.onnx", "onnxruntime", "fp32", parity=parity, info={"opset": facts["opset"]}))
        bundle.save()
    return Bundle.load(out)


__all__ = ["convert_instances", "export_instance_onnx", "instance_parity", "is_instance_model", "tail_module", "MASK_IOU_MIN"]
