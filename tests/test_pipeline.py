"""The threaded pipeline: order, end of stream, errors, live-source dropping, shutdown, memory."""
from __future__ import annotations

import json
import os
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from edgeseg.errors import SourceError
from runtime.pipeline import Pipeline, PipelineError
from runtime.sources import Source, open_source, write_synthetic_clip
from runtime.stats import STAGES, Stats


def _wait_threads(baseline: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.02)
    return threading.active_count()


def _identity(work):
    return work.frame.image if work.data is None else work.data


def _pipeline(source, infer=None, **kw):
    return Pipeline(source, preprocess=_identity, infer=infer or _identity,
                    postprocess=lambda w: (w.frame.index, w.data.shape), **kw)


@pytest.fixture
def baseline():
    return threading.active_count()


def test_file_like_source_processes_every_frame_in_order(baseline):
    src = open_source("synthetic://?frames=25&width=48&height=32")
    stats = Stats()
    works = list(_pipeline(src, stats=stats))
    assert [w.data[0] for w in works] == list(range(25))
    s = stats.summary()
    assert s["frames_in"] == 25 and s["dropped"] == 0
    assert all(set(w.timings) == {"capture", "preprocess", "inference", "postprocess"} for w in works)
    assert _wait_threads(baseline) == baseline


def test_max_frames_stops_early(baseline):
    src = open_source("synthetic://?frames=0&width=32&height=32")  # endless
    out = list(_pipeline(src, max_frames=7))
    assert len(out) == 7
    assert src.closed
    assert _wait_threads(baseline) == baseline


def test_live_source_drops_stale_frames_and_processes_the_newest(baseline):
    src = open_source("synthetic://?frames=0&width=32&height=32&live=1&fps=400")
    stats = Stats()

    def slow(work):
        time.sleep(0.03)  # an engine ~12x slower than the camera
        return work.data

    indices = [w.data[0] for w in _pipeline(src, infer=slow, stats=stats, max_frames=12)]
    assert len(indices) == 12
    assert indices == sorted(indices) and len(set(indices)) == 12
    dropped = stats.summary()["dropped"]
    assert dropped > 0
    assert indices[-1] - indices[0] > 11  # skipped over stale frames
    assert _wait_threads(baseline) == baseline


def test_same_slow_engine_on_a_file_source_drops_nothing(baseline):
    src = open_source("synthetic://?frames=15&width=32&height=32")
    stats = Stats()

    def slow(work):
        time.sleep(0.01)
        return work.data

    indices = [w.data[0] for w in _pipeline(src, infer=slow, stats=stats)]
    assert indices == list(range(15)) and stats.summary()["dropped"] == 0
    assert _wait_threads(baseline) == baseline


def test_error_in_a_stage_propagates_and_stops_everything(baseline):
    src = open_source("synthetic://?frames=0&width=32&height=32")

    def broken(work):
        if work.frame.index == 4:
            raise ValueError("engine exploded")
        return work.data

    seen = []
    with pytest.raises(ValueError, match="engine exploded"):
        for w in _pipeline(src, infer=broken):
            seen.append(w.data[0])
    assert seen == list(range(len(seen))) and len(seen) <= 4
    assert _wait_threads(baseline) == baseline


class _FailingSource(Source):
    uri = "failing://"
    live = True

    def __init__(self):
        super().__init__()
        self.n = 0

    def read(self):
        self.n += 1
        if self.n > 3:
            raise SourceError("camera unplugged")
        return self._frame(np.zeros((8, 8, 3), np.uint8))


def test_source_error_propagates(baseline):
    with pytest.raises(SourceError, match="unplugged"):
        list(_pipeline(_FailingSource()))
    assert _wait_threads(baseline) == baseline


def test_consumer_stopping_early_leaves_no_thread(baseline):
    src = open_source("synthetic://?frames=0&width=32&height=32")
    for i, _ in enumerate(_pipeline(src)):
        if i == 3:
            break
    assert _wait_threads(baseline) == baseline
    assert src.closed


