"""Weight compression of a converted model (linear INT8/INT4, palettization) and the torch-side
activation calibration of W8A8.

Palettization builds its look-up tables with a weighted 1-D k-means (Lloyd's algorithm on the
unique FP16 weight values, quantile-initialised) through coremltools' `mode="custom"`, so
coremltools' scikit-learn dependency for `mode="kmeans"` is not needed; every weight maps to its
nearest table entry, which `validate_package` checks.

W8A8: coremltools' own activation quantization (`linear_quantize_activations`) runs the model
through Core ML to calibrate, which needs macOS. Here the activations are calibrated on the torch
side instead, with `coremltools.optimize.torch.quantization.LinearQuantizer` (observers only, no
training: batch norm frozen, fake quantization on, a few hundred frames at most), finalized into
quantize/dequantize pairs and converted with `torch.jit.trace` (quantized tensors cannot be
captured by `torch.export`). The package then has `quantize`/`dequantize` ops around each layer
and INT8 weights.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np

from converters.coreml.errors import CoreMLConversionError, DeploymentTargetError, first_line
from converters.coreml.schemes import WEIGHT_THRESHOLD, import_ct, quiet_logger, scheme_for
from edgeseg.errors import option
from edgeseg.spec import Preprocess

log = logging.getLogger("edgeseg.coreml")


def kmeans_lut(weight: np.ndarray, nbits: int, iterations: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Weighted 1-D k-means look-up table for one weight tensor: (lut (2**nbits,), indices uint8).

    Runs Lloyd's algorithm on the unique values (weighted by their counts), so an FP16 tensor of
    any size costs at most 65536 points per iteration. Indices point at the nearest entry of the
    stored (rounded) table.
    """
    k = 1 << nbits
    flat = np.asarray(weight).reshape(-1)
    values, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    v = values.astype(np.float64)
    w = counts.astype(np.float64)
    if len(v) <= k:
        centroids = np.concatenate([v, np.full(k - len(v), v[-1])])
    else:
        cdf = np.cumsum(w)
        q = (np.arange(k) + 0.5) / k * cdf[-1]
        centroids = v[np.minimum(np.searchsorted(cdf, q), len(v) - 1)]
        span = float(v[-1] - v[0]) or 1.0
        for _ in range(iterations):
            bounds = (centroids[1:] + centroids[:-1]) / 2
            assign = np.searchsorted(bounds, v)
            mass = np.bincount(assign, weights=w, minlength=k)
            sums = np.bincount(assign, weights=w * v, minlength=k)
            new = np.where(mass > 0, sums / np.maximum(mass, 1e-300), centroids)
            new.sort()
            moved = float(np.max(np.abs(new - centroids)))
            centroids = new
            if moved <= 1e-6 * span:
                break
    lut = centroids.astype(flat.dtype)
    lut64 = np.sort(lut.astype(np.float64))
    lut = lut64.astype(flat.dtype)
    bounds = (lut64[1:] + lut64[:-1]) / 2
    idx = np.searchsorted(bounds, v)
    # ties and rounding: pick the truly nearest of the two neighbours
    lo = np.clip(idx - 1, 0, k - 1)
    closer = np.abs(lut64[lo] - v) < np.abs(lut64[idx] - v)
    idx = np.where(closer, lo, idx)
    return lut, idx[inverse].astype(np.uint8)


def _lut_function(nbits: int):
    def fn(weight):
        return kmeans_lut(weight, nbits)

    return fn


def _apply_compression_pass(mlmodel, pass_name: str, config):
    """Run one coremltools compression pass on a converted model and serialise the result.

    The public `linear_quantize_weights` / `palettize_weights` re-run coremltools' whole default
    optimisation pipeline on the already optimised program after the pass (4-5x the time of the
    pass itself here); this runs the same registered pass and only the ML Program backend passes,
    which include the dead-code elimination that drops the replaced FP16 weights.
    """
    import coremltools as ct
    from coremltools.converters.mil.converter import mil_convert
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.models.utils import _apply_graph_pass

    graph_pass = PASS_REGISTRY[pass_name]
    graph_pass.set_options([PassOption("config", config), PassOption("joint_compression", False)])
    prog = _apply_graph_pass(mlmodel, graph_pass, return_pymil_prog=True)
    spec = mlmodel.get_spec()
    return mil_convert(
        prog, convert_to="mlprogram", convert_from="milinternal",
        specification_version=max(spec.specificationVersion, 7),  # compressed weights: iOS16 spec or newer
        compute_units=mlmodel.compute_unit, model_description=spec.description,
        skip_model_load=True, pass_pipeline=ct.PassPipeline.EMPTY,
    )


