"""AToP exporter: trained checkpoints to an ONNX model repository (issue: the exporter)."""
