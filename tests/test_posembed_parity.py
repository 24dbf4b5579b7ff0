"""Fixed sin-cos tables equal the ones stored in the official checkpoint."""

from __future__ import annotations

from safetensors.torch import load_file

from comfy_mm_interleaved.models.posembed import sincos_1d, sincos_2d
from conftest import assert_close, golden_dir


def test_posembed_parity_with_official_tables() -> None:
    state = load_file(str(golden_dir() / "tiny_official_state_dict.safetensors"))
    table = state["visual_tokenizer.pos_embed"]
    grid = int(round((table.shape[0] - 1) ** 0.5))
    assert_close(sincos_2d(table.shape[1], grid, cls_token=True), table, 1e-6, "visual_tokenizer.pos_embed")
    for key, table in state.items():
        if key.startswith("image_decoder.decoder.mmfs_module.") and key.endswith("pos_embed"):
            grid = int(round(table.shape[0] ** 0.5))
            assert_close(sincos_2d(table.shape[1], grid), table, 1e-6, key)


def test_sincos_1d_layout() -> None:
    import torch

    emb = sincos_1d(4, torch.tensor([0.0, 1.0]))
    assert emb[0].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert abs(float(emb[1, 0]) - 0.8414709848) < 1e-6 and abs(float(emb[1, 1]) - 0.00999983) < 1e-6
