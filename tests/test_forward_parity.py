"""The whole ``MMInterleaved.forward`` against the official training forward (golden ``forward_case``): images in,
the four random draws injected, every recorded tensor and the three losses."""

from __future__ import annotations

import pytest
import torch

from conftest import load_case
from helpers_model import fixture_draws, fixture_images, forward_kwargs, tiny_model
from test_llm_parity import TOL, assert_matches

# fixture tensors that are inputs of the call, or of the other text-target variant
NOT_OUTPUTS = ("in.", "rng.cfg_uncond_rand", "rng.vae_posterior_eps", "out.gt_text_ids_if_laion_en")


@pytest.fixture(scope="module")
def case():
    return load_case("forward")


@pytest.fixture(scope="module")
def output(case):
    model = tiny_model()
    with torch.no_grad():
        return model(
            **forward_kwargs(case),
            image_tensors=fixture_images(case, "image_tensors"),
            image_tensors_dec=fixture_images(case, "image_tensors_dec"),
            draws=fixture_draws(case),
            return_intermediates=True,
        )


def test_forward_parity_every_tensor(output, case) -> None:
    names = [name for name in case.keys() if not name.startswith(NOT_OUTPUTS)]
    missing = [name for name in names if name not in output.intermediates]
    assert not missing, f"fixture tensors the forward does not report: {missing}"
    for name in names:
        assert_matches(output.intermediates[name], case[name], name)


@pytest.mark.parametrize("name", ["loss", "loss_txt", "loss_img"])
def test_forward_parity_losses(output, case, name: str) -> None:
    expected = case.meta["scalars"][name]
    actual = float(getattr(output, name))
    assert abs(actual - expected) <= TOL * max(1.0, abs(expected)), f"{name}: {actual} != {expected}"


def test_forward_does_not_modify_inputs(case) -> None:
    """The official code rescales image_tensors_dec in place; ours leaves the caller's tensors alone."""
    model = tiny_model()
    images, images_dec = fixture_images(case, "image_tensors"), fixture_images(case, "image_tensors_dec")
    before = images.clone(), images_dec.clone()
    with torch.no_grad():
        model(**forward_kwargs(case), image_tensors=images, image_tensors_dec=images_dec, draws=fixture_draws(case))
    assert torch.equal(images, before[0]) and torch.equal(images_dec, before[1])


def test_forward_parity_image_loss_mask_and_weights(case) -> None:
    """``image_loss_mask`` drops images from the (all-element) mean; the loss weights override the config's."""
    model = tiny_model()
    images, images_dec = fixture_images(case, "image_tensors"), fixture_images(case, "image_tensors_dec")
    keep = torch.ones(images.shape[0], dtype=torch.bool)
    keep[0] = False
    with torch.no_grad():
        out = model(
            **forward_kwargs(case),
            image_tensors=images,
            image_tensors_dec=images_dec,
            draws=fixture_draws(case),
            image_loss_mask=keep,
            loss_txt_weight=2.0,
            loss_img_weight=0.5,
        )
    counted = keep & (case["imgdec.context_attention_mask"].sum(1) > 2)
    expected = float((case["sd.loss_elementwise"] * counted[:, None, None, None]).mean())
    assert abs(float(out.loss_img) - expected) <= TOL * max(1.0, expected)
    assert abs(float(out.loss) - (2.0 * float(out.loss_txt) + 0.5 * float(out.loss_img))) <= 1e-5
