"""Accuracy on held-out labelled data: mIoU, per-class IoU, pixel accuracy, and agreement with FP32.

    from calibration.evaluate import evaluate_bundle
    result = evaluate_bundle("bundle/", "synthetic:test?n=200")   # every artifact this machine runs
    print(format_table(result))

Frames go through the bundle's `Preprocess.apply`; class maps are mapped back to the frame size
(letterbox removed, nearest neighbour) and scored there against the dataset's masks with
`edgeseg.metrics.ConfusionMatrix`, as the benchmarks do. `EvalSet` keeps the preprocessed frames
in memory so several models (FP32, each INT8 candidate) are scored on identical inputs.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from calibration.data import CalibrationError, CalibrationWarning, FrameSource, frame_hash, open_source, sample_indices
from edgeseg import progress
from edgeseg.metrics import ConfusionMatrix
from edgeseg.spec import Preprocess, unletterbox

log = logging.getLogger("edgeseg.calibration")

DEFAULT_EVAL_IMAGES = 200
MAX_OVERLAP = 0.1  # above this share of evaluation frames seen in calibration, the data is not held out


@dataclass
class EvalSet:
    """Preprocessed evaluation frames (+ masks at frame size when labelled)."""

    inputs: list[np.ndarray]
    masks: list[np.ndarray] | None
    frame_shapes: list[tuple[int, int]]
    names: list[str]
    description: str
    source_key: str = ""
    dropped_overlap: int = 0
    ignore_index: int | None = 255
    dataset_labels: list[str] | None = None
    split: str = ""  # which frames these are relative to calibration, in words (for the report)

    @property
    def labelled(self) -> bool:
        return self.masks is not None

    def __len__(self) -> int:
        return len(self.inputs)

    def subset(self, k: int) -> "EvalSet":
        """The first-k-spread subset (same sampling rule as calibration), for quick comparisons."""
        idx = sample_indices(len(self), k)
        return EvalSet([self.inputs[i] for i in idx], [self.masks[i] for i in idx] if self.masks is not None else None,
                       [self.frame_shapes[i] for i in idx], [self.names[i] for i in idx], f"{len(idx)} of {self.description}",
                       self.source_key, 0, self.ignore_index, self.dataset_labels)


def default_eval_split(data: Any) -> str:
    """The split evaluation reads when a spec names none: the generator's `test` scenes, else `val`
    (VOC, Cityscapes and COCO publish no test masks)."""
    return "test" if isinstance(data, str) and data.strip().lower().startswith("synthetic") else "val"


def load_eval_set(data: Any, preprocess: Preprocess, *, max_images: int | None = DEFAULT_EVAL_IMAGES, split: str | None = None,
                  exclude_hashes: set[str] | None = None, indices: Sequence[int] | None = None,
                  require_labels: bool = False) -> EvalSet:
    """Read up to `max_images` frames (spread over the source) for evaluation.

    exclude_hashes: content hashes of calibration frames. Evaluation frames identical to one of them
    are dropped with a warning; when more than 10% are, the data is not held out and this raises.
    indices: read exactly these source indices (e.g. the frames calibration did not use).
    """
    if isinstance(data, FrameSource):
        src = data
    else:
        src = open_source(data, split=split or default_eval_split(data), preprocess=preprocess,
                          default_n=max_images or DEFAULT_EVAL_IMAGES)
    if require_labels and not src.labelled:
        raise CalibrationError(
            f"{src.description} has no masks; accuracy needs labelled data: a dataset spec (synthetic:test, voc:/path ...) "
            "or a folder with images/ and masks/"
        )
    if indices is None:
        indices = sample_indices(len(src), max_images if max_images else len(src))
    elif max_images:
        indices = [indices[i] for i in sample_indices(len(indices), max_images)]
    inputs, masks, shapes, names, dropped = [], [], [], [], []
    for frame in progress.iterate(src.read(indices), "reading evaluation frames", total=len(indices), unit="frames"):
        if exclude_hashes and frame_hash(frame.image) in exclude_hashes:
            dropped.append(frame.name)
            continue
        inputs.append(preprocess.apply(frame.image))
        shapes.append(tuple(frame.image.shape[:2]))
        names.append(frame.name)
        if src.labelled:
            m = np.asarray(frame.mask)
            if m.shape[:2] != frame.image.shape[:2]:
                raise CalibrationError(f"{frame.name}: mask {m.shape[:2]} and image {frame.image.shape[:2]} differ in size")
            masks.append(m)
    total = len(inputs) + len(dropped)
    if dropped:
        if len(dropped) > MAX_OVERLAP * total:
            raise CalibrationError(
                f"{len(dropped)} of {total} evaluation frames are also calibration frames (e.g. {dropped[0]}); "
                "accuracy must be measured on held-out data: evaluate on another split (e.g. synthetic:test, the val split) "
                "or other footage"
            )
        warnings.warn(f"{len(dropped)} evaluation frame(s) also occur in the calibration frames (e.g. {dropped[0]}); "
                      "they were left out of the evaluation", CalibrationWarning, stacklevel=2)
    if not inputs:
        raise CalibrationError(f"no evaluation frames could be read from {src.description}")
    return EvalSet(inputs, masks if src.labelled else None, shapes, names, src.description, src.key, len(dropped),
                   src.ignore_index, src.labels)


# -- running models ------------------------------------------------------------------------
Runner = Callable[[np.ndarray], np.ndarray]


def onnx_runner(path: str | os.PathLike, threads: int | None = None) -> Runner:
    """The deployment engine (ONNX Runtime, CPU) as batch -> first output."""
    from runtime.engines.onnxruntime import OnnxRuntimeEngine

    return engine_runner(OnnxRuntimeEngine(path, threads=threads))


def engine_runner(engine) -> Runner:
    """Any engine (runtime.engines) as batch -> its first output."""
    return lambda x: next(iter(engine.infer(x).values()))


def artifact_runner(bundle, art, threads: int | None = None) -> tuple[Runner | None, str]:
    """The engine of `art`'s backend (runtime.engines.registry) as a runner, or (None, why) where
    this machine cannot run it (CoreML off macOS, TensorRT without a GPU, a missing extra)."""
    from edgeseg.errors import EdgesegError
    from runtime.engines.registry import get_backend

    if art.backend == "onnxruntime":  # by path: a bundle holds several ONNX INT8 graphs (one per target)
        return onnx_runner(bundle.artifact_path(art), threads), ""
    backend = get_backend(art.backend)
    ok, why = backend.available()
    if not ok:
        return None, why
    try:
        engine = backend.engine_class().from_bundle(bundle, precision=art.precision, **({"threads": threads} if threads else {}))
    except EdgesegError as e:
        return None, str(e)
    return engine_runner(engine), ""


def torch_runner(model) -> Runner:
    import torch

    model = model.eval()

    def run(x):
        with torch.no_grad():
            y = model(torch.from_numpy(x))
        if isinstance(y, dict):
            y = y["out"] if "out" in y else next(iter(y.values()))
        elif isinstance(y, (tuple, list)):
            y = y[0]
        return y.float().numpy()

    return run


def class_map(output: np.ndarray, output_kind: str = "logits") -> np.ndarray:
    """One network output (batch of one) -> HxW uint8 class map at the input resolution."""
    out = np.asarray(output)
    if output_kind == "mask":
        return out.reshape(out.shape[-2:]).astype(np.uint8)
    if out.ndim == 4:
        out = out[0]
    if out.ndim == 3 and out.shape[0] == 1:  # one-channel: foreground score
        return (out[0] > (0.5 if output_kind == "probs" else 0.0)).astype(np.uint8)
    return out.argmax(0).astype(np.uint8)


def predict(runner: Runner, evalset: EvalSet, preprocess: Preprocess, output_kind: str = "logits",
            keep_outputs: bool = False, desc: str = "inference"):
    """Class maps at frame size for every frame (and the raw outputs when keep_outputs)."""
    maps, outputs = [], []
    for x, hw in progress.iterate(list(zip(evalset.inputs, evalset.frame_shapes)), desc, unit="frames"):
        y = runner(x)
        if keep_outputs:
            outputs.append(np.asarray(y, np.float32))
        maps.append(unletterbox(class_map(y, output_kind), preprocess, hw))
    return (maps, outputs) if keep_outputs else maps


def score(maps: Sequence[np.ndarray], evalset: EvalSet, labels: list[str]) -> dict:
    """mIoU, per-class IoU, pixel accuracy against the evaluation masks."""
    if not evalset.labelled:
        raise CalibrationError(f"{evalset.description} has no masks: accuracy cannot be measured")
    cm = ConfusionMatrix(len(labels), evalset.ignore_index)
    for pred, mask, name in zip(maps, evalset.masks, evalset.names):
        try:
            cm.update(pred, mask)
        except ValueError as e:
            raise CalibrationError(
                f"{name}: {e}; the dataset's classes do not match the model's {len(labels)} labels ({', '.join(labels[:6])} ...)"
            ) from None
    return cm.summary(labels)


def agreement(maps: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Share of all pixels whose class matches the reference maps."""
    same = sum(int(np.count_nonzero(a == b)) for a, b in zip(maps, reference))
    total = sum(a.size for a in maps)
    return same / total if total else float("nan")


