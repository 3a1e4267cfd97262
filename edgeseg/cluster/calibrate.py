"""`edgeseg calibrate --cluster`: the INT8 candidates of the per-layer sensitivity pass and the
mixed-precision search, each quantized and scored on a worker.

    with RayCandidates("local", workers=2) as candidates:
        calibrate_bundle("bundle/", "frames/", candidates=candidates)

Every worker gets the FP32 graph and the evaluator (the held-out frames, preprocessed, and FP32's
results on them) once; a candidate is then a list of layer names going out and a few figures
coming back. A candidate is the same file wherever it is built (ONNX Runtime's quantizer with the
same ranges) and scored on the same frames, so the search decides exactly as it does on one
machine; it only learns the figures sooner.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

from edgeseg.cluster.worker import scratch_dir
from edgeseg.errors import EdgesegError


class CandidateWorker:
    """One copy of the FP32 graph and the evaluator; quantizes and scores the candidates it is given."""

    def __init__(self, evaluator, model: bytes, threads: int | None = None):
        self._tmp = scratch_dir("calibrate")
        self.model = self._tmp / "fp32.onnx"
        self.model.write_bytes(model)
        self.evaluator = evaluator
        self.evaluator.threads = threads  # the CPUs this worker reserved, not every core of its node
        self._ranges: dict[str, Path] = {}

    def info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname()}

    def candidate(self, ranges: bytes, method: str, target: str, kind: str, names: list[str]) -> dict:
        """kind "quick": only `names` quantized, scored on the sensitivity frames; "measure": every
        layer but `names` quantized, scored on every held-out frame."""
        from calibration.quantize import quantize_model

        key = hashlib.sha256(ranges).hexdigest()[:16]
        if key not in self._ranges:
            self._ranges[key] = self._tmp / f"ranges.{key}.json"
            self._ranges[key].write_bytes(ranges)
        out = self._tmp / "candidate.onnx"
        if kind == "quick":
            quantize_model(self.model, out, self._ranges[key], method, target, nodes_to_quantize=list(names))
            result = self.evaluator.quick(out)
        else:
            quantize_model(self.model, out, self._ranges[key], method, target, nodes_to_exclude=list(names))
            result = self.evaluator.measure(out)
        return {"result": result, "info": self.info()}

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


class RayCandidates:
    """What `calibrate_bundle(candidates=...)` calls to measure candidates: `self(evaluator,
    model_path, ranges_path, method, target)` gives the measurer of one target's candidates, whose
    `quick(groups)` and `measure(float_sets)` return the figures in the order asked, computed on
    the workers (`parallel` of them at once)."""

    def __init__(self, cluster: str = "local", workers: int | None = None, worker_cpus: int = 1, max_retries: int = 3):
        from edgeseg.cluster.session import check_address

        self.address = check_address(cluster)
        self.workers, self.worker_cpus, self.max_retries = workers, worker_cpus, max_retries
        self._cluster = None
        self._pools: dict[tuple, object] = {}

    def __call__(self, evaluator, model_path, ranges_path, method: str, target: str) -> "_Measurer":
        from edgeseg.cluster.session import RayCluster, Shared

        if self._cluster is None:
            self._cluster = RayCluster.connect(self.address)
        key = (id(evaluator), str(model_path))
        if key not in self._pools:  # one pool per evaluation set and graph, shared by the targets
            n = self.workers or max(1, self._cluster.cpus() // self.worker_cpus)
            setup = (Shared(self._cluster.put(evaluator)), Shared(self._cluster.put(Path(model_path).read_bytes())),
                     self.worker_cpus)
            self._pools[key] = self._cluster.pool(CandidateWorker, setup, workers=n, cpus=self.worker_cpus,
                                                  max_retries=self.max_retries)
        return _Measurer(self._pools[key], self._cluster.put(Path(ranges_path).read_bytes()), method, target)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _Measurer:
    def __init__(self, pool, ranges_ref, method: str, target: str):
        self.pool, self.ranges, self.method, self.target = pool, ranges_ref, method, target
        self.parallel = len(pool.workers)
        self.per_worker: dict[str, int] = {}

    def _run(self, kind: str, name_lists: list[list[str]]) -> list[dict]:
        items = [(i, "candidate", lambda names=names: (self.ranges, self.method, self.target, kind, list(names)))
                 for i, names in enumerate(name_lists)]
        out: list[dict | None] = [None] * len(items)
        for i, outcome, _, _ in self.pool.map(items):
            if not isinstance(outcome, dict):
                raise EdgesegError(f"{self.target}: a candidate with {len(name_lists[i])} layer(s) failed on the cluster: "
                                   f"{outcome.error}")
            out[i] = outcome["result"]
            where = f"{outcome['info']['host']}:{outcome['info']['pid']}"
            self.per_worker[where] = self.per_worker.get(where, 0) + 1
        return out

    def stats(self) -> dict:
        return {"where": f"{self.parallel} Ray worker(s)", "candidates": sum(self.per_worker.values()),
                "per_worker": dict(self.per_worker), "retried": self.pool.retried}

    def quick(self, groups: list[list[str]]) -> list[dict]:
        return self._run("quick", groups)

    def measure(self, float_sets: list[list[str]]) -> list[dict]:
        return self._run("measure", float_sets)


__all__ = ["CandidateWorker", "RayCandidates"]
