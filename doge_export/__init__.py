"""doge-export: Doge small language models to ONNX and TensorRT, with a runtime and validation."""

__version__ = "0.1.0"
