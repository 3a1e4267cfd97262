"""The weights stored in a package, read back and compared with the torch weights they came from,
each within the error its storage allows (FP16 rounding, half a quantization step, the nearest
look-up table entry), with Core ML's batch-norm folding taken into account."""
from __future__ import annotations

import math

import numpy as np

from converters.coreml.schemes import WEIGHT_THRESHOLD, Scheme

_WEIGHT_CONSUMERS = {"conv": "weight", "conv_transpose": "weight", "linear": "weight"}


def stored_weights(func) -> list[dict]:
    """Every weight tensor feeding a conv / conv_transpose / linear, with how it is stored."""
    out = []
    for op in func.operations:
        slot = _WEIGHT_CONSUMERS.get(op.op_type)
        if slot is None or slot not in op.inputs:
            continue
        var = op.inputs[slot]
        src = var.op
        entry = {"consumer": op.name, "op_type": op.op_type, "name": var.name, "shape": tuple(var.shape)}
        if src is None:
            continue
        if src.op_type == "const":
            val = np.asarray(src.outputs[0].val)
            entry.update(storage=str(val.dtype).replace("float", "fp"), kind="float", value=val)
        elif src.op_type == "constexpr_affine_dequantize":
            q = np.asarray(src.inputs["quantized_data"].val)
            scale = np.asarray(src.inputs["scale"].val, np.float64)
            axis = int(src.inputs["axis"].val)
            shape = [1] * q.ndim
            if scale.ndim:
                shape[axis] = -1
            entry.update(storage=str(q.dtype), kind="affine", value=src.materialized_val_inference(),
                         step=np.broadcast_to(np.abs(scale).reshape(shape), q.shape))
        elif src.op_type == "constexpr_blockwise_shift_scale":
            data_var = src.inputs["data"]
            scale = np.asarray(src.inputs["scale"].val, np.float64)
            data = data_var.val if data_var.val is not None else data_var.op.materialized_val_inference()
            from coremltools.converters.mil.mil import types as mtypes

            bits = mtypes.builtin_to_string(data_var.dtype) if hasattr(data_var, "dtype") else str(np.asarray(data).dtype)
            step = scale
            for ax, (d, s) in enumerate(zip(np.shape(data), scale.shape)):
                if d // s > 1:
                    step = np.repeat(step, d // s, ax)
            entry.update(storage=bits, kind="affine", value=src.materialized_val_inference(), step=np.abs(step))
        elif src.op_type == "constexpr_lut_to_dense":
            lut = np.asarray(src.inputs["lut"].val)
            k = lut.shape[0] if lut.ndim == 1 else lut.shape[-2]
            entry.update(storage=f"lut{int(round(math.log2(k)))}", kind="lut", value=src.materialized_val_inference(), lut=lut)
        else:
            entry.update(storage=src.op_type, kind="other", value=None)
        out.append(entry)
    return out


def eligible(w: dict, scheme: Scheme) -> bool:
    """Whether coremltools compresses this weight under `scheme`: more than WEIGHT_THRESHOLD
    elements, and for block / channel-group schemes a channel count the block or group divides."""
    shape = w["shape"]
    if int(np.prod(shape)) <= WEIGHT_THRESHOLD:
        return False
    out_axis, in_axis = (1, 0) if w["op_type"] == "conv_transpose" else (0, 1)
    if scheme.block_size and len(shape) > in_axis and shape[in_axis] % scheme.block_size:
        return False
    if scheme.group_size and shape[out_axis] % scheme.group_size:
        return False
    return True


def _torch_weights(model) -> list[tuple[str, np.ndarray, int, np.ndarray | None]]:
    """(name, weight, output-channel axis, batch-norm factor or None) of every conv / linear.

    The factor gamma / sqrt(running_var + eps) is what Core ML multiplies a convolution's weights
    by when it folds the batch norm that follows it (found as the next sibling module)."""
    from torch import nn

    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    bns = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    factor: dict[int, np.ndarray] = {}
    for parent in model.modules():
        kids = list(parent.children())
        for a, b in zip(kids, kids[1:]):
            if isinstance(a, convs + transposed) and isinstance(b, bns) and b.track_running_stats:
                out_c = a.out_channels if hasattr(a, "out_channels") else a.out_features
                if b.num_features == out_c and b.running_var is not None:
                    f = 1.0 / np.sqrt(b.running_var.detach().cpu().double().numpy() + b.eps)
                    if b.weight is not None:
                        f = f * b.weight.detach().cpu().double().numpy()
                    factor[id(a)] = f
    refs, seen = [], set()
    for name, mod in model.named_modules():
        if isinstance(mod, convs + transposed):
            axis = 1 if isinstance(mod, transposed) else 0
            refs.append((f"{name}.weight", mod.weight.detach().cpu().double().numpy(), axis, factor.get(id(mod))))
            seen.add(id(mod.weight))
    # tensors used functionally (F.conv2d(x, self.kernel)): fixed filters kept as buffers, ...
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) not in seen and t.is_floating_point() and t.dim() >= 2:
            refs.append((name, t.detach().cpu().double().numpy(), 0, None))
    return refs


