"""Ray, and only here: connecting to a cluster, starting one actor per worker, and keeping every
worker busy with tasks while Ray retries what a lost worker was running.

    cluster = RayCluster.connect("local")          # or "auto", "ray://head:10001", "head:6379"
    pool = cluster.pool(SegmenterWorker, (Shared(cluster.put(blob)), options), workers=4, cpus=1, max_retries=3)
    for tag, outcome, worker in pool.map(items):   # items: (tag, method, args_fn)
        ...
    cluster.close()

Each worker is an actor with `max_restarts` and `max_task_retries`: when its process dies, Ray
starts a new one (the constructor runs again, so the bundle is opened again from the object
store) and runs again every task that was queued on it. Python exceptions other than user errors
are retried too (`retry_exceptions`); user errors are returned as data by the workers, because
running a bad input again cannot help.
"""
from __future__ import annotations

import logging
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from edgeseg.errors import EdgesegError, option

log = logging.getLogger("edgeseg.cluster")

LOCAL_OBJECT_STORE = 1 << 30  # bytes of shared memory a local cluster may use for objects (spills to disk beyond)
QUEUE_DEPTH = 2  # tasks queued per worker: the next task's arguments are there when one ends
CLOSE_TIMEOUT_S = 10.0  # for the workers to remove their folders before they are killed


class ClusterError(EdgesegError, RuntimeError):
    """A cluster that cannot be reached or used; the message names the fix."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError(f"{option('cluster')} needs Ray: pip install 'edgeseg[cluster]' (on this machine and every worker)") from None
    return ray


def check_address(spec: str) -> str:
    """local | auto | ray://HOST:PORT | HOST:PORT (a cluster's GCS address)."""
    s = str(spec).strip()
    if s in ("local", "auto") or re.fullmatch(r"ray://[^\s/:]+:\d{1,5}", s) or re.fullmatch(r"[^\s/:]+:\d{1,5}", s):
        return s
    raise ClusterError(f"{option('cluster')} takes local (start Ray here), auto (the cluster this machine belongs to), "
                       f"ray://HOST:PORT (Ray Client) or HOST:PORT (a head node's address); got {spec!r}")


@dataclass
class TaskFailure:
    """A task that failed after Ray's retries (or whose input cannot be used)."""

    error: str
    retryable: bool = True


