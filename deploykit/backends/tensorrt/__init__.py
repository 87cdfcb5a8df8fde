"""TensorRT backend (strongly typed engines; build path arrives with the GPU targets)."""
