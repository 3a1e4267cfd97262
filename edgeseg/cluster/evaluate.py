"""`edgeseg eval --cluster`: the evaluation frames in shards across workers, one confusion matrix
per artifact and shard, summed. Confusion matrices and agreement counts are integers, so the
sum over shards is exactly the single-machine figure, and the scores derive from it the same way.

Workers read the frames themselves (a dataset spec such as `synthetic:test` is generated where it
is read; a dataset folder must be at the same path on every worker); the bundle is shipped.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np

from edgeseg.bundle import Bundle
from edgeseg.cluster.worker import pack_bundle, scratch_dir, unpack_bundle

log = logging.getLogger("edgeseg.cluster")

SHARDS_PER_WORKER = 2  # a slow shard then holds up less of the run


class EvalWorker:
    """A copy of the bundle and the shards of evaluation frames it is given."""

    def __init__(self, blob: bytes, threads: int | None = None):
        self._tmp = scratch_dir("eval")
        self.bundle = Bundle.load(unpack_bundle(blob, self._tmp / "bundle"))
        self.threads = threads

    def info(self) -> dict:
        import os
        import socket

        return {"pid": os.getpid(), "host": socket.gethostname()}

    def shard(self, data, split: str, default_n: int, indices: list[int], artifacts: list[str]) -> dict:
        """Confusion matrices of `artifacts` (paths in the bundle) on the frames at `indices`, and
        per artifact the pixels that agree with the first (FP32) one."""
        from calibration.data import open_source
        from calibration.evaluate import load_eval_set, onnx_runner, predict
        from edgeseg.metrics import ConfusionMatrix

        t0 = time.perf_counter()
        man = self.bundle.manifest
        src = open_source(data, split=split, preprocess=man.preprocess, default_n=default_n)
        evalset = load_eval_set(src, man.preprocess, indices=indices, max_images=None, require_labels=True)
        out = {"frames": len(evalset), "matrices": {}, "agree": {}, "errors": {}, "seconds": {}, "info": self.info()}
        reference = None
        for path in artifacts:
            a0 = time.perf_counter()
            art = next(a for a in man.artifacts if a.path == path)
            try:
                maps = predict(onnx_runner(self.bundle.artifact_path(art), self.threads), evalset, man.preprocess, man.output_kind)
            except Exception as e:  # as evaluate_bundle: a graph this ONNX Runtime cannot run is skipped
                if art.precision == "fp32":
                    raise
                out["errors"][path] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                continue
            cm = ConfusionMatrix(len(man.labels), evalset.ignore_index)
            for pred, mask in zip(maps, evalset.masks):
                cm.update(pred, mask)
            out["matrices"][path] = cm.matrix
            if reference is None and art.precision == "fp32":
                reference = maps
            if reference is not None:
                out["agree"][path] = (sum(int(np.count_nonzero(a == b)) for a, b in zip(maps, reference)),
                                      sum(a.size for a in maps))
            out["seconds"][path] = time.perf_counter() - a0
        out["total_s"] = time.perf_counter() - t0
        return out

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


def split_shards(indices: list[int], n: int) -> list[list[int]]:
    """`n` contiguous, nearly equal shards (fewer when there are fewer frames)."""
    n = max(1, min(n, len(indices)))
    bounds = np.linspace(0, len(indices), n + 1).round().astype(int)
    return [indices[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def evaluate_bundle_on_cluster(bundle, data, *, cluster: str = "local", workers: int | None = None, worker_cpus: int = 1,
                               max_images: int | None = 200, split: str | None = None, max_retries: int = 3) -> dict:
    """`calibration.evaluate.evaluate_bundle` with the frames sharded over Ray workers; the same
    result (figures identical), plus a "cluster" entry with the shards and the time they took."""
    from calibration.data import CalibrationError, open_source, sample_indices
    from calibration.evaluate import DEFAULT_EVAL_IMAGES, _check_labels, default_eval_split
    from edgeseg.cluster.session import RayCluster, Shared
    from edgeseg.metrics import ConfusionMatrix

    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    man = bundle.manifest
    split = split or default_eval_split(data)
    default_n = max_images or DEFAULT_EVAL_IMAGES
    src = open_source(data, split=split, preprocess=man.preprocess, default_n=default_n)
    if not src.labelled:
        raise CalibrationError(f"{src.description} has no masks; accuracy needs labelled data: a dataset spec "
                               "(synthetic:test, voc:/path ...) or a folder with images/ and masks/")
    if src.kind == "arrays" or not isinstance(data, (str, Path)):
        raise CalibrationError("evaluation on a cluster reads the data on each worker: pass a dataset spec or a path")
    indices = sample_indices(len(src), max_images if max_images else len(src))
    fp32 = bundle.find("onnxruntime", "fp32")
    order = fp32 + [a for a in man.artifacts if a not in fp32]
    runnable, skipped = [], []
    for art in order:
        if art.backend != "onnxruntime":
            skipped.append({"path": art.path, "backend": art.backend, "precision": art.precision,
                            "reason": f"{art.backend} artifacts do not run on this machine's ONNX Runtime"})
            continue
        bundle.verify_artifact(art)
        runnable.append(art)

    t0 = time.perf_counter()
    ray = RayCluster.connect(cluster)
    try:
        n = workers or max(1, ray.cpus() // worker_cpus)
        pool = ray.pool(EvalWorker, (Shared(ray.put(pack_bundle(bundle))), worker_cpus), workers=n, cpus=worker_cpus,
                        max_retries=max_retries)
        startup = time.perf_counter() - t0
        shards = split_shards(indices, n * SHARDS_PER_WORKER)
        paths = [a.path for a in runnable]
        outs: list[dict] = [None] * len(shards)
        t1 = time.perf_counter()
        try:
            for i, outcome, _, _ in pool.map((i, "shard", lambda s=s: (data, split, default_n, s, paths)) for i, s in enumerate(shards)):
                if not isinstance(outcome, dict):
                    raise CalibrationError(f"evaluation shard {i + 1} of {len(shards)} failed: {outcome.error}")
                outs[i] = outcome
        finally:
            pool.close()
        wall = time.perf_counter() - t1
    finally:
        ray.close()

    frames = sum(o["frames"] for o in outs)
    if frames != len(indices):
        raise CalibrationError(f"the workers read {frames} frames of {len(indices)}; is {data} the same on every worker?")
    evalset_labels = src.labels
    _check_labels(_LabelsOnly(evalset_labels, src.description), man.labels)
    rows, reference = [], None
    for art in runnable:
        errors = [o["errors"][art.path] for o in outs if art.path in o["errors"]]
        if errors:
            skipped.append({"path": art.path, "backend": art.backend, "precision": art.precision,
                            "reason": f"ONNX Runtime (CPU) cannot run it here: {errors[0]}"})
            continue
        cm = ConfusionMatrix(len(man.labels), src.ignore_index)
        for o in outs:
            cm.matrix += o["matrices"][art.path]
        row = {"path": art.path, "backend": art.backend, "precision": art.precision, "target": art.target,
               **cm.summary(man.labels), "seconds": round(sum(o["seconds"][art.path] for o in outs), 2)}
        if reference is None and art.precision == "fp32":
            reference = (art.path, row["miou"])
        if reference is not None:
            same = sum(o["agree"][art.path][0] for o in outs)
            total = sum(o["agree"][art.path][1] for o in outs)
            row["agreement_with_fp32"] = same / total if total else float("nan")
            row["miou_drop_points"] = 100.0 * (reference[1] - row["miou"])
        rows.append(row)
    return {"model": str(bundle.path), "data": src.description, "frames": frames, "labels": man.labels,
            "reference": reference[0] if reference else None, "results": rows, "skipped": skipped,
            "cluster": {"address": cluster, "workers": n, "shards": len(shards), "startup_s": round(startup, 2),
                        "seconds": round(wall, 2)}}


class _LabelsOnly:
    """What `_check_labels` reads of an evaluation set."""

    def __init__(self, labels, description: str):
        self.dataset_labels, self.description = labels, description


__all__ = ["EvalWorker", "evaluate_bundle_on_cluster", "split_shards"]
