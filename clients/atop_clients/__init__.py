"""AToP clients (issue: clients and containerized deployment). Must never import torch."""
