"""The edgeseg runtime: sources -> preprocessing -> engine -> postprocessing -> sinks.

Needs NumPy, OpenCV and one engine library (ONNX Runtime, TensorRT + pycuda, or CoreML); it never
imports torch, so a device app ships without it.
"""
