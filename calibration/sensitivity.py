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

Candidates are built and scored by a *measurer*: `LocalMeasurer` one after another on this machine,
or `edgeseg.cluster.calibrate.RayCandidates` on Ray workers, `parallel` at a time. The sensitivity
pass hands it every group (then every refined layer) at once; the search, whose next step depends
on the last answer, asks for the candidates it may need next ahead of time (the next prefixes of
the doubling, the next levels of the bisection, the next layers to give back) and decides exactly
as the one-at-a-time search does, reading the answers it asked for in the same order.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

from calibration.evaluate import EvalSet, agreement, noise_ratio, onnx_runner, predict, pseudo_score, score
from edgeseg.progress import bar as progress_bar
from edgeseg.spec import Preprocess

log = logging.getLogger("edgeseg.calibration")

QuantizeFn = Callable[..., Path]  # (out_path, nodes_to_exclude=..., nodes_to_quantize=...) -> path


class Measurer(Protocol):
    parallel: int  # candidates it scores at once

    def quick(self, groups: list[list[str]]) -> list[dict]:
        """`Evaluator.quick` of each graph with only that group's layers quantized, in order."""

    def measure(self, float_sets: list[list[str]]) -> list[dict]:
        """`Evaluator.measure` of each graph with every layer quantized but that set's, in order."""

    def stats(self) -> dict:
        """Where the candidates were scored, and how many (for the report)."""


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
        self.threads: int | None = None  # engine threads for candidates (a cluster worker sets its CPUs)
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
        maps = predict(model if callable(model) else onnx_runner(model, self.threads), self.evalset, self.pre, self.output_kind)
        s = score(maps, self.evalset, self.labels) if self.evalset.labelled else pseudo_score(maps, self.fp32_maps, self.labels)
        s["agreement_with_fp32"] = agreement(maps, self.fp32_maps)
        s["miou_drop_points"] = 100.0 * (self.reference["miou"] - s["miou"])
        return s

    def quick(self, model_path: str | Path) -> dict:
        """Effect of a candidate on the sensitivity frames: changed pixels, noise ratio, mIoU change."""
        maps, outs = predict(onnx_runner(model_path, self.threads), self.sens_set, self.pre, self.output_kind, keep_outputs=True)
        out = {"changed_pixels": 1.0 - agreement(maps, self.sens_maps), "noise_ratio": noise_ratio(outs, self.sens_outputs),
               "miou_drop_points": None}
        if self.sens_set.labelled:
            ref = score(self.sens_maps, self.sens_set, self.labels)["miou"]
            out["miou_drop_points"] = 100.0 * (ref - score(maps, self.sens_set, self.labels)["miou"])
        return out


class LocalMeasurer:
    """Candidates quantized with `quantize` into `workdir` and scored by `evaluator`, one at a time."""

    parallel = 1

    def __init__(self, evaluator: Evaluator, quantize: QuantizeFn, workdir: Path):
        self.evaluator, self.quantize, self.path = evaluator, quantize, Path(workdir) / "candidate.onnx"
        self.count = 0

    def quick(self, groups: list[list[str]]) -> list[dict]:
        out = []
        for names in groups:
            self.quantize(self.path, nodes_to_quantize=list(names))
            out.append(self.evaluator.quick(self.path))
        self.path.unlink(missing_ok=True)
        self.count += len(groups)
        return out

    def measure(self, float_sets: list[list[str]]) -> list[dict]:
        out = []
        for names in float_sets:
            self.quantize(self.path, nodes_to_exclude=list(names))
            out.append(self.evaluator.measure(self.path))
        self.path.unlink(missing_ok=True)
        self.count += len(float_sets)
        return out

    def stats(self) -> dict:
        return {"where": "this process", "candidates": self.count}


def layer_sensitivity(measurer: Measurer, layers: Sequence[str], op_types: dict[str, str],
                      progress: Callable[[str], None] | None = None, group_size: int | None = None,
                      refine_groups: int = 3, refine_ratio: float = 0.5) -> list[LayerSensitivity]:
    """Each layer's effect when quantized alone, coarse to fine (see the module doc). Most sensitive first."""
    done = [0]
    total = len(layers)
    # a parallel measurer gets several batches' worth at once (workers stay busy), while the
    # progress still moves; one at a time here
    chunk = 1 if measurer.parallel <= 1 else 4 * measurer.parallel

    def measure(name_lists: list[list[str]]) -> list[dict]:
        out: list[dict] = []
        for i in range(0, len(name_lists), chunk):
            part = name_lists[i:i + chunk]
            out += measurer.quick(part)
            before, done[0] = done[0], done[0] + len(part)
            bar.update(len(part))
            if progress and done[0] // 10 > before // 10:
                progress(f"sensitivity: {done[0]} measurements ({total} layers)")
        return out

    def entry(name, q, measured="alone"):
        return LayerSensitivity(name, op_types.get(name, "?"), q["changed_pixels"], q["noise_ratio"], q["miou_drop_points"], measured)

    k = group_size or max(1, round(math.sqrt(total)))
    grouped = not (k <= 1 or total <= 2 * k)
    groups = [list(layers[i:i + k]) for i in range(0, total, k)] if grouped else []
    bar = progress_bar("layer sensitivity", total=len(groups) if grouped else total, unit="trials")
    if not grouped:
        out = [entry(name, q) for name, q in zip(layers, measure([[name] for name in layers]))]
    else:
        effects = measure(groups)
        key = lambda q: (q["changed_pixels"], q["noise_ratio"])  # noqa: E731
        ranked = sorted(range(len(groups)), key=lambda i: key(effects[i]), reverse=True)
        worst = effects[ranked[0]]
        refine = set(ranked[:refine_groups]) | {
            i for i in ranked if effects[i]["changed_pixels"] >= refine_ratio * worst["changed_pixels"] > 0}
        bar.total = len(groups) + sum(len(groups[i]) for i in refine)
        alone = [name for i in sorted(refine) for name in groups[i]]
        by_name = dict(zip(alone, measure([[name] for name in alone])))
        out = []
        for i, g in enumerate(groups):
            if i in refine:
                out += [entry(name, by_name[name]) for name in g]
            else:
                out += [entry(name, effects[i], f"group of {len(g)}") for name in g]
    bar.close()
    return sorted(out, key=lambda s: s.key, reverse=True)


