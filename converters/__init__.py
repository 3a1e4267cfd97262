"""Converters: a trained network -> ONNX (`converters.onnx`), TensorRT engines
(`converters.tensorrt`) and CoreML packages (`converters.coreml`), each checked against the
original (`converters.parity`)."""
