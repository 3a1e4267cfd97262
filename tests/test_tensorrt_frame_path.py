"""The GPU frame path wired end to end on the CPU: pycuda and tensorrt replaced at the lowest layer
only (tests/fake_gpu.py: host memory as device memory, the kernels' host build running each launch,
ONNX Runtime as the engine), everything above them real: Segmenter, the pipeline, GpuFramePath, the
kernel launchers, TensorRTEngine. Asserts which kernel receives which buffer, the review rules
(context current on every thread, page-locked buffers for async copies, one primary context never
detached, plugins before deserialising), and that the class maps equal the CPU path's."""
from __future__ import annotations

import shutil
import threading

import cv2
import numpy as np
import pytest

from edgeseg.bundle import Bundle
from tests import fake_gpu


@pytest.fixture
def bundle(default_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(default_bundle.path, dst)
    b = Bundle.load(dst)
    fake_gpu.add_fake_engine(b)
    return Bundle.load(dst)


@pytest.fixture
def gpu(bundle, monkeypatch):
    if not (shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")):
        pytest.skip("no C++ compiler to build the kernels' host code")
    return fake_gpu.install(monkeypatch, str(bundle.artifact_path(bundle.select("onnxruntime", "fp32"))))


@pytest.fixture
def cpu(bundle):
    from runtime.segmenter import Segmenter

    return Segmenter(bundle, backend="onnxruntime")


def _frames(n=4, hw=(200, 300)):
    from edgeseg.data.synthetic import SyntheticScenes

    return [img for img, _ in SyntheticScenes(size=hw, length=n, split="test")]


def _launches(rec, name):
    return [c for c in rec.of("launch") if c[1] == name]


def test_auto_picks_tensorrt_and_the_gpu_frame_path(gpu, bundle):
    import edgeseg

    seg = edgeseg.Segmenter(bundle)
    assert seg.backend == "tensorrt" and seg.frame_path == "gpu"
    assert "TensorRT and a CUDA device" in seg.backend_reason
    seg.close()


def test_segment_wiring_and_class_map(gpu, bundle, cpu):
    from runtime.segmenter import Segmenter

    seg = Segmenter(bundle)
    frame = _frames(1)[0]
    r = seg.segment(frame)
    ref = cpu.segment(frame)
    assert r.class_map.shape == frame.shape[:2] and r.class_map.dtype == np.uint8
    assert np.mean(r.class_map == ref.class_map) >= 0.999  # preprocessing agrees within 1e-3, not bit for bit
    # the kernel chain, buffer by buffer
    (htod,) = [c for c in gpu.of("htod_async")]
    (pre,) = _launches(gpu, "edgeseg_preprocess")
    (run,) = gpu.of("execute")
    (cls,) = _launches(gpu, "edgeseg_classify")
    frame_dev, nbytes, stream = htod[1], htod[2], htod[3]
    assert nbytes == frame.nbytes  # the raw frame, uploaded once
    assert pre[2] == stream and pre[3][0] == frame_dev  # preprocessing reads the uploaded frame...
    input_ptr = pre[3][7]
    assert run[2]["input"] == input_ptr and run[1] == stream  # ...and writes the engine's input binding
    assert cls[3][0] == run[2][seg._gpu.output_name] and cls[2] == stream  # classification reads the engine's output
    map_ptr = cls[3][-1]
    (dtoh,) = gpu.of("dtoh_async")
    assert dtoh[1] == map_ptr and dtoh[2] == frame.shape[0] * frame.shape[1]  # only the class map comes back
    assert not _launches(gpu, "edgeseg_overlay")  # nobody asked for an overlay
    assert set(r.timings) >= {"preprocess", "inference", "postprocess", "cuda_upload", "cuda_preprocess",
                              "cuda_inference", "cuda_postprocess", "cuda_download"}
    seg.close()


def test_review_rules_hold(gpu, bundle):
    from runtime.engines.tensorrt import device_target, gpu_context
    from runtime.segmenter import Segmenter

    target = device_target(0)  # device facts from cuda.Device(n): no context retained for them
    assert target.compute_capability == fake_gpu.FAKE_CC and gpu.retained == 0
    seg = Segmenter(bundle)
    seg.segment(_frames(1)[0])
    seg.close()
    again = Segmenter(bundle)
    again.segment(_frames(1)[0])
    again.close()
    assert gpu.retained == 1 and gpu.detached == 0  # one primary context for the process, never detached
    assert gpu_context(0) is gpu_context(0)
    names = [c[0] for c in gpu.calls]
    assert names.index("init_libnvinfer_plugins") < names.index("deserialize")
    assert all(not stack for stack in gpu.stacks.values())  # every push popped


def test_kernels_push_the_context_themselves(gpu, bundle):
    """A worker thread that never pushed a context can launch (the fake fails any call without one)."""
    from edgeseg.spec import Preprocess
    from runtime.cuda.kernels import GpuPreprocessor
    from runtime.engines.tensorrt import gpu_context

    pre = Preprocess(size=(32, 48))
    ctx = gpu_context(0)
    k = GpuPreprocessor(pre, ctx)
    frame = np.random.default_rng(0).integers(0, 256, (50, 70, 3), np.uint8)
    with ctx.active():
        src, dst = ctx.cuda.mem_alloc(frame.nbytes), ctx.cuda.mem_alloc(k.output_nbytes)
        ctx.cuda.memcpy_htod(src, frame)
        stream = ctx.cuda.Stream()
    errors = []

    def worker():
        try:
            k.launch(int(src), frame.shape[:2], frame.strides[0], int(dst), stream)
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert errors == []
    out = np.frombuffer(dst.buf[: k.output_nbytes].tobytes(), np.float32).reshape(pre.input_shape)
    assert np.abs(out - pre.apply(frame)).max() <= 1e-3
    assert np.abs(k(frame) - pre.apply(frame)).max() <= 1e-3  # the host convenience copies through pinned buffers


def test_stream_two_frames_in_flight_with_gpu_overlay(gpu, bundle, cpu, tmp_path):
    from runtime.segmenter import Segmenter

    folder = tmp_path / "frames"
    folder.mkdir()
    frames = _frames(6, (120, 160))
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:02d}.png"), f)
    seg = Segmenter(bundle)
    results = list(seg.stream(str(folder), save=str(tmp_path / "out" / "%05d.png"), alpha=0.4))
    assert [r.frame_index for r in results] == list(range(6))
    for f, r in zip(frames, results):
        assert np.mean(r.class_map == cpu.segment(f).class_map) >= 0.999
    # frames alternate between the two slots' streams; each frame's chain stays on its stream
    pres, runs = _launches(gpu, "edgeseg_preprocess"), gpu.of("execute")
    streams = [p[2] for p in pres]
    assert len(set(streams)) == 2 and all(a != b for a, b in zip(streams, streams[1:]))
    assert [r[1] for r in runs] == streams
    overlays = _launches(gpu, "edgeseg_overlay")
    classifies = _launches(gpu, "edgeseg_classify")
    assert len(overlays) == 6
    for o, c, p in zip(overlays, classifies, pres):
        assert o[3][0] == c[3][-1]  # the overlay reads the frame-size class map...
        assert o[3][3] == p[3][0]  # ...and the uploaded frame
    # the overlay the sink wrote came from the GPU, and matches the CPU's drawing within a grey level
    written = sorted((tmp_path / "out").iterdir())
    assert len(written) == 6
    img = cv2.imread(str(written[-1]))
    cpu_overlay = results[-1].overlay(alpha=0.4)
    same = results[-1].class_map == cpu.segment(frames[-1]).class_map
    assert np.abs(img.astype(int) - cpu_overlay.astype(int))[same].max() <= 1
    # stages ran on the pipeline's threads, each pushing the context itself
    assert {"edgeseg-preprocess", "edgeseg-inference", "edgeseg-postprocess"} <= gpu.threads
    summary = seg.stats.summary()
    assert set(summary["cuda_stages"]) == {"upload", "preprocess", "inference", "postprocess", "download"}
    assert "CUDA events" in summary["engine_fps_note"] and summary["info"]["frame_path"] == "gpu"
    assert all(not stack for stack in gpu.stacks.values())
    seg.close()


def test_a_stream_stopped_early_leaves_the_slots_usable(gpu, bundle):
    from runtime.segmenter import Segmenter

    seg = Segmenter(bundle)
    for i, _ in enumerate(seg.stream("synthetic://?frames=20&width=96&height=64")):
        if i == 2:
            break
    assert len(list(seg.stream("synthetic://?frames=5&width=96&height=64"))) == 5
    assert seg.segment(_frames(1)[0]).class_map.shape == (200, 300)  # and one frame after the streams
    seg.close()


def test_options_that_need_scores_keep_gpu_preprocessing(gpu, bundle):
    from runtime.segmenter import Segmenter

    seg = Segmenter(bundle, smoothing=0.5, scores=True)
    ref = Segmenter(bundle, backend="onnxruntime", smoothing=0.5, scores=True)
    assert seg.frame_path.startswith("gpu preprocessing and engine, postprocessing on the cpu: smoothing and scores")
    for f in _frames(3):
        r, expected = seg.segment(f), ref.segment(f)
        assert r.scores.shape[1:] == f.shape[:2] and np.abs(r.scores - expected.scores).max() < 1e-3
        assert np.mean(r.class_map == expected.class_map) >= 0.999
    (run,) = gpu.of("execute")[-1:]
    dtoh = gpu.of("dtoh_async")[-1]
    assert dtoh[1] == run[2][seg._gpu.output_name]  # the scores come back instead of a class map
    assert not _launches(gpu, "edgeseg_classify")
    seg.close()


def test_hidden_classes_and_nv12(gpu, bundle, cpu):
    from runtime.segmenter import Segmenter

    labels = bundle.manifest.labels
    seg = Segmenter(bundle, ignore=[labels[1]])
    ref = Segmenter(bundle, backend="onnxruntime", ignore=[labels[1]])
    frame = _frames(1, (240, 320))[0]
    assert np.mean(seg.segment(frame).class_map == ref.segment(frame).class_map) >= 0.999
    assert not np.any(seg.segment(frame).class_map == 1)
    yuv = cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420)  # I420 -> NV12: interleave U and V
    h, w = frame.shape[:2]
    u = yuv[h: h + h // 4].reshape(h // 2, w // 2)
    v = yuv[h + h // 4:].reshape(h // 2, w // 2)
    nv12 = np.concatenate([yuv[:h], np.stack([u, v], -1).reshape(h // 2, w)])
    bgr = cv2.cvtColor(nv12, cv2.COLOR_YUV2BGR_NV12)
    gpu_nv12 = seg.segment(nv12, pixel_format="nv12")
    assert np.mean(gpu_nv12.class_map == ref.segment(bgr).class_map) >= 0.999
    assert np.array_equal(ref.segment(nv12, pixel_format="nv12").class_map, ref.segment(bgr).class_map)  # CPU path
    from edgeseg.spec import FrameError

    with pytest.raises(FrameError, match=r"NV12 frame is a \(H \* 3 / 2, W\) uint8 array"):
        seg.segment(frame, pixel_format="nv12")
    with pytest.raises(FrameError, match="pixel_format must be bgr or nv12"):
        seg.segment(frame, pixel_format="yuyv")
    seg.close()


def test_run_command_on_the_gpu_path(gpu, bundle, tmp_path, capsys):
    from edgeseg.cli import main

    out = tmp_path / "o.mp4"
    code = main(["run", str(bundle.path), "--source", "synthetic://?frames=6&width=128&height=72", "--out", str(out),
                 "--stats"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "backend tensorrt" in captured.err and out.exists()
    assert "cuda inference" in captured.out
    assert len(_launches(gpu, "edgeseg_overlay")) == 6


def test_engine_built_for_another_gpu_is_not_deserialised(gpu, bundle):
    from runtime.engines.base import EngineError, resolve_backend
    from runtime.engines.tensorrt import TensorRTEngine

    for art in bundle.manifest.artifacts:
        if art.backend == "tensorrt":
            art.info["compute_capability"] = [7, 5]
    name, why = resolve_backend("auto", bundle)
    assert name == "onnxruntime" and "built for compute capability 7.5" in why and "edgeseg build" in why
    with pytest.raises(EngineError, match="no TensorRT engine for this machine.*7.5.*build_missing=True"):
        TensorRTEngine.from_bundle(bundle)
    assert not gpu.of("deserialize")


def test_run_build_missing(default_bundle, monkeypatch, tmp_path, capsys):
    """--build-missing hands a bundle without an engine for this GPU to the builder (above the runtime)."""
    from edgeseg.cli import main

    source = "synthetic://?frames=2&width=64&height=48"
    assert main(["run", str(default_bundle.path), "--source", source, "--build-missing"]) == 0  # no TensorRT: ONNX Runtime
    assert "backend onnxruntime" in capsys.readouterr().err
    if not shutil.which("g++"):
        pytest.skip("no C++ compiler to build the kernels' host code")
    fake_gpu.install(monkeypatch, str(default_bundle.artifact_path(default_bundle.select("onnxruntime", "fp32"))))
    assert main(["run", str(default_bundle.path), "--source", source, "--build-missing"]) == 2
    err = capsys.readouterr().err  # the stand-in has the runtime only, as TensorRT's lean package does
    assert "has no builder/ONNX parser" in err and "edgeseg build" in err
