"""The runtime's front door.

    import edgeseg
    seg = edgeseg.Segmenter("bundle/")                  # backend="auto": TensorRT > ONNX Runtime
    result = seg.segment(frame)                         # one BGR frame -> SegmentationResult
    for result in seg.stream("synthetic://", save="overlay.mp4"):
        print(result.frame_index, result.timings)
    seg.run(0, callback=lambda r: ...)                  # callback mode for apps
    print(seg.stats.format())

Two frame paths. With a TensorRT engine, frames stay on the GPU (runtime.cuda.frames): one
upload, the fused preprocessing kernel writing the engine's input, the engine, classification and
overlay kernels, and only the class map (and overlay) back, two frames in flight. Every other
engine takes the CPU path: the bundle's `Preprocess.apply` (edgeseg/spec.py, the one definition
shared with conversion and calibration, and the reference the CUDA kernel is tested against),
`engine.infer`, then runtime.postprocess. Both give the same class map.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from edgeseg.bundle import Bundle
from edgeseg.errors import EdgesegError
from edgeseg.spec import MAX_FRAME_PIXELS, FrameError, check_frame, check_nv12, frame_size_problem
from runtime.engines.base import open_engine, resolve_backend
from runtime.pipeline import STAGE_NICE, Config, Pipeline, Tuner, Work, candidate_configs, check_stage_nice
from runtime.postprocess import Postprocessor, SegmentationResult
from runtime.legend import Legend
from runtime.sinks import DisplaySink, ImageFileSink, ServerSink, Sink, SinkError, VideoSink, open_sink, parse_host_port
from runtime.sources import ImageSource, Source, open_source
from runtime.stats import CUDA_STAGES, STAGES, Stats

log = logging.getLogger("edgeseg.runtime")

STATS_EVERY_S = 2.0  # how often a running stream rewrites stats.json
CUDA_KEYS = tuple(f"cuda_{s}" for s in CUDA_STAGES)
SERVER_STATS_EVERY_S = 0.5


def cuda_timings(cuda_ms: dict) -> dict:
    """CUDA milliseconds per stage (runtime.cuda.frames) as the timing keys Stats reports beside the CPU ones."""
    return {f"cuda_{k}": v for k, v in cuda_ms.items()}


def nv12_to_bgr(frame) -> np.ndarray:
    """An NV12 frame ((H * 3 / 2, W) uint8) as BGR, for the CPU path (the GPU path converts per sample)."""
    return cv2.cvtColor(check_nv12(frame), cv2.COLOR_YUV2BGR_NV12)


class Stream:
    """The iterator `Segmenter.stream()` returns: iterate for results; `close()` (or leaving a
    `with` block, or breaking out of a for loop) stops the pipeline and closes sinks and source."""

    def __init__(self, gen, source: Source, sinks: list[Sink], own_source: bool):
        self._gen, self.source, self.sinks, self._own_source = gen, source, sinks, own_source
        self._started = False
        self._done = False

    def __iter__(self):
        return self

    def __next__(self) -> SegmentationResult:
        if self._done:
            raise StopIteration
        self._started = True
        try:
            return next(self._gen)
        except BaseException:
            self._done = True
            raise

    def close(self) -> None:
        if self._done and self._started:
            return
        self._done = True
        if self._started:
            self._gen.close()  # runs the generator's cleanup
        else:  # never iterated: the generator never ran, release what stream() opened
            self._gen.close()
            for s in self.sinks:
                s.close()
            if self._own_source:
                self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class Segmenter:
    """Bundle + engine + postprocessing.

    bundle: a bundle folder or `edgeseg.bundle.Bundle`. backend: auto or a name in
    runtime.engines.registry (`auto` picks TensorRT when it, a GPU and an engine built for it are
    present, else the next the registry names, down to ONNX Runtime; `.backend` and
    `.backend_reason` say which and why). The runtime opens what the bundle holds;
    `edgeseg.Segmenter(..., build_missing=True)` also builds a missing TensorRT engine. precision: the artifact to use (fp32, fp16, int8...).
    smoothing / keep / ignore / threshold / scores / fill: see runtime.postprocess.Postprocessor.
    Instance bundles (task instance-segmentation) give `runtime.instances.InstanceResult`s instead:
    conf / iou / max_det / mask_threshold: see runtime.instance_postprocess; `track` (default on)
    gives each object an id kept across frames (runtime.tracking, `track_iou`, `track_max_age`).
    engine_options go to the engine (ONNX Runtime: threads=, providers=). engine: an engine opened
    already (its `backend` attribute names it); then backend/engine_options are not used.
    gpu_frames: with a TensorRT engine, keep frames on the GPU (default); False runs the CPU path
    around `engine.infer`. `.frame_path` says which path runs and why.
    """

    max_pixels: int | None = MAX_FRAME_PIXELS  # segment() refuses larger frames (streams skip them: open_source)

    def __init__(self, bundle, backend: str = "auto", precision: str | None = None, smoothing: float = 0.0,
                 keep=None, ignore=None, threshold: float | None = None, scores: bool = False, fill: int | None = None,
                 engine=None, backend_reason: str | None = None, gpu_frames: bool = True, conf: float | None = None,
                 iou: float | None = None, max_det: int | None = None, mask_threshold: float = 0.5, track: bool = True,
                 track_iou: float = 0.3, track_max_age: int = 30, **engine_options):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        m = self.bundle.manifest
        self.task = m.task
        self.instances = m.task == "instance-segmentation"
        if self.instances:
            given = {k: v for k, v in dict(smoothing=smoothing, keep=keep, ignore=ignore, threshold=threshold, scores=scores,
                                           fill=fill).items() if v not in (None, False, 0.0)}
            if given:
                raise EdgesegError(f"{', '.join(sorted(given))}: semantic class-map options; this bundle is an instance model "
                                   "(filter its objects with conf=, iou=, max_det=, mask_threshold=)")
        elif any(v is not None for v in (conf, iou, max_det)):
            raise EdgesegError("conf, iou and max_det filter instance models' objects; this bundle is a semantic model "
                               "(its options are threshold=, keep=, ignore=, smoothing=)")
        if engine is not None:
            self.backend, self.backend_reason = engine.backend, backend_reason or "engine given"
        else:
            self.backend, self.backend_reason = resolve_backend(backend, self.bundle, precision)
        log.info("backend %s (%s)", self.backend, self.backend_reason)
        if engine is None:
            if self.backend == "onnxruntime":
                # idle ORT threads spin for work by default, taking the CPU the other stages need
                engine_options.setdefault("spinning", False)
            engine = open_engine(self.bundle, self.backend, precision, **engine_options)
            # more engines of the same artifact with other thread counts, for the stream's tuning
            self._open_more = lambda threads: open_engine(self.bundle, self.backend, precision,
                                                          **{**engine_options, "threads": threads})
        else:
            self._open_more = None
        self.engine = engine
        self._threads = engine_options.get("threads")  # fixed by the caller, else tuned on CPU engines
        self._engines = {self._threads: engine}
        self._tuned: Config | None = None
        self._tuning: dict | None = None
        self.precision = getattr(self.engine, "precision", precision)
        self.preprocess = m.preprocess
        self.labels, self.palette = list(m.labels), [list(c) for c in m.palette]
        if self.instances:
            self._post_options = dict(conf=conf, iou=iou, max_det=max_det, mask_threshold=mask_threshold)
            self._track_options = dict(iou_threshold=track_iou, max_age=track_max_age) if track else None
        else:
            self._post_options = dict(smoothing=smoothing, keep=keep, ignore=ignore, threshold=threshold, scores=scores, fill=fill)
        self.postprocessor = self._make_postprocessor()
        names = [o.name for o in self.engine.outputs]
        # an instance model's post-processing reads every output by name (its layout)
        self._output = None if self.instances else (m.output_name if m.output_name in names else names[0])
        self._apply = self.preprocess.apply
        self._gpu, self.frame_path = self._open_gpu_path(gpu_frames)
        self.stats = Stats()
        self._stats_info(self.stats)
        self._index = 0
        # segment() from several threads: the frame index under a lock; engines that do not say
        # they are thread-safe (ONNX Runtime's run is) one call at a time; smoothing carries state
        # from one call to the next, so with it on a concurrent call is refused
        self._index_lock = threading.Lock()
        self._engine_lock = contextlib.nullcontext() if getattr(self.engine, "thread_safe", False) else threading.Lock()
        self._busy = threading.Lock()

    def _make_postprocessor(self):
        """A fresh post-processing stage: the class map for semantic bundles; for instance bundles
        the objects (runtime.instance_postprocess), tracked (runtime.tracking) unless track=False."""
        m = self.bundle.manifest
        if not self.instances:
            return Postprocessor.from_manifest(m, **self._post_options)
        from runtime.instance_postprocess import InstancePostprocessor

        post = InstancePostprocessor.from_manifest(m, **self._post_options)
        return _Tracked(post, self._track_options) if self._track_options is not None else post

    def _open_gpu_path(self, wanted: bool):
        """(the GPU frame path or None, which path runs and why)."""
        from runtime.cuda.frames import GpuFramePath, is_device_engine

        if not is_device_engine(self.engine):
            return None, f"cpu: the {self.engine.backend} engine takes host arrays"
        if not wanted:
            return None, "cpu: gpu_frames=False"
        if self.instances:
            return None, "cpu: instance post-processing runs on the CPU (its cost follows the objects' area)"

        path = GpuFramePath(self.engine, self.bundle.manifest, self.postprocessor)
        how = "gpu" if path.on_gpu else f"gpu preprocessing and engine, postprocessing on the cpu: {path.why_cpu}"
        log.info("frames: %s", how)
        return path, how

    # -- the stages -------------------------------------------------------------------------
    def _preprocess(self, image: np.ndarray):
        return self._apply(image)

    def _infer(self, batch):
        out = self.engine.infer(batch)
        return out if self._output is None else out[self._output]

    def _stats_info(self, stats: Stats) -> None:
        stats.info.update({
            "bundle": str(self.bundle.path), "model": self.bundle.manifest.model.get("name"),
            "backend": self.backend, "backend_reason": self.backend_reason, "precision": self.precision,
            "input_size": list(self.preprocess.size), "output_kind": self.bundle.manifest.output_kind,
            "frame_path": self.frame_path, "task": self.task,
        })

    # -- one frame --------------------------------------------------------------------------
    def segment(self, frame: np.ndarray, pixel_format: str = "bgr") -> SegmentationResult:
        """Segment one BGR uint8 frame (HxWx3), or an NV12 one ((H * 3 / 2, W) uint8, as hardware
        decoders and CSI cameras give: pixel_format="nv12").

        Thread-safe: concurrent calls each get their own result and frame index (engines that do
        not say they are thread-safe run one call at a time). Smoothing, when on, carries over
        between calls, so then the calls must come one at a time (from one thread, or one stream
        each: `stream()`); a call made while another runs raises."""
        if pixel_format == "nv12" and self._gpu is None:
            frame = nv12_to_bgr(frame)
        elif pixel_format not in ("bgr", "nv12"):
            raise FrameError(f"pixel_format must be bgr or nv12, got {pixel_format!r}")
        if isinstance(frame, np.ndarray) and frame.ndim >= 2:
            h, w = frame.shape[:2]
            too = frame_size_problem(h * 2 // 3 if pixel_format == "nv12" else h, w, self.max_pixels)
            if too:
                raise FrameError(f"cannot segment this frame: {too}")
        if getattr(self.postprocessor, "smoothing", 0) and not self._busy.acquire(blocking=False):
            raise EdgesegError("Segmenter.segment with smoothing is called from several threads at once: smoothing follows "
                               "one sequence of frames; use one Segmenter per thread, or smoothing=0")
        try:
            if self._gpu is not None:
                with self._engine_lock:  # the GPU frame path's buffers and streams: one frame at a time
                    return self._segment_gpu(frame, pixel_format)
            return self._segment_cpu(frame)
        finally:
            if getattr(self.postprocessor, "smoothing", 0):
                self._busy.release()

    def _segment_cpu(self, frame: np.ndarray) -> SegmentationResult:
        check_frame(frame)
        t0 = time.perf_counter()
        with self._engine_lock:
            x = self._preprocess(frame)
            t1 = time.perf_counter()
            out = self._infer(x)
        t2 = time.perf_counter()
        with self._index_lock:
            index, self._index = self._index, self._index + 1
        result = self.postprocessor(out, frame.shape[:2], frame=frame, frame_index=index)
        result.timings = {"preprocess": (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3, **result.timings}
        self.stats.add_timings(result.timings)
        self.stats.frame_out((time.perf_counter() - t0) * 1e3)
        return result

    def _segment_gpu(self, frame: np.ndarray, pixel_format: str) -> SegmentationResult:
        t0 = time.perf_counter()
        with self._index_lock:
            index, self._index = self._index, self._index + 1
        result, _, cuda_ms, cpu_ms = self._gpu.segment(frame, self.postprocessor, index, pixel_format)
        result.timings = {**cpu_ms, **cuda_timings(cuda_ms)}
        self.stats.add_timings(result.timings)
        self.stats.frame_out((time.perf_counter() - t0) * 1e3)
        return result

    __call__ = segment

    def reset(self) -> None:
        """Forget the temporal smoothing state, or the instance tracks (between unrelated clips)."""
        self.postprocessor.reset()

    # -- streams ----------------------------------------------------------------------------
    def stream(self, source, show: bool = False, save=None, serve=None, max_frames: int | None = None,
               stats_path=None, callback: Callable[[SegmentationResult], object] | None = None,
               alpha: float = 0.5, mode: str = "blend", render: Callable[[SegmentationResult], np.ndarray] | None = None,
               legend: bool = False, sinks: list | None = None, cv2_threads: int | None = 1, queue_size: int = 2,
               stage_nice: int | None = None, tune: bool = True, serve_token: str | None = None,
               **source_options) -> Iterator[SegmentationResult]:
        """Segment a source (URI, path, camera index or `Source`) with capture, preprocessing,
        inference and postprocessing overlapping in threads; yields results in order.

        show: a window (display://0). save: a video file, image folder or image path. serve:
        "HOST:PORT" (or a port) for the browser view; serve_token: its access token (generated for
        a non-loopback host when not given; runtime.server). stats_path: stats.json, rewritten every
        few seconds and at the end. callback(result) runs for each result (return False to stop).
        render(result) -> BGR image for the sinks (default: result.overlay(alpha=, mode=)).
        legend: draw the classes present, their colours and pixel shares onto it (runtime.legend).
        cv2_threads: OpenCV threads while streaming (restored after): the stages already run in
        parallel, and OpenCV's own pool would only contend with the engine's threads.
        stage_nice: how much lower than the engine the other stages run (0: same priority; see
        runtime.pipeline). tune: on an engine that computes on this CPU, the first frames of the
        first stream measure the candidate engine threads and stage priorities (those the caller
        did not fix) and the fastest is kept for the rest and for later streams
        (`stats.info["tuning"]` says what was measured and chosen; runtime.pipeline.Tuner).
        Live sources drop stale frames (see `.stats`); others process every frame.
        """
        pipeline_options = dict(queue_size=queue_size, configs=self._configs(stage_nice, tune))
        opened: list[Sink] = []
        src = None
        try:
            # open everything that can fail before starting threads, so errors come early and clean
            if show:
                opened.append(DisplaySink("display://0"))
            src = source if isinstance(source, Source) else open_source(source, **source_options)
            if save:
                opened.append(open_sink(save, fps=src.fps or 30.0))
                _check_images_out(src, opened[-1])
            if serve:
                host, port = parse_host_port(serve)
                opened.append(ServerSink(host, port, title=f"edgeseg · {self.bundle.manifest.model.get('name') or self.bundle.path.name}",
                                         token=serve_token))
            opened.extend(open_sink(s) for s in (sinks or []))
        except BaseException:
            for s in opened:
                s.close()
            if src is not None and not isinstance(source, Source):
                src.close()
            raise
        gen = self._stream(src, opened, max_frames, stats_path, callback, alpha, mode, render, legend, cv2_threads,
                           pipeline_options)
        return Stream(gen, src, opened, own_source=not isinstance(source, Source))

    def _stream(self, src: Source, sinks: list[Sink], max_frames, stats_path, callback, alpha, mode, render, legend,
                cv2_threads, pipeline_options: dict) -> Iterator[SegmentationResult]:
        stats = Stats()
        self._stats_info(stats)
        self.stats = stats
        post = self._make_postprocessor()
        servers = [s for s in sinks if isinstance(s, ServerSink)]
        if self.instances:  # masks, outlines and captions per object, coloured by track
            plain = render or (lambda r: r.overlay(alpha=alpha))
        else:
            plain = render or (lambda r: r.overlay(alpha=alpha, mode=mode))
        annotator = Legend() if legend else None

        def draw(r: SegmentationResult, drawn: np.ndarray | None) -> np.ndarray:
            """The sinks' image: the overlay (drawn on the GPU already, or here), then the legend."""
            image = drawn if drawn is not None else plain(r)
            return annotator.annotate(image, r) if annotator is not None else image

        stats_path = Path(stats_path) if stats_path else None

        if self._gpu is not None:
            gpu = self._gpu
            # the sinks' overlay, drawn on the GPU where it is the default blend or fill
            alpha_gpu = None if not sinks or render is not None or mode not in ("blend", "fill") else (
                1.0 if mode == "fill" else float(alpha))

            def preprocess(w: Work):
                return gpu.upload(w.frame.image, overlay=alpha_gpu)

            def infer(w: Work):
                return gpu.infer(w.data)

            def postprocess(w: Work):
                r, drawn, cuda_ms = gpu.collect(w.data, post, w.frame.index, w.frame.timestamp, frame=w.frame.image)
                r.frame_name = w.frame.name
                w.timings.update(cuda_timings(cuda_ms))
                return r, drawn
        else:
            def preprocess(w: Work):
                return self._preprocess(w.frame.image)

            infer = None  # the engine of each configuration (make, below)

            def postprocess(w: Work):
                r = post(w.data, w.frame.image.shape[:2], frame=w.frame.image, frame_index=w.frame.index,
                         timestamp=w.frame.timestamp)
                r.timings.pop("postprocess", None)  # the pipeline times the whole stage
                r.frame_name = w.frame.name
                return r, None

        old_threads = cv2.getNumThreads()
        if cv2_threads is not None:
            cv2.setNumThreads(int(cv2_threads))

        def make(config: Config, frames: int | None, keep_source: bool) -> Pipeline:
            run = infer
            if run is None:
                engine, output = self._engine_for(config.threads), self._output
                if output is None:
                    run = lambda w: engine.infer(w.data)  # noqa: E731
                else:
                    run = lambda w: engine.infer(w.data)[output]  # noqa: E731
            return Pipeline(src, preprocess, run, postprocess, stats=stats,
                            max_frames=frames, queue_size=pipeline_options["queue_size"], stage_nice=config.stage_nice,
                            keep_source=keep_source)

        tuner = Tuner(pipeline_options["configs"])
        pipeline = tuner.run(make, max_frames, on_choice=lambda c: self._keep(c, tuner, stats))
        for s in servers:
            s.publish_stats(stats.summary())
        last_server = last_file = time.perf_counter()
        try:
            for work in pipeline:
                result, drawn = work.data
                t0 = time.perf_counter()
                if sinks:
                    image = draw(result, drawn)
                    for s in sinks:
                        s.write(image, result)
                t1 = time.perf_counter()
                timings = work.timings
                timings["sink"] = (t1 - t0) * 1e3
                latency = (t1 - work.ready) * 1e3
                timings["queue"] = max(0.0, latency - sum(timings.get(k, 0.0) for k in ("preprocess", "inference", "postprocess", "sink")))
                result.timings = {k: timings[k] for k in (*STAGES, *CUDA_KEYS) if k in timings}
                stats.add_timings(result.timings)
                stats.frame_out(latency)
                if servers and t1 - last_server >= SERVER_STATS_EVERY_S:
                    last_server = t1
                    summary = stats.summary()
                    for s in servers:
                        s.publish_stats(summary)
                if stats_path is not None and t1 - last_file >= STATS_EVERY_S:
                    last_file = t1
                    stats.save(stats_path)
                if callback is not None and callback(result) is False:
                    break
                yield result
                if any(s.stopped for s in sinks):
                    break
        finally:
            if self._gpu is not None:
                self._gpu.cancel()  # a stage waiting for a free slot gives up
            pipeline.close()
            if self._gpu is not None:
                self._gpu.reset()  # the threads are joined: frames left in flight are dropped, slots free again
            try:
                src.close()  # a stream stopped during tuning: the trial pipelines leave the source open
            except Exception as e:
                log.warning("closing %s: %s", getattr(src, "uri", src), e)
            errors = []
            for s in sinks:
                try:
                    s.close()
                except Exception as e:
                    errors.append(e)
            if cv2_threads is not None:
                cv2.setNumThreads(old_threads)
            if stats_path is not None:
                stats.save(stats_path)
            if errors:
                log.warning("closing sinks: %s", "; ".join(map(str, errors)))

    def tune(self, source, max_frames: int = 1000, **options) -> dict | None:
        """Stream `source` only until the tuning has chosen a configuration (or `max_frames`), and
        return what it measured (None where there was nothing to choose). Later streams run the
        choice from their first frame; benchmarks call this before they time."""
        stream = self.stream(source, max_frames=max_frames, **options)
        with stream:
            for _ in stream:
                if self._tuned is not None:
                    break
        return self._tuning

    def _configs(self, stage_nice: int | None, tune: bool) -> list[Config]:
        """The configurations the next stream measures (one: nothing to choose)."""
        if stage_nice is not None:
            check_stage_nice(stage_nice)
        if self._tuned is not None:
            return [Config(self._tuned.threads, self._tuned.stage_nice if stage_nice is None else stage_nice)]
        if not (tune and getattr(self.engine, "on_cpu", False)):
            return [Config(self._threads, STAGE_NICE if stage_nice is None else stage_nice)]
        # threads vary unless the caller fixed them or gave an engine opened already
        vary = self._threads is None and self._open_more is not None
        return candidate_configs(self._threads, stage_nice, vary_threads=vary)

    def _engine_for(self, threads: int | None):
        if threads not in self._engines:
            self._engines[threads] = self._open_more(threads)
        return self._engines[threads]

    def _keep(self, config: Config, tuner: Tuner, stats: Stats) -> None:
        """The stream settled on `config`: it becomes the Segmenter's engine and configuration."""
        self.engine = self._engine_for(config.threads)
        for threads, engine in list(self._engines.items()):
            if threads != config.threads:
                engine.close()
                del self._engines[threads]
        stats.info.update(stage_nice=config.stage_nice, engine_threads=config.to_dict()["threads"])
        if len(tuner.candidates) > 1:
            self._tuned, self._tuning = config, tuner.summary()
        if self._tuning is not None:
            stats.info["tuning"] = self._tuning  # measured on this stream or on the first one

    def run(self, source, callback: Callable[[SegmentationResult], object] | None = None, **options) -> Stats:
        """Callback mode: stream `source` to the end (or until callback returns False); returns the stats."""
        for _ in self.stream(source, callback=callback, **options):
            pass
        return self.stats

    # -- measuring --------------------------------------------------------------------------
    def engine_fps(self, frames: int = 100, warmup: int = 10, frame: np.ndarray | None = None) -> float:
        """Engine-only throughput: `infer` in a loop on one preprocessed frame (no capture,
        preprocessing or postprocessing), the ceiling a pipeline can approach."""
        if frame is None:
            h, w = self.preprocess.size
            frame = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
        if self._gpu is not None:
            return self._gpu.engine_fps(frames, warmup)
        x = self._preprocess(check_frame(frame))
        for _ in range(max(1, warmup)):
            self._infer(x)
        t0 = time.perf_counter()
        for _ in range(frames):
            self._infer(x)
        return frames / (time.perf_counter() - t0)

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        gpu, self._gpu = getattr(self, "_gpu", None), None
        if gpu is not None:
            gpu.close()
        engines = {id(e): e for e in [getattr(self, "engine", None), *getattr(self, "_engines", {}).values()] if e is not None}
        self.engine, self._engines = None, {}
        for engine in engines.values():  # the tuning may have opened one per thread count
            engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self) -> str:
        return (f"Segmenter({str(self.bundle.path)!r}, backend={self.backend!r} ({self.backend_reason}), "
                f"precision={self.precision!r}, classes={len(self.labels)}, input={self.preprocess.size})")