def pseudo_score(maps: Sequence[np.ndarray], reference: Sequence[np.ndarray], labels: list[str]) -> dict:
    """Scores against the reference model's class maps (what stands in for labels when there are none)."""
    cm = ConfusionMatrix(len(labels), None)
    for pred, ref in zip(maps, reference):
        cm.update(pred, ref)
    return cm.summary(labels)


def noise_ratio(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Output error energy relative to the reference output's energy (1 / SQNR)."""
    err = sum(float(np.sum((a.astype(np.float64) - b) ** 2)) for a, b in zip(outputs, reference))
    sig = sum(float(np.sum(b.astype(np.float64) ** 2)) for b in reference)
    return err / sig if sig > 0 else float("inf") if err > 0 else 0.0


# -- whole bundles and checkpoints ---------------------------------------------------------------
def evaluate_bundle(bundle, data: Any, *, max_images: int | None = DEFAULT_EVAL_IMAGES, split: str | None = None,
                    threads: int | None = None) -> dict:
    """Accuracy of every artifact of `bundle` this machine can run (each with its own engine),
    plus agreement with the FP32 ONNX model's class maps."""
    from edgeseg.bundle import Bundle

    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    man = bundle.manifest
    evalset = load_eval_set(data, man.preprocess, max_images=max_images, split=split, require_labels=True)
    _check_labels(evalset, man.labels)
    fp32 = bundle.find("onnxruntime", "fp32")
    order = fp32 + [a for a in man.artifacts if a not in fp32]
    rows, skipped, reference = [], [], None
    for art in order:
        bundle.verify_artifact(art)
        runner, why_not = artifact_runner(bundle, art, threads)
        if runner is None:
            skipped.append({"path": art.path, "backend": art.backend, "precision": art.precision, "reason": why_not})
            continue
        t0 = time.perf_counter()
        try:
            maps = predict(runner, evalset, man.preprocess, man.output_kind, desc=art.path)
        except Exception as e:  # e.g. an fp16 graph with ops ONNX Runtime's CPU provider lacks
            if art.precision == "fp32" and art.backend == "onnxruntime":
                raise
            skipped.append({"path": art.path, "backend": art.backend, "precision": art.precision,
                            "reason": f"{art.backend} cannot run it here: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"})
            continue
        row = {"path": art.path, "backend": art.backend, "precision": art.precision, "target": art.target,
               **score(maps, evalset, man.labels), "seconds": round(time.perf_counter() - t0, 2)}
        if reference is None and art.precision == "fp32":
            reference = (art.path, maps, row["miou"])
        if reference is not None:
            row["agreement_with_fp32"] = agreement(maps, reference[1])
            row["miou_drop_points"] = 100.0 * (reference[2] - row["miou"])
        rows.append(row)
    return {"model": str(bundle.path), "data": evalset.description, "frames": len(evalset), "labels": man.labels,
            "reference": reference[0] if reference else None, "results": rows, "skipped": skipped}


def evaluate_checkpoint(path: str | os.PathLike, data: Any, *, max_images: int | None = DEFAULT_EVAL_IMAGES,
                        split: str | None = None) -> dict:
    """Accuracy of a zoo checkpoint (torch) with the checkpoint's own preprocessing."""
    from edgeseg.models import load_checkpoint

    model, ckpt = load_checkpoint(path)
    pre = Preprocess.from_dict(ckpt["preprocess"]) if ckpt.get("preprocess") else Preprocess()
    labels = list(ckpt.get("labels") or [])
    evalset = load_eval_set(data, pre, max_images=max_images, split=split, require_labels=True)
    if not labels:
        labels = list(evalset.dataset_labels or [])
    if not labels:
        raise CalibrationError(f"{path} names no labels and the dataset neither; save the checkpoint with labels=[...]")
    _check_labels(evalset, labels)
    t0 = time.perf_counter()
    maps = predict(torch_runner(model), evalset, pre, "logits", desc=f"{path} (torch)")
    row = {"path": str(path), "backend": "torch", "precision": "fp32", "target": None, **score(maps, evalset, labels),
           "seconds": round(time.perf_counter() - t0, 2)}
    return {"model": str(path), "data": evalset.description, "frames": len(evalset), "labels": labels,
            "reference": None, "results": [row], "skipped": []}


def _check_labels(evalset: EvalSet, labels: list[str]) -> None:
    ds = evalset.dataset_labels
    if ds and list(ds) != list(labels) and len(ds) == len(labels):
        warnings.warn(f"dataset labels {ds} differ in name from the model's {labels}; scoring by class index",
                      CalibrationWarning, stacklevel=3)
    elif ds and len(ds) != len(labels):
        raise CalibrationError(f"{evalset.description} has {len(ds)} classes ({', '.join(ds[:6])} ...) but the model has "
                               f"{len(labels)} ({', '.join(labels[:6])} ...); evaluate on data labelled with the model's classes")


def _column(r: dict) -> str:
    """fp32, int8/cpu, openvino int8 ...: what tells the artifacts apart in a column header."""
    name = r["precision"] + ("/" + r["target"] if r.get("target") else "")
    return name if r["backend"] == "onnxruntime" else f"{r['backend'][:8]} {name}"


def format_table(result: dict) -> str:
    """The per-artifact figures as a text table, then per-class IoU."""
    lines = [f"{result['model']} on {result['data']} ({result['frames']} frames)"]
    head = f"{'artifact':<34} {'precision':<9} {'target':<9} {'mIoU':>7} {'pixel acc':>9} {'Δ mIoU pts':>10} {'agree fp32':>10}"
    lines += [head, "-" * len(head)]
    for r in result["results"]:
        drop = r.get("miou_drop_points")
        agree = r.get("agreement_with_fp32")
        lines.append(f"{r['path'][-34:]:<34} {r['precision']:<9} {str(r.get('target') or '-'):<9} {r['miou']:>7.4f} "
                     f"{r['pixel_accuracy']:>9.4f} {'-' if drop is None else f'{0.0 - drop + 0.0:+.2f}':>10} "
                     f"{'-' if agree is None else f'{agree:.4f}':>10}")
    for s in result.get("skipped", []):
        lines.append(f"{s['path'][-34:]:<34} {s['precision']:<9} skipped: {s['reason']}")
    if result["results"]:
        labels = list(result["results"][0]["per_class_iou"])
        lines += ["", "per-class IoU", f"{'class':<16}" + "".join(f"{_column(r):>16}" for r in result["results"])]
        for lab in labels:
            vals = [r["per_class_iou"].get(lab) for r in result["results"]]
            lines.append(f"{lab[:16]:<16}" + "".join(f"{'n/a' if v is None else f'{v:.4f}':>16}" for v in vals))
    return "\n".join(lines)


__all__ = ["EvalSet", "load_eval_set", "onnx_runner", "engine_runner", "artifact_runner", "torch_runner", "class_map", "predict", "score", "agreement",
           "pseudo_score", "noise_ratio", "default_eval_split", "evaluate_bundle", "evaluate_checkpoint", "format_table"]
