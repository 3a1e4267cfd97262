"""The GPU frame path: camera frames through CUDA preprocessing, a TensorRT engine and CUDA
postprocessing, with only the class map (and the overlay, when a sink draws one) coming back.

    path = GpuFramePath(engine, manifest, postprocessor)     # engine: runtime.engines.tensorrt.TensorRTEngine
    slot = path.upload(frame)       # pinned copy, async upload, fused preprocessing into the engine's input
    path.infer(slot)                # engine on device pointers, classification (+ overlay), async download
    result, overlay, cuda_ms = path.collect(slot, postprocessor, index)   # wait for this frame only

The engine is a device engine: TensorRTEngine, or anything offering what the path uses of it
(`gpu` (GpuContext), `inputs`, `outputs`, `check_shape`, `ensure_slots(n)` and
`infer_device(inputs, shapes, stream, slot) -> {name: DeviceTensor}`), as the benchmarks' stand-ins do.

Each frame in flight has its own slot: a CUDA stream, events between the stages, device and
page-locked host buffers and an execution context of the engine. `upload`, `infer` and `collect`
are the preprocess, inference and postprocess stages of runtime.pipeline, on three threads: while
one frame is waited for, the next is uploaded and preprocessed on another stream. Every CUDA
call makes the device's primary context current itself (runtime.engines.tensorrt.GpuContext).

The class map equals the CPU path's (runtime.postprocess.Postprocessor: argmax of the bilinearly
upsampled scores, letterbox removed, hidden classes as `fill`; one score channel: score >
threshold). Postprocessing options that need the scores on the host (smoothing, a confidence
threshold, scores=True) or a mask output keep the GPU preprocessing and engine and download the
scores for the CPU postprocessing instead (`on_gpu` False, `why_cpu` says why).
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time

import numpy as np

from runtime.cuda.kernels import GpuPostprocessor, GpuPreprocessor, PostTables, frame_hw, logit_threshold
from runtime.engines.base import EngineError
from runtime.postprocess import SegmentationResult

EVENTS = ("start", "uploaded", "preprocessed", "inferred", "classified", "done")
# CUDA milliseconds per stage, from the events around it (Stats' "cuda" section)
CUDA_STAGES = {"upload": ("start", "uploaded"), "preprocess": ("uploaded", "preprocessed"),
               "inference": ("preprocessed", "inferred"), "postprocess": ("inferred", "classified"),
               "download": ("classified", "done")}
WAIT_S = 0.05  # how often a wait for a free slot checks for cancellation


class Cancelled(EngineError):
    """The frame path was closed while a stage waited for a free slot."""


def is_device_engine(engine) -> bool:
    """Whether `engine` runs on device pointers in a GpuContext (the TensorRT engine does)."""
    return hasattr(engine, "infer_device") and hasattr(engine, "gpu") and hasattr(engine, "ensure_slots")


def cpu_postprocessing_reason(postprocessor) -> str | None:
    """Why these postprocessing options need the scores on the host; None when the GPU does it all."""
    if postprocessor.output_kind == "mask":
        return "the model outputs a class mask, not scores"
    wants = [name for name, on in (("smoothing", postprocessor.smoothing), ("a confidence threshold", postprocessor.threshold
             is not None), ("scores", postprocessor.want_scores)) if on]
    if wants:
        return f"{' and '.join(wants)} need the scores on the host"
    return None


class _Slot:
    """Buffers, stream and events of one frame in flight."""

    def __init__(self, cuda, index: int, input_nbytes: int):
        self.index = index
        self.stream = cuda.Stream()
        self.events = {k: cuda.Event() for k in EVENTS}
        self.input = cuda.mem_alloc(input_nbytes)  # the engine's input binding, written by the preprocessing kernel
        self.key = None
        self.frame_host = self.frame_dev = self.map_dev = self.map_host = self.out_dev = self.overlay_host = None
        self.scores_host = None
        self.size: tuple[int, int] = (0, 0)
        self.format = "bgr"
        self.overlay = False
        self.alpha: float | None = None

    def ensure(self, cuda, shape: tuple[int, ...], size: tuple[int, int], overlay: bool) -> None:
        """Buffers for frames of this shape (reallocated only when the frame size changes)."""
        key = (shape, size, overlay)
        if self.key == key:
            return
        self.free_frame_buffers()
        nbytes = int(np.prod(shape))
        self.frame_host = cuda.pagelocked_empty(shape, np.uint8)
        self.frame_dev = cuda.mem_alloc(nbytes)
        self.map_dev = cuda.mem_alloc(size[0] * size[1])
        self.map_host = cuda.pagelocked_empty(size, np.uint8)
        if overlay:
            self.out_dev = cuda.mem_alloc(nbytes)
            self.overlay_host = cuda.pagelocked_empty(shape, np.uint8)
        self.key = key

    def free_frame_buffers(self) -> None:
        for a in (self.frame_dev, self.map_dev, self.out_dev):
            if a is not None:
                a.free()
        self.frame_host = self.frame_dev = self.map_dev = self.map_host = self.out_dev = self.overlay_host = None
        self.key = None

    def free(self) -> None:
        self.free_frame_buffers()
        if self.input is not None:
            self.input.free()
            self.input = None


class GpuFramePath:
    """Frames -> SegmentationResult around a TensorRT engine, `in_flight` frames at a time."""

    def __init__(self, engine, manifest, postprocessor, *, in_flight: int = 2):
        if not is_device_engine(engine):
            raise EngineError(f"the GPU frame path runs an engine on device buffers (TensorRT); the "
                              f"{getattr(engine, 'backend', type(engine).__name__)} engine takes the CPU path")
        self.engine, self.manifest, self.pre = engine, manifest, manifest.preprocess
        self.gpu, self.cuda = engine.gpu, engine.gpu.cuda
        inp = engine.inputs[0]
        engine.check_shape(inp, tuple(self.pre.input_shape))
        if np.dtype(self.pre.dtype) != inp.dtype:
            raise EngineError(f"the engine's input {inp.name!r} is {inp.dtype}, the bundle's preprocessing writes "
                              f"{self.pre.dtype}; rebuild the engine from this bundle (`edgeseg build`)")
        self.input_name, self.input_shape = inp.name, tuple(self.pre.input_shape)
        names = [o.name for o in engine.outputs]
        self.output_name = manifest.output_name if manifest.output_name in names else names[0]
        self._post = postprocessor  # for the letterbox geometry it shares with every postprocessor of the bundle
        self.why_cpu = cpu_postprocessing_reason(postprocessor)
        self.on_gpu = self.why_cpu is None
        self.num_classes = len(postprocessor.labels)
        self.pre_k = GpuPreprocessor(self.pre, self.gpu)
        self.post_k = None
        if self.on_gpu:
            self.post_k = GpuPostprocessor(PostTables.from_postprocessor(postprocessor), self.gpu,
                                           threshold=logit_threshold(0.5, postprocessor.output_kind))
        engine.ensure_slots(in_flight)
        with self.gpu.active():
            self.slots = [_Slot(self.cuda, i, self.pre_k.output_nbytes) for i in range(in_flight)]
        self._free: queue.Queue[_Slot] = queue.Queue()
        for s in self.slots:
            self._free.put(s)
        self._cancelled = threading.Event()

    # -- the three stages ----------------------------------------------------------------------------
    def upload(self, frame: np.ndarray, pixel_format: str = "bgr", overlay: float | None = None) -> _Slot:
        """Stage 1: take a free slot (waiting for one while `in_flight` frames are pending), copy the frame
        into its page-locked buffer, upload it asynchronously and enqueue the fused preprocessing, which
        writes the engine's input binding. `overlay`: the alpha of an overlay to draw (BGR frames)."""
        size = frame_hw(frame, pixel_format)
        slot = self._acquire()
        try:
            cuda, ev, s = self.cuda, slot.events, slot.stream
            draw = overlay is not None and self.on_gpu and pixel_format == "bgr"
            with self.gpu.active():
                slot.ensure(cuda, frame.shape, size, draw)
                np.copyto(slot.frame_host, frame)
                slot.size, slot.format, slot.overlay, slot.alpha = size, pixel_format, draw, overlay
                pitch = frame.shape[1] * (1 if pixel_format == "nv12" else 3)
                ev["start"].record(s)
                cuda.memcpy_htod_async(slot.frame_dev, slot.frame_host, s)
                ev["uploaded"].record(s)
                uv = int(slot.frame_dev) + size[0] * pitch if pixel_format == "nv12" else 0
                self.pre_k.launch(int(slot.frame_dev), size, pitch, int(slot.input), s, pixel_format, uv, pitch if uv else 0)
                ev["preprocessed"].record(s)
        except BaseException:
            self._release(slot)
            raise
        return slot

    def infer(self, slot: _Slot) -> _Slot:
        """Stage 2: enqueue the engine on the slot's input binding, then the classification at frame size
        (and the overlay) on its outputs, then the download of what comes back. Nothing waits here."""
        try:
            cuda, ev, s = self.cuda, slot.events, slot.stream
            with self.gpu.active():
                outs = self.engine.infer_device({self.input_name: int(slot.input)}, {self.input_name: self.input_shape},
                                                stream=s, slot=slot.index)
                scores = outs[self.output_name]
                ev["inferred"].record(s)
                if self.on_gpu:
                    layout = self._layout(scores.shape)
                    hw = scores.shape[2:] if layout == "nchw" else scores.shape[1:3]
                    box = self._box(tuple(hw), slot.size)
                    self.post_k.classify(scores.ptr, scores.shape, scores.dtype, box, slot.size, int(slot.map_dev), s, layout)
                    if slot.overlay:
                        pitch = slot.size[1] * 3
                        self.post_k.overlay(int(slot.map_dev), slot.size, int(slot.frame_dev), pitch, int(slot.out_dev),
                                            pitch, s, alpha=slot.alpha)
                    ev["classified"].record(s)
                    cuda.memcpy_dtoh_async(slot.map_host, slot.map_dev, s)
                    if slot.overlay:
                        cuda.memcpy_dtoh_async(slot.overlay_host, slot.out_dev, s)
                else:
                    ev["classified"].record(s)
                    if slot.scores_host is None or slot.scores_host.shape != scores.shape or slot.scores_host.dtype != scores.dtype:
                        slot.scores_host = cuda.pagelocked_empty(scores.shape, scores.dtype)
                    cuda.memcpy_dtoh_async(slot.scores_host, scores.ptr, s)
                ev["done"].record(s)
        except BaseException:
            self._release(slot)
            raise
        return slot

    def collect(self, slot: _Slot, postprocessor, frame_index: int = 0, timestamp: float | None = None,
                frame: np.ndarray | None = None) -> tuple[SegmentationResult, np.ndarray | None, dict]:
        """Stage 3: wait for this frame's download, then build its result (the CPU postprocessing with
        `postprocessor` when the scores came back instead). Returns (result, overlay or None, CUDA ms per
        stage); the slot is free again."""
        try:
            ev = slot.events
            with self.gpu.active():
                ev["done"].synchronize()
                cuda_ms = {k: ev[b].time_since(ev[a]) for k, (a, b) in CUDA_STAGES.items()}
            if self.on_gpu:
                result = SegmentationResult(
                    class_map=np.array(slot.map_host), labels=postprocessor.labels, palette=postprocessor.palette,
                    frame=frame, frame_index=frame_index, timestamp=timestamp, background=postprocessor.background,
                    hidden=postprocessor.hidden)
                overlay = np.array(slot.overlay_host) if slot.overlay else None
            else:
                result = postprocessor(np.array(slot.scores_host), slot.size, frame=frame, frame_index=frame_index,
                                       timestamp=timestamp)
                result.timings.pop("postprocess", None)
                overlay = None
            return result, overlay, cuda_ms
        finally:
            self._release(slot)

    # -- one frame ---------------------------------------------------------------------------------
    def segment(self, frame: np.ndarray, postprocessor, frame_index: int = 0, pixel_format: str = "bgr",
                overlay: float | None = None):
        """All three stages for one frame: (result, overlay or None, CUDA ms, CPU ms per stage)."""
        t0 = time.perf_counter()
        slot = self.upload(frame, pixel_format, overlay)
        t1 = time.perf_counter()
        self.infer(slot)
        t2 = time.perf_counter()
        result, drawn, cuda_ms = self.collect(slot, postprocessor, frame_index, frame=frame if pixel_format == "bgr" else None)
        t3 = time.perf_counter()
        return result, drawn, cuda_ms, {"preprocess": (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3,
                                        "postprocess": (t3 - t2) * 1e3}

    def engine_fps(self, frames: int = 100, warmup: int = 10) -> float:
        """Engine-only throughput: the engine on one preprocessed frame already in its input binding,
        synchronised after each run (no upload, pre- or postprocessing), the ceiling a pipeline can approach."""
        h, w = self.pre.size
        frame = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
        slot = self.upload(frame)
        try:
            with self.gpu.active():
                run = lambda: self.engine.infer_device({self.input_name: int(slot.input)},  # noqa: E731
                                                       {self.input_name: self.input_shape}, stream=slot.stream, slot=slot.index)
                for _ in range(max(1, warmup)):
                    run()
                slot.stream.synchronize()
                t0 = time.perf_counter()
                for _ in range(frames):
                    run()
                    slot.stream.synchronize()
                return frames / (time.perf_counter() - t0)
        finally:
            self._release(slot)

    # -- helpers -----------------------------------------------------------------------------------
    def _layout(self, shape: tuple[int, ...]) -> str:
        nc = self.num_classes
        channels = (nc, 1) if nc <= 2 else (nc,)
        if len(shape) == 4 and shape[1] in channels:
            return "nchw"
        if len(shape) == 4 and shape[3] in channels:
            return "nhwc"
        raise EngineError(f"the engine's output {self.output_name!r} has shape {tuple(shape)}, not (1, {nc}, H, W) "
                          f"scores for the bundle's {nc} labels; the manifest does not match the engine")

    def _box(self, map_hw: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
        """Where the frame sits in the score map: Preprocess.letterbox scaled to it, as the CPU path does."""
        return self._post._box(map_hw, size)

    def _acquire(self) -> _Slot:
        while True:
            if self._cancelled.is_set():
                raise Cancelled("the GPU frame path was closed")
            try:
                return self._free.get(timeout=WAIT_S)
            except queue.Empty:
                continue

    def _release(self, slot: _Slot) -> None:
        self._free.put(slot)

    def cancel(self) -> None:
        """Wake and fail any stage waiting for a free slot (the stream is stopping)."""
        self._cancelled.set()

    def reset(self) -> None:
        """After a stream has ended (its threads joined): wait for the work of frames it left in flight,
        free every slot again and accept frames."""
        with self.gpu.active():
            for s in self.slots:
                s.stream.synchronize()
        while True:
            try:
                self._free.get_nowait()
            except queue.Empty:
                break
        for s in self.slots:
            self._free.put(s)
        self._cancelled.clear()

    def close(self) -> None:
        self.cancel()
        with self.gpu.active():
            for s in self.slots:
                with contextlib.suppress(Exception):  # a failed launch must not keep the memory
                    s.stream.synchronize()
                s.free()
        self.slots = []
        if self.post_k is not None:
            self.post_k.close()


__all__ = ["GpuFramePath", "CUDA_STAGES", "Cancelled", "cpu_postprocessing_reason", "is_device_engine"]
