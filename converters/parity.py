"""Parity: how far a converted model is from its reference, on real-looking frames.

Reports per-output error statistics (max / mean absolute error of logits) and what users see:
the share of pixels whose class agrees.
"""
from __future__ import annotations

import os

import numpy as np

from edgeseg import progress
from edgeseg.spec import Preprocess


def parity_frames(pre: Preprocess, n: int = 8, seed: int = 0) -> list[np.ndarray]:
    """Held-out synthetic scenes at 1.5x the input size (so resizing is exercised)."""
    from edgeseg.data.synthetic import SyntheticScenes

    H, W = pre.size
    scenes = SyntheticScenes(size=(int(H * 1.5), int(W * 1.5)), length=n, seed=seed, split="test")
    return [scenes[i][0] for i in range(n)]


def compare(reference: np.ndarray, test: np.ndarray, output_kind: str = "logits") -> dict:
    """Error statistics between two outputs of the same shape (N,C,H,W logits or N,H,W masks)."""
    reference, test = np.asarray(reference), np.asarray(test)
    if reference.shape != test.shape:
        raise ValueError(f"outputs differ in shape: reference {reference.shape}, test {test.shape}")
    if output_kind == "mask":
        return {"mask_agreement": float(np.mean(reference == test))}
    ref, out = reference.astype(np.float64), test.astype(np.float64)
    diff = np.abs(ref - out)
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "max_rel": float(diff.max() / max(np.abs(ref).max(), 1e-12)),
        "mask_agreement": float(np.mean(ref.argmax(1) == out.argmax(1))),
    }


def _runner(model):
    """A callable batch -> output for a torch module, an ONNX path or an engine."""
    if isinstance(model, (str, os.PathLike)):
        from runtime.engines.onnxruntime import OnnxRuntimeEngine

        eng = OnnxRuntimeEngine(model)
        return lambda x: next(iter(eng.infer(x).values()))
    if hasattr(model, "infer"):
        return lambda x: next(iter(model.infer(x).values()))
    import torch

    def run(x):
        with torch.no_grad():
            y = model(torch.from_numpy(x))
        return y.numpy()

    return run


def check_parity(reference, test, pre: Preprocess, frames: int | list[np.ndarray] = 8, output_kind: str = "logits") -> dict:
    """Run both models on the same preprocessed frames and aggregate `compare` over them."""
    imgs = parity_frames(pre, frames) if isinstance(frames, int) else frames
    ref_run, test_run = _runner(reference), _runner(test)
    stats = [compare(ref_run(pre.apply(f)), test_run(pre.apply(f)), output_kind)
             for f in progress.iterate(imgs, "parity check", unit="frames")]
    out = {"frames": len(imgs)}
    for key in stats[0]:
        vals = [s[key] for s in stats]
        out[key] = float(max(vals)) if key.startswith("max") else float(np.mean(vals))
    if "mask_agreement" in out:
        out["min_mask_agreement"] = float(min(s["mask_agreement"] for s in stats))
    return out
