"""Triton kernels (importable only as ``comfy_mm_interleaved.kernels``)."""