class _Tracked:
    """Instance post-processing followed by the tracker: rows keep their id across frames. Calls
    run one at a time (a tracker follows one sequence of frames)."""

    def __init__(self, post, track_options: dict):
        from runtime.tracking import IoUTracker

        self.post, self.tracker = post, IoUTracker(**track_options)
        self._lock = threading.Lock()

    def __call__(self, outputs, frame_hw, **kw):
        result = self.post(outputs, frame_hw, **kw)
        with self._lock:
            tracked = self.tracker.update(result)
        tracked.timings = result.timings
        return tracked

    def reset(self) -> None:
        with self._lock:
            self.tracker.reset()

    def __getattr__(self, name):
        return getattr(self.post, name)


def _check_images_out(src: Source, sink: Sink) -> None:
    """Images in, images out: one image gives one image, a folder of them a folder."""
    if not isinstance(src, ImageSource) or src.loop:
        return
    n = len(src.paths)
    if n == 1 and isinstance(sink, VideoSink):
        raise SinkError(f"the source is one image ({src.uri}): write an image (such as result.png) or a folder "
                        f"(such as results/, where it keeps its name), not the video {sink.uri}")
    if n > 1 and isinstance(sink, ImageFileSink):
        raise SinkError(f"the source has {n} images and {sink.uri} would keep only the last: write a folder "
                        f"(such as {Path(sink.uri).with_suffix('')}/, where each keeps its name) or a video (such as overlay.mp4)")


__all__ = ["Segmenter", "SegmentationResult", "Stream"]
