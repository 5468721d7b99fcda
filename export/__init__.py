"""ONNX export of the VPP stages with parity gates, FP16/INT8 variants and TensorRT
engines built on the target (issue: export/). Wraps ``vpp_edge.training.models``."""
