"""What the engines that quantize their own format share (OpenVINO through NNCF, LiteRT through
the LiteRT quantizer): the calibration frames and the held-out yardstick come from `calibration`
(the same frames, the same `Preprocess`, the same mIoU as the ONNX INT8 graphs), and each artifact
is measured with the engine that will run it, then moved into the bundle in one step.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from edgeseg.errors import ConversionError, option

log = logging.getLogger("edgeseg.convert")


@dataclass
class Int8Inputs:
    """Calibration frames (`calib.inputs`: preprocessed batches) and, where there are held-out
    frames, the evaluator that scores candidates against the bundle's FP32 ONNX model."""

    calib: Any  # calibration.CalibrationSet
    evaluator: Any  # calibration.sensitivity.Evaluator | None
    budget: float  # mIoU points

    def measure(self, runner: Callable) -> dict | None:
        return None if self.evaluator is None else self.evaluator.measure(runner)

    def metrics(self, full: dict | None, final: dict | None, float_layers: list[str], target: str) -> dict:
        """The manifest figures, in the same fields as the ONNX INT8 artifacts'."""
        from calibration import artifact_metrics
        from calibration.sensitivity import MixedPrecisionResult

        result = None
        if self.evaluator is not None and final is not None:
            result = MixedPrecisionResult(
                target, self.evaluator.metric, self.budget, self.evaluator.reference, full or final, final,
                float_layers=[{"name": n} for n in float_layers],
                within_budget=final["miou_drop_points"] <= self.budget + 1e-9)
        return artifact_metrics(self.evaluator, result, self.calib, self.budget)


def int8_inputs(bundle, data, eval_data=None, *, max_miou_drop: float = 0.5, max_images: int = 300,
                eval_max_images: int = 200) -> Int8Inputs:
    from calibration import calibration_frames, check_budget
    from calibration.sensitivity import Evaluator

    if data is None:
        raise ConversionError(f"INT8 needs calibration frames: pass {option('calib')} with an image folder, a video or a dataset "
                              "(synthetic:train, voc:/path ...)")
    budget = check_budget(max_miou_drop)
    fp32 = bundle.select("onnxruntime", "fp32")
    bundle.verify_artifact(fp32)
    calib, evalset = calibration_frames(bundle, data, eval_data, max_images=max_images, eval_max_images=eval_max_images)
    man = bundle.manifest
    evaluator = None
    if evalset is not None:
        evaluator = Evaluator(evalset, man.preprocess, man.labels, man.output_kind, bundle.artifact_path(fp32),
                              sensitivity_frames=1)
    return Int8Inputs(calib, evaluator, budget)


@contextmanager
def staging(bundle) -> Iterator[Path]:
    """A scratch folder inside the bundle (same file system, so moving out of it is atomic; one a
    killed process leaves behind is removed by the next write)."""
    path = bundle.staging_dir("convert")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def install(bundle, staged: Path, artifact, sources: list) -> None:
    """Move a staged file or folder to `artifact.path` in the bundle atomically and record it with
    its checksum, under the bundle's write lock and into the manifest as it is now (what another
    writer added meanwhile stays); refused if an artifact it was made from (`sources`) was
    replaced in the meantime. The manifest is saved last: a failure before leaves the bundle as it was."""
    from edgeseg.bundle import Bundle, atomic_path

    with Bundle.writing(bundle.path) as current:
        for src in sources:
            if not any(a.path == src.path and a.sha256 == src.sha256 for a in current.manifest.artifacts):
                raise ConversionError(f"{bundle.path / src.path} was replaced while {artifact.path} was made from it "
                                      "(by another `edgeseg convert`?); run the conversion again")
        with atomic_path(current.path / artifact.path) as tmp:
            os.replace(staged, tmp)
        current.add_artifact(artifact)
        current.save()
    bundle.manifest = current.manifest


__all__ = ["Int8Inputs", "int8_inputs", "staging", "install"]
