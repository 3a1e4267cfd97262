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
                 join_timeout: float = 5.0, stage_nice: int = STAGE_NICE):
        self.source = source
        self.stage_nice = check_stage_nice(stage_nice)
        self.stats = stats if stats is not None else Stats()
        self.max_frames = None if max_frames is None or max_frames <= 0 else int(max_frames)
        self.live = bool(source.live)
        self.join_timeout = float(join_timeout)
        self._stop = threading.Event()
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
        if interrupt is not None:
            interrupt()

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
            while not self._stop.is_set():
                if not self.live and self.max_frames is not None and n >= self.max_frames:
                    break
                t0 = time.perf_counter()
                frame = self.source.read()
                t1 = time.perf_counter()
                if frame is None or self._stop.is_set():
                    break
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


__all__ = ["Pipeline", "Work", "LatestSlot", "BoundedQueue", "PipelineError", "STAGE_NICE", "check_stage_nice", "lower_thread_priority"]
