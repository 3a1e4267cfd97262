"""Honest timings for the runtime.

Every stage (capture, queue wait, preprocess, inference, postprocess, sink) is timed per frame.
Percentiles come from a window of recent frames (bounded memory, so a days-long stream keeps a flat
footprint); means and counts cover the whole run. Two rates are reported and never mixed:

* `pipeline_fps`: results delivered per second of wall time (what the application sees);
* `engine_fps`: 1000 / mean inference ms (what the engine alone would reach if nothing else ran).

`queue` is the time a frame spent waiting between stages (its latency minus the work done on
it), so the stages plus `queue` add up to the end-to-end latency.
"""
from __future__ import annotations

import json
import math
import threading
import time
from collections import deque

STAGES = ("capture", "queue", "preprocess", "inference", "postprocess", "sink")
# The GPU frame path's stages in CUDA milliseconds (events on the frame's stream), reported beside the
# CPU milliseconds of the stages above as `cuda_<stage>` timings. Where two frames are in flight the
# GPU interleaves their work, so a stage's CUDA time can include the other frame's kernels.
CUDA_STAGES = ("upload", "preprocess", "inference", "postprocess", "download")
WINDOW = 2048


class _Series:
    """Durations of one stage: whole-run sum/count/max plus a recent window for percentiles."""

    __slots__ = ("recent", "total", "count", "max")

    def __init__(self, window: int):
        self.recent: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0
        self.max = 0.0

    def add(self, ms: float) -> None:
        self.recent.append(ms)
        self.total += ms
        self.count += 1
        if ms > self.max:
            self.max = ms

    def summary(self) -> dict:
        if not self.count:
            return {"count": 0, "mean_ms": None, "p50_ms": None, "p95_ms": None, "max_ms": None}
        ordered = sorted(self.recent)
        return {
            "count": self.count,
            "mean_ms": round(self.total / self.count, 3),
            "p50_ms": round(_percentile(ordered, 50), 3),
            "p95_ms": round(_percentile(ordered, 95), 3),
            "max_ms": round(self.max, 3),
        }


