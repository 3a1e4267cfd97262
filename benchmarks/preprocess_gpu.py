"""Fused CUDA preprocessing, 1080p BGR -> 512x512 network input, measured side by side in one run:

  - kernel time (CUDA events, median of many launches),
  - the memory-bandwidth floor: bytes the kernel must move / the GPU's peak DRAM bandwidth, and the
    same bytes moved by a device-to-device copy (what the GPU reaches in practice),
  - OpenCV on the CPU (`Preprocess.apply`, the reference the kernel matches),
  - the host-to-device copy of the frame from pinned memory.

    python benchmarks/preprocess_gpu.py [--frame 1080x1920] [--size 512x512] [--letterbox] [--dtype float16]

Exits with status 2 and a message when pycuda or a CUDA GPU is missing.
"""
from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frame", type=_hw, default=(1080, 1920), help="frame HxW (default 1080x1920)")
    ap.add_argument("--size", type=_hw, default=(512, 512), help="network input HxW (default 512x512)")
    ap.add_argument("--letterbox", action="store_true", help="letterbox instead of stretch")
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--cpu-iters", type=int, default=30)
    ap.add_argument("--device", type=int, default=0)
    args = ap.parse_args(argv)

    try:
        from runtime.cuda.kernels import GpuPreprocessor
        from runtime.engines.tensorrt import gpu_context

        gpu = gpu_context(args.device)
    except Exception as e:  # EngineError: pycuda or GPU missing
        print(f"preprocess_gpu: no usable GPU: {e}", file=sys.stderr)
        return 2
    cuda = gpu.cuda
    pre = Preprocess(size=args.size, resize="letterbox" if args.letterbox else "stretch", dtype=args.dtype)
    rng = np.random.default_rng(0)
    fh, fw = args.frame
    frame = rng.integers(0, 256, (fh, fw, 3), np.uint8)
    k = GpuPreprocessor(pre, gpu)

    # Correctness first: a benchmark of a wrong kernel means nothing.
    err = float(np.abs(k(frame).astype(np.float32) - pre.replace(dtype="float32").apply(frame)).max())

    with gpu.active():
        stream = cuda.Stream()
        host = cuda.pagelocked_empty(frame.shape, np.uint8)
        np.copyto(host, frame)
        d_frame = cuda.mem_alloc(frame.nbytes)
        d_out = cuda.mem_alloc(k.output_nbytes)
        cuda.memcpy_htod(d_frame, host)
        d_copy = cuda.mem_alloc(frame.nbytes + k.output_nbytes)
        launch = lambda: k.launch(int(d_frame), (fh, fw), fw * 3, int(d_out), stream)  # noqa: E731
        for _ in range(20):
            launch()
        stream.synchronize()
        kernel = _events_ms(cuda, stream, launch, args.iters)
        moved = frame.nbytes + k.output_nbytes  # read the frame once, write the input once
        # A device-to-device copy moves `moved` bytes read + `moved` written; half of it is the comparison.
        copy = _events_ms(cuda, stream, lambda: cuda.memcpy_dtod_async(d_copy, d_frame, frame.nbytes, stream), args.iters)
        upload = _events_ms(cuda, stream, lambda: cuda.memcpy_htod_async(d_frame, host, stream), max(20, args.iters // 5))
        try:
            attr = cuda.device_attribute
            mem_clock_khz = gpu.device.get_attribute(attr.MEMORY_CLOCK_RATE)
            bus_bits = gpu.device.get_attribute(attr.GLOBAL_MEMORY_BUS_WIDTH)
            peak_gbs = 2 * mem_clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
        except Exception:  # attribute not reported by this driver/toolkit
            peak_gbs = None
        for a in (d_frame, d_out, d_copy):
            a.free()
    floor_ms = moved / (peak_gbs * 1e9) * 1e3 if peak_gbs else None
    copy_ms = statistics.median(copy) * (moved / (2 * frame.nbytes))  # scale the frame copy to `moved` bytes

    cpu = []
    for _ in range(args.cpu_iters):
        t0 = time.perf_counter()
        pre.apply(frame)
        cpu.append((time.perf_counter() - t0) * 1e3)

    kern = statistics.median(kernel)
    peak = f"peak DRAM {peak_gbs:.0f} GB/s" if peak_gbs else "peak DRAM bandwidth not reported"
    print(f"device: {gpu.name} (sm{''.join(map(str, gpu.compute_capability))}), {peak}")
    print(f"task: {fh}x{fw} BGR uint8 -> {pre.size[0]}x{pre.size[1]} {pre.resize} {pre.dtype} NCHW; "
          f"max |kernel - Preprocess.apply| = {err:.2e}")
    print(f"bytes moved (frame in + tensor out): {moved / 1e6:.2f} MB")
    print(f"kernel            median {kern:8.4f} ms  (min {min(kernel):.4f}, {moved / kern / 1e6:.0f} GB/s effective)")
    if floor_ms:
        print(f"bandwidth floor          {floor_ms:8.4f} ms  at peak DRAM bandwidth    -> kernel / floor = {kern / floor_ms:.2f}x")
    print(f"dtod copy, same bytes    {copy_ms:8.4f} ms  (achievable bandwidth)    -> kernel / copy  = {kern / copy_ms:.2f}x")
    print(f"OpenCV CPU (Preprocess.apply) median {statistics.median(cpu):8.3f} ms  -> CPU / kernel = "
          f"{statistics.median(cpu) / kern:.0f}x")
    print(f"H2D upload of the frame (pinned)    {statistics.median(upload):8.4f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
