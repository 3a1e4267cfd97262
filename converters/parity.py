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


# -- dynamic shapes -------------------------------------------------------------------------
# A graph exported with symbolic sizes can still hold the export size as a constant (a pooling
# kernel or a reshape computed from `int(x.shape[2])` while tracing): it then fails, or is silently
# wrong, at any other size. So a dynamic export is run at several sizes against its reference.
STRIDE = 32  # sizes stay multiples of the coarsest stride of common backbones
ATOL, RTOL, MIN_AGREEMENT = 1e-3, 1e-3, 0.999


def dynamic_sizes(size: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(batch, H, W) to check: the export size, one smaller, one larger, a non-square one, batch 2."""
    H, W = (int(v) for v in size)
    r = lambda v: max(STRIDE, int(round(v / STRIDE)) * STRIDE)  # noqa: E731
    smaller = (r(H / 2), r(W / 2))
    if smaller == (H, W):  # already at the smallest multiple
        smaller = (max(1, H // 2), max(1, W // 2))
    larger = (r(H * 1.5), r(W * 1.5))
    wide = (H, r(W * 1.5)) if H == W else (W, H)
    if wide[0] == wide[1]:
        wide = (H, W + STRIDE)
    return [(1, H, W), (1, *smaller), (1, *larger), (1, *wide), (2, H, W)]


def check_sizes(reference, test, pre: Preprocess, output_kind: str = "logits", frames: int = 2,
                sizes: list[tuple[int, int, int]] | None = None) -> dict:
    """Run `test` (an ONNX path or engine) at each (batch, H, W) of `sizes` (default
    `dynamic_sizes(pre.size)`) against `reference` (a torch module, or None for an ONNX source: then
    each size must run and give an output whose batch matches).
    Returns {'ok', 'sizes': [{batch, size, ok, ...figures or error}]}."""
    test_run = _quiet_runner(test) if isinstance(test, (str, os.PathLike)) else _runner(test)
    ref_run = _runner(reference) if reference is not None else None
    rows = []
    for batch, h, w in (dynamic_sizes(pre.size) if sizes is None else sizes):
        at = pre.replace(size=(h, w))
        imgs = parity_frames(at, max(frames, batch), seed=1)
        x = np.concatenate([at.apply(f) for f in imgs[:batch]]) if batch > 1 else at.apply(imgs[0])
        row: dict = {"batch": batch, "size": [h, w]}
        try:
            y = np.asarray(test_run(x))
        except Exception as e:  # the engine's own message says what broke (a reshape, a concat ...)
            rows.append({**row, "ok": False, "error": f"{type(e).__name__}: {_summary(e)}"})
            continue
        if ref_run is None:
            ok = y.shape[0] == batch and (output_kind == "mask" or bool(np.all(np.isfinite(y))))
            rows.append({**row, "ok": ok, **({} if ok else {"error": f"output shape {list(y.shape)} for batch {batch}"})})
            continue
        try:
            r = np.asarray(ref_run(x))
        except Exception as e:
            rows.append({**row, "ok": False, "error": f"the reference fails at this size: {type(e).__name__}: {_summary(e)}"})
            continue
        if r.shape != y.shape:
            rows.append({**row, "ok": False, "error": f"output shape {list(y.shape)}, reference {list(r.shape)}"})
            continue
        stats = compare(r, y, output_kind)
        ok = stats["mask_agreement"] >= MIN_AGREEMENT
        if "max_abs" in stats:
            allowed = ATOL + RTOL * float(np.abs(r).max())
            ok = ok and stats["max_abs"] <= allowed
            stats["allowed_abs"] = allowed
        if not ok:
            stats["error"] = (f"disagrees with the reference: mask agreement {100 * stats['mask_agreement']:.2f}%"
                              + (f", max |Δ| {stats['max_abs']:.3g} > {stats['allowed_abs']:.3g}" if "max_abs" in stats else ""))
        rows.append({**row, "ok": ok, **stats})
    return {"ok": all(r["ok"] for r in rows), "sizes": rows}


def format_sizes(result: dict) -> str:
    """One line per size: what was run and how it came out."""
    lines = []
    for r in result["sizes"]:
        what = f"batch {r['batch']} at {r['size'][0]}x{r['size'][1]}"
        if r["ok"]:
            lines.append(f"{what}: ok" + (f" (max |Δ| {r['max_abs']:.2g})" if "max_abs" in r else ""))
        else:
            lines.append(f"{what}: {r['error']}")
    return "\n  ".join(lines)


def _quiet_runner(path):
    """ONNX Runtime on the CPU, its own error log off: a size that fails is reported in the result."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def _summary(e: BaseException) -> str:
    from converters.onnx import error_summary

    return error_summary(e, lines=2)
