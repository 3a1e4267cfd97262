"""Batch throughput on Ray with 1 and 2 workers against the plain single-process `edgeseg run`
over the same files, and what each task costs beyond its frames; side by side in one run.

    python benchmarks/cluster_scaling.py                         # default model, 8 clips of 60 frames at 640x360
    python benchmarks/cluster_scaling.py --videos 12 --frames 120 --rounds 5 --bundle my_bundle/

Each round runs, back to back on the same files, (a) `edgeseg run BUNDLE --source 'clips/*.mp4'
--out plain/` as its own process (no Ray), (b) the same batch on a local Ray instance with one
worker and (c) with two, so drift in the host's speed hits all of them alike; medians are
printed. "processing FPS" is frames over the time from the first task sent to the last result
written; "wall" adds what each needs before that (process start and bundle load for (a), making
the workers and shipping them the bundle for (b)/(c), which a long batch pays once).

Per-task overhead: `--tiny-tasks` one-frame clips go through one worker, then through the same
code in this process; the difference per task is what a task costs on Ray beyond what it costs
anyway (opening the video, starting the pipeline, writing its part). Two tasks are queued per
worker, so the round trip of one overlaps the work of the next; the round trip of an empty call,
one at a time, is printed too. The sizes of what travels (task, result per frame, bundle) are
printed for the cost model in docs/cluster.md.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_clips(folder: Path, n: int, frames: int, size: tuple[int, int], prefix: str = "clip") -> list[Path]:
    from runtime.sources import write_synthetic_clip

    return [write_synthetic_clip(folder / f"{prefix}{i:03d}.mp4", frames=frames, size=size, seed=i) for i in range(n)]


def plain_run(bundle: Path, clips: Path, out: Path) -> dict:
    """`edgeseg run` as a user runs it: its own process, no cluster."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "edgeseg.cli", "run", str(bundle), "--source", str(clips / "*.mp4"),
                        "--out", str(out), "--quiet"], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"plain run failed:\n{r.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {"frames": s["frames"], "processing_s": s["processing_s"], "wall_s": wall}


def cluster_run(bundle: Path, clips: Path, out: Path, workers: int, ship: bool = False, cpus: int = 1) -> dict:
    from edgeseg.cluster import BatchSegmenter

    t0 = time.perf_counter()
    with BatchSegmenter(bundle, cluster="auto", workers=workers, worker_cpus=cpus, ship_sources=ship) as batch:
        s = batch.run(str(clips / "*.mp4"), out)
    wall = time.perf_counter() - t0
    if not s.ok or not s.frames:
        raise SystemExit(f"cluster run failed:\n{s.format()}")
    return {"frames": s.frames, "processing_s": s.processing_s, "wall_s": wall, "startup_s": s.startup_s,
            "busy_s": sum(w.busy_s for w in s.workers), "tasks": s.tasks, "summary": s}


def in_process_tasks(bundle: Path, clips: Path, out: Path) -> dict:
    from edgeseg.cluster import BatchSegmenter

    with BatchSegmenter(bundle) as batch:
        batch._start()  # the bundle is opened before the clock starts, as on the workers
        s = batch.run(str(clips / "*.mp4"), out)
    return {"frames": s.frames, "processing_s": s.processing_s, "tasks": s.tasks,
            "busy_s": sum(w.busy_s for w in s.workers)}


def round_trip_ms(bundle: Path, n: int = 50) -> float:
    """Latency of an empty call on a worker (sent, run, answered), one at a time."""
    import ray

    from edgeseg.bundle import Bundle
    from edgeseg.cluster.session import RayCluster, Shared
    from edgeseg.cluster.worker import SegmenterWorker, pack_bundle

    cluster = RayCluster.connect("auto")
    pool = cluster.pool(SegmenterWorker, (Shared(cluster.put(pack_bundle(Bundle.load(bundle)))), {"threads": 1}), workers=1)
    try:
        w = pool.workers[0].handle
        ray.get(w.call.remote(pool.setup, "info"))
        t0 = time.perf_counter()
        for _ in range(n):
            ray.get(w.call.remote(pool.setup, "info"))
        return (time.perf_counter() - t0) / n * 1e3
    finally:
        pool.close()


