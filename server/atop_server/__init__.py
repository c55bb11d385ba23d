"""AToP gRPC inference server (issue: the gRPC inference server). Must never import torch."""