def test_keyboard_interrupt_in_the_consumer_shuts_down(baseline):
    src = open_source("synthetic://?frames=0&width=32&height=32&live=1&fps=100")
    with pytest.raises(KeyboardInterrupt):
        for i, _ in enumerate(_pipeline(src)):
            if i == 2:
                raise KeyboardInterrupt
    assert _wait_threads(baseline) == baseline


def _priority() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


class _PrioritySource(Source):
    """Records the priority of the thread that reads it."""

    uri = "priority://"

    def __init__(self, live: bool):
        super().__init__()
        self.live, self.seen = live, []

    def read(self):
        if self.frames_read >= 4:
            return None
        self.seen.append(_priority())
        return self._frame(np.zeros((8, 8, 3), np.uint8))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads have priorities of their own only on Linux")
@pytest.mark.parametrize("live", [False, True])
def test_stages_beside_the_engine_run_at_a_lower_priority(baseline, live):
    base = _priority()
    for nice in (5, 0):
        seen = {}

        def record(stage):
            def fn(work):
                seen.setdefault(stage, _priority())
                return _identity(work)
            return fn

        src, stats = _PrioritySource(live), Stats()
        list(Pipeline(src, record("preprocess"), record("inference"), record("postprocess"), stats=stats, stage_nice=nice))
        assert stats.info["stage_nice"] == nice  # kept in stats.json
        lowered = min(19, base + nice)
        assert seen == {"preprocess": lowered, "inference": base, "postprocess": lowered}
        # a live source's capture keeps the caller's priority: the newest frame is taken when it arrives
        assert set(src.seen) == {base if live else lowered}
        assert _priority() == base  # the consumer (this thread) is left alone
    assert _wait_threads(baseline) == baseline


@pytest.mark.parametrize("nice", [-1, 20, 2.5, "low"])
def test_stage_nice_out_of_range_is_a_clear_error(nice, segmenter):
    with pytest.raises(PipelineError, match="stage_nice must be 0..19"):
        _pipeline(_PrioritySource(live=False), stage_nice=nice)
    with pytest.raises(PipelineError, match="stage_nice must be 0..19"):  # before anything is opened
        segmenter.stream("synthetic://?frames=2&width=32&height=32", stage_nice=nice)


# -- through the Segmenter --------------------------------------------------------------------
@pytest.fixture(scope="module")
def segmenter(default_bundle):
    from runtime.segmenter import Segmenter

    return Segmenter(default_bundle)


def test_stream_saves_video_and_stats_json(segmenter, tmp_path, baseline):
    video, stats_path = tmp_path / "out" / "overlay.mp4", tmp_path / "stats.json"
    results = list(segmenter.stream("synthetic://?frames=12&width=160&height=96", save=str(video), stats_path=str(stats_path)))
    assert [r.frame_index for r in results] == list(range(12))
    assert all(r.class_map.shape == (96, 160) for r in results)
    assert set(results[-1].timings) == set(STAGES)
    cap = cv2.VideoCapture(str(video))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    assert n == 12
    assert sorted(p.name for p in video.parent.iterdir()) == ["overlay.mp4"]  # no partial file left
    s = json.loads(stats_path.read_text())
    assert s["frames_out"] == 12 and s["pipeline_fps"] > 0 and s["engine_fps"] > 0
    for stage in STAGES:
        assert s["stages"][stage]["count"] == 12 and s["stages"][stage]["p95_ms"] >= s["stages"][stage]["p50_ms"] >= 0
    assert s["info"]["backend"] == "onnxruntime"
    assert _wait_threads(baseline) == baseline


def test_video_is_not_visible_under_its_name_while_being_written(segmenter, tmp_path, baseline):
    video = tmp_path / "live.mp4"
    seen = []
    for r in segmenter.stream("synthetic://?frames=6&width=96&height=64", save=str(video)):
        seen.append(video.exists())
    assert seen and not any(seen) and video.exists()
    assert _wait_threads(baseline) == baseline


