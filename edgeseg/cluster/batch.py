"""Many videos through one bundle, on this machine or on a Ray cluster.

    from edgeseg.cluster import BatchSegmenter
    with BatchSegmenter("bundle/", cluster="local", workers=2) as batch:
        summary = batch.run("archive/**/*.mp4", out="results/", masks="png")
    print(summary.format())

Without `cluster` the tasks run one after another in this process (ray is not imported); with
it, each worker is a Ray actor holding one `Segmenter`, the bundle is shipped to it once through
Ray's object store, and each task is a video or a range of a long one (`chunk_frames`). Results
are written as they come back (see `edgeseg.cluster.outputs`); sources finished by an earlier run
with the same options are skipped.
"""
from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable

from edgeseg import progress
from edgeseg.bundle import Bundle
from edgeseg.files import sha256_file
from edgeseg.cluster.outputs import ResultStore
from edgeseg.cluster.plan import BatchError, OutputSpec, Source, Task, find_sources, plan_tasks
from edgeseg.cluster.worker import SegmenterWorker, pack_bundle
from edgeseg.errors import option

log = logging.getLogger("edgeseg.cluster")

SEGMENTER_OPTIONS = ("backend", "precision", "smoothing", "keep", "ignore", "threshold")


@dataclass
class WorkerStats:
    worker: str
    host: str = ""
    pids: list[int] = field(default_factory=list)
    tasks: int = 0
    frames: int = 0
    busy_s: float = 0.0

    @property
    def fps(self) -> float | None:
        return self.frames / self.busy_s if self.busy_s > 0 else None

    def add(self, info: dict) -> None:
        """One task's figures (a worker's `info`)."""
        if info.get("pid") not in self.pids:
            self.pids.append(info.get("pid"))
        self.tasks += 1
        self.frames += info["frames"]
        self.busy_s += info["seconds"]


@dataclass
class BatchSummary:
    """What a batch run did. `fps` is frames over the processing wall time; each worker's FPS is
    its frames over the time it spent in tasks."""

    sources: int = 0
    done: int = 0  # processed by this run
    skipped: int = 0  # finished by an earlier run with the same options
    failed: list[dict] = field(default_factory=list)  # {"source", "range", "error"}
    tasks: int = 0
    retried: int = 0  # tasks Ray ran again after losing their worker (or an exception)
    restarts: int = 0  # workers Ray restarted
    frames: int = 0
    startup_s: float = 0.0  # connecting and opening the bundle on every worker
    processing_s: float = 0.0
    bundle_bytes: int = 0  # shipped once to each worker
    source_bytes: int = 0  # videos shipped with their tasks (--ship-sources)
    cluster: str | None = None
    workers: list[WorkerStats] = field(default_factory=list)
    out: str = ""

    @property
    def fps(self) -> float | None:
        return self.frames / self.processing_s if self.processing_s > 0 and self.frames else None

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fps"] = self.fps
        for w, ws in zip(d["workers"], self.workers):
            w["fps"] = ws.fps
        return d

    def format(self) -> str:
        f = lambda v, spec=".1f": "-" if v is None else format(v, spec)  # noqa: E731
        where = f"on {self.cluster}" if self.cluster else "in this process"
        lines = [f"{self.sources} sources {where}: {self.done} done, {self.skipped} already done, {len(self.failed)} failed; "
                 f"{self.tasks} tasks, {self.frames} frames in {self.processing_s:.1f} s = {f(self.fps)} FPS in total"]
        if self.cluster:
            lines.append(f"startup {self.startup_s:.1f} s (bundle {self.bundle_bytes / 1e6:.1f} MB shipped to each worker"
                         + (f", {self.source_bytes / 1e6:.1f} MB of video shipped" if self.source_bytes else "") + f"); "
                         f"{self.retried} task(s) retried, {self.restarts} worker restart(s)")
        if self.workers:
            lines.append(f"{'worker':<10} {'host':<20} {'tasks':>6} {'frames':>8} {'busy s':>8} {'FPS':>7}")
            for w in self.workers:
                lines.append(f"{w.worker:<10} {w.host[:20]:<20} {w.tasks:>6} {w.frames:>8} {w.busy_s:>8.1f} {f(w.fps):>7}")
        for x in self.failed:
            lines.append(f"FAILED {x['source']}{' ' + x['range'] if x.get('range') else ''}: {x['error']}")
        lines.append(f"results -> {self.out}")
        return "\n".join(lines)


