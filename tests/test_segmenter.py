"""The Segmenter API, its errors, the `edgeseg run` / `edgeseg bench` commands, and the torch-free rule."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

import edgeseg
from edgeseg.bundle import Bundle
from edgeseg.errors import EdgesegError, SourceError
from edgeseg.metrics import miou
from edgeseg.spec import FrameError
from runtime.postprocess import SegmentationResult
from runtime.segmenter import Segmenter


@pytest.fixture(scope="module")
def seg(default_bundle):
    return Segmenter(default_bundle)


def test_api_and_backend_choice(seg, default_bundle):
    assert seg.backend == "onnxruntime" and seg.backend_reason
    assert seg.labels == default_bundle.manifest.labels
    assert "onnxruntime" in repr(seg)
    frame = np.random.default_rng(0).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    r = seg.segment(frame)
    assert isinstance(r, SegmentationResult)
    assert r.class_map.shape == (120, 200) and r.class_map.dtype == np.uint8
    assert set(r.timings) == {"preprocess", "inference", "postprocess"}
    assert r.overlay().shape == frame.shape  # the result keeps its frame
    assert seg.stats.summary()["frames_out"] >= 1


def test_lazy_public_names():
    import edgeseg.segmenter

    assert edgeseg.Segmenter is edgeseg.segmenter.Segmenter and issubclass(edgeseg.Segmenter, Segmenter)
    assert edgeseg.SegmentationResult is SegmentationResult


def test_bundle_path_or_object(default_bundle):
    a = Segmenter(str(default_bundle.path))
    b = Segmenter(Bundle.load(default_bundle.path))
    frame = np.full((64, 64, 3), 90, np.uint8)
    assert np.array_equal(a.segment(frame).class_map, b.segment(frame).class_map)


def test_segments_synthetic_scenes(seg):
    """End to end on held-out scenes: catches colour order, layout or geometry mistakes."""
    from edgeseg.data.synthetic import SyntheticScenes

    scenes = SyntheticScenes(size=(240, 320), length=6, split="test")
    scores = [miou(seg.segment(img).class_map, mask, len(seg.labels)) for img, mask in scenes]
    assert np.mean(scores) > 0.6, scores


@pytest.mark.parametrize("bad,match", [
    ([[1, 2, 3]], "numpy array"),
    (np.zeros((32, 32), np.uint8), "single-channel"),
    (np.zeros((32, 32, 4), np.uint8), "4"),
    (np.zeros((32, 32, 3), np.float32), "uint8"),
    (None, "numpy array"),
])
def test_bad_frames(seg, bad, match):
    with pytest.raises(FrameError, match=match):
        seg.segment(bad)


def test_unopenable_source_message(seg):
    baseline = threading.active_count()
    with pytest.raises(SourceError) as e:
        seg.stream("/nonexistent/clip.mp4")
    assert "/nonexistent/clip.mp4" in str(e.value) and "no such file" in str(e.value)
    with pytest.raises(SourceError, match="does not exist"):
        seg.stream("/dev/video97", serve="127.0.0.1:0")  # the server opened first is closed again
    assert threading.active_count() == baseline


def test_missing_bundle_is_a_clear_error(tmp_path):
    with pytest.raises(EdgesegError, match="bundle not found"):
        Segmenter(tmp_path / "nope")


def test_options_are_validated(default_bundle):
    with pytest.raises(EdgesegError, match="smoothing"):
        Segmenter(default_bundle, smoothing=2)
    with pytest.raises(EdgesegError, match="unknown label"):
        Segmenter(default_bundle, keep=["unicorn"])
    with pytest.raises(EdgesegError, match="unknown backend"):
        Segmenter(default_bundle, backend="tpu")


def test_keep_scores_and_smoothing_options(default_bundle):
    from edgeseg.data.synthetic import SyntheticScenes

    img, _ = SyntheticScenes(size=(96, 128), length=1, split="test")[0]
    s = Segmenter(default_bundle, keep=["ball"], scores=True)
    r = s.segment(img)
    assert set(np.unique(r.class_map)) <= {0, 1}
    assert r.scores.shape == (len(s.labels), 96, 128)
    assert r.mask("ball").shape == (96, 128)


def test_engine_fps(seg):
    assert seg.engine_fps(frames=5, warmup=1) > 0


# -- commands ----------------------------------------------------------------------------------
def test_run_command(default_bundle, tmp_path, capsys):
    from edgeseg.cli import main

    out, stats = tmp_path / "o.mp4", tmp_path / "s.json"
    code = main(["run", str(default_bundle.path), "--source", "synthetic://?frames=6&width=128&height=72",
                 "--out", str(out), "--stats", "--stats-json", str(stats), "--smoothing", "0.5", "--alpha", "0.4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert out.exists() and json.loads(stats.read_text())["frames_out"] == 6
    assert "inference" in captured.out and "pipeline" in captured.out
    assert "backend onnxruntime" in captured.err


def test_run_command_user_errors(default_bundle, capsys):
    from edgeseg.cli import main

    assert main(["run", str(default_bundle.path), "--source", "/nonexistent/clip.mp4"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["run", str(default_bundle.path), "--source", "synthetic://?frames=2", "--serve", "localhost:http"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert main(["run", str(default_bundle.path), "--source", "synthetic://?frames=2", "--stage-nice", "25"]) == 2
    assert "--stage-nice must be 0..19" in capsys.readouterr().err  # the flag the user typed, not the keyword


def test_bench_command(default_bundle, capsys):
    from edgeseg.cli import main

    assert main(["bench", str(default_bundle.path), "--frames", "10", "--stage-nice", "0"]) == 0
    out = capsys.readouterr().out
    assert "engine-only" in out and "pipeline" in out and "ratio" in out


def test_runtime_and_run_command_never_import_torch(default_bundle):
    code = (
        "import sys\n"
        "import runtime.segmenter, runtime.sources, runtime.sinks, runtime.server, runtime.pipeline, runtime.stats\n"
        "import edgeseg.commands.run, edgeseg.commands.bench\n"
        "import numpy as np\n"
        f"s = runtime.segmenter.Segmenter({str(default_bundle.path)!r})\n"
        "s.segment(np.zeros((48, 64, 3), np.uint8))\n"
        "list(s.stream('synthetic://?frames=2&width=64&height=48'))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))




# -- segment() from several threads -------------------------------------------------------------
class _SlowEngine:
    """Wraps an engine: each infer takes a while and records how many run at once."""

    def __init__(self, engine, thread_safe: bool, delay: float = 0.02):
        self._engine, self.thread_safe, self.delay = engine, thread_safe, delay
        self.backend, self.precision = engine.backend, engine.precision
        self.inputs, self.outputs = engine.inputs, engine.outputs
        self._lock, self.running, self.most = threading.Lock(), 0, 0

    def infer(self, batch):
        import time

        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.delay)
            return self._engine.infer(batch)
        finally:
            with self._lock:
                self.running -= 1

    def close(self):
        pass


def _frames(n):
    from edgeseg.data.synthetic import SyntheticScenes

    scenes = SyntheticScenes(size=(96, 160), length=n, split="test")
    return [scenes[i][0] for i in range(n)]


def _hammer(fn, frames, threads=6):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, frames))


@pytest.mark.parametrize("thread_safe", [True, False], ids=["thread-safe-engine", "serialised-engine"])
def test_segment_from_many_threads_gives_each_call_its_own_result(default_bundle, thread_safe):
    frames = _frames(24)
    alone = Segmenter(default_bundle)
    expected = [alone.segment(f).class_map for f in frames]
    slow = _SlowEngine(alone.engine, thread_safe)
    seg = Segmenter(default_bundle, engine=slow)
    results = _hammer(seg.segment, frames)
    assert all(np.array_equal(r.class_map, e) for r, e in zip(results, expected))
    assert sorted(r.frame_index for r in results) == list(range(len(frames)))  # unique indices
    assert seg.stats.summary()["frames_out"] == len(frames)
    assert (slow.most > 1) is thread_safe  # a thread-safe engine runs calls side by side, others one at a time


def test_segment_with_smoothing_refuses_concurrent_calls(default_bundle):
    frames = _frames(12)
    seg = Segmenter(default_bundle, smoothing=0.6, engine=_SlowEngine(Segmenter(default_bundle).engine, True, delay=0.05))
    errors, done = [], []

    def call(frame):
        try:
            done.append(seg.segment(frame))
        except EdgesegError as e:
            errors.append(str(e))

    _hammer(call, frames, threads=4)
    assert errors and done  # some ran, the ones that overlapped were refused
    assert all("smoothing is called from several threads at once" in e for e in errors)
    assert len(done) + len(errors) == len(frames)
    seg.segment(frames[0])  # one at a time is fine again