def _percentile(ordered: list[float], q: float) -> float:
    """Linear-interpolated percentile of a sorted list (numpy's default method)."""
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class Stats:
    """Thread-safe per-stage timings and counters of one segmenter or one stream."""

    def __init__(self, window: int = WINDOW):
        self.window = int(window)
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._series = {s: _Series(self.window) for s in (*STAGES, *(f"cuda_{c}" for c in CUDA_STAGES))}
            self._latency = _Series(self.window)
            self.counters = {"frames_in": 0, "frames_out": 0, "dropped": 0, "corrupt": 0, "reconnects": 0}
            self.started = time.perf_counter()
            self._first_out: float | None = None
            self._last_out: float | None = None
            self.info: dict = {}

    # -- recording ------------------------------------------------------------------------
    def add(self, stage: str, ms: float) -> None:
        if stage not in self._series:
            raise KeyError(f"unknown stage {stage!r}; stages are {STAGES}")
        with self._lock:
            self._series[stage].add(float(ms))

    def add_timings(self, timings: dict) -> None:
        with self._lock:
            for stage, ms in timings.items():
                if stage in self._series and ms is not None:
                    self._series[stage].add(float(ms))

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + int(n)

    def set_counter(self, name: str, value: int) -> None:
        with self._lock:
            self.counters[name] = int(value)

    def frame_out(self, latency_ms: float | None = None) -> None:
        """One result delivered to the application."""
        now = time.perf_counter()
        with self._lock:
            self.counters["frames_out"] += 1
            if self._first_out is None:
                self._first_out = now
            self._last_out = now
            if latency_ms is not None:
                self._latency.add(float(latency_ms))

    # -- reading --------------------------------------------------------------------------
    def stage(self, name: str) -> dict:
        with self._lock:
            return self._series[name].summary()

    @property
    def pipeline_fps(self) -> float | None:
        """Steady-state delivery rate: results after the first, over the time since the first.

        Start-up (opening the source, the first inference) is excluded; `wall_s` keeps it."""
        with self._lock:
            n = self.counters["frames_out"]
            if n < 2 or self._last_out is None or self._last_out <= self._first_out:
                return None
            return (n - 1) / (self._last_out - self._first_out)

    @property
    def engine_fps(self) -> float | None:
        """1000 / mean inference ms: the engine's CUDA time where the GPU path measured it (its CPU time
        there is only the enqueue), else the inference stage's time."""
        with self._lock:
            s = self._series["cuda_inference"]
            if not s.count:
                s = self._series["inference"]
            return 1000.0 * s.count / s.total if s.count and s.total > 0 else None

    def summary(self) -> dict:
        """JSON-able snapshot (what `stats.json` and the browser view show)."""
        pipeline_fps, engine_fps = self.pipeline_fps, self.engine_fps
        with self._lock:
            stages = {s: self._series[s].summary() for s in STAGES}
            cuda = {c: self._series[f"cuda_{c}"].summary() for c in CUDA_STAGES if self._series[f"cuda_{c}"].count}
            latency = self._latency.summary()
            counters = dict(self.counters)
            wall = time.perf_counter() - self.started
            info = dict(self.info)
        return {
            "pipeline_fps": None if pipeline_fps is None else round(pipeline_fps, 2),
            "engine_fps": None if engine_fps is None else round(engine_fps, 2),
            "engine_fps_note": "1000 / mean inference ms measured inside the pipeline"
                               + (" (CUDA events)" if cuda else ""),
            "wall_s": round(wall, 3),
            **counters,
            "stages": stages,
            **({"cuda_stages": cuda} if cuda else {}),
            "latency": latency,
            "window": self.window,
            **({"info": info} if info else {}),
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.summary(), **kw)

    def save(self, path) -> None:
        """Write `summary()` as JSON, atomically."""
        from edgeseg.bundle import write_text_atomic

        write_text_atomic(path, json.dumps(self.summary(), indent=2) + "\n")

    def format(self) -> str:
        """A small table for terminals."""
        s = self.summary()

        def f(v, spec="7.2f"):
            return " " * (len(format(0.0, spec)) - 1) + "-" if v is None else format(v, spec)

        lines = [f"{'stage':<12} {'p50 ms':>8} {'p95 ms':>8} {'mean ms':>8} {'frames':>7}"]
        for name in STAGES:
            st = s["stages"][name]
            if st["count"]:
                lines.append(f"{name:<12} {f(st['p50_ms'], '8.2f')} {f(st['p95_ms'], '8.2f')} {f(st['mean_ms'], '8.2f')} {st['count']:>7}")
        for name, st in s.get("cuda_stages", {}).items():
            lines.append(f"{'cuda ' + name:<12} {f(st['p50_ms'], '8.2f')} {f(st['p95_ms'], '8.2f')} {f(st['mean_ms'], '8.2f')} {st['count']:>7}")
        lat = s["latency"]
        if lat["count"]:
            lines.append(f"{'latency':<12} {f(lat['p50_ms'], '8.2f')} {f(lat['p95_ms'], '8.2f')} {f(lat['mean_ms'], '8.2f')} {lat['count']:>7}")
        pf, ef = s["pipeline_fps"], s["engine_fps"]
        lines.append(
            f"pipeline {'-' if pf is None else f'{pf:.1f}'} FPS, engine-only {'-' if ef is None else f'{ef:.1f}'} FPS "
            f"(from inference time); frames {s['frames_out']} out / {s['frames_in']} in, "
            f"dropped {s['dropped']}, corrupt {s['corrupt']}" + (f", reconnects {s['reconnects']}" if s["reconnects"] else "")
        )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Stats(frames_out={self.counters['frames_out']}, pipeline_fps={self.pipeline_fps}, engine_fps={self.engine_fps})"


class Timer:
    """`with Timer() as t: ...; t.ms` — perf_counter based."""

    __slots__ = ("t0", "ms")

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.ms = 0.0
        return self

    def __exit__(self, *exc):
        self.ms = (time.perf_counter() - self.t0) * 1000.0
        return False


__all__ = ["Stats", "Timer", "STAGES", "CUDA_STAGES"]