class BatchSegmenter:
    """`Segmenter` for many videos. bundle: a bundle folder. cluster: None (this process), "local"
    (a Ray instance started here), "auto", "ray://HOST:PORT" or "HOST:PORT". workers: actors
    (default: the cluster's CPUs / worker_cpus). worker_cpus: CPUs each worker reserves, also its
    engine threads. max_retries: how often Ray restarts a lost worker and runs its tasks again.
    ship_sources: send each video's bytes with its tasks (for workers that do not see the files
    at the same path). backend, precision, smoothing, keep, ignore, threshold: as for Segmenter;
    threads, stage_nice: as for Segmenter and Segmenter.stream (default threads: worker_cpus).
    """

    def __init__(self, bundle, cluster: str | None = None, *, workers: int | None = None, worker_cpus: int = 1,
                 max_retries: int = 3, ship_sources: bool = False, threads: int | None = None, stage_nice: int | None = None,
                 **segmenter_options):
        unknown = set(segmenter_options) - set(SEGMENTER_OPTIONS)
        if unknown:
            raise TypeError(f"unknown options {sorted(unknown)}; BatchSegmenter takes {SEGMENTER_OPTIONS}")
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        self.cluster_spec = cluster
        if cluster is not None:
            from edgeseg.cluster.session import check_address

            check_address(cluster)
        if workers is not None and (isinstance(workers, bool) or int(workers) < 1):
            raise BatchError(f"{option('workers')} must be 1 or more, got {workers!r}")
        if isinstance(worker_cpus, bool) or not isinstance(worker_cpus, int) or worker_cpus < 1:
            raise BatchError(f"{option('worker_cpus')} must be a whole number of CPUs, 1 or more, got {worker_cpus!r}")
        self.workers, self.worker_cpus, self.max_retries = workers, worker_cpus, max_retries
        self.ship_sources = bool(ship_sources)
        self.options = {k: v for k, v in segmenter_options.items() if v is not None}
        self.threads = threads
        self.stream_options = {} if stage_nice is None else {"stage_nice": stage_nice}
        self._cluster = self._pool = self._local = None
        self._bundle_bytes = 0
        self._startup_s = 0.0
        self.labels = list(self.bundle.manifest.labels)
        self._bundle_sha = _bundle_identity(self.bundle)

    # -- workers ---------------------------------------------------------------------------
    def _start(self) -> None:
        if self.cluster_spec is None:
            if self._local is None:
                t0 = time.perf_counter()
                opts = dict(self.options, **({"threads": self.threads} if self.threads else {}))
                self._local = SegmenterWorker(self.bundle.path, opts, self.stream_options)
                self._startup_s = time.perf_counter() - t0
            return
        if self._pool is not None:
            return
        from edgeseg.cluster.session import RayCluster, Shared

        t0 = time.perf_counter()
        self._cluster = RayCluster.connect(self.cluster_spec)
        cpus = self._cluster.cpus()
        n = self.workers or max(1, cpus // self.worker_cpus)
        blob = pack_bundle(self.bundle)
        self._bundle_bytes = len(blob)
        opts = dict(self.options, threads=self.threads or self.worker_cpus)
        self._pool = self._cluster.pool(SegmenterWorker, (Shared(self._cluster.put(blob)), opts, self.stream_options), workers=n, cpus=self.worker_cpus,
                                        max_retries=self.max_retries)
        self._startup_s = time.perf_counter() - t0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None
        if self._local is not None:
            self._local.close()
            self._local = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- a run -----------------------------------------------------------------------------
    def spec(self, table: str = "parquet", masks: str | None = None, overlay: bool = False, max_frames: int | None = None,
             alpha: float = 0.5, mode: str = "blend", legend: bool = False) -> OutputSpec:
        return OutputSpec(table=table, masks=masks, overlay=bool(overlay), max_frames=max_frames, alpha=float(alpha), mode=mode,
                          legend=bool(legend), segmenter=dict(sorted(self.options.items())), bundle_sha256=self._bundle_sha)

    def run(self, sources, out, *, table: str = "parquet", masks: str | None = None, overlay: bool = False,
            chunk_frames: int | None = None, max_frames: int | None = None, alpha: float = 0.5, mode: str = "blend",
            legend: bool = False, progress: Callable[[dict], None] | None = None) -> BatchSummary:
        """Segment every video `sources` names (a glob, folder, file or a list of them) into `out`.
        chunk_frames: split longer videos into ranges of that many frames (needs smoothing off and
        no overlay, which carry over between frames). alpha, mode, legend: the overlay's look (as for
        Segmenter.stream). progress(event) gets a dict per event:
        {"event": "done" | "failed" | "skipped", "source", "task", "frames", "worker", "pid", ...}."""
        spec = self.spec(table, masks, overlay, max_frames, alpha, mode, legend)
        if chunk_frames and (overlay or self.options.get("smoothing")):
            raise BatchError(f"{option('chunk_frames')} cannot be used with {option('overlay')} or {option('smoothing')}: "
                             "both carry over from frame to frame, "
                             "so a video must stay in one task")
        found = find_sources(sources)
        store = ResultStore(out, spec, self.labels)
        summary = BatchSummary(sources=len(found), cluster=self.cluster_spec, out=str(store.root))
        say = progress or (lambda event: None)
        tasks_of, todo = self._plan(found, store, chunk_frames, max_frames, summary, say)
        pending = [t for ts in todo.values() for t in ts]
        summary.tasks = len(pending)
        say({"event": "planned", "sources": len(found), "skipped": summary.skipped, "tasks": len(pending),
             "frames": _expected_frames(pending)})
        if pending:
            self._start()
            summary.startup_s, summary.bundle_bytes = self._startup_s, self._bundle_bytes
            restarts = self._pool.restarts if self._pool is not None else 0
            t0 = time.perf_counter()
            stats: dict[int, WorkerStats] = {}
            for task, outcome, worker, retried in self._execute(pending, spec, summary):
                key = task.source.key
                if isinstance(outcome, dict) and "part" in outcome:
                    info = outcome["info"]
                    store.write_part(task, outcome["part"], outcome.get("overlay"), info)
                    stats.setdefault(worker, WorkerStats(str(worker), info.get("host", ""))).add(info)
                    summary.frames += info["frames"]
                    todo[key].remove(task)
                    say({"event": "done", "source": key, "task": str(task), "frames": info["frames"], "worker": worker,
                         "pid": info.get("pid"), "retried": retried, "seconds": info["seconds"]})
                    if not todo[key] and not any(f["source"] == key for f in summary.failed):
                        store.finish(task.source, tasks_of[key])
                        summary.done += 1
                else:
                    error = outcome["error"] if isinstance(outcome, dict) else outcome.error
                    if isinstance(outcome, dict) and outcome.get("not_here"):
                        error += f" ({option('ship_sources')})"
                    rng = "" if len(tasks_of[key]) == 1 else f"[{task.start}:{'' if task.stop is None else task.stop}]"
                    summary.failed.append({"source": key, "path": task.source.path, "range": rng, "error": error})
                    say({"event": "failed", "source": key, "task": str(task), "error": error, "worker": worker})
            summary.processing_s = time.perf_counter() - t0
            summary.workers = [stats[k] for k in sorted(stats)]
            if self._pool is not None:
                summary.restarts = self._pool.restarts - restarts
        store.write_summary(summary.to_dict())
        return summary

    def _plan(self, found: list[Source], store: ResultStore, chunk_frames, max_frames, summary: BatchSummary, say):
        """Each source's tasks, and those still to run: sources done by an earlier run are skipped,
        parts already written are not run again, and a source with every part written is merged."""
        tasks_of: dict[str, list[Task]] = {}
        todo: dict[str, list[Task]] = {}
        for s in found:
            if store.done(s) is not None:
                summary.skipped += 1
                say({"event": "skipped", "source": s.key})
                continue
            tasks_of[s.key] = plan_tasks([s], chunk_frames, max_frames)
            todo[s.key] = [t for t in tasks_of[s.key] if not store.part_done(t)]
            if not todo[s.key]:  # interrupted after its last part: merge only
                store.finish(s, tasks_of[s.key])
                summary.done += 1
                del todo[s.key]
        return tasks_of, todo

    def _execute(self, tasks: list[Task], spec: OutputSpec, summary: BatchSummary):
        """(task, outcome, worker, retried) for every task, in this process or on the pool."""
        if self._pool is None:
            for task in tasks:
                yield task, self._local.process(task, spec), 0, False
            return
        shipped: dict = {}  # source path -> its object ref while tasks of it are out
        left = defaultdict(int)
        for t in tasks:
            left[t.source.path] += 1

        def args(task: Task):
            def make():
                if not self.ship_sources:
                    return (task, spec)
                if task.source.path not in shipped:
                    data = _read_source(task.source)
                    summary.source_bytes += len(data)
                    shipped[task.source.path] = self._cluster.put(data)
                return (task, spec, shipped[task.source.path])
            return make

        for task, outcome, worker, retried in self._pool.map((t, "process", args(t)) for t in tasks):
            summary.retried += retried
            left[task.source.path] -= 1
            if left[task.source.path] == 0:
                shipped.pop(task.source.path, None)  # its last task is back: the object can go
            yield task, outcome, worker, retried

def _expected_frames(tasks: list[Task]) -> int | None:
    """Frames the tasks will read, from the containers' counts (None when a count is unknown)."""
    total = 0
    for t in tasks:
        end = t.source.frames if t.stop is None else min(t.stop, t.source.frames or t.stop)
        if end is None:
            return None
        total += max(0, end - t.start)
    return total


def _read_source(source: Source) -> bytes:
    st = os.stat(source.path)
    if st.st_size != source.size:
        raise BatchError(f"{source.path} changed while the batch was running; run it again")
    with open(source.path, "rb") as fh:
        return fh.read()


def _bundle_identity(bundle: Bundle) -> str:
    """The manifest's checksum: artifacts carry their own, so this changes when any of them does."""
    return sha256_file(bundle.path / "manifest.json")


class ConsoleProgress:
    """The command line's view of a batch run: a bar of frames (estimated from the containers)
    on a terminal, else one line per finished task; failures are always written."""

    def __init__(self):
        self.bar = None
        self.done = self.total = 0

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "planned":
            self.total = event["tasks"]
            progress.write(f"{event['sources']} sources: {event['skipped']} already done, {event['tasks']} task(s) to run")
            if self.total:
                self.bar = progress.bar("batch", total=event.get("frames") or None, unit="frames", rate_label="FPS")
            return
        if kind == "skipped":
            return
        self.done += 1
        where = f"[{self.done}/{self.total}] {event['task']}"
        if kind == "failed":
            progress.write(f"{where}: FAILED: {event['error']}")
        elif progress.enabled():
            self.bar.update(event["frames"])
            self.bar.note(f"task {self.done}/{self.total}")
        else:
            progress.write(f"{where}: {event['frames']} frames on worker {event['worker']}"
                           + (" (retried)" if event.get("retried") else ""))
        if self.done == self.total and self.bar is not None:
            self.bar.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["BatchSegmenter", "BatchSummary", "WorkerStats", "ConsoleProgress"]
