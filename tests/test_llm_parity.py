"""Decoder LLM with MMFS, text head and image-decoder conditioning against the official forward (golden
``forward_case``), fed with the fixture's visual-tokenizer output; plus training-side behaviour of the LLM."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from comfy_mm_interleaved.models.llm import MMDecoder
from conftest import assert_close, load_case
from helpers_model import fixture_visual, forward_kwargs, tiny_config, tiny_model

TOL = 1e-4
CONDITIONING = [
    "imgdec.context_features",
    "imgdec.context_attention_mask",
    "imgdec.mmfs_mask",
    "imgdec.mmfs_source_image",
]


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    if expected.is_floating_point():
        assert_close(actual, expected, TOL, name)
    else:
        assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert torch.equal(actual.to(expected.dtype), expected), f"{name}: values differ"


@pytest.fixture(scope="module")
def case():
    return load_case("forward")


@pytest.fixture(scope="module")
def model():
    return tiny_model(with_visual_tokenizer=False, with_image_decoder=False)


@pytest.fixture(scope="module")
def output(model, case):
    with torch.no_grad():
        return model(**forward_kwargs(case), visual=fixture_visual(case), return_intermediates=True)


def test_llm_parity_forward_case_tensors(output, case) -> None:
    names = case.keys("llm.") + ["out.text_logits", "out.gt_text_ids"] + CONDITIONING
    assert any(name.startswith("llm.mmfs.layer") for name in names)
    for name in names:
        assert name in output.intermediates, f"missing intermediate {name}"
        assert_matches(output.intermediates[name], case[name], name)
    assert torch.equal(output.text_logits, output.intermediates["out.text_logits"])


def test_llm_parity_mmfs_layers_are_the_official_ones(output, case) -> None:
    layers = sorted({int(n.split(".")[2].removeprefix("layer")) for n in case.keys("llm.mmfs.layer")})
    assert layers == tiny_config().llm.mmfs_layer_indices()
    recorded = {n for n in output.intermediates if n.startswith("llm.mmfs.layer")}
    assert recorded == set(case.keys("llm.mmfs.layer"))


def test_llm_parity_text_loss(output, case) -> None:
    expected = case.meta["scalars"]["loss_txt"]
    assert abs(float(output.loss_txt) - expected) <= TOL * max(1.0, abs(expected))
    assert output.loss_img is None  # built without the image decoder
    assert abs(float(output.loss) - tiny_config().loss_txt_weight * expected) <= TOL * max(1.0, abs(expected))


def test_llm_parity_text_targets_ignore_text_without_image(model, case) -> None:
    kwargs = forward_kwargs(case) | {"meta": None}
    dataset = tiny_config().dataset_to_ignore_noimage_cond_loss[0]
    with torch.no_grad():
        out = model(**kwargs, dataset_name=dataset, visual=fixture_visual(case), return_intermediates=True)
    assert_matches(out.intermediates["out.gt_text_ids"], case["out.gt_text_ids_if_laion_en"], "gt_text_ids (laion)")
    expected = case.meta["scalars"]["loss_txt_if_dataset_laion_en"]
    assert abs(float(out.loss_txt) - expected) <= TOL * max(1.0, abs(expected))


def test_llm_parity_gradient_checkpointing_same_gradients(case) -> None:
    """Checkpointed training recomputes the layers (MMFS inputs included) and gives the same gradients, also to
    the image features that reach the layers as a keyword argument."""
    results = []
    for checkpointing in (False, True):
        config = tiny_config()
        config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, gradient_checkpointing=checkpointing))
        model = tiny_model(config, with_visual_tokenizer=False, with_image_decoder=False).train()
        model.mm_decoder.set_official_trainable()
        visual = fixture_visual(case)
        maps = [m.clone().requires_grad_(True) for m in visual.multiscale_features]
        visual = dataclasses.replace(visual, multiscale_features=maps)
        out = model(**forward_kwargs(case), visual=visual)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.mm_decoder.named_parameters() if p.requires_grad}
        results.append((out.loss.detach(), grads, maps[1].grad))
    (loss_a, grads_a, feat_a), (loss_b, grads_b, feat_b) = results
    assert any(layer.gradient_checkpointing for layer in model.mm_decoder.layers)
    assert_close(loss_b, loss_a, 1e-6, "loss")
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert_close(grads_b[name], grads_a[name], 1e-5, name)
    assert feat_a is not None and float(feat_a.abs().max()) > 0
    assert_close(feat_b, feat_a, 1e-5, "feature grad")


def test_llm_official_trainable_split() -> None:
    llm = MMDecoder(tiny_config())
    llm.set_official_trainable()
    trainable = {n for n, p in llm.named_parameters() if p.requires_grad}
    mmfs = {n for n, _ in llm.named_parameters() if ".llama_cross_attn." in n}
    assert trainable == {n for n in mmfs if not n.endswith("ignore_token")}
    layers = {int(n.split(".")[1]) for n in trainable}
    assert layers == set(tiny_config().llm.mmfs_layer_indices())


def test_llm_fresh_init_is_the_official_one() -> None:
    """Gates start at 0 (the LLM starts as plain LLaMA), MMFS as the official reset, no rotary buffer saved."""
    llm = MMDecoder(tiny_config()).requires_grad_(False)
    mmfs_config = tiny_config().llm.mmfs
    for block in llm.mmfs_layers():
        assert float(block.gate) == 0.0
        assert float(block.attn.sampling_offsets.weight.abs().max()) == 0.0
        assert float(block.attn.sampling_offsets.bias.abs().max()) <= mmfs_config.offset_init_magnitude
        assert float(block.attn.attention_weights.bias.abs().max()) == 0.0
        assert torch.equal(block.norm1.weight, torch.ones_like(block.norm1.weight))
    assert not any("inv_freq" in k for k in llm.state_dict())
