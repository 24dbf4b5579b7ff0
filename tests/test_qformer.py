"""Q-Former resampler: official key layout, golden parity, and agreement with transformers' Blip2QFormerModel."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfy_mm_interleaved.config import MMInterleavedConfig, QFormerConfig
from comfy_mm_interleaved.models.qformer import QFormerResampler
from conftest import assert_close, load_case

REFERENCE_KEYS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_state_dict_keys.json"


def official_key_shapes(prefix: str) -> dict[str, tuple[int, ...]]:
    """Keys (prefix stripped) and shapes of the released 13B checkpoint, from the reference dump."""
    dump = json.loads(REFERENCE_KEYS.read_text(encoding="utf-8"))  # {key: [shape, dtype]}
    return {k[len(prefix) :]: tuple(v[0]) for k, v in dump.items() if k.startswith(prefix)}


def _subset(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def tiny(golden: Path) -> tuple[MMInterleavedConfig, dict[str, torch.Tensor]]:
    config = MMInterleavedConfig.from_official_tiny(golden / "tiny_config.json")
    return config, load_file(str(golden / "tiny_official_state_dict.safetensors"))


@pytest.mark.parametrize(
    ("part", "prefix"),
    [
        ("visual_tokenizer", "visual_tokenizer.perceiver_resampler."),
        ("image_decoder", "image_decoder.perceiver_resampler."),
    ],
)
def test_qformer_tiny_keys_load_strict(tiny, part: str, prefix: str) -> None:
    config, state = tiny
    resampler = QFormerResampler(getattr(config, part).resampler)
    expected = _subset(state, prefix)
    ours = resampler.state_dict()
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert tuple(ours[key].shape) == tuple(value.shape), key
    resampler.load_state_dict(expected, strict=True)


@pytest.mark.parametrize(
    ("part", "prefix"),
    [
        ("visual_tokenizer", "visual_tokenizer.perceiver_resampler."),
        ("image_decoder", "image_decoder.perceiver_resampler."),
    ],
)
def test_qformer_13b_keys_and_shapes_match_official(part: str, prefix: str) -> None:
    official = official_key_shapes(prefix)
    with torch.device("meta"):
        resampler = QFormerResampler(getattr(MMInterleavedConfig.official_13b(), part).resampler)
    ours = {k: tuple(v.shape) for k, v in resampler.state_dict().items()}
    assert ours == official


def test_qformer_parity_image_decoder_prompt_embeds(tiny) -> None:
    """The un-normalised path with a key mask: context features -> 77 prompt embeddings (forward_case §5.5)."""
    config, state = tiny
    case = load_case("forward")
    resampler = QFormerResampler(config.image_decoder.resampler).eval()
    resampler.load_state_dict(_subset(state, "image_decoder.perceiver_resampler."), strict=True)
    with torch.no_grad():
        out = resampler(case["imgdec.context_features"], case["imgdec.context_attention_mask"])
    assert_close(out, case["imgdec.prompt_embeds"], 1e-4, "imgdec.prompt_embeds")


def _random_config(**overrides) -> QFormerConfig:
    base = QFormerConfig(
        num_queries=5,
        hidden_size=32,
        encoder_hidden_size=24,
        cross_attention_frequency=2,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
    )
    return dataclasses.replace(base, **overrides)


def test_qformer_matches_transformers_blip2_qformer() -> None:
    """Without qk-norm our module is the stock BLIP-2 Q-Former: compare with transformers' implementation."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    torch.manual_seed(0)
    config = _random_config()
    ours = QFormerResampler(config).eval()
    for p in ours.parameters():  # make the LayerNorms non-trivial too
        p.data.normal_(0, 0.3)
    reference = Blip2QFormerModel(
        Blip2QFormerConfig(
            hidden_size=config.hidden_size,
            encoder_hidden_size=config.encoder_hidden_size,
            cross_attention_frequency=config.cross_attention_frequency,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
        )
    ).eval()
    reference.load_state_dict(_subset(ours.state_dict(), "blip2qformer."), strict=True)

    states = torch.randn(3, 7, config.encoder_hidden_size)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1, 0, 1, 0, 1, 1, 0]])
    with torch.no_grad():
        expected = reference(
            query_embeds=ours.queries.expand(3, -1, -1), encoder_hidden_states=states, encoder_attention_mask=mask
        ).last_hidden_state
        actual = ours(states, mask)
    assert_close(actual, expected, 1e-5, "qformer vs Blip2QFormerModel")


def test_qformer_key_mask_semantics() -> None:
    torch.manual_seed(0)
    resampler = QFormerResampler(_random_config(qk_normalization=True)).eval()
    states = torch.randn(2, 6, 24)
    with torch.no_grad():
        unmasked = resampler(states)
        assert_close(resampler(states, torch.ones(2, 6, dtype=torch.long)), unmasked, 1e-6, "all-ones mask")
        mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
        masked = resampler(states, mask)
        changed = states.clone()
        changed[0, 3:] = torch.randn(3, 24)  # masked positions must not matter
        assert_close(resampler(changed, mask), masked, 1e-6, "masked keys ignored")
        # ... and the first 3 keys alone give the same result as a 3-token input
        assert_close(resampler(states[:1, :3]), masked[:1], 1e-5, "masked == truncated")
    assert (masked[0] - unmasked[0]).abs().max() > 1e-3


def test_qformer_dropout_only_in_training_and_checkpointing_is_exact() -> None:
    torch.manual_seed(0)
    config = _random_config(qk_normalization=True, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    resampler = QFormerResampler(config)
    states = torch.randn(2, 6, 24, requires_grad=True)
    resampler.eval()
    assert torch.equal(resampler(states), resampler(states))
    resampler.train()
    assert not torch.equal(resampler(states), resampler(states))

    checkpointed = QFormerResampler(dataclasses.replace(config, gradient_checkpointing=True)).train()
    checkpointed.load_state_dict(resampler.state_dict())
    grads = []
    for model in (resampler, checkpointed):
        torch.manual_seed(1)
        (grad,) = torch.autograd.grad(model(states).square().sum(), states)
        grads.append(grad)
    assert_close(grads[1], grads[0], 1e-6, "gradient with checkpointing")


def test_qformer_bad_inputs() -> None:
    resampler = QFormerResampler(_random_config())
    with pytest.raises(ValueError, match=r"\[batch, seq, 24\]"):
        resampler(torch.randn(2, 6, 23))
    with pytest.raises(ValueError, match=r"\[batch, seq, 24\]"):
        resampler(torch.randn(6, 24))
    with pytest.raises(ValueError, match="encoder_attention_mask must have shape"):
        resampler(torch.randn(2, 6, 24), torch.ones(2, 5))
    with pytest.raises(ValueError, match="not divisible"):
        QFormerResampler(_random_config(hidden_size=30))
