"""Training: one accelerate loop for pretraining and SFT, resumable data streams, atomic checkpoints.

Entry points: ``python -m comfy_mm_interleaved train --config FILE`` (``cli.py``) or ``loop.train(cfg)``.
"""