class RayCluster:
    """A connection to Ray. `connect("local")` starts a private local instance (no dashboard) and
    stops it on `close()`; a connection this process already had (`ray.init()` by the caller) is
    used as it is and left open."""

    def __init__(self, ray, address: str, owned: bool, started_s: float):
        self.ray, self.address, self.owned, self.started_s = ray, address, owned, started_s

    @classmethod
    def connect(cls, spec: str = "local", num_cpus: int | None = None, object_store_memory: int | None = None) -> "RayCluster":
        spec = check_address(spec)
        ray = import_ray()
        t0 = time.perf_counter()
        if ray.is_initialized():
            log.info("using this process's Ray connection")
            return cls(ray, spec, False, 0.0)
        options: dict[str, Any] = {"logging_level": logging.WARNING, "namespace": "edgeseg"}
        if spec == "local":
            options.update(address="local", num_cpus=num_cpus, include_dashboard=False,
                           object_store_memory=object_store_memory or LOCAL_OBJECT_STORE)
        else:
            options["address"] = spec
        try:
            ray.init(**options)
        except (ConnectionError, TimeoutError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            how = ("start one with `ray start --head` (then connect with auto), or start one here with local" if spec != "local"
                   else "check free memory and space in /tmp (Ray's session folder)")
            raise ClusterError(f"cannot {'start a local Ray instance' if spec == 'local' else f'reach the Ray cluster at {spec}'}: "
                               f"{first}; {how}") from None
        return cls(ray, spec, True, time.perf_counter() - t0)

    def cpus(self) -> int:
        return int(self.ray.cluster_resources().get("CPU", 0))

    def put(self, value):
        return self.ray.put(value)

    def pool(self, cls: type, args: tuple, workers: int, cpus: float = 1, max_retries: int = 3) -> "WorkerPool":
        return WorkerPool(self, cls, args, workers, cpus, max_retries)

    def close(self) -> None:
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()
        self.owned = False


@dataclass(frozen=True)
class Shared:
    """An object-store reference for every worker's constructor. It travels nested, so Ray does
    not resolve it; the worker fetches it when it builds its object."""

    ref: Any


class _Host:
    """The actor. It builds `cls(*setup)` on its first call rather than in its constructor, and
    every call carries `setup`: an actor whose constructor takes object-store arguments may fail
    to restart (ray-project/ray#53727), while these references stay pinned by the pool, so a
    restarted process rebuilds its object from them on the first task it is given."""

    def __init__(self, cls: type):
        self.cls, self.obj = cls, None

    def call(self, setup: tuple, method: str, *args):
        if self.obj is None:
            import ray

            self.obj = self.cls(*(ray.get(a.ref) if isinstance(a, Shared) else a for a in setup))
        return getattr(self.obj, method)(*args)

    def close(self) -> None:
        """Let the object remove what it holds (its unpacked bundle) before the process is killed."""
        obj, self.obj = self.obj, None
        if obj is not None and hasattr(obj, "close"):
            obj.close()


@dataclass
class _Worker:
    handle: Any
    pid: int | None = None
    alive: bool = True
    restarts: int = 0


@dataclass
class _Pending:
    tag: Any
    method: str
    args: Callable[[], tuple]
    attempts: int = 0


class WorkerPool:
    """N actors of `cls(*args)`; `map` runs items on them, at most QUEUE_DEPTH queued per worker."""

    def __init__(self, cluster: RayCluster, cls: type, args: tuple, workers: int, cpus: float, max_retries: int):
        ray = self.ray = cluster.ray
        if workers < 1:
            raise ClusterError(f"need at least one worker, got {workers}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ClusterError(f"{option('max_retries')} must be 0 or more, got {max_retries!r}")
        self.max_retries = max_retries
        have = cluster.cpus()
        if workers * cpus > have:  # the actors that do not fit would wait for CPUs forever
            raise ClusterError(f"{workers} worker(s) of {cpus} CPU(s) need {workers * cpus} CPUs but the cluster has {have}; "
                               f"use at most {max(1, have // max(cpus, 1))} ({option('workers')}) or fewer CPUs each "
                               f"({option('worker_cpus')})")
        self.setup = args  # holds the Shared references (pinned) for as long as the pool lives
        remote = ray.remote(_Host).options(num_cpus=cpus, max_restarts=max_retries, max_task_retries=max_retries)
        t0 = time.perf_counter()
        self.workers = [_Worker(remote.remote(cls)) for _ in range(workers)]
        try:
            infos = ray.get([w.handle.call.remote(self.setup, "info") for w in self.workers])
        except ray.exceptions.RayActorError as e:
            self.close()
            raise ClusterError(f"the workers could not start: {_cause(e)}; is edgeseg installed on every node "
                               "(pip install 'edgeseg[cluster]')?") from None
        except ray.exceptions.RayTaskError as e:
            self.close()
            raise ClusterError(f"the workers could not start: {_cause(e)}") from None
        for w, info in zip(self.workers, infos):
            w.pid = info["pid"]
        self.infos = infos
        self.startup_s = time.perf_counter() - t0
        self.retried = 0

    def map(self, items: Iterable[tuple[Any, str, Callable[[], tuple]]]) -> Iterator[tuple[Any, Any, int, bool]]:
        """Run `(tag, method, args_fn)` items; yields `(tag, outcome, worker_index, retried)` as they
        finish, outcome being the method's return value or a TaskFailure. args_fn is called when the
        item is submitted (so large arguments are put in the object store only then)."""
        ray = self.ray
        queue = deque(_Pending(tag, method, fn) for tag, method, fn in items)
        inflight: dict[Any, tuple[_Pending, int, int | None]] = {}
        queued = [0] * len(self.workers)

        def submit(i: int) -> None:
            w = self.workers[i]
            while w.alive and queued[i] < QUEUE_DEPTH and queue:
                p = queue.popleft()
                p.attempts += 1
                call = w.handle.call.options(retry_exceptions=True, max_task_retries=self.max_retries)
                ref = call.remote(self.setup, p.method, *p.args())
                inflight[ref] = (p, i, w.pid)
                queued[i] += 1

        try:
            yield from self._collect(queue, inflight, queued, submit)
        finally:
            for ref in inflight:  # the caller stopped early: drop what the workers still hold
                try:
                    ray.cancel(ref)
                except Exception:
                    pass

    def _collect(self, queue, inflight, queued, submit):
        ray = self.ray
        for i in range(len(self.workers)):
            submit(i)
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                p, i, pid_at_submit = inflight.pop(ref)
                w = self.workers[i]
                queued[i] -= 1
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayActorError as e:  # the worker is gone for good (restarts used up)
                    w.alive = False
                    if p.attempts <= self.max_retries and any(x.alive for x in self.workers):
                        queue.append(p)
                        self.retried += 1
                    else:
                        yield p.tag, TaskFailure(f"worker lost: {_cause(e)}"), i, True
                except ray.exceptions.RayTaskError as e:
                    yield p.tag, TaskFailure(_cause(e)), i, p.attempts > 1
                except ray.exceptions.RayError as e:
                    yield p.tag, TaskFailure(_cause(e)), i, p.attempts > 1
                else:
                    pid = value.get("info", {}).get("pid") if isinstance(value, dict) else None
                    retried = p.attempts > 1
                    if pid is not None and pid_at_submit is not None and pid != pid_at_submit:
                        retried = True  # queued on a process that died; Ray ran it again on the restarted one
                    if pid is not None and pid != w.pid:
                        w.pid, w.restarts = pid, w.restarts + 1
                    self.retried += retried
                    yield p.tag, value, i, retried
                for j in [i] + [k for k in range(len(self.workers)) if k != i]:
                    submit(j)
            if not inflight and queue:  # every worker is gone
                while queue:
                    yield queue.popleft().tag, TaskFailure("no worker left: every worker was lost"), -1, True

    @property
    def restarts(self) -> int:
        return sum(w.restarts for w in self.workers)

    def close(self) -> None:
        # ray.kill ends a process at once (no finalizers), so each worker cleans up first; one that
        # does not answer in time leaves its folders to the next worker started on its machine
        closing = [w.handle.close.remote() for w in self.workers if w.alive]
        if closing:
            try:
                self.ray.wait(closing, num_returns=len(closing), timeout=CLOSE_TIMEOUT_S)
            except Exception:  # a worker already gone
                pass
        for w in self.workers:
            try:
                self.ray.kill(w.handle, no_restart=True)
            except Exception:  # already gone
                pass
        self.workers = []


def _cause(e: BaseException) -> str:
    """The first line that says what went wrong, without Ray's traceback wrapping."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        text = str(cause).strip()
        return f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith((" ", "Traceback"))]
    return lines[-1][:300] if lines else type(e).__name__


__all__ = ["RayCluster", "WorkerPool", "Shared", "TaskFailure", "ClusterError", "check_address", "import_ray"]
