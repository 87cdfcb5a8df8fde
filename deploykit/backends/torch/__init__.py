"""PyTorch eager backend: the baseline every speedup is measured against."""
