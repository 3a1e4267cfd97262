"""CUDA kernels for the GPU runtime path: fused preprocessing into the engine's input buffer, and
classification / overlay on the GPU (`preprocess.cu`, `postprocess.cu`, loaded through pycuda by
`runtime.cuda.kernels`). Importing this package needs neither pycuda nor a GPU."""
from runtime.cuda.kernels import (
    GpuFrameResult,
    GpuPipeline,
    GpuPostprocessor,
    GpuPreprocessor,
    HostKernels,
    classify_reference,
    host_library,
    overlay_reference,
)

__all__ = [
    "GpuFrameResult", "GpuPipeline", "GpuPostprocessor", "GpuPreprocessor", "HostKernels", "classify_reference",
    "host_library", "overlay_reference",
]
