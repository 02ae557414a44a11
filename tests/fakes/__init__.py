"""Stand-ins for libraries and devices this machine lacks (TensorRT, GPUs)."""
