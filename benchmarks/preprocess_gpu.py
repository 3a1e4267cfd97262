"""Fused CUDA preprocessing, 1080p BGR -> 512x512 network input, measured side by side in one run,
for float32 and float16 outputs:

  - kernel time (CUDA events, median of many launches),
  - the memory-bandwidth floor: bytes the kernel must move (the frame read once, the tensor written
    once) / the GPU's peak DRAM bandwidth from its device attributes, and the same bytes moved by a
    device-to-device copy (what the GPU reaches in practice),
  - OpenCV on the CPU (`Preprocess.apply`, the reference the kernel matches), on one thread and on
    OpenCV's default thread count,
  - the host-to-device copy of the frame from page-locked memory.

    python benchmarks/preprocess_gpu.py [--frame 1080x1920] [--size 512x512] [--letterbox] [--json out.json]

Exits with status 2 and a message when pycuda or a CUDA GPU is missing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeseg.spec import Preprocess  # noqa: E402


def _hw(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def _events_ms(cuda, stream, fn, iters: int) -> list[float]:
    start, end = cuda.Event(), cuda.Event()
    times = []
    for _ in range(iters):
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(end.time_since(start))
    return times


def peak_bandwidth_gbs(gpu) -> float | None:
    """Peak DRAM bandwidth from the device attributes (double data rate x bus width); None where unreported."""
    try:
        attr = gpu.cuda.device_attribute
        clock_khz = gpu.device.get_attribute(attr.MEMORY_CLOCK_RATE)
        bus_bits = gpu.device.get_attribute(attr.GLOBAL_MEMORY_BUS_WIDTH)
    except Exception:  # attribute not reported by this driver/toolkit
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None


def measure(gpu, frame_hw=(1080, 1920), size=(512, 512), dtype="float32", letterbox=False, iters=200,
            cpu_iters=30) -> dict:
    """One configuration: kernel vs bandwidth floor vs device copy vs OpenCV, as a dict of figures."""
    import cv2

    from runtime.cuda.kernels import GpuPreprocessor

    cuda = gpu.cuda
    pre = Preprocess(size=size, resize="letterbox" if letterbox else "stretch", dtype=dtype)
    fh, fw = frame_hw
    frame = np.random.default_rng(0).integers(0, 256, (fh, fw, 3), np.uint8)
    k = GpuPreprocessor(pre, gpu)
    # Correctness first: a benchmark of a wrong kernel means nothing.
    err = float(np.abs(k(frame).astype(np.float32) - pre.replace(dtype="float32").apply(frame)).max())
    moved = frame.nbytes + k.output_nbytes  # read the frame once, write the input once
    with gpu.active():
        stream = cuda.Stream()
        host = cuda.pagelocked_empty(frame.shape, np.uint8)
        np.copyto(host, frame)
        d_frame, d_out, d_copy = cuda.mem_alloc(frame.nbytes), cuda.mem_alloc(k.output_nbytes), cuda.mem_alloc(frame.nbytes)
        try:
            cuda.memcpy_htod(d_frame, host)
            launch = lambda: k.launch(int(d_frame), (fh, fw), fw * 3, int(d_out), stream)  # noqa: E731
            for _ in range(20):
                launch()
            stream.synchronize()
            kernel = _events_ms(cuda, stream, launch, iters)
            # a device-to-device copy of the frame reads and writes frame.nbytes: scaled to `moved` read+written
            copy = _events_ms(cuda, stream, lambda: cuda.memcpy_dtod_async(d_copy, d_frame, frame.nbytes, stream), iters)
            upload = _events_ms(cuda, stream, lambda: cuda.memcpy_htod_async(d_frame, host, stream), max(20, iters // 5))
        finally:
            for a in (d_frame, d_out, d_copy):
                a.free()
    peak = peak_bandwidth_gbs(gpu)
    kern = statistics.median(kernel)
    copy_ms = statistics.median(copy) * moved / (2 * frame.nbytes)
    floor_ms = moved / (peak * 1e9) * 1e3 if peak else None

    def cpu_ms(threads: int | None) -> float:
        old = cv2.getNumThreads()
        if threads is not None:
            cv2.setNumThreads(threads)
        try:
            pre.apply(frame)
            times = []
            for _ in range(cpu_iters):
                t0 = time.perf_counter()
                pre.apply(frame)
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        finally:
            cv2.setNumThreads(old)

    cpu1, cpu_all = cpu_ms(1), cpu_ms(None)
    return {
        "frame": f"{fh}x{fw}", "size": f"{size[0]}x{size[1]}", "resize": pre.resize, "dtype": dtype,
        "max_abs_error_vs_preprocess_apply": err, "bytes_moved": moved,
        "kernel_ms_median": round(kern, 5), "kernel_ms_min": round(min(kernel), 5),
        "kernel_gbs": round(moved / kern / 1e6, 1),
        "peak_dram_gbs": round(peak, 1) if peak else None, "bandwidth_floor_ms": round(floor_ms, 5) if floor_ms else None,
        "kernel_over_floor": round(kern / floor_ms, 2) if floor_ms else None,
        "dtod_copy_same_bytes_ms": round(copy_ms, 5), "kernel_over_copy": round(kern / copy_ms, 2),
        "opencv_cpu_ms_1_thread": round(cpu1, 3), "opencv_cpu_ms_default_threads": round(cpu_all, 3),
        "opencv_threads_default": cv2.getNumThreads(),
        "cpu_1_thread_over_kernel": round(cpu1 / kern, 1), "cpu_default_threads_over_kernel": round(cpu_all / kern, 1),
        "upload_pinned_ms_median": round(statistics.median(upload), 5),
        "kernel_iters": iters, "cpu_iters": cpu_iters,
    }


def describe(r: dict) -> str:
    floor = (f"bandwidth floor {r['bandwidth_floor_ms']:.4f} ms at {r['peak_dram_gbs']:.0f} GB/s -> kernel/floor "
             f"{r['kernel_over_floor']:.2f}x" if r["bandwidth_floor_ms"] else "peak DRAM bandwidth not reported")
    return (f"{r['frame']} -> {r['size']} {r['resize']} {r['dtype']}: kernel {r['kernel_ms_median']:.4f} ms "
            f"({r['kernel_gbs']:.0f} GB/s, max |err| {r['max_abs_error_vs_preprocess_apply']:.1e}); {floor}; "
            f"dtod copy of the same bytes {r['dtod_copy_same_bytes_ms']:.4f} ms -> kernel/copy {r['kernel_over_copy']:.2f}x; "
            f"OpenCV CPU {r['opencv_cpu_ms_1_thread']:.2f} ms (1 thread, {r['cpu_1_thread_over_kernel']:.0f}x the kernel), "
            f"{r['opencv_cpu_ms_default_threads']:.2f} ms ({r['opencv_threads_default']} threads); "
            f"upload {r['upload_pinned_ms_median']:.4f} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frame", type=_hw, default=(1080, 1920), help="frame HxW (default 1080x1920)")
    ap.add_argument("--size", type=_hw, default=(512, 512), help="network input HxW (default 512x512)")
    ap.add_argument("--letterbox", action="store_true", help="letterbox instead of stretch")
    ap.add_argument("--dtype", choices=["float32", "float16", "both"], default="both")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--cpu-iters", type=int, default=30)
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    try:
        from runtime.engines.tensorrt import gpu_context

        gpu = gpu_context(args.device)
    except Exception as e:  # EngineError: pycuda or GPU missing
        print(f"preprocess_gpu: no usable GPU: {e}", file=sys.stderr)
        return 2
    print(f"device: {gpu.name} (sm{''.join(map(str, gpu.compute_capability))})")
    results = []
    for dtype in (["float32", "float16"] if args.dtype == "both" else [args.dtype]):
        r = measure(gpu, args.frame, args.size, dtype, args.letterbox, args.iters, args.cpu_iters)
        results.append(r)
        print(describe(r))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": gpu.name, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