def compress(mlmodel, precision: str):
    """Apply the weight compression of `precision` to a converted FP16 MLModel."""
    scheme = scheme_for(precision)
    if scheme.kind in ("none", "w8a8"):
        return mlmodel
    import_ct()
    import coremltools.optimize.coreml as cto

    if scheme.kind == "linear":
        kw = dict(mode="linear_symmetric", dtype=f"int{scheme.nbits}", granularity=scheme.granularity,
                  weight_threshold=WEIGHT_THRESHOLD)
        if scheme.block_size:
            kw["block_size"] = scheme.block_size
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(**kw))
        public, pass_name = cto.linear_quantize_weights, "compression::linear_quantize_weights"
    else:
        kw = dict(mode="custom", lut_function=_lut_function(scheme.nbits), granularity=scheme.granularity,
                  weight_threshold=WEIGHT_THRESHOLD)
        if scheme.group_size:
            kw["group_size"] = scheme.group_size
        config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(**kw))
        public, pass_name = cto.palettize_weights, "compression::palettize_weights"
    try:
        # coremltools' compression passes warn on the root logger for each weight they skip
        # (too small, or not divisible into blocks); the validation report lists those weights
        with warnings.catch_warnings(), quiet_logger("", logging.ERROR):
            warnings.simplefilter("ignore")
            try:
                return _apply_compression_pass(mlmodel, pass_name, config)
            except (ImportError, AttributeError, KeyError, TypeError) as e:
                # coremltools moved an internal: take the public (slower) entry point
                log.debug("fast compression path unavailable (%s); using %s", e, public.__name__)
                return public(mlmodel, config=config)
    except ValueError as e:
        if "iOS1" in str(e):
            raise DeploymentTargetError(f"{precision}: {first_line(e)}") from None
        raise CoreMLConversionError(f"{precision} compression failed: {first_line(e)}") from None


# -- W8A8 ---------------------------------------------------------------------------------------
def _calibration_inputs(calibration, preprocess: Preprocess, limit: int) -> list[np.ndarray]:
    """Normalised (1, 3, H, W) float32 batches from frames, a folder of images, or 'synthetic'."""
    import cv2

    frames: Iterable
    if calibration is None:
        raise CoreMLConversionError(
            f"w8a8 needs calibration frames to measure activation ranges: pass {option('calibration', '--calib')} a folder of "
            "images, 'synthetic' (the synthetic scenes the default model was trained on) or, from Python, a list of BGR frames"
        )
    if isinstance(calibration, str) and calibration in ("synthetic", "synthetic://"):
        from edgeseg.data.synthetic import SyntheticScenes

        H, W = preprocess.size
        scenes = SyntheticScenes(size=(H, W), length=limit, seed=1, split="val")
        frames = (scenes[i][0] for i in range(len(scenes)))
    elif isinstance(calibration, (str, os.PathLike)):
        folder = Path(calibration)
        if not folder.is_dir():
            raise CoreMLConversionError(f"calibration folder not found: {folder}")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp"))
        if not files:
            raise CoreMLConversionError(f"no images (.jpg/.png/.bmp/.webp) in calibration folder {folder}")
        frames = (cv2.imread(str(p), cv2.IMREAD_COLOR) for p in files)
    else:
        frames = calibration
    pre = preprocess.replace(layout="nchw", dtype="float32")
    out = []
    for f in frames:
        if f is None:
            continue
        out.append(pre.apply(f))
        if len(out) >= limit:
            break
    if not out:
        raise CoreMLConversionError("the calibration source gave no frames")
    return out


def w8a8_model(model, preprocess: Preprocess, calibration, limit: int):
    """The torch model with calibrated INT8 fake quantization, finalized for conversion."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from coremltools.optimize.torch.quantization import LinearQuantizer, LinearQuantizerConfig

    batches = _calibration_inputs(calibration, preprocess, limit)
    # Observers and fake quantization on from the first step; no training happens, so no milestones.
    config = LinearQuantizerConfig.from_dict({"global_config": {"quantization_scheme": "symmetric"}})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantizer = LinearQuantizer(model, config)
            prepared = quantizer.prepare(example_inputs=(torch.from_numpy(batches[0]),), inplace=False)
            prepared.eval()  # batch norm uses its running statistics while observers record ranges
            with torch.no_grad():
                for b in batches:
                    prepared(torch.from_numpy(b))
            return quantizer.finalize(inplace=False).eval(), len(batches)
    except Exception as e:
        raise CoreMLConversionError(
            f"w8a8: torch-side quantization failed ({type(e).__name__}: {first_line(e)}); it needs a model that "
            "torch.fx can trace symbolically (no data-dependent Python control flow); int8-weights works for any model"
        ) from None
