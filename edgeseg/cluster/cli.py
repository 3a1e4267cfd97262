"""The command-line side of batch and cluster work: the flags `run`, `eval` and `calibrate` add,
and the batch form of `edgeseg run`:

    edgeseg run BUNDLE --source 'archive/**/*.mp4' --out results/ [--cluster local|auto|ray://HOST:PORT]

`run` becomes a batch when a cluster is named, when a batch output is asked for (--table,
--save-masks, --overlay, --chunk-frames), or when the source is a pattern or folder of videos.
"""
from __future__ import annotations

import argparse
import glob as globlib
import os
from pathlib import Path

from edgeseg.cluster.plan import MASK_FORMATS, TABLE_FORMATS, BatchError
from runtime.sources import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

CLUSTER_HELP = ("run on Ray: local (start Ray on this machine), auto (the cluster this machine belongs to), "
                "ray://HOST:PORT (Ray Client) or HOST:PORT (a head node); needs pip install 'edgeseg[cluster]'")


def add_cluster_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """--cluster, --workers, --worker-cpus, shared by run, eval and calibrate."""
    g = p.add_argument_group(f"cluster ({what})")
    g.add_argument("--cluster", metavar="ADDRESS", help=CLUSTER_HELP)
    g.add_argument("--workers", type=int, metavar="N", help="Ray workers, one bundle each (default: the cluster's CPUs / --worker-cpus)")
    g.add_argument("--worker-cpus", type=int, default=1, metavar="C", help="CPUs each worker reserves and its engine threads (default 1)")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    add_cluster_arguments(p, "many videos; --out is then the results folder")
    g = p.add_argument_group("batch outputs (per source, under --out)")
    g.add_argument("--table", choices=TABLE_FORMATS, help="per-frame class areas (default parquet when pyarrow is installed, else csv)")
    g.add_argument("--save-masks", choices=MASK_FORMATS, help="also save each frame's class map: png (one file per frame) or rle (COCO)")
    g.add_argument("--overlay", action="store_true", help="also write each source's overlay video")
    g.add_argument("--chunk-frames", type=int, metavar="N", help="split videos longer than N frames into tasks of N frames")
    g.add_argument("--max-retries", type=int, default=3, metavar="N", help="times Ray restarts a lost worker and reruns its tasks (default 3)")
    g.add_argument("--ship-sources", action="store_true",
                   help="send each video to the workers through Ray (for workers that do not see the files at the same path)")


def wants_batch(args) -> bool:
    if args.cluster or args.table or args.save_masks or args.overlay or args.chunk_frames:
        return True
    return is_video_collection(args.source)


def is_video_collection(source: str) -> bool:
    """A pattern that matches videos, or a folder holding videos and no images."""
    s = os.path.expanduser(str(source))
    if any(ch in s for ch in "*?[") and not os.path.exists(s):
        return any(Path(p).suffix.lower() in VIDEO_EXTENSIONS for p in globlib.iglob(s, recursive=True))
    if os.path.isdir(s):
        here = [p for p in Path(s).iterdir() if p.is_file()]
        if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in here):
            return False
        return any(p.suffix.lower() in VIDEO_EXTENSIONS for p in Path(s).rglob("*"))
    return False


def default_table() -> str:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return "csv"
    return "parquet"


def run_batch(args, labels) -> int:
    """`edgeseg run` over many videos (see the module docstring)."""
    from edgeseg.cluster.batch import BatchSegmenter, ConsoleProgress

    for flag, value in (("--show", args.show), ("--serve", args.serve), ("--loop", args.loop), ("--stats-json", args.stats_json)):
        if value:
            raise BatchError(f"{flag} is for one stream; a batch run writes each source's results under --out (drop {flag})")
    if not args.out:
        raise BatchError("a batch run writes its results into a folder: add --out results/")
    with BatchSegmenter(args.bundle, args.cluster, workers=args.workers, worker_cpus=args.worker_cpus, max_retries=args.max_retries,
                        ship_sources=args.ship_sources, threads=args.threads, backend=args.backend, precision=args.precision,
                        smoothing=args.smoothing or None, keep=labels(args.keep), ignore=labels(args.ignore),
                        threshold=args.threshold, stage_nice=args.stage_nice) as batch:
        show = ConsoleProgress()
        try:
            summary = batch.run(args.source, args.out, table=args.table or default_table(), masks=args.save_masks,
                                overlay=args.overlay, chunk_frames=args.chunk_frames, max_frames=args.frames, alpha=args.alpha,
                                mode=args.mode, legend=args.legend, progress=show)
        finally:
            show.close()
    print(summary.format())
    return 0 if summary.ok else 1


__all__ = ["add_cluster_arguments", "add_run_arguments", "wants_batch", "run_batch", "is_video_collection"]
