"""The GPU frame path around a real GPU engine, measured side by side in one run: pipeline FPS over
engine-only FPS (goal >= 0.95).

The pipeline is the runtime as `edgeseg run` drives a TensorRT engine: `Segmenter.stream` with the
pipeline's capture, preprocess, inference and postprocess threads, the frame copied to page-locked
memory and uploaded once, the fused preprocessing kernel writing the engine's input, the engine,
classification at frame size (and with --overlay the overlay) on the GPU, two frames in flight on
their own CUDA streams, only the class map (and overlay) coming back.

The engine is a stand-in, in this benchmark only (never in runtime/): TensorRT cannot be installed
on the GPU machines at hand, so the default model runs in PyTorch on CUDA, captured as a CUDA graph
per frame slot (one replay per frame, as TensorRT's execute_async_v3 is one enqueue; its input is
copied device-to-device into the graph's static input first). Engine-only FPS is that engine alone
on one preprocessed frame, synchronised after each run: what GpuFramePath.engine_fps measures for
TensorRT. Frames come from memory (synthetic scenes rendered once), so decoding, which a Jetson
does in hardware, does not bound the pipeline.

Each round times an engine-only burst, a pipeline burst and another engine-only burst; the ratio
divides the pipeline by the mean of the engine bursts around it, and medians over rounds are reported.

    python benchmarks/stream_gpu.py [--frame 1080x1920] [--size 512x512] [--dtype float32] [--overlay] [--json out.json]

Exits with status 2 and a message when pycuda, torch with CUDA or a GPU is missing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.sinks import Sink  # noqa: E402
from runtime.sources import Frame, Source  # noqa: E402

GOAL = 0.95
# What benchmarks/device_check.sh measures: 1080p frames to the 512x512 task of the preprocessing benchmark,
# float32 and float16 engines, with and without the overlay a sink needs; and the default model's own 256x256.
MATRICES = {
    "quick": [dict(frame_hw=(1080, 1920), size=(512, 512), dtype="float32", overlay=False, frames=200, rounds=2,
                   engine_frames=200)],
    "full": [dict(frame_hw=(1080, 1920), size=(512, 512), dtype=dtype, overlay=overlay, frames=400, rounds=3)
             for dtype in ("float32", "float16") for overlay in (False, True)]
            + [dict(frame_hw=(1080, 1920), size=(256, 256), dtype="float32", overlay=False, frames=400, rounds=3)],
}


class MemorySource(Source):
    """`count` frames cycling through images held in memory (a file source: every frame processed)."""

    def __init__(self, images: list[np.ndarray], count: int):
        super().__init__()
        self.images, self.count, self.n = images, int(count), 0
        self.uri, self.size, self.fps = "memory://", images[0].shape[:2], None
        self.frame_count = self.count

    def read(self) -> Frame | None:
        if self.closed or self.n >= self.count:
            return None
        frame = Frame(self.images[self.n % len(self.images)], self.n, time.perf_counter(), False)
        self.n += 1
        return frame


class KeepLatest(Sink):
    """A sink that keeps the last image it was given: the overlay is produced for it, nothing is encoded
    (an encoder would measure itself, not the frame path)."""

    uri = "memory://latest"

    def __init__(self):
        self.image, self.count = None, 0

    def write(self, image, result=None) -> None:
        self.image, self.count = image, self.count + 1


class TorchGraphEngine:
    """Benchmark stand-in for a TensorRT engine: a torch model on CUDA, one CUDA graph per slot, behind
    the device-engine interface runtime.cuda.frames drives (inputs, outputs, ensure_slots, infer_device)."""

    def __init__(self, model, pre, gpu):
        import torch

        from runtime.engines.base import TensorInfo

        self.torch, self.gpu, self.pre = torch, gpu, pre
        self.tdtype = torch.float16 if pre.dtype == "float16" else torch.float32
        self.device = torch.device("cuda", gpu.index)
        self.model = model.to(self.device, self.tdtype).eval()
        self.precision = "fp16" if pre.dtype == "float16" else "fp32"
        self.backend = f"torch {torch.__version__} CUDA graph (benchmark stand-in)"
        with torch.no_grad():
            out = self.model(torch.zeros(pre.input_shape, device=self.device, dtype=self.tdtype))
        self.inputs = [TensorInfo("input", tuple(pre.input_shape), np.dtype(pre.dtype))]
        self.outputs = [TensorInfo("logits", tuple(out.shape), np.dtype(pre.dtype))]
        self._graphs: list = []

    def check_shape(self, info, shape):
        if tuple(shape) != tuple(info.shape):
            from runtime.engines.base import EngineError

            raise EngineError(f"the stand-in engine takes {info.shape}, got {tuple(shape)}")

    def ensure_slots(self, n: int) -> None:
        torch = self.torch
        while len(self._graphs) < n:
            x = torch.zeros(self.pre.input_shape, device=self.device, dtype=self.tdtype)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.no_grad(), torch.cuda.stream(side):
                for _ in range(3):  # warm up outside the capture, as CUDA graphs need
                    self.model(x)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph):
                y = self.model(x)
            torch.cuda.synchronize(self.device)
            self._graphs.append((graph, x, y))

    def infer_device(self, inputs, shapes=None, stream=None, slot: int = 0):
        from runtime.engines.tensorrt import DeviceTensor

        graph, x, y = self._graphs[slot]
        src = int(next(iter(inputs.values())))
        with self.gpu.active():
            self.gpu.cuda.memcpy_dtod_async(x.data_ptr(), src, x.numel() * x.element_size(), stream)
            with self.torch.cuda.stream(self.torch.cuda.ExternalStream(stream.handle, device=self.device)):
                graph.replay()
        return {"logits": DeviceTensor("logits", y.data_ptr(), tuple(y.shape), np.dtype(self.pre.dtype))}

    def close(self) -> None:
        self._graphs = []


def _scenes(frame_hw: tuple[int, int], n: int) -> list[np.ndarray]:
    from edgeseg.data.synthetic import SyntheticScenes

    return [img for img, _ in SyntheticScenes(size=frame_hw, length=n, split="test")]


def _stage_means(summary: dict, key: str) -> dict:
    return {k: v["mean_ms"] for k, v in summary.get(key, {}).items() if v.get("count")}


def measure(gpu, frame_hw=(1080, 1920), size=(512, 512), dtype="float32", overlay=False, frames=300, rounds=3,
            engine_frames=300) -> dict:
    """Pipeline vs engine-only FPS of the GPU frame path around the torch CUDA-graph stand-in."""
    import torch

    from edgeseg.bundle import Bundle, Manifest
    from edgeseg.models import load_checkpoint
    from edgeseg.spec import Preprocess
    from edgeseg.train import DEFAULT_CHECKPOINT
    from runtime.segmenter import Segmenter

    model, ckpt = load_checkpoint(DEFAULT_CHECKPOINT)
    pre = Preprocess.from_dict(ckpt["preprocess"]).replace(size=list(size), dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="edgeseg-stream-gpu-") as tmp:
        bundle = Bundle.create(Path(tmp) / "bundle", Manifest(labels=ckpt["labels"], palette=ckpt["palette"], preprocess=pre))
        engine = TorchGraphEngine(model, pre, gpu)
        seg = Segmenter(bundle, engine=engine, backend_reason="benchmark stand-in")
        images = _scenes(frame_hw, 8)
        keep = KeepLatest()
        seg.segment(images[0])  # compile kernels, allocate the slots
        seg.engine_fps(20, 10)
        rows = []
        for _ in range(rounds):
            before = seg.engine_fps(engine_frames, 10)
            for _ in seg.stream(MemorySource(images, frames), sinks=[keep] if overlay else None, stage_nice=0):
                pass
            summary = seg.stats.summary()
            after = seg.engine_fps(engine_frames, 10)
            pipe = summary["pipeline_fps"] or 0.0
            rows.append({"engine_fps_before": round(before, 1), "pipeline_fps": pipe, "engine_fps_after": round(after, 1),
                         "ratio": round(pipe / ((before + after) / 2), 3), "frames": summary["frames_out"],
                         "cuda_ms": _stage_means(summary, "cuda_stages"),
                         "cpu_ms": {k: v for k, v in _stage_means(summary, "stages").items()}})
        seg.close()
        engine.close()
    ratio = statistics.median(r["ratio"] for r in rows)
    return {
        "engine": engine.backend, "model": ckpt["arch"]["name"], "frame": f"{frame_hw[0]}x{frame_hw[1]}",
        "input": f"{size[0]}x{size[1]}", "dtype": dtype, "overlay_on_gpu": bool(overlay), "frame_path": seg.frame_path,
        "frames_per_burst": frames, "rounds": rounds,
        "engine_fps_median": round(statistics.median((r["engine_fps_before"] + r["engine_fps_after"]) / 2 for r in rows), 1),
        "pipeline_fps_median": round(statistics.median(r["pipeline_fps"] for r in rows), 1),
        "ratio_median": round(ratio, 3), "goal": GOAL, "goal_met": ratio >= GOAL, "rounds_detail": rows,
        "torch": torch.__version__,
    }


def describe(r: dict) -> str:
    last = r["rounds_detail"][-1]
    return (f"{r['frame']} -> {r['input']} {r['dtype']}{' + GPU overlay' if r['overlay_on_gpu'] else ''}: pipeline "
            f"{r['pipeline_fps_median']:.0f} FPS / engine-only {r['engine_fps_median']:.0f} FPS = {r['ratio_median']:.3f} "
            f"(goal {r['goal']}: {'met' if r['goal_met'] else 'NOT met'}); CUDA ms "
            + ", ".join(f"{k} {v:.3f}" for k, v in last["cuda_ms"].items())
            + "; CPU ms " + ", ".join(f"{k} {v:.3f}" for k, v in last["cpu_ms"].items()))


def _hw(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frame", type=_hw, default=(1080, 1920), help="frame HxW (default 1080x1920)")
    ap.add_argument("--size", type=_hw, default=(512, 512), help="model input HxW (default 512x512)")
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    ap.add_argument("--overlay", action="store_true", help="draw the overlay on the GPU for a sink")
    ap.add_argument("--frames", type=int, default=300, help="frames per pipeline burst")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--matrix", choices=["quick", "full"],
                    help="instead of one configuration, the list benchmarks/device_check.sh reports (MATRICES)")
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    try:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
        from runtime.engines.tensorrt import gpu_context

        gpu = gpu_context(args.device)
    except Exception as e:
        print(f"stream_gpu: no usable GPU: {e}", file=sys.stderr)
        return 2
    configs = MATRICES[args.matrix] if args.matrix else [
        dict(frame_hw=args.frame, size=args.size, dtype=args.dtype, overlay=args.overlay, frames=args.frames,
             rounds=args.rounds)]
    print(f"device: {gpu.name}")
    results = []
    for config in configs:
        results.append(measure(gpu, **config))
        print(describe(results[-1]), flush=True)
        if args.json:  # rewritten after each configuration: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps({"device": gpu.name, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
