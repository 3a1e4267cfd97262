"""Batch runs of many videos, on Ray and in one process: the same per-frame results either way,
retries after a lost worker, reruns that skip finished work, sharded evaluation with the
single-machine figures. One local Ray instance (2 CPUs) serves the whole module."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgeseg.cli import main
from tests.conftest import ROOT

ray = pytest.importorskip("ray", reason="Ray is the optional extra edgeseg[cluster]")

# (folder, name, frames, seed): six short clips in two folders, one long enough to be split
VIDEOS = [("cam0", "a.mp4", 9, 1), ("cam0", "b.mp4", 6, 2), ("cam0", "c.avi", 5, 3),
          ("cam1", "d.mp4", 7, 4), ("cam1", "e.mp4", 5, 5), ("cam1/night", "f.mp4", 6, 6)]


@pytest.fixture(scope="module")
def ray_address():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20, logging_level="WARNING",
             namespace="edgeseg-tests")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    from runtime.sources import write_synthetic_clip

    root = tmp_path_factory.mktemp("archive")
    for folder, name, frames, seed in VIDEOS:
        write_synthetic_clip(root / folder / name, frames=frames, size=(72, 96), seed=seed)
    (root / "cam1" / "notes.txt").write_text("not a video")
    return root


@pytest.fixture(scope="module")
def plain(default_bundle, videos, tmp_path_factory):
    """`edgeseg run` of each video alone, in this process: the reference outputs, by source key."""
    out = tmp_path_factory.mktemp("plain")
    refs = {}
    for folder, name, _, _ in VIDEOS:
        dest = out / folder
        assert main(["run", str(default_bundle.path), "--source", str(videos / folder / name), "--out", str(dest),
                     "--save-masks", "png"]) == 0
        refs[f"{folder}/{name}"] = dest / name
    return refs


def pattern(videos) -> str:
    return str(videos / "**" / "*.*")


def scratch_of(pids) -> list[str]:
    """The folders that processes `pids` hold in the system's temporary folder (`scratch_dir`)."""
    return [p.name for p in Path(tempfile.gettempdir()).iterdir() if any(p.name.startswith(f".edgeseg-tmp-{pid}-") for pid in pids)]


def assert_same_outputs(results: Path, plain: dict, masks: bool = True) -> None:
    from edgeseg.cluster.outputs import read_table

    for key, ref in plain.items():
        got, want = read_table(results / key / "areas.parquet"), read_table(ref / "areas.parquet")
        assert list(got) == list(want) and got["frame"].size == want["frame"].size > 0, key
        for col in want:
            assert np.array_equal(got[col], want[col]), f"{key}: column {col} differs"
        if masks:
            names = sorted(p.name for p in (ref / "masks").iterdir())
            assert sorted(p.name for p in (results / key / "masks").iterdir()) == names
            for n in names:
                assert (results / key / "masks" / n).read_bytes() == (ref / "masks" / n).read_bytes(), f"{key}/{n}"


