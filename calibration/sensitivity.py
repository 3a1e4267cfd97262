"""Which layers INT8 hurts, and the fewest to keep in float so INT8 stays within an accuracy budget.

1. Sensitivity: each quantized node is quantized *alone* (everything else float) and its effect is
   measured against FP32 on a subset of the evaluation frames: the share of pixels whose class
   changes, the output noise ratio (error energy / signal energy, 1/SQNR) and, with labels, the
   mIoU change. One layer alone moves mIoU by less than a few hundred frames can resolve, so layers
   are ranked by changed pixels, then noise ratio; the mIoU change is reported beside them.
   To keep this affordable on big graphs it runs coarse to fine: consecutive groups of about
   sqrt(N) layers are quantized together first, and the layers of the groups that matter (the top
   three, and any that changes at least half as many pixels as the worst) are then measured alone.
   Layers of the other groups carry their group's figures (marked `measured="group of k"`), an
   estimate from above.
2. Search: layers are kept in float in order of sensitivity — the shortest prefix that meets the
   budget, found by doubling then bisection — and then every kept layer, least sensitive first, is
   given back to INT8 when the budget still holds without it. Every candidate is the real artifact
   (ONNX Runtime's `quantize_static` with `nodes_to_exclude`) scored on the whole evaluation set.

The budget is on mIoU against labels (points = percent). Without labels the FP32 class maps stand in
for labels, which is stricter: every pixel INT8 changes counts as an error.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from calibration.evaluate import EvalSet, agreement, noise_ratio, onnx_runner, predict, pseudo_score, score
from edgeseg.progress import bar as progress_bar
from edgeseg.spec import Preprocess

log = logging.getLogger("edgeseg.calibration")

QuantizeFn = Callable[..., Path]  # (out_path, nodes_to_exclude=..., nodes_to_quantize=...) -> path


@dataclass
class LayerSensitivity:
    name: str
    op_type: str
    changed_pixels: float  # share of pixels whose class differs from FP32 with only this layer quantized
    noise_ratio: float  # output error energy / FP32 output energy
    miou_drop_points: float | None  # with labels, on the sensitivity frames
    measured: str = "alone"  # or "group of k": the figures of the group it was quantized with

    @property
    def key(self) -> tuple[float, float]:
        return (self.changed_pixels, self.noise_ratio)


@dataclass
class Trial:
    float_layers: list[str]
    miou: float
    drop_points: float
    within_budget: bool
    purpose: str


@dataclass
class MixedPrecisionResult:
    target: str
    metric: str  # "miou" (labels) or "miou_vs_fp32" (FP32 masks as labels)
    budget_points: float
    reference: dict  # FP32 scores
    full_int8: dict  # every layer INT8
    final: dict  # with float_layers kept in float
    float_layers: list[dict] = field(default_factory=list)  # name, op_type, reason, sensitivity figures
    sensitivity: list[LayerSensitivity] = field(default_factory=list)
    trials: list[Trial] = field(default_factory=list)
    within_budget: bool = True
    seconds: float = 0.0

    @property
    def float_layer_names(self) -> list[str]:
        return [f["name"] for f in self.float_layers]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sensitivity"] = [asdict(s) for s in self.sensitivity]
        return d


class Evaluator:
    """Scores candidate models on one evaluation set against the FP32 model's results (computed once)."""

    def __init__(self, evalset: EvalSet, preprocess: Preprocess, labels: list[str], output_kind: str,
                 fp32_path: str | Path, sensitivity_frames: int = 16):
        self.evalset, self.pre, self.labels, self.output_kind = evalset, preprocess, labels, output_kind
        self.metric = "miou" if evalset.labelled else "miou_vs_fp32"
        self.fp32_maps = predict(onnx_runner(fp32_path), evalset, preprocess, output_kind)
        if evalset.labelled:
            self.reference = score(self.fp32_maps, evalset, labels)
        else:
            self.reference = pseudo_score(self.fp32_maps, self.fp32_maps, labels)
        self.sens_set = evalset.subset(min(sensitivity_frames, len(evalset)))
        self.sens_maps, self.sens_outputs = predict(onnx_runner(fp32_path), self.sens_set, preprocess, output_kind,
                                                    keep_outputs=True)

    def measure(self, model: str | Path | Callable) -> dict:
        """Scores of a candidate (an ONNX file, or any batch -> output runner: another engine's
        artifact) on the whole evaluation set, with its mIoU drop against FP32 in points."""
        maps = predict(model if callable(model) else onnx_runner(model), self.evalset, self.pre, self.output_kind)
        s = score(maps, self.evalset, self.labels) if self.evalset.labelled else pseudo_score(maps, self.fp32_maps, self.labels)
        s["agreement_with_fp32"] = agreement(maps, self.fp32_maps)
        s["miou_drop_points"] = 100.0 * (self.reference["miou"] - s["miou"])
        return s

    def quick(self, model_path: str | Path) -> dict:
        """Effect of a candidate on the sensitivity frames: changed pixels, noise ratio, mIoU change."""
        maps, outs = predict(onnx_runner(model_path), self.sens_set, self.pre, self.output_kind, keep_outputs=True)
        out = {"changed_pixels": 1.0 - agreement(maps, self.sens_maps), "noise_ratio": noise_ratio(outs, self.sens_outputs),
               "miou_drop_points": None}
        if self.sens_set.labelled:
            ref = score(self.sens_maps, self.sens_set, self.labels)["miou"]
            out["miou_drop_points"] = 100.0 * (ref - score(maps, self.sens_set, self.labels)["miou"])
        return out