def test_stream_from_a_video_file_and_callback_mode(segmenter, tmp_path, baseline):
    clip = write_synthetic_clip(tmp_path / "clip.avi", frames=9, size=(72, 128))
    got = []
    stats = segmenter.run(str(clip), callback=lambda r: got.append(r.frame_index))
    assert got == list(range(9)) and stats.summary()["frames_out"] == 9
    stopped = []
    segmenter.run("synthetic://?frames=50&width=64&height=48", callback=lambda r: stopped.append(r) or len(stopped) < 3)
    assert len(stopped) == 3
    assert _wait_threads(baseline) == baseline


def test_unused_stream_releases_its_sinks(segmenter, tmp_path, baseline):
    s = segmenter.stream("synthetic://?frames=5&width=64&height=48", serve="127.0.0.1:0")
    assert threading.active_count() > baseline  # the server is up
    s.close()
    assert _wait_threads(baseline) == baseline


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_short_soak_keeps_memory_flat(segmenter, baseline):
    """A shorter version of benchmarks/soak.py: memory after warm-up stays flat."""
    marks = {}
    for r in segmenter.stream("synthetic://?frames=0&width=128&height=72&noise=3", max_frames=400):
        if r.frame_index in (100, 399):
            marks[r.frame_index] = _rss_kb()
    grown = (marks[399] - marks[100]) / marks[100]
    assert grown < 0.05, f"RSS grew {100 * grown:.1f}% ({marks[100]} -> {marks[399]} kB)"
    assert _wait_threads(baseline) == baseline


def test_breaking_out_of_a_segmenter_stream_leaves_no_thread(segmenter, baseline):
    for r in segmenter.stream("synthetic://?frames=0&width=64&height=48", serve="127.0.0.1:0"):
        if r.frame_index == 2:
            break
    assert _wait_threads(baseline) == baseline


# -- sinks --------------------------------------------------------------------------------------
def test_image_sinks(tmp_path):
    from runtime.sinks import ImageFileSink, ImageFolderSink, VideoSink, open_sink

    frames = [np.full((24, 32, 3), i * 30, np.uint8) for i in range(3)]
    folder = open_sink(str(tmp_path / "frames") + "/")
    pattern = open_sink(str(tmp_path / "pat" / "f_%03d.png"))
    single = open_sink(str(tmp_path / "result.png"))
    assert isinstance(folder, ImageFolderSink) and isinstance(pattern, ImageFolderSink) and isinstance(single, ImageFileSink)
    for f in frames:
        for s in (folder, pattern, single):
            s.write(f)
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["000000.jpg", "000001.jpg", "000002.jpg"]
    assert sorted(p.name for p in (tmp_path / "pat").iterdir()) == ["f_000.png", "f_001.png", "f_002.png"]
    assert cv2.imread(str(tmp_path / "result.png"))[0, 0, 0] == 60
    assert isinstance(open_sink(str(tmp_path / "v.avi")), VideoSink)


def test_video_sink_without_frames_leaves_nothing(tmp_path):
    from runtime.sinks import open_sink

    s = open_sink(str(tmp_path / "empty.mp4"))
    s.close()
    assert list(tmp_path.iterdir()) == []


def test_bad_sinks_are_clear_errors(tmp_path):
    from runtime.sinks import SinkError, display_available, open_sink

    with pytest.raises(SinkError, match="unknown sink"):
        open_sink("ftp://x/y")
    with pytest.raises(SinkError, match="cannot tell"):
        open_sink(str(tmp_path / "out.xyz"))
    if not display_available()[0]:
        with pytest.raises(SinkError, match="--serve"):
            open_sink("display://0")


def test_latest_slot_keeps_the_newest_and_the_last_frame_before_the_end():
    from runtime.pipeline import _END, LatestSlot

    dropped = []
    slot = LatestSlot(on_drop=dropped.append)
    stop = threading.Event()
    for i in range(3):
        slot.put(i)
    slot.put(_END)
    assert slot.get(stop) == 2 and dropped == [0, 1]
    assert slot.get(stop) is _END