def test_plain_run_records_what_the_segmenter_sees(default_bundle, videos, plain):
    """The reference itself: areas are the pixel counts of Segmenter.segment's class maps."""
    from edgeseg.cluster.outputs import read_table
    from runtime.segmenter import Segmenter

    table = read_table(plain["cam0/a.mp4"] / "areas.parquet")
    seg = Segmenter(default_bundle)
    cap = cv2.VideoCapture(str(videos / "cam0" / "a.mp4"))
    n = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        cm = seg.segment(frame).class_map
        for c, label in enumerate(default_bundle.manifest.labels):
            assert table[f"area:{label}"][n] == np.count_nonzero(cm == c)
        mask = cv2.imread(str(plain["cam0/a.mp4"] / "masks" / f"{n:06d}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(mask, cm)
        n += 1
    assert n == 9 and list(table["frame"]) == list(range(9)) and table["height"][0] == 72 and table["width"][0] == 96


def test_six_videos_on_two_workers_equal_plain_runs(default_bundle, videos, plain, ray_address, tmp_path, capsys):
    out = tmp_path / "results"
    rc = main(["run", str(default_bundle.path), "--source", pattern(videos), "--out", str(out), "--cluster", ray_address,
               "--workers", "2", "--save-masks", "png", "--chunk-frames", "4"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "6 sources on" in printed and "6 done" in printed and "0 failed" in printed and "FPS" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 6 and summary["failed"] == [] and summary["frames"] == sum(v[2] for v in VIDEOS)
    assert summary["tasks"] == 13  # in ranges of 4 frames: 3 for a.mp4 (9 frames), 2 for each of the others
    assert len(summary["workers"]) == 2 and all(w["frames"] > 0 and w["fps"] > 0 for w in summary["workers"])
    assert summary["bundle_bytes"] > 1_000_000
    assert_same_outputs(out, plain)
    assert not any(p.name == ".parts" for p in out.rglob("*"))


def test_lost_worker_is_retried_and_the_result_is_complete(default_bundle, videos, plain, ray_address, tmp_path):
    from edgeseg.cluster import BatchSegmenter

    killed = []

    def kill_first_worker(event):
        if event["event"] == "done" and not killed:  # that worker has its next task queued: kill it mid-run
            assert scratch_of([event["pid"]]), "the worker's unpacked bundle is not where its successor looks"
            os.kill(event["pid"], signal.SIGKILL)
            killed.append(event["pid"])

    with BatchSegmenter(default_bundle.path, cluster=ray_address, workers=2, ship_sources=True) as batch:
        summary = batch.run(pattern(videos), tmp_path / "results", masks="png", progress=kill_first_worker)
    assert killed
    # the killed worker's folders went when its successor started, the others' when the pool closed
    assert scratch_of([killed[0]] + [pid for w in summary.workers for pid in w.pids]) == []
    assert summary.done == 6 and summary.failed == [], summary.format()
    assert summary.retried >= 1 and summary.restarts >= 1, summary.format()
    assert summary.source_bytes == sum(p.stat().st_size for p in videos.rglob("*.*") if p.suffix != ".txt")
    pids = {pid for w in summary.workers for pid in w.pids}
    assert killed[0] in pids and len(pids) >= 3  # two workers, one of them restarted
    assert_same_outputs(tmp_path / "results", plain)


def test_rerun_resumes_and_then_does_nothing(default_bundle, videos, plain, ray_address, tmp_path):
    from edgeseg.cluster import BatchSegmenter

    out = tmp_path / "results"

    class Stop(Exception):
        pass

    seen = []

    def stop_after_three(event):
        if event["event"] == "done":
            seen.append(event["task"])
            if len(seen) == 3:
                raise Stop  # the command dies with tasks still running

    with BatchSegmenter(default_bundle.path, cluster=ray_address, workers=2) as batch:
        with pytest.raises(Stop):
            batch.run(pattern(videos), out, chunk_frames=4, progress=stop_after_three)
        second = batch.run(pattern(videos), out, chunk_frames=4)
        assert second.tasks == 13 - 3 and second.done + second.skipped == 6 and not second.failed, second.format()
        assert_same_outputs(out, plain, masks=False)
        stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "summary.json"}
        third = batch.run(pattern(videos), out, chunk_frames=4)
    assert third.tasks == 0 and third.skipped == 6 and third.frames == 0 and third.workers == []
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "summary.json"} == stamps
    # other options are other results: masks now asked for, so every source runs again
    with BatchSegmenter(default_bundle.path) as batch:
        fourth = batch.run(pattern(videos), out, masks="png")
    assert fourth.done == 6 and fourth.skipped == 0
    assert_same_outputs(out, plain)


def test_eval_on_local_cluster_equals_single_machine(default_bundle, tmp_path):
    from calibration.evaluate import evaluate_bundle

    data = "synthetic:test?n=6"
    single = evaluate_bundle(default_bundle.path, data)
    r = subprocess.run([sys.executable, "-m", "edgeseg.cli", "eval", str(default_bundle.path), "--data", data,
                        "--cluster", "local", "--json", str(tmp_path / "eval.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    sharded = json.loads((tmp_path / "eval.json").read_text())
    assert sharded["cluster"]["workers"] >= 1 and sharded["cluster"]["shards"] >= 2
    assert sharded["frames"] == single["frames"] == 6 and sharded["data"] == single["data"]
    for a, b in zip(sharded["results"], single["results"]):
        assert a["path"] == b["path"]
        assert a["miou"] == b["miou"] and a["per_class_iou"] == b["per_class_iou"]
        assert a["pixel_accuracy"] == b["pixel_accuracy"] and a["agreement_with_fp32"] == b["agreement_with_fp32"]


def test_calibrate_on_cluster_keeps_the_same_float_layers(default_model, ray_address, tmp_path, capsys):
    """A model whose all-INT8 graph misses the budget: the per-layer sensitivity and the float-layer
    search run their candidates on two workers, and decide exactly as on one machine."""
    import shutil
    import warnings

    from calibration import CalibrationWarning, calibrate_bundle
    from converters.onnx import convert
    from edgeseg.spec import Preprocess
    from tests.conftest import outlier_model

    model, _ = outlier_model(default_model)
    here = convert(model, tmp_path / "here", labels=default_model[1]["labels"],
                   preprocess=Preprocess.from_dict(default_model[1]["preprocess"])).path
    there = shutil.copytree(here, tmp_path / "there")
    calib, held_out = "synthetic:train?n=64", "synthetic:test?n=48"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        local = calibrate_bundle(here, calib, method="minmax", target="tensorrt", eval_data=held_out, max_images=64,
                                 sensitivity_frames=8)
    assert main(["calibrate", str(there), "--data", calib, "--eval-data", held_out, "--method", "minmax", "--target", "tensorrt",
                 "--max-images", "64", "--sensitivity-frames", "8", "--cluster", "local", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    a = json.loads((here / "quant_report.json").read_text())["targets"]["tensorrt"]
    b = json.loads((there / "quant_report.json").read_text())["targets"]["tensorrt"]
    assert local["targets"]["tensorrt"]["drop_points_all_int8"] > 0.5  # the search had work to do
    assert b["float_layers_names"] == a["float_layers_names"] and a["float_layers_names"]
    assert all(f"float: {name}" in printed for name in b["float_layers_names"])
    assert [s["name"] for s in b["sensitivity"]] == [s["name"] for s in a["sensitivity"]]
    assert [(t["float_layers"], t["purpose"], t["within_budget"]) for t in b["trials"]] == \
        [(t["float_layers"], t["purpose"], t["within_budget"]) for t in a["trials"]]
    assert b["final"]["miou"] == a["final"]["miou"]
    assert a["candidates"]["where"] == "this process"
    assert b["candidates"]["where"] == "2 Ray worker(s)" and len(b["candidates"]["per_worker"]) == 2
    assert b["candidates"]["candidates"] >= a["candidates"]["candidates"]  # plus those scored ahead of time
    assert (there / "model.int8.tensorrt.onnx").read_bytes() == (here / "model.int8.tensorrt.onnx").read_bytes()


def test_calibrate_cluster_refuses_what_it_does_not_distribute(default_bundle, capsys):
    assert main(["calibrate", str(default_bundle.path), "--data", "synthetic:train?n=40", "--target", "openvino",
                 "--cluster", "local"]) != 0
    assert "--cluster distributes the ONNX INT8 search" in capsys.readouterr().err


# -- Ray's retries, directly ---------------------------------------------------------------------
class Flaky:
    """Fails the first `fail` calls of each key (counted in files, so a restarted process knows)."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def info(self):
        return {"pid": os.getpid()}

    def work(self, key: str, fail: int):
        marker = self.folder / key
        n = int(marker.read_text()) if marker.exists() else 0
        marker.write_text(str(n + 1))
        if n < fail:
            raise RuntimeError(f"attempt {n + 1} of {key} failed")
        return {"key": key, "attempts": n + 1, "info": self.info()}


def test_more_workers_than_cpus_is_refused(default_bundle, videos, ray_address, tmp_path, capsys):
    rc = main(["run", str(default_bundle.path), "--source", pattern(videos), "--out", str(tmp_path / "r"),
               "--cluster", ray_address, "--workers", "3"])
    assert rc == 2
    assert "3 worker(s) of 1 CPU(s) need 3 CPUs but the cluster has 2; use at most 2 (--workers)" in capsys.readouterr().err


def test_exceptions_are_retried_then_reported(ray_address, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import the tests
    from edgeseg.cluster.session import RayCluster, TaskFailure

    cluster = RayCluster.connect(ray_address)
    pool = cluster.pool(Flaky, (str(tmp_path),), workers=1, max_retries=2)
    try:
        outcomes = {tag: out for tag, out, _, _ in pool.map([("twice", "work", lambda: ("twice", 2)),
                                                             ("always", "work", lambda: ("always", 5))])}
    finally:
        pool.close()
    assert outcomes["twice"]["attempts"] == 3
    assert isinstance(outcomes["always"], TaskFailure) and "attempt 3 of always failed" in outcomes["always"].error


# -- without a cluster ----------------------------------------------------------------------------
def test_batch_without_cluster_never_imports_ray(default_bundle, videos, tmp_path):
    code = (
        "import sys\n"
        "from edgeseg.cli import main\n"
        f"assert main(['run', {str(default_bundle.path)!r}, '--source', {str(videos / 'cam1' / '*.mp4')!r}, "
        f"'--out', {str(tmp_path / 'r')!r}, '--frames', '2']) == 0\n"
        f"assert main(['eval', {str(default_bundle.path)!r}, '--data', 'synthetic:test?n=2']) == 0\n"
        "import edgeseg.cluster, edgeseg.cluster.batch, edgeseg.cluster.evaluate, edgeseg.cluster.cli\n"
        "print('RAY' if 'ray' in sys.modules else 'NO RAY')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("NO RAY")
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["frames"] == 4


def test_rle_masks_overlay_and_csv(default_bundle, videos, plain, tmp_path):
    from pycocotools import mask as coco_mask

    from edgeseg.cluster import BatchSegmenter, read_table

    src = videos / "cam0" / "b.mp4"
    with BatchSegmenter(default_bundle.path) as batch:
        s = batch.run(src, tmp_path / "r", table="csv", masks="rle", overlay=True)
    assert s.done == 1
    folder = tmp_path / "r" / "b.mp4"
    got, want = read_table(folder / "areas.csv"), read_table(plain["cam0/b.mp4"] / "areas.parquet")
    assert all(np.array_equal(got[c], want[c]) for c in want)
    entries = json.loads((folder / "masks.json").read_text())
    for frame in range(6):
        png = cv2.imread(str(plain["cam0/b.mp4"] / "masks" / f"{frame:06d}.png"), cv2.IMREAD_UNCHANGED)
        rebuilt = np.zeros_like(png)
        for e in (e for e in entries if e["image_id"] == frame):
            m = coco_mask.decode({"size": e["segmentation"]["size"], "counts": e["segmentation"]["counts"].encode()})
            assert m.sum() == e["area"]
            rebuilt[m.astype(bool)] = e["category_id"]
        assert np.array_equal(rebuilt, png)
    cap = cv2.VideoCapture(str(folder / "overlay.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 6
    cap.release()
    assert not any(p.name.startswith(".") for p in folder.iterdir())


def test_a_broken_video_is_reported_by_source(default_bundle, videos, tmp_path, capsys):
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "good.mp4").write_bytes((videos / "cam1" / "e.mp4").read_bytes())
    (archive / "broken.mp4").write_bytes(b"\x00not a video" * 100)
    rc = main(["run", str(default_bundle.path), "--source", str(archive), "--out", str(tmp_path / "r")])
    assert rc == 1
    out = capsys.readouterr().out
    assert "1 done" in out and "1 failed" in out and "FAILED broken.mp4: cannot open video" in out
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert [f["source"] for f in summary["failed"]] == ["broken.mp4"] and "FFmpeg cannot decode" in summary["failed"][0]["error"]
    assert (tmp_path / "r" / "good.mp4" / "done.json").is_file() and not (tmp_path / "r" / "broken.mp4" / "done.json").exists()


def test_worker_without_the_video_says_how_to_ship_it(default_bundle, tmp_path, monkeypatch):
    from edgeseg.cluster.plan import OutputSpec, Source, Task
    from edgeseg.cluster.worker import SegmenterWorker, pack_bundle

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    # what a worker killed with its bundle unpacked leaves: a folder of a process that is gone
    r = subprocess.run([sys.executable, "-c", "import sys; from edgeseg.files import make_temp_dir; "
                        "print(make_temp_dir(sys.argv[1], 'bundle'))", str(scratch)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    stale = Path(r.stdout.strip())
    assert stale.is_dir()
    worker = SegmenterWorker(pack_bundle(default_bundle))  # the bundle as a remote worker gets it
    try:
        assert not stale.exists() and scratch_of([os.getpid()]) != []
        out = worker.process(Task(Source(str(tmp_path / "elsewhere.mp4"), "elsewhere.mp4", 10, 0)), OutputSpec(table="csv"))
    finally:
        worker.close()
    assert "is not on" in out["error"] and "have them shipped with the tasks" in out["error"] and out["not_here"]
    assert list(scratch.iterdir()) == []  # the task's folder and the unpacked bundle are gone


def test_a_video_the_worker_cannot_see_names_the_fix(default_bundle, videos, tmp_path):
    from edgeseg.cluster import BatchSegmenter

    src = tmp_path / "gone.mp4"
    src.write_bytes((videos / "cam1" / "e.mp4").read_bytes())

    def vanish(event):  # planned here, then not there when the worker looks
        if event["event"] == "planned":
            src.unlink()

    with BatchSegmenter(default_bundle.path) as batch:
        s = batch.run(src, tmp_path / "r", progress=vanish)
    assert len(s.failed) == 1 and "is not on" in s.failed[0]["error"] and s.failed[0]["error"].endswith("(ship_sources)")


@pytest.mark.parametrize("args, message", [
    (["--cluster", "bogus"], "--cluster takes local (start Ray here), auto"),
    (["--cluster", "http://head:8265"], "--cluster takes local"),
    (["--show"], "--show is for one stream"),
    (["--chunk-frames", "4", "--overlay"], "--chunk-frames cannot be used with --overlay"),
    (["--chunk-frames", "0"], "--chunk-frames must be a positive number"),
    (["--workers", "0", "--cluster", "local"], "--workers must be 1 or more"),
    (["--worker-cpus", "0"], "--worker-cpus must be a whole number"),
])
def test_bad_batch_options(default_bundle, videos, tmp_path, capsys, args, message):
    rc = main(["run", str(default_bundle.path), "--source", pattern(videos), "--out", str(tmp_path / "r"), *args])
    assert rc == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("source, message", [
    ("{videos}/cam1/*.txt", "matches no video files (1 other files)"),
    ("{videos}/nowhere", "no such file or folder"),
    ("rtsp://camera/stream", "batch runs take video files, not streams"),
])
def test_bad_batch_sources(default_bundle, videos, tmp_path, capsys, source, message):
    rc = main(["run", str(default_bundle.path), "--source", source.format(videos=videos), "--out", str(tmp_path / "r"),
               "--table", "csv"])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_batch_needs_an_out_folder(default_bundle, videos, capsys):
    assert main(["run", str(default_bundle.path), "--source", pattern(videos)]) == 2
    assert "add --out results/" in capsys.readouterr().err


def test_cluster_without_ray_says_how_to_install(monkeypatch):
    from edgeseg.cluster.session import ClusterError, import_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ClusterError, match=r"pip install 'edgeseg\[cluster\]'"):
        import_ray()


def test_instance_results_give_areas_counts_and_object_rles():
    from pycocotools import mask as coco_mask

    from edgeseg.cluster.outputs import FrameRecorder
    from edgeseg.cluster.plan import OutputSpec
    from runtime.instances import InstanceResult

    crop = np.ones((4, 5), bool)
    r = InstanceResult(xyxy=[[2, 1, 7, 5], [10, 8, 15, 12], [0, 0, 5, 4]], confidence=[0.9, 0.8, 0.7], class_id=[1, 1, 0],
                       mask_rects=[[2, 1, 7, 5], [10, 8, 15, 12], [0, 0, 5, 4]], mask_crops=[crop, crop, crop],
                       frame_size=(16, 20), labels=["person", "car"], frame_index=7, timestamp=0.25)
    rec = FrameRecorder(["person", "car"], OutputSpec(table="csv", masks="rle"))
    rec.add(r)
    part = rec.part()
    # objects 0 (car) and 2 (person) overlap on 3x3 pixels: the more confident car keeps them
    assert part["areas"].tolist() == [[20 - 9, 40]] and part["counts"].tolist() == [[1, 2]]
    assert part["frame"].tolist() == [7] and part["size"].tolist() == [[16, 20]]
    entries = part["masks"][0]
    assert [(e["category_id"], e["area"], e["score"]) for e in entries] == [(1, 20, pytest.approx(0.9)), (1, 20, pytest.approx(0.8)),
                                                                            (0, 20, pytest.approx(0.7))]
    assert entries[1]["bbox"] == [10.0, 8.0, 5.0, 4.0]
    m = coco_mask.decode({"size": entries[1]["segmentation"]["size"], "counts": entries[1]["segmentation"]["counts"].encode()})
    assert np.array_equal(m.astype(bool), r.mask(1))


def test_a_killed_run_leaves_no_temporaries_after_the_next(default_bundle, videos, tmp_path):
    from edgeseg.cluster import BatchSegmenter

    out = tmp_path / "r"
    folder = out / "e.mp4"
    folder.mkdir(parents=True)
    # what `kill -9` in the middle of writing a table leaves: a temporary of a process that is gone
    r = subprocess.run([sys.executable, "-c", "import sys; from edgeseg.files import make_temp_dir; "
                        "print(make_temp_dir(sys.argv[1], 'areas.parquet'))", str(folder)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    stale = Path(r.stdout.strip())
    assert stale.is_dir()
    with BatchSegmenter(default_bundle.path) as batch:
        assert batch.run(videos / "cam1" / "e.mp4", out).done == 1
    assert not stale.exists() and sorted(p.name for p in folder.iterdir()) == ["areas.parquet", "done.json"]
