"""Accuracy of instance bundles: COCO box and mask AP (AP, AP50, AP75, pycocotools) of every
artifact this machine runs, each with its own engine, through the runtime's post-processing at
each image's own size - the figures an application of the bundle gets.

    result = evaluate_instance_bundle("bundle/", "synthetic:test?n=200&size=360x640")
    print(format_instance_table(result))
"""
from __future__ import annotations

import time

import numpy as np

from edgeseg.errors import EdgesegError


def _engine(bundle, art):
    """(engine, why not) for one artifact: ONNX graphs by path (a bundle may hold several)."""
    from runtime.engines.registry import get_backend

    if art.backend == "onnxruntime":
        from runtime.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(bundle.artifact_path(art)), ""
    backend = get_backend(art.backend)
    ok, why = backend.available()
    if not ok:
        return None, why
    try:
        return backend.engine_class().from_bundle(bundle, precision=art.precision), ""
    except EdgesegError as e:
        return None, str(e)


def _images(data, max_images: int | None, split: str | None):
    from edgeseg.data.registry import open_instances

    reader = open_instances(data, split=split or "test") if isinstance(data, str) else data
    n = len(reader)
    if not n:
        raise EdgesegError(f"{data}: no images to evaluate on")
    idx = np.arange(n) if not max_images or max_images >= n else np.unique(np.linspace(0, n - 1, max_images).round().astype(int))
    return reader, idx


def score_engine(infer, manifest, reader, idx, desc: str = "") -> dict:
    """{"box": {AP, AP50, AP75}, "mask": {...}, ...} of one engine's `infer` on reader[idx]."""
    from edgeseg import progress
    from edgeseg.instance_metrics import InstanceEvaluator
    from runtime.instance_postprocess import InstancePostprocessor

    post = InstancePostprocessor.from_manifest(manifest)
    ev = InstanceEvaluator(manifest.labels)
    for i in progress.iterate(idx.tolist(), desc or "evaluate", unit="images"):
        img, truth = reader[i]
        ev.add(post(infer(manifest.preprocess.apply(img)), img.shape[:2]), truth)
    return ev.summary()


def evaluate_instance_bundle(bundle, data, *, max_images: int | None = 200, split: str | None = None) -> dict:
    from edgeseg.bundle import Bundle

    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    m = bundle.manifest
    if m.task != "instance-segmentation":
        raise EdgesegError(f"{bundle.path} is a {m.task} bundle; box and mask AP are for instance-segmentation bundles")
    reader, idx = _images(data, max_images, split)
    if list(reader.labels) != list(m.labels):
        raise EdgesegError(f"the data's classes {list(reader.labels)[:6]} are not the bundle's {m.labels[:6]}; "
                           "evaluate on data labelled with the model's classes")
    rows, skipped = [], []
    for art in m.artifacts:
        bundle.verify_artifact(art)
        engine, why = _engine(bundle, art)
        if engine is None:
            skipped.append({"path": art.path, "backend": art.backend, "precision": art.precision, "reason": why})
            continue
        t0 = time.perf_counter()
        s = score_engine(engine.infer, m, reader, idx, desc=art.path)
        rows.append({"path": art.path, "backend": art.backend, "precision": art.precision, "target": art.target,
                     "box": s["box"], "mask": s["mask"], "per_class": s["per_class"], "objects": s["objects"],
                     "detections": s["detections"], "seconds": round(time.perf_counter() - t0, 2)})
    return {"model": str(bundle.path), "data": str(data), "images": int(len(idx)), "labels": m.labels, "results": rows,
            "skipped": skipped, "task": "instance-segmentation"}


def format_instance_table(result: dict) -> str:
    lines = [f"{result['model']} on {result['data']} ({result['images']} images, pycocotools COCO AP)",
             f"{'artifact':<28} {'backend':<12} {'precision':<10} {'box AP':>7} {'AP50':>6} {'AP75':>6} "
             f"{'mask AP':>8} {'AP50':>6} {'AP75':>6}"]
    for r in result["results"]:
        b, k = r["box"], r["mask"]
        lines.append(f"{r['path']:<28} {r['backend']:<12} {r['precision']:<10} {b['AP']:>7.4f} {b['AP50']:>6.4f} {b['AP75']:>6.4f} "
                     f"{k['AP']:>8.4f} {k['AP50']:>6.4f} {k['AP75']:>6.4f}")
    for s in result["skipped"]:
        lines.append(f"{s['path']:<28} {s['backend']:<12} {s['precision']:<10} not run here: {s['reason']}")
    return "\n".join(lines)


__all__ = ["evaluate_instance_bundle", "format_instance_table", "score_engine"]
