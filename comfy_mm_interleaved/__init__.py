"""comfy_mm_interleaved: MM-Interleaved as a PyTorch library (models, ops, inference, training)."""

__version__ = "0.1.0"
