"""Math kernels. Each op has a readable `naive.py` reference beside its fast paths."""
