"""ONNX Runtime backend (CPU execution provider; CUDA where onnxruntime-gpu is installed)."""
