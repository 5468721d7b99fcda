"""The on-robot runtime: cameras, engines, action chunking, ZeroMQ, safety, metrics.

Imports no torch, diffusers or transformers on its TensorRT / ONNX Runtime paths.
"""
