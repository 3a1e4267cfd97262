"""The streaming pipeline: capture, preprocess, infer and postprocess overlap in threads joined
by bounded queues; the consumer (the caller's thread) runs the sinks and the application.

    capture ──► [slot|queue] ──► preprocess ──► [q] ──► infer ──► [q] ──► postprocess ──► [q] ──► consumer

* Live sources (cameras, network streams) feed a one-frame slot that the capture thread
  overwrites: the pipeline always works on the newest frame and counts the overwritten ones as
  dropped (latency first). Files, folders and generated clips feed a bounded queue that blocks
  the reader instead (throughput first: every frame is processed, in order).
* OpenCV, NumPy and the engines release the GIL in their heavy calls, so the stages really run
  in parallel; the engine is the one stage that should never wait, and every other stage has
  to fit in the CPU time the engine leaves idle.
* So the other stages run at a lower OS priority (`stage_nice`, Linux, where priority is per
  thread): a CPU engine splits each operator over its threads and waits for the slowest, so a
  decode or resize that preempts one engine thread stalls them all. Lowered, those stages run
  in the gaps the engine leaves instead. A live source's capture keeps its priority (the newest
  frame must be taken when it arrives); the engine thread and the consumer keep the caller's.
* Which configuration is fastest depends on the model and the machine: a light model streams
  faster with one engine thread fewer (the freed core decodes and postprocesses), a heavy one
  wants every core; lowered stages help one and hurt the other. So `Tuner` measures the few
  candidate `Config`s (engine threads x stage priority) on the first frames of a stream, each
  in a short pipeline of its own, twice in turn, and keeps the fastest for the rest; every
  frame of the trials is delivered as usual (`benchmarks/pipeline_efficiency.py` measures it).
* Shutdown (end of stream, an error in any stage, Ctrl-C or the consumer stopping early) sets
  one event; every blocking wait polls it, the source is interrupted, and all threads are joined
  with timeouts, so none is left behind. The first error is re-raised in the consumer.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from edgeseg.errors import EdgesegError, option
from runtime.sources import Frame, Source
from runtime.stats import Stats

log = logging.getLogger("edgeseg.runtime")

_END = object()
_POLL = 0.05  # seconds between checks of the stop event in blocking waits
STAGE_NICE = 19  # how much lower the non-engine stages run (benchmarks/pipeline_efficiency.py)


class PipelineError(EdgesegError, ValueError):
    """A pipeline option that cannot be used."""


def check_stage_nice(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or not 0 <= value <= 19:
        raise PipelineError(f"{option('stage_nice')} must be 0..19 (how much lower than the engine the other stages run; 0: the same), "
                            f"got {value!r}")
    return int(value)


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value by `nice` (capped at 19). A no-op where threads have
    no priority of their own (not Linux) or where the OS refuses."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + int(nice)))
    except OSError as e:  # e.g. a seccomp profile that forbids it: run at the same priority
        log.debug("cannot lower the priority of %s: %s", threading.current_thread().name, e)


@dataclass
class Work:
    """One frame travelling through the stages."""

    frame: Frame
    ready: float  # perf_counter when the frame became available (after capture)
    timings: dict = field(default_factory=dict)
    data: Any = None


class LatestSlot:
    """A one-item mailbox that keeps the newest item: `put` replaces an unread item (counted as
    dropped). The end marker does not replace a pending frame: that one is still delivered."""

    def __init__(self, on_drop: Callable[[Any], None] | None = None):
        self._cond = threading.Condition()
        self._item: Any = None
        self._full = False
        self._ended = False
        self._on_drop = on_drop

    def put(self, item, stop: threading.Event | None = None) -> bool:
        with self._cond:
            if item is _END:
                self._ended = True
            else:
                if self._full and self._on_drop:
                    self._on_drop(self._item)
                self._item, self._full = item, True
            self._cond.notify()
        return True

    def get(self, stop: threading.Event):
        with self._cond:
            while not self._full:
                if self._ended or stop.is_set():
                    return _END
                self._cond.wait(_POLL)
            item, self._item, self._full = self._item, None, False
            return item


class BoundedQueue:
    """A FIFO of at most `size` items whose blocking calls give up when `stop` is set."""

    def __init__(self, size: int):
        self.size = max(1, int(size))
        self._items: deque = deque()
        self._cond = threading.Condition()

    def put(self, item, stop: threading.Event) -> bool:
        with self._cond:
            while len(self._items) >= self.size:
                if stop.is_set():
                    return False
                self._cond.wait(_POLL)
            if stop.is_set() and item is not _END:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self, stop: threading.Event):
        with self._cond:
            while not self._items:
                if stop.is_set():
                    return _END
                self._cond.wait(_POLL)
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def wait_space(self, stop: threading.Event) -> bool:
        """Block until a put would not block (False if stopped first)."""
        with self._cond:
            while len(self._items) >= self.size:
                if stop.is_set():
                    return False
                self._cond.wait(_POLL)
            return True


class Pipeline:
    """Run `source` through preprocess -> infer -> postprocess in threads; iterate for `Work` items
    whose `data` is the postprocessed result. Use as a context manager or call `close()`."""

    def __init__(self, source: Source, preprocess: Callable, infer: Callable, postprocess: Callable,
                 stats: Stats | None = None, max_frames: int | None = None, queue_size: int = 2,
                 join_timeout: float = 5.0, stage_nice: int = STAGE_NICE, keep_source: bool = False):
        self.source = source
        self.keep_source = bool(keep_source)  # a tuning trial: the next pipeline reads on from the same source
        self.stage_nice = check_stage_nice(stage_nice)
        self.stats = stats if stats is not None else Stats()
        self.max_frames = None if max_frames is None or max_frames <= 0 else int(max_frames)
        self.live = bool(source.live)
        self.join_timeout = float(join_timeout)
        self._stop = threading.Event()
        self._finish = threading.Event()
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()
        # live: newest frame wins, and short queues after it so nothing stale piles up
        depth = 1 if self.live else queue_size
        self._frames = LatestSlot(on_drop=lambda _: self.stats.count("dropped")) if self.live else BoundedQueue(queue_size)
        self._inputs = BoundedQueue(depth)
        self._outputs = BoundedQueue(depth)
        self._results = BoundedQueue(queue_size)
        self._threads = [
            threading.Thread(target=self._capture, name="edgeseg-capture", daemon=True),
            threading.Thread(target=self._stage, args=("preprocess", preprocess, self._frames, self._inputs), name="edgeseg-preprocess", daemon=True),
            threading.Thread(target=self._stage, args=("inference", infer, self._inputs, self._outputs), name="edgeseg-inference", daemon=True),
            threading.Thread(target=self._stage, args=("postprocess", postprocess, self._outputs, self._results), name="edgeseg-postprocess", daemon=True),
        ]
        self._started = False
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "Pipeline":
        if not self._started:
            self._started = True
            self.stats.info.setdefault("source", self.source.describe())
            self.stats.info.setdefault("stage_nice", self.stage_nice)
            for t in self._threads:
                t.start()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
        return False

    @property
    def error(self) -> BaseException | None:
        return self._error

    def _fail(self, e: BaseException) -> None:
        with self._error_lock:
            if self._error is None:
                self._error = e
        self._stop.set()

    def stop(self) -> None:
        """Ask every stage to finish (non-blocking)."""
        self._stop.set()
        interrupt = getattr(self.source, "interrupt", None)
        if interrupt is not None and not self.keep_source:
            interrupt()

    def finish(self) -> None:
        """Read no more frames; those already read still go through every stage and are delivered."""
        self._finish.set()

    def close(self) -> None:
        """Stop and join every thread, then release the source. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        deadline = time.monotonic() + self.join_timeout
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))
        try:
            if not self.keep_source:
                self.source.close()
        except Exception as e:  # closing must not hide the error that stopped the stream
            log.warning("closing %s: %s", getattr(self.source, "uri", self.source), e)
        for t in self._threads:
            if t.is_alive():
                t.join(1.0)
                if t.is_alive():
                    log.warning("thread %s did not stop within %.1f s", t.name, self.join_timeout)
        self._sync_source_counters()
        self.stats.info["source"] = self.source.describe()  # as it ended (a video cut short says so)

    def _sync_source_counters(self) -> None:
        self.stats.set_counter("corrupt", getattr(self.source, "corrupt", 0))
        self.stats.set_counter("reconnects", getattr(self.source, "reconnects", 0))

    # -- threads ----------------------------------------------------------------------------
    def _capture(self) -> None:
        n = 0
        try:
            if not self.live:
                lower_thread_priority(self.stage_nice)
            while not self._stop.is_set() and not self._finish.is_set():
                if not self.live and self.max_frames is not None and n >= self.max_frames:
                    break
                t0 = time.perf_counter()
                frame = self.source.read()
                t1 = time.perf_counter()
                if frame is None or self._stop.is_set():
                    break
                if self._finish.is_set() and self.live:
                    break  # a live frame read after the trial ended: the next pipeline takes a newer one
                n += 1
                self.stats.count("frames_in")
                self._sync_source_counters()
                work = Work(frame, ready=t1, timings={"capture": (t1 - t0) * 1000.0})
                if not self._frames.put(work, self._stop):
                    break
        except BaseException as e:
            self._fail(e)
        finally:
            self._frames.put(_END, self._stop)

    def _stage(self, name: str, fn: Callable, inbox, outbox) -> None:
        # Live sources: take a frame only once the next stage can accept the result, so the
        # frame processed is the newest one, not one that waited behind a busy engine.
        pull_late = self.live and inbox is self._frames
        try:
            if name != "inference":
                lower_thread_priority(self.stage_nice)
            while True:
                if pull_late and not outbox.wait_space(self._stop):
                    break
                work = inbox.get(self._stop)
                if work is _END:
                    break
                t0 = time.perf_counter()
                work.data = fn(work)
                work.timings[name] = (time.perf_counter() - t0) * 1000.0
                if not outbox.put(work, self._stop):
                    break
        except BaseException as e:
            self._fail(e)
        finally:
            outbox.put(_END, self._stop)

    # -- consumer ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Work]:
        self.start()
        delivered = 0
        try:
            while True:
                if self.max_frames is not None and delivered >= self.max_frames:
                    break
                work = self._results.get(self._stop)
                if work is _END:
                    break
                delivered += 1
                yield work
        finally:
            self.close()
        if self._error is not None:
            raise self._error


