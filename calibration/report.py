"""`quant_report.json` and `quant_report.png`: what calibration measured, for people and for CI.

The PNG has, per target, the most sensitive layers (changed pixels when quantized alone; the layers
kept in float highlighted) and per-class IoU of FP32 beside each INT8 artifact.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

REPORT_JSON = "quant_report.json"
REPORT_PNG = "quant_report.png"
TOP_LAYERS = 25


def json_safe(x):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(report: dict, path: str | os.PathLike) -> None:
    from edgeseg.files import strip_local_paths  # the report travels with the bundle

    Path(path).write_text(json.dumps(strip_local_paths(json_safe(report)), indent=2) + "\n")


def write_png(report: dict, path: str | os.PathLike) -> None:
    # the Agg canvas directly: no pyplot state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from edgeseg.files import strip_local_paths

    report = strip_local_paths(report)  # the picture travels with the bundle too
    targets = list(report.get("targets", {}).items())
    rows = max(1, len(targets))
    fig = Figure(figsize=(15, 4.8 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2, squeeze=False)
    for r, (name, t) in enumerate(targets):
        ax = axes[r][0]
        sens = t.get("sensitivity") or []
        floats = set(t.get("float_layers_names") or [])
        if sens:
            top = sens[:TOP_LAYERS]
            vals = [max(s["changed_pixels"], 1e-6) * 100 for s in top]
            alone = [s.get("measured", "alone") == "alone" for s in top]
            y = np.arange(len(top))[::-1]
            for yi, v, s, a in zip(y, vals, top, alone):
                colour = "#d62728" if s["name"] in floats else "#1f77b4"
                # layers measured only with their group: hatched, an estimate from above
                ax.barh([yi], [v], color=colour, alpha=1.0 if a else 0.45, hatch=None if a else "///", edgecolor="white")
            ax.set_yticks(y)
            ax.set_yticklabels([_short(s["name"]) for s in top], fontsize=7)
            ax.set_xscale("log")
            ax.set_xlabel("pixels changed vs FP32 when quantized alone (%)")
            kept = f"; red: kept in float ({len(floats)})" if floats else ""
            if not all(alone):
                kept += "; hatched: group estimate"
            ax.set_title(f"{name}: {len(top)} most sensitive of {len(sens)} layers{kept}", fontsize=9)
        else:
            final = t.get("final") or {}
            why = (f"\n(all-INT8 measured within the budget: drop {final['miou_drop_points']:.2f} pts "
                   f"<= {t.get('budget_points')})" if t.get("within_budget") and final.get("miou_drop_points") is not None else "")
            ax.text(0.5, 0.5, "per-layer sensitivity not measured" + why, ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
        ax = axes[r][1]
        fp = (report.get("fp32") or {}).get("per_class_iou") or {}
        q = (t.get("final") or {}).get("per_class_iou") or {}
        labels = list(fp or q)
        if labels:
            x = np.arange(len(labels))
            w = 0.38
            ax.bar(x - w / 2, [fp.get(l) or 0 for l in labels], w, label="FP32", color="#7f7f7f")
            ax.bar(x + w / 2, [q.get(l) or 0 for l in labels], w, label=f"INT8 {name}", color="#2ca02c")
            ax.set_xticks(x)
            ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_ylabel("IoU" if report.get("metric") == "miou" else "IoU vs FP32 masks")
            fm, qm = (report.get("fp32") or {}).get("miou"), (t.get("final") or {}).get("miou")
            title = f"{name}: per-class IoU"
            if fm is not None and qm is not None:
                title += f" (mIoU FP32 {fm:.4f}, INT8 {qm:.4f}, budget {t.get('budget_points')} pts)"
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no accuracy figures", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
    ev = report.get("evaluation", {})
    methods = ", ".join(f"{name}: {t.get('method')}" for name, t in targets)
    fig.suptitle(f"INT8 calibration ({methods} ranges; {report.get('calibration', {}).get('frames')} calibration frames) "
                 f"— measured on {ev.get('frames')} frames: {ev.get('split') or ev.get('data')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110, format="png")


def _short(name: str, n: int = 48) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]


__all__ = ["REPORT_JSON", "REPORT_PNG", "write_json", "write_png", "json_safe"]