def search_mixed_precision(evaluator: Evaluator, measurer: Measurer, sensitivity: list[LayerSensitivity],
                           full_int8: dict, budget_points: float, target: str,
                           max_prune_trials: int = 32, progress: Callable[[str], None] | None = None) -> MixedPrecisionResult:
    """Fewest layers in float (greedy by sensitivity, then pruned) that bring the drop within budget.
    `evaluator` gives the metric and FP32's figures; `measurer` scores the candidates."""
    t0 = time.perf_counter()
    result = MixedPrecisionResult(target, evaluator.metric, budget_points, evaluator.reference, full_int8, full_int8,
                                  sensitivity=sensitivity)
    ok = lambda s: s["miou_drop_points"] <= budget_points + 1e-9  # noqa: E731
    if ok(full_int8):
        result.seconds = time.perf_counter() - t0
        return result
    ranked = [s for s in sensitivity if s.noise_ratio > 0 or s.changed_pixels > 0]
    by_name = {s.name: s for s in sensitivity}
    cache: dict[frozenset, dict] = {frozenset(): full_int8}  # the trials the search asked for
    ahead: dict[frozenset, dict] = {}  # candidates scored ahead of time, not asked for (yet)
    room = max(1, measurer.parallel)

    trials = progress_bar(f"{target}: float-layer search", unit="trials")

    def prefetch(name_lists: list[list[str]]) -> None:
        """With a parallel measurer: score the candidates the next steps may ask for, `room` at once."""
        if room <= 1:
            return
        todo, seen = [], set()
        for names in name_lists:
            key = frozenset(names)
            if key not in cache and key not in ahead and key not in seen:
                todo.append(list(names))
                seen.add(key)
            if len(todo) == room:
                break
        if len(todo) > 1:
            for names, r in zip(todo, measurer.measure(todo)):
                ahead[frozenset(names)] = r

    def trial(names: list[str], purpose: str) -> dict:
        key = frozenset(names)
        if key not in cache:
            cache[key] = ahead.pop(key) if key in ahead else measurer.measure([list(names)])[0]
            s = cache[key]
            trials.update()
            trials.note(f"{len(names)} in float: drop {s['miou_drop_points']:.2f} pts")
            result.trials.append(Trial(list(names), s["miou"], s["miou_drop_points"], ok(s), purpose))
            if progress:
                progress(f"{target}: {len(names)} layer(s) in float -> mIoU drop {s['miou_drop_points']:.2f} pts ({purpose})")
        return cache[key]

    prefix = lambda n: [s.name for s in ranked[:n]]  # noqa: E731
    # shortest passing prefix: double, then bisect
    lo, hi, k = 0, None, 1
    while k <= len(ranked):
        prefetch([prefix(n) for n in _doublings(k, len(ranked))])
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
            prefetch([prefix(n) for n in _bisection_points(lo, hi)])
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
            order = list(reversed(chosen))
            for i, name in enumerate(order):
                # the next layers to try giving back, each against the layers kept now
                prefetch([[n for n in chosen if n != m] for m in order[i:i + min(room, budget_left + 1)]])
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
    result.seconds = time.perf_counter() - t0
    return result


def _doublings(k: int, n: int) -> list[int]:
    """The prefix sizes the doubling asks for from k on: k, 2k, 4k ... then all n."""
    out = []
    while k <= n:
        out.append(k)
        k *= 2
    return out + [n]


def _bisection_points(lo: int, hi: int) -> list[int]:
    """The points bisection of (lo, hi) may ask for, level by level (the midpoint, then the
    midpoints of both halves, ...)."""
    out, level = [], [(lo, hi)]
    while level:
        nxt = []
        for a, b in level:
            if b - a > 1:
                m = (a + b) // 2
                out.append(m)
                nxt += [(a, m), (m, b)]
        level = nxt
    return out


__all__ = ["LayerSensitivity", "Trial", "MixedPrecisionResult", "Evaluator", "LocalMeasurer", "Measurer", "layer_sensitivity", "search_mixed_precision"]