def _lut_violation(value: np.ndarray, ref: np.ndarray, lut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(excess, spacing): how much farther each stored value is from the reference than the
    nearest table entry (0 when the nearest entry was chosen), and the local table spacing."""
    lut = np.asarray(lut, np.float64)
    if lut.ndim == 1:
        groups = [(slice(None),) * value.ndim]
        tables = [lut]
    else:
        # iOS18 layout: lut[g0, g1, ..., K, cluster_dim]; the group grid tiles the weight
        grid = lut.shape[:-2]
        blocks = [d // g for d, g in zip(value.shape, grid)]
        groups, tables = [], []
        for gi in np.ndindex(*grid):
            groups.append(tuple(slice(i * b, (i + 1) * b) for i, b in zip(gi, blocks)))
            tables.append(lut[gi][:, 0])
    excess = np.zeros(value.shape, np.float64)
    spacing = np.ones(value.shape, np.float64)
    for sl, table in zip(groups, tables):
        t = np.unique(table)
        r = ref[sl]
        if len(t) == 1:
            continue
        i = np.clip(np.searchsorted(t, r), 1, len(t) - 1)
        lo, hi = t[i - 1], t[i]
        excess[sl] = np.abs(value[sl] - r) - np.minimum(np.abs(r - lo), np.abs(r - hi))
        spacing[sl] = hi - lo
    return excess, spacing


def fp16_error(value: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(error, allowed) of FP16-stored weights against float64 reference weights, judged by what
    casting the reference to FP16 itself does (numpy's IEEE cast: subnormals below 6.1e-5 keep
    only 2**-24 steps, values under 2**-25 become 0, beyond 65504 infinity).

    allowed = the cast's own error, at least half an FP16 step at that value (the other neighbour
    of a value close to half-way), plus FP32 rounding of the folding arithmetic before the cast
    (Core ML multiplies batch-norm factors in FP32). A stored value equal to the cast passes
    whatever its size, infinities included; anything farther off than a neighbour fails."""
    value, ref = np.asarray(value, np.float64), np.asarray(ref, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        cast16 = ref.astype(np.float16)
        cast = cast16.astype(np.float64)
        step = np.spacing(np.abs(cast16)).astype(np.float64)  # 2**-24 in the subnormal range
        err = np.where(value == cast, 0.0, np.abs(value - ref))
        allowed = np.maximum(np.abs(cast - ref), step / 2) + 4 * 2.0**-24 * np.abs(ref)
    allowed = np.where(np.isfinite(allowed) & (allowed > 0), allowed, 1e-300)  # past FP16's range only the cast itself passes
    err = np.where(np.isnan(err), np.inf, err)
    return err, allowed


def fp16_steps_from_cast(value: np.ndarray, ref: np.ndarray) -> float:
    """Largest distance, in FP16 steps, between stored values and numpy's FP16 cast of the
    reference (0: identical to plain casting; 1: a neighbour, from rounding the folding in FP32)."""
    with np.errstate(over="ignore", invalid="ignore"):
        cast16 = np.asarray(ref, np.float64).astype(np.float16)
        step = np.spacing(np.abs(cast16)).astype(np.float64)
        d = np.where(np.asarray(value, np.float64) == cast16, 0.0, np.abs(np.asarray(value, np.float64) - cast16) / step)
    d = d[np.isfinite(d)]
    return float(d.max()) if d.size else 0.0


def _compare(entry: dict, ref: np.ndarray, axis: int, bn: np.ndarray | None, steps: float = 0.5) -> dict:
    """Compare a stored weight with a torch weight: as is, with the following batch norm folded in
    (what Core ML does), or, for layers whose batch norm could not be paired, up to a fitted
    per-output-channel factor (allowed 1.5x the error, as the fit itself absorbs some noise).
    `steps`: allowed quantization error in steps (0.5 for one rounding; W8A8 weights are rounded
    twice, by the torch fake quantizer and onto the stored grid, so 1.0).
    Returns the error relative to the allowed one (<= 1 passes) and the relative RMS error."""
    value = np.asarray(entry["value"], np.float64)
    fp16 = 2.0**-10  # FP16 storage of the weight before compression (half an ulp is 2**-11)
    shape = [1] * ref.ndim
    shape[axis] = -1

    def score(r, slack=1.0):
        err = np.abs(value - r)
        extra = {}
        if entry["kind"] == "affine":
            # half a step, plus FP16 rounding of the weight, of the stored scale (times |q|) and
            # of the dequantized value: three half-ulps of |w|
            allowed = steps * entry["step"] * (1 + 2.0**-10) + 3 * 2.0**-11 * np.abs(r) + 1e-7
            ratio = float(np.max(err / allowed))
        elif entry["kind"] == "lut":
            # the nearest entry to the FP16-rounded weight: within 10% of the local spacing plus
            # the rounding of the nearest entry itself
            excess, spacing = _lut_violation(value, r, entry["lut"])
            allowed = 0.1 * spacing + 2 * fp16 * np.abs(r) + 1e-7
            ratio = max(float(np.max(excess / allowed)), 0.0) if excess.size else 0.0
        elif entry["storage"] == "fp16":
            err, allowed = fp16_error(value, r)
            ratio = float(np.max(err / allowed)) if err.size else 0.0
            extra["fp16_steps_from_cast"] = fp16_steps_from_cast(value, r)
        else:
            allowed = 2.0**-23 * np.abs(r) * 2 + 1e-6 * (np.abs(r).max() + 1e-12)
            ratio = float(np.max(err / allowed))
        rms = float(np.sqrt(np.mean((value - r) ** 2)) / max(np.sqrt(np.mean(r**2)), 1e-12))
        return {"ratio": ratio / slack, "rel_rms": rms, **extra}

    tried = [dict(score(ref), folded="none")]
    if bn is not None and bn.shape[0] == ref.shape[axis]:
        tried.append(dict(score(ref * bn.reshape(shape)), folded="batch norm"))
    if min(t["ratio"] for t in tried) > 1.0:
        moved = np.moveaxis(ref, axis, 0).reshape(ref.shape[axis], -1)
        vmoved = np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)
        denom = np.sum(moved * moved, axis=1)
        s = np.where(denom > 0, np.sum(moved * vmoved, axis=1) / np.maximum(denom, 1e-300), 1.0)
        tried.append(dict(score(ref * s.reshape(shape), slack=1.5), folded="fitted"))
    return min(tried, key=lambda t: t["ratio"])


def match_torch_weights(weights: list[dict], torch_model, scheme: Scheme | None) -> tuple[dict, list[str]]:
    """Pair every stored weight with the same-shaped torch weight it matches best; returns the
    summary for the validation report and one line per weight outside the scheme's error."""
    refs = _torch_weights(torch_model)
    by_shape: dict[tuple, list] = {}
    for name, arr, axis, bn in refs:
        by_shape.setdefault(tuple(arr.shape), []).append((name, arr, axis, bn))
    matched, unmatched, worst, max_rms, folded, steps16 = 0, [], 0.0, 0.0, 0, None
    failures = []
    for w in weights:
        if w.get("value") is None:
            continue
        cands = by_shape.get(tuple(w["shape"]), [])
        if not cands:
            unmatched.append(w["name"])
            continue
        steps = 1.0 if scheme is not None and scheme.kind == "w8a8" else 0.5
        best = min((dict(_compare(w, arr, axis, bn, steps), ref=name) for name, arr, axis, bn in cands),
                   key=lambda r: r["ratio"])
        if best["ratio"] <= 1.0:
            matched += 1
            folded += best["folded"] != "none"
            worst = max(worst, best["ratio"])
            max_rms = max(max_rms, best["rel_rms"])
            if "fp16_steps_from_cast" in best:
                steps16 = max(steps16 or 0.0, best["fp16_steps_from_cast"])
        else:
            failures.append(f"{w['name']} {w['shape']} ({w['storage']}): {best['ratio']:.2f}x the allowed error vs {best['ref']}")
    summary = {"compared": matched, "unmatched": len(unmatched), "bn_folded": folded,
               "worst_error_vs_allowed": round(worst, 3), "max_rel_rms": round(max_rms, 5)}
    if steps16 is not None:  # FP16 weights: how far from plain numpy casting of the same weights
        summary["max_fp16_steps_from_cast"] = round(steps16, 3)
    return summary, failures
