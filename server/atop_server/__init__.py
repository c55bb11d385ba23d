"""AToP gRPC inference server (KServe v2 / Open Inference Protocol + atop.v1.Classifier). Never imports torch."""

__version__ = "0.1.0"
