"""deploykit: PyTorch CNNs to measured, accuracy-checked edge artifacts."""

__version__ = "0.1.0"

__all__ = ["__version__"]