# -- choosing the configuration --------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """How the stages share the CPU: engine threads (None: the engine's own default) and how much
    lower than the engine the other stages run."""

    threads: int | None
    stage_nice: int

    def to_dict(self) -> dict:
        return {"threads": self.threads if self.threads is not None else "engine default", "stage_nice": self.stage_nice}


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def candidate_configs(threads: int | None = None, stage_nice: int | None = None, cores: int | None = None,
                      vary_threads: bool = True) -> list[Config]:
    """The configurations worth measuring; a value the caller fixed is not varied (nor threads
    when `vary_threads` is False). The first is the untuned default (the engine's threads, the
    other stages lowered)."""
    cores = cores or usable_cores()
    if threads is not None or not vary_threads:
        thread_options = [threads]
    else:  # every core, one fewer (a core left to decoding and postprocessing), half on big machines
        thread_options = [None] + ([cores - 1] if cores > 1 else []) + ([cores // 2] if cores >= 6 else [])
    nice_options = [check_stage_nice(stage_nice)] if stage_nice is not None else [STAGE_NICE, 0]
    return [Config(t, n) for t in thread_options for n in nice_options]


class Tuner:
    """Chooses a `Config` on the first frames of a stream, then streams the rest with it.

    Each candidate runs in a pipeline of its own (fresh threads, so a stage priority lowered by
    one trial is not inherited by the next: raising it back needs privileges) on the same source,
    for at least `min_frames` results and `min_seconds`; the candidates take turns, up to
    `repeats` rounds, and each keeps its best rate (other programs can only slow a trial down, so
    the best rate is the closest to what the configuration can do). After each round only those
    within `keep_within` of the best go on. Ties within `tie` go to the earlier candidate.
    Results of the trials are delivered like any other.

    make(config, max_frames, keep_source) -> Pipeline builds the pipeline of one configuration.
    """

    def __init__(self, candidates: list[Config], min_frames: int = 8, min_seconds: float = 0.2, repeats: int = 3,
                 tie: float = 0.02, keep_within: float = 0.85):
        if not candidates:
            raise PipelineError("Tuner needs at least one candidate configuration")
        self.candidates, self.min_frames, self.min_seconds = list(candidates), int(min_frames), float(min_seconds)
        self.repeats, self.tie, self.keep_within = int(repeats), float(tie), float(keep_within)
        self.rates: dict[Config, list[float]] = {c: [] for c in self.candidates}
        self.chosen: Config | None = None
        self.trial_frames = 0

    def run(self, make: Callable[[Config, int | None, bool], Pipeline], max_frames: int | None = None,
            on_choice: Callable[[Config], None] | None = None) -> Iterator[Work]:
        """Results of the trials, then of the chosen configuration; `on_choice(config)` is called
        once the choice is made (before the first result streamed with it)."""
        left = None if max_frames is None or max_frames <= 0 else int(max_frames)
        done = on_choice or (lambda config: None)
        alive = list(self.candidates)
        if len(alive) > 1:
            for _ in range(self.repeats):
                for config in alive:
                    delivered, ended = yield from self._trial(make(config, left, True), config)
                    self.trial_frames += delivered
                    if left is not None:
                        left -= delivered
                    if ended or left == 0:  # the source (or the frame budget) ran out while tuning
                        self._choose()
                        done(self.chosen)
                        return
                # the next round measures only the candidates still in the running
                best = {c: max(self.rates[c]) for c in alive if self.rates[c]}
                top = max(best.values(), default=0.0)
                alive = [c for c in alive if best.get(c, top) >= self.keep_within * top]
                if len(alive) == 1:
                    break
        self._choose()
        done(self.chosen)
        if left != 0:
            yield from make(self.chosen, left, False)

    def _trial(self, pipeline: Pipeline, config: Config):
        """Stream until the trial has measured enough, then let the frames in flight drain."""
        times: list[float] = []
        finished_at = None
        with pipeline:
            for work in pipeline:
                times.append(time.perf_counter())
                if finished_at is None and len(times) >= self.min_frames and times[-1] - times[min(2, len(times) - 1)] >= self.min_seconds:
                    pipeline.finish()
                    finished_at = len(times)
                yield work
        measured = times[2:finished_at or len(times)]  # the first results include filling the pipeline
        if len(measured) >= 2 and measured[-1] > measured[0]:
            self.rates[config].append((len(measured) - 1) / (measured[-1] - measured[0]))
        return len(times), finished_at is None  # not finished by us: the source ended

    def _choose(self) -> None:
        best = {c: max(r) for c, r in self.rates.items() if r}
        if not best:
            self.chosen = self.candidates[0]
            return
        top = max(best.values())
        self.chosen = next(c for c in self.candidates if c in best and best[c] >= top * (1.0 - self.tie))

    def summary(self) -> dict:
        return {
            "chosen": None if self.chosen is None else self.chosen.to_dict(),
            "candidates": [{**c.to_dict(), "fps": [round(r, 1) for r in self.rates[c]]} for c in self.candidates],
            "trial_frames": self.trial_frames,
            "rule": "best rate of each candidate over its trials; ties within "
                    f"{100 * self.tie:.0f}% go to the earlier candidate",
        }


__all__ = ["Pipeline", "Work", "LatestSlot", "BoundedQueue", "PipelineError", "STAGE_NICE", "check_stage_nice", "lower_thread_priority",
           "Config", "Tuner", "candidate_configs", "usable_cores"]
