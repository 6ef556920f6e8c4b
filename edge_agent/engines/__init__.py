"""Engines: one interface over ONNX Runtime and TensorRT, the engine cache, memory budget, batch tuner."""
