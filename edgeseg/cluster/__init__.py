"""Batch work across machines, on Ray: many videos through a bundle, evaluation shards and
calibration candidates, each on a worker that opened the bundle once.

    plan.py      the sources a pattern names, the tasks they split into, the output options
    worker.py    SegmenterWorker: one Segmenter, tasks -> result parts (in this process or in an actor)
    outputs.py   FrameRecorder (per-frame areas, masks) and ResultStore (atomic parts, merge, done.json)
    session.py   Ray: connect, one actor per worker, tasks kept flowing, retries (the only module importing ray)
    batch.py     BatchSegmenter: `edgeseg run --source 'archive/**/*.mp4' --out results/ [--cluster ...]`

Ray is an optional extra (`pip install 'edgeseg[cluster]'`): nothing imports it until a cluster is
asked for. The names below load on first use.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "BatchSegmenter": "edgeseg.cluster.batch",
    "BatchSummary": "edgeseg.cluster.batch",
    "read_table": "edgeseg.cluster.outputs",
    "find_sources": "edgeseg.cluster.plan",
    "RayCluster": "edgeseg.cluster.session",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'edgeseg.cluster' has no attribute {name!r}")
    obj = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = obj
    return obj
