"""The GPU frame path: fused preprocessing into the engine's input, classification and overlay at
frame size (`preprocess.cu`, `postprocess.cu`, launched through pycuda by `runtime.cuda.kernels`),
and the two-frames-in-flight schedule around a TensorRT engine (`runtime.cuda.frames`). Importing
this package needs neither pycuda nor a GPU."""