def sizes(bundle: Path, clip: Path) -> dict:
    """Bytes of what travels: the bundle (once per worker), a task, a result per frame."""
    from edgeseg.bundle import Bundle
    from edgeseg.cluster.batch import BatchSegmenter
    from edgeseg.cluster.plan import find_sources, plan_tasks
    from edgeseg.cluster.worker import SegmenterWorker, pack_bundle

    b = Bundle.load(bundle)
    task = plan_tasks(find_sources(clip))[0]
    out = {"bundle": len(pack_bundle(b))}
    batch = BatchSegmenter(b)
    worker = SegmenterWorker(b.path)
    try:
        for masks in (None, "png"):
            spec = batch.spec(masks=masks)
            out["task"] = len(pickle.dumps((task, spec)))
            r = worker.process(task, spec)
            frames = r["info"]["frames"]
            out[f"result_per_frame_{masks or 'table'}"] = len(pickle.dumps(r)) / frames
        spec = batch.spec(overlay=True)
        r = worker.process(task, spec)
        out["overlay_per_frame"] = len(r["overlay"]) / r["info"]["frames"]
        out["video_per_frame"] = os.path.getsize(clip) / r["info"]["frames"]
    finally:
        worker.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", help="bundle folder (default: the embedded default model, converted here)")
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--frames", type=int, default=60, help="frames per clip")
    ap.add_argument("--size", type=int, nargs=2, default=(360, 640), metavar=("H", "W"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tiny-tasks", type=int, default=40, help="one-frame clips for the per-task overhead")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray instance")
    args = ap.parse_args()
    med = statistics.median

    import ray

    work = Path(tempfile.mkdtemp(prefix="edgeseg-cluster-bench-"))
    try:
        if args.bundle:
            bundle = Path(args.bundle)
        else:
            from converters.onnx import convert

            bundle = convert("default", work / "bundle").path
        clips = work / "clips"
        make_clips(clips, args.videos, args.frames, tuple(args.size))
        tiny = work / "tiny"
        make_clips(tiny, args.tiny_tasks, 1, tuple(args.size), prefix="tiny")
        travel = sizes(bundle, next(clips.iterdir()))

        t0 = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING", object_store_memory=1 << 30)
        ray_start = time.perf_counter() - t0
        variants = {
            "plain": lambda out: plain_run(bundle, clips, out),
            "1 worker": lambda out: cluster_run(bundle, clips, out, 1),
            "2 workers": lambda out: cluster_run(bundle, clips, out, 2),
            f"1 worker x {args.cpus} CPUs": lambda out: cluster_run(bundle, clips, out, 1, cpus=args.cpus),
        }
        runs: dict[str, list[dict]] = {k: [] for k in variants}
        for r in range(args.rounds):
            for k, fn in variants.items():
                out = work / f"run-{r}-{len(runs[k])}-{k.replace(' ', '')}"
                runs[k].append(fn(out))
                shutil.rmtree(out, ignore_errors=True)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]['frames'] / v[-1]['processing_s']:.1f} FPS"
                                                            for k, v in runs.items()), file=sys.stderr, flush=True)
        over_cluster = [cluster_run(bundle, tiny, work / f"tiny-ray{r}", 1) for r in range(args.rounds)]
        over_ship = [cluster_run(bundle, tiny, work / f"tiny-ship{r}", 1, ship=True) for r in range(args.rounds)]
        over_local = [in_process_tasks(bundle, tiny, work / f"tiny-local{r}") for r in range(args.rounds)]
        latency = med([round_trip_ms(bundle) for _ in range(args.rounds)])
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    frames = runs["plain"][0]["frames"]
    print(f"cluster_scaling: {args.videos} clips x {args.frames} frames at {args.size[1]}x{args.size[0]} ({frames} frames), "
          f"bundle {bundle.name}; local Ray with {args.cpus} CPUs on {os.cpu_count()} cores; medians of {args.rounds} rounds")
    print(f"{'run':<20} {'processing FPS':>14} {'wall s':>8} {'setup s':>8}  vs plain (processing)")
    base = med([x["frames"] / x["processing_s"] for x in runs["plain"]])
    for name, xs in runs.items():
        fps = med([x["frames"] / x["processing_s"] for x in xs])
        wall = med([x["wall_s"] for x in xs])
        setup = med([x["wall_s"] - x["processing_s"] for x in xs])
        print(f"{name:<20} {fps:>14.1f} {wall:>8.2f} {setup:>8.2f}  {fps / base:.2f}x")
    one = med([x["frames"] / x["processing_s"] for x in runs["1 worker"]])
    two = med([x["frames"] / x["processing_s"] for x in runs["2 workers"]])
    print(f"2 workers / 1 worker: {two / one:.2f}x;  ray.init (local, once): {ray_start:.1f} s;  "
          f"workers ready (bundle shipped and opened): {med([x['startup_s'] for x in runs['2 workers']]):.2f} s for 2")
    n = args.tiny_tasks
    per_ray = med([x["processing_s"] / n for x in over_cluster]) * 1e3
    per_ship = med([x["processing_s"] / n for x in over_ship]) * 1e3
    per_local = med([x["processing_s"] / n for x in over_local]) * 1e3
    busy = med([x["busy_s"] / n for x in over_cluster]) * 1e3
    print(f"per task ({n} one-frame clips, 1 worker): {per_ray:.1f} ms on Ray ({busy:.1f} ms of it inside the worker), "
          f"{per_ship:.1f} ms with --ship-sources, {per_local:.1f} ms in this process -> overhead {per_ray - per_local:.1f} ms "
          f"per task ({per_ship - per_local:.1f} ms shipping the clip); an empty call's round trip {latency:.2f} ms")
    print(f"travels: bundle {travel['bundle'] / 1e6:.2f} MB once per worker; task {travel['task']} B; result per frame "
          f"{travel['result_per_frame_table']:.0f} B (table), {travel['result_per_frame_png']:.0f} B with PNG masks, "
          f"+{travel['overlay_per_frame']:.0f} B with the overlay; the video itself {travel['video_per_frame']:.0f} B per frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