def layer_sensitivity(evaluator: Evaluator, quantize: QuantizeFn, layers: Sequence[str], op_types: dict[str, str],
                      workdir: Path, progress: Callable[[str], None] | None = None, group_size: int | None = None,
                      refine_groups: int = 3, refine_ratio: float = 0.5) -> list[LayerSensitivity]:
    """Each layer's effect when quantized alone, coarse to fine (see the module doc). Most sensitive first."""
    path = workdir / "sensitivity.onnx"
    done = [0]
    total = len(layers)

    def measure(names: list[str]) -> dict:
        quantize(path, nodes_to_quantize=names)
        q = evaluator.quick(path)
        done[0] += 1
        bar.update()
        if progress and done[0] % 10 == 0:
            progress(f"sensitivity: {done[0]} measurements ({total} layers)")
        return q

    def entry(name, q, measured="alone"):
        return LayerSensitivity(name, op_types.get(name, "?"), q["changed_pixels"], q["noise_ratio"], q["miou_drop_points"], measured)

    k = group_size or max(1, round(math.sqrt(total)))
    grouped = not (k <= 1 or total <= 2 * k)
    groups = [list(layers[i:i + k]) for i in range(0, total, k)] if grouped else []
    bar = progress_bar("layer sensitivity", total=len(groups) if grouped else total, unit="trials")
    if not grouped:
        out = [entry(name, measure([name])) for name in layers]
    else:
        effects = [measure(g) for g in groups]
        key = lambda q: (q["changed_pixels"], q["noise_ratio"])  # noqa: E731
        ranked = sorted(range(len(groups)), key=lambda i: key(effects[i]), reverse=True)
        worst = effects[ranked[0]]
        refine = set(ranked[:refine_groups]) | {
            i for i in ranked if effects[i]["changed_pixels"] >= refine_ratio * worst["changed_pixels"] > 0}
        bar.total = len(groups) + sum(len(groups[i]) for i in refine)
        out = []
        for i, g in enumerate(groups):
            if i in refine:
                out += [entry(name, measure([name])) for name in g]
            else:
                out += [entry(name, effects[i], f"group of {len(g)}") for name in g]
    bar.close()
    path.unlink(missing_ok=True)
    return sorted(out, key=lambda s: s.key, reverse=True)


