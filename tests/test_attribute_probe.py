"""The training-only ShapeStories attribute probe (``comfy_mm_interleaved/shapestories/probe.py``).

Labels read from rendered images; the probed loss = the model's loss + weight x probe CE, with gradients reaching
the decoder's prompt; a training run logs the probe's accuracies, and ``export-checkpoint --drop attribute_probe.``
leaves a plain model folder with the trained weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from comfy_mm_interleaved.checkpoint import from_pretrained
from comfy_mm_interleaved.inference.engine import EMBEDDED_MODEL_DIR
from comfy_mm_interleaved.shapestories.generate import random_attributes
from comfy_mm_interleaved.shapestories.probe import (
    IGNORE,
    PROBED_ATTRIBUTES,
    attribute_labels,
    build_probed_model,
    probed_from,
)
from comfy_mm_interleaved.shapestories.render import render_array
from comfy_mm_interleaved.tokenizer import load_tokenizer
from comfy_mm_interleaved.train.config import TrainConfig
from comfy_mm_interleaved.train.export import export_checkpoint
from comfy_mm_interleaved.train.loop import loss_terms, train
from comfy_mm_interleaved.train.stream import SourceConfig, StreamConfig, TrainStream


def to_tensor(pixels: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255.0


def test_attribute_labels_are_the_rendered_attributes_and_blank_images_are_ignored() -> None:
    rng = np.random.default_rng(11)
    truths = [random_attributes(rng) for _ in range(12)]
    images = to_tensor([render_array(a, 64) for a in truths] + [np.zeros((64, 64, 3), np.uint8)])
    labels = attribute_labels(images)
    assert labels.shape == (13, 5) and labels.dtype == torch.int64
    for truth, row in zip(truths, labels.tolist()):
        row_word, column_word = truth.position.split()
        expected = {"colour": truth.colour, "shape": truth.shape, "size": truth.size, "row": row_word,
                    "column": column_word}  # fmt: skip
        assert [names[i] for names, i in zip(PROBED_ATTRIBUTES.values(), row)] == list(expected.values())
    assert labels[-1].tolist() == [IGNORE] * 5
    with pytest.raises(ValueError, match=r"\[n, 3, S, S\]"):
        attribute_labels(images[:, :1])


@pytest.fixture(scope="module")
def shipped():
    return from_pretrained(EMBEDDED_MODEL_DIR)


@pytest.fixture(scope="module")
def batch(shipped):
    config = shipped.config
    tokenizer = load_tokenizer(EMBEDDED_MODEL_DIR / "tokenizer", config.special_tokens)
    source = SourceConfig("shapestories", "shapestories", pack=False, options={"seed": 4, "image_size": 64,
                          "kinds": ["generation", "story"], "weights": [0.5, 0.5]})  # fmt: skip
    stream = StreamConfig(
        sources=[source], seq_len=128, batch_size=4, num_img_token=config.num_img_token,
        encoder_image_size=config.encoder_image_size, decoder_image_size=config.image_decoder.image_size,
    )  # fmt: skip
    raw = next(iter(TrainStream(stream, tokenizer, config.special_tokens)))
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def test_probed_loss_adds_the_weighted_probe_and_its_gradient_reaches_the_prompt(shipped, batch) -> None:
    probed = probed_from(shipped, probe_weight=0.5).eval()
    with torch.no_grad():
        torch.manual_seed(3)
        plain = shipped(**batch, return_intermediates=True)
    torch.manual_seed(3)
    out = probed(**batch)
    terms = loss_terms(out)
    assert set(terms) == {"loss", "loss_txt", "loss_img", "loss_probe", *(f"probe_acc/{a}" for a in PROBED_ATTRIBUTES)}
    assert torch.equal(out.loss_txt, plain.loss_txt) and torch.equal(out.loss_img, plain.loss_img)
    # the probe loss recomputed by hand: the head on the mean prompt, CE per attribute over the images in the loss
    with torch.no_grad():
        labels = attribute_labels(batch["image_tensors_dec"])
        logits = probed.attribute_probe(plain.intermediates["imgdec.prompt_embeds"].mean(1))
        used = plain.intermediates["imgdec.context_attention_mask"].sum(1) > 2  # images with text before them
        parts = logits.split([len(v) for v in PROBED_ATTRIBUTES.values()], dim=-1)
        expected = torch.stack(
            [torch.nn.functional.cross_entropy(part[used], labels[used, k]) for k, part in enumerate(parts)]
        ).mean()
    assert used.any() and float(out.loss_probe) > 0
    torch.testing.assert_close(out.loss_probe, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, plain.loss + 0.5 * out.loss_probe, rtol=0, atol=1e-6)
    assert all(0.0 <= float(terms[f"probe_acc/{a}"]) <= 1.0 for a in PROBED_ATTRIBUTES)
    out.loss.backward()
    assert probed.attribute_probe.weight.grad.abs().sum() > 0
    with_probe = resampler_grads(probed)

    probed.zero_grad(set_to_none=True)
    probed.probe_weight = 0.0
    torch.manual_seed(3)
    zero = probed(**batch)
    torch.testing.assert_close(zero.loss, plain.loss, rtol=0, atol=1e-6)
    zero.loss.backward()
    assert probed.attribute_probe.weight.grad is None or probed.attribute_probe.weight.grad.abs().sum() == 0
    diffusion_only = resampler_grads(probed)
    # the probe's own share of the gradient reaches the decoder's prompt (the resampler), not only the diffusion's
    assert (with_probe - diffusion_only).abs().sum() > 1e-3 * diffusion_only.abs().sum()


def resampler_grads(model) -> torch.Tensor:  # noqa: ANN001
    grads = [p.grad.flatten() for p in model.image_decoder.perceiver_resampler.parameters() if p.grad is not None]
    assert grads, "no gradient reached the image decoder's resampler"
    return torch.cat(grads).clone()


def test_factory_options_are_checked(tmp_path: Path) -> None:
    cfg = TrainConfig.load(None, ["model.factory_options={probe_wieght: 1}", f"model.init_from={EMBEDDED_MODEL_DIR}"])
    with pytest.raises(ValueError, match="unknown keys \\['probe_wieght'\\]"):
        build_probed_model(cfg)
    with pytest.raises(ValueError, match="set model.init_from"):
        build_probed_model(TrainConfig.load(None, []))
    with pytest.raises(ValueError, match="probe_weight must be >= 0"):
        build_probed_model(TrainConfig.load(None, [f"model.init_from={EMBEDDED_MODEL_DIR}",
                                                   "model.factory_options={probe_weight: -1}"]))  # fmt: skip


def test_training_logs_the_probe_and_export_drops_its_head(shipped, tmp_path: Path) -> None:
    out = tmp_path / "run"
    data = {
        "model": {
            "factory": "comfy_mm_interleaved.shapestories.probe:build_probed_model",
            "factory_options": {"probe_weight": 0.3},
            "init_from": str(EMBEDDED_MODEL_DIR),
            "tokenizer": str(EMBEDDED_MODEL_DIR / "tokenizer"),
            "freeze": "none",
        },
        "optim": {"lr": 1e-3, "warmup_steps": 0, "rules": [{"match": "attribute_probe.", "lr": 1e-2}]},
        "train": {
            "output_dir": str(out),
            "max_steps": 2,
            "save_every": 2,
            "log_every": 1,
            "eval_every": 0,
            "progress_bar": False,
            "cpu": True,
            "seed": 1,
        },
        "data": {
            "seq_len": 128,
            "batch_size": 2,
            "sources": [
                {
                    "format": "shapestories",
                    "shards": "shapestories",
                    "pack": False,
                    "options": {"seed": 6, "kinds": ["generation"], "weights": [1.0]},
                }
            ],
        },
    }
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(data), encoding="utf-8")
    result = train(TrainConfig.load(config_path))
    assert result.step == 2 and result.last_checkpoint is not None
    header = (out / "metrics.csv").read_text(encoding="utf-8")
    for tag in ("loss_probe", "probe_acc/column", "probe_acc/colour"):
        assert f",{tag}," in header

    with pytest.raises(ValueError, match="unexpected"):
        export_checkpoint([result.last_checkpoint], EMBEDDED_MODEL_DIR, tmp_path / "bad")
    with pytest.raises(ValueError, match="matches no weight"):
        export_checkpoint([result.last_checkpoint], EMBEDDED_MODEL_DIR, tmp_path / "bad", drop=["probe."])
    folder = export_checkpoint(
        [result.last_checkpoint], EMBEDDED_MODEL_DIR, tmp_path / "model", drop=["attribute_probe."]
    )
    exported = from_pretrained(folder).state_dict()
    before = shipped.state_dict()
    assert set(exported) == set(before)
    changed = [k for k in before if not torch.equal(exported[k], before[k])]
    assert any(k.startswith("image_decoder.perceiver_resampler.") for k in changed)  # trained, then exported