def search_mixed_precision(evaluator: Evaluator, quantize: QuantizeFn, sensitivity: list[LayerSensitivity],
                           full_int8: dict, budget_points: float, workdir: Path, target: str,
                           max_prune_trials: int = 32, progress: Callable[[str], None] | None = None) -> MixedPrecisionResult:
    """Fewest layers in float (greedy by sensitivity, then pruned) that bring the drop within budget."""
    t0 = time.perf_counter()
    result = MixedPrecisionResult(target, evaluator.metric, budget_points, evaluator.reference, full_int8, full_int8,
                                  sensitivity=sensitivity)
    ok = lambda s: s["miou_drop_points"] <= budget_points + 1e-9  # noqa: E731
    if ok(full_int8):
        result.seconds = time.perf_counter() - t0
        return result
    ranked = [s for s in sensitivity if s.noise_ratio > 0 or s.changed_pixels > 0]
    by_name = {s.name: s for s in sensitivity}
    cache: dict[frozenset, dict] = {frozenset(): full_int8}
    path = workdir / "candidate.onnx"

    trials = progress_bar(f"{target}: float-layer search", unit="trials")

    def trial(names: list[str], purpose: str) -> dict:
        key = frozenset(names)
        if key not in cache:
            quantize(path, nodes_to_exclude=names)
            cache[key] = evaluator.measure(path)
            s = cache[key]
            trials.update()
            trials.note(f"{len(names)} in float: drop {s['miou_drop_points']:.2f} pts")
            result.trials.append(Trial(list(names), s["miou"], s["miou_drop_points"], ok(s), purpose))
            if progress:
                progress(f"{target}: {len(names)} layer(s) in float -> mIoU drop {s['miou_drop_points']:.2f} pts ({purpose})")
        return cache[key]

    # shortest passing prefix: double, then bisect
    lo, hi, k = 0, None, 1
    while k <= len(ranked):
        if ok(trial([s.name for s in ranked[:k]], f"top {k} by sensitivity")):
            hi = k
            break
        lo, k = k, k * 2
    if hi is None and ranked and lo < len(ranked):
        if ok(trial([s.name for s in ranked], "every sensitive layer")):
            hi = len(ranked)
        else:
            lo = len(ranked)
    if hi is None:
        best = min(cache.items(), key=lambda kv: kv[1]["miou_drop_points"])
        chosen, final, within = list(best[0]), best[1], False
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(trial([s.name for s in ranked[:mid]], f"top {mid} by sensitivity")):
                hi = mid
            else:
                lo = mid
        chosen = [s.name for s in ranked[:hi]]
        # give layers back to INT8, least sensitive first, while the budget holds; repeat until no
        # layer can go back, so each one left has a measured reason to stay in float
        budget_left, changed = max_prune_trials, True
        while changed and len(chosen) > 1 and budget_left > 0:
            changed = False
            for name in list(reversed(chosen)):
                rest = [n for n in chosen if n != name]
                if frozenset(rest) not in cache:
                    if budget_left == 0:
                        break
                    budget_left -= 1
                if ok(trial(rest, f"without {name}")):
                    chosen, changed = rest, True
                    if len(chosen) == 1:
                        break
        final, within = cache[frozenset(chosen)], True
    trials.close()
    result.final, result.within_budget = final, within
    order = {s.name: i for i, s in enumerate(sensitivity)}
    for name in sorted(chosen, key=lambda n: order.get(n, 1 << 30)):
        s = by_name.get(name)
        without = cache.get(frozenset(n for n in chosen if n != name))
        why = (f"quantized alone it changed {s.changed_pixels:.3%} of pixels (noise ratio {s.noise_ratio:.2e}"
               + (f", mIoU {-s.miou_drop_points:+.2f} pts" if s.miou_drop_points is not None else "") + " on the sensitivity frames)") if s else ""
        if without is not None:
            why += f"; quantizing it too gives a drop of {without['miou_drop_points']:.2f} pts > budget {budget_points:.2f}"
        result.float_layers.append({"name": name, "op_type": s.op_type if s else "?", "reason": why,
                                    "changed_pixels": s.changed_pixels if s else None,
                                    "noise_ratio": s.noise_ratio if s else None,
                                    "miou_drop_points_alone": s.miou_drop_points if s else None,
                                    "drop_points_if_quantized": without["miou_drop_points"] if without else None})
    path.unlink(missing_ok=True)
    result.seconds = time.perf_counter() - t0
    return result


__all__ = ["LayerSensitivity", "Trial", "MixedPrecisionResult", "Evaluator", "layer_sensitivity", "search_mixed_precision"]
