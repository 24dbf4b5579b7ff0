"""Building a fresh model from local LLaMA / CLIP / Stable Diffusion folders (tiny random ones made here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from comfy_mm_interleaved.checkpoint import CheckpointError, from_pretrained, save_pretrained
from comfy_mm_interleaved.components import build_from_components
from comfy_mm_interleaved.config import MMInterleavedConfig
from conftest import golden_dir

INIT_RANGE = 0.5  # the LLaMA folder's initializer_range: the added embedding rows are drawn with it
# Official TextDecoder init (decoder_text.py): added rows of ``head`` weight 0 / bias -100, head_new 0 / 100 - 5.
NEW_ROWS_BIAS, HEAD_NEW_BIAS = -100.0, 95.0
TOKENS = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "a</w>": 3}


@pytest.fixture(scope="module")
def config() -> MMInterleavedConfig:
    return MMInterleavedConfig.from_official_tiny(golden_dir() / "tiny_config.json")


def _make_llama(folder: Path, config: MMInterleavedConfig) -> None:
    llm = config.llm
    llama = LlamaConfig(
        vocab_size=config.orig_vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_hidden_layers,
        num_attention_heads=llm.num_attention_heads,
        rms_norm_eps=llm.rms_norm_eps,
        initializer_range=INIT_RANGE,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    LlamaForCausalLM(llama).save_pretrained(folder)


def _make_clip(folder: Path, config: MMInterleavedConfig) -> None:
    vit = config.visual_tokenizer.encoder
    vision = {
        name: getattr(vit, name)
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size")
    } | {"image_size": vit.image_size, "hidden_act": vit.hidden_act}
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    torch.manual_seed(2)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)


def _make_sd(folder: Path, config: MMInterleavedConfig) -> None:
    dec = config.image_decoder
    torch.manual_seed(3)
    UNet2DConditionModel(**dec.unet).save_pretrained(folder / "unet")
    AutoencoderKL(**dec.vae).save_pretrained(folder / "vae")
    DDPMScheduler(**dec.scheduler).save_pretrained(folder / "scheduler")
    text = CLIPTextConfig(
        vocab_size=len(TOKENS),
        hidden_size=dec.resampler.hidden_size,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=dec.prompt_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    CLIPTextModel(text).save_pretrained(folder / "text_encoder")
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps(TOKENS), encoding="utf-8")
    merges.write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), pad_token="!", model_max_length=dec.prompt_length)
    tokenizer.save_pretrained(folder / "tokenizer")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, config) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("components")
    paths = {"llm": root / "llama", "clip": root / "clip", "sd": root / "sd"}
    _make_llama(paths["llm"], config)
    _make_clip(paths["clip"], config)
    _make_sd(paths["sd"], config)
    return paths


@pytest.fixture(scope="module")
def built(folders, config) -> torch.nn.Module:
    return build_from_components(config, folders["llm"], folders["clip"], folders["sd"])


def _weights(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def test_llm_and_text_head(built, folders, config):
    state = built.state_dict()
    llama = _weights(folders["llm"])
    vocab = config.orig_vocab_size
    for key, tensor in llama.items():
        if key == "lm_head.weight":
            assert torch.equal(state["text_decoder.head.weight"][:vocab], tensor)
        elif key == "model.embed_tokens.weight":
            assert torch.equal(state["mm_decoder.embed_tokens.weight"][:vocab], tensor)
        else:
            assert torch.equal(state["mm_decoder." + key[len("model.") :]], tensor), key
    added = state["mm_decoder.embed_tokens.weight"][vocab:]
    assert added.shape[0] == config.txt_vocab_size - vocab
    assert 0.5 * INIT_RANGE < float(added.std()) < 1.5 * INIT_RANGE and abs(float(added.mean())) < 0.5 * INIT_RANGE

    head = built.text_decoder
    assert torch.equal(head.head.weight[vocab:], torch.zeros_like(head.head.weight[vocab:]))
    assert torch.equal(head.head.bias[:vocab], torch.zeros(vocab))
    assert torch.equal(head.head.bias[vocab:], torch.full_like(head.head.bias[vocab:], NEW_ROWS_BIAS))
    assert torch.equal(head.head_new.weight, torch.zeros_like(head.head_new.weight))
    assert torch.equal(head.head_new.bias, torch.full_like(head.head_new.bias, HEAD_NEW_BIAS))
    gates = [v for k, v in state.items() if k.endswith("llama_cross_attn.gate")]
    assert len(gates) == len(config.llm.mmfs_layer_indices()) and all(float(g.abs().sum()) == 0 for g in gates)


def test_clip_vision_tower(built, folders):
    state = built.state_dict()
    vision = {k: v for k, v in _weights(folders["clip"]).items() if k.startswith("vision_model.")}
    copied = [k for k in vision if not k.startswith("vision_model.post_layernorm.")]
    assert len(copied) < len(vision)  # post_layernorm exists in the folder and is dropped
    for key in copied:
        assert torch.equal(state["visual_tokenizer.encoder." + key], vision[key]), key
    assert not any("post_layernorm" in k for k in state)


def test_stable_diffusion_parts(built, folders, config):
    state = built.state_dict()
    for sub, prefix in (("unet", "image_decoder.decoder.unet."), ("vae", "image_decoder.decoder.vae.")):
        weights = _weights(folders["sd"] / sub, "diffusion_pytorch_model.safetensors")
        assert {k for k in state if k.startswith(prefix)} == {prefix + k for k in weights}
        assert all(torch.equal(state[prefix + k], v) for k, v in weights.items())

    # neg_prompt_embeds = text_encoder(<bos> <eos> <pad>...) computed here from the hand-built ids
    encoder = CLIPTextModel.from_pretrained(folders["sd"] / "text_encoder").eval()
    length = config.image_decoder.prompt_length
    ids = torch.tensor([[TOKENS["<|startoftext|>"], TOKENS["<|endoftext|>"]] + [TOKENS["!"]] * (length - 2)])
    with torch.no_grad():
        expected = encoder(ids).last_hidden_state
    assert torch.allclose(state["image_decoder.neg_prompt_embeds"], expected, atol=1e-6, rtol=0)


def test_built_model_saves_and_loads(built, tmp_path):
    folder = save_pretrained(built, tmp_path / "model")
    reloaded = from_pretrained(folder).state_dict()
    original = built.state_dict()
    assert set(reloaded) == set(original)
    assert all(torch.equal(reloaded[k], original[k]) for k in original)


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def test_pickled_llama_and_deprecated_vae_names(folders, config, tmp_path, built):
    llama = _copy(folders["llm"], tmp_path)
    torch.save(_weights(llama), llama / "pytorch_model.bin")
    (llama / "model.safetensors").unlink()
    sd = _copy(folders["sd"], tmp_path)
    vae_file = sd / "vae" / "diffusion_pytorch_model.safetensors"
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, tensor in load_file(str(vae_file)).items():
        for new, old in old_names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[key] = tensor
    assert any(".query." in k for k in renamed)
    save_file(renamed, str(vae_file))
    model = build_from_components(config, llama, folders["clip"], sd)
    state, reference = model.state_dict(), built.state_dict()
    pretrained = ("mm_decoder.embed_tokens", "image_decoder.decoder.vae.", "text_decoder.head.weight")
    for key in (k for k in reference if k.startswith(pretrained) or ".mlp." in k and k.startswith("mm_decoder.")):
        rows = config.orig_vocab_size if "embed_tokens" in key or "head" in key else None
        assert torch.equal(state[key][:rows], reference[key][:rows]), key


def test_without_text_encoder_keeps_init_and_warns(folders, config, tmp_path):
    sd = _copy(folders["sd"], tmp_path)
    shutil.rmtree(sd / "text_encoder")
    with pytest.warns(UserWarning, match="neg_prompt_embeds keeps its N\\(0, 0.02\\) init"):
        model = build_from_components(config, folders["llm"], folders["clip"], sd)
    embeds = model.image_decoder.neg_prompt_embeds
    assert embeds.shape == (1, config.image_decoder.prompt_length, config.image_decoder.resampler.hidden_size)
    assert 0.01 < float(embeds.detach().std()) < 0.03


def test_missing_folders_and_files(folders, config, tmp_path):
    with pytest.raises(CheckpointError, match="LLaMA folder .* does not exist.*nothing is downloaded"):
        build_from_components(config, tmp_path / "nope", folders["clip"], folders["sd"])
    clip = _copy(folders["clip"], tmp_path)
    (clip / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="CLIP folder .*: no weights in"):
        build_from_components(config, folders["llm"], clip, folders["sd"])
    sd = _copy(folders["sd"], tmp_path)
    (sd / "unet" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="SD UNet folder .*config.json is missing"):
        build_from_components(config, folders["llm"], folders["clip"], sd)
    shutil.copy(folders["sd"] / "unet" / "config.json", sd / "unet" / "config.json")
    shutil.rmtree(sd / "vae")
    with pytest.raises(CheckpointError, match="SD VAE folder .* does not exist"):
        build_from_components(config, folders["llm"], folders["clip"], sd)


def test_config_mismatch_is_listed(folders, config, tmp_path):
    llama = _copy(folders["llm"], tmp_path)
    data = json.loads((llama / "config.json").read_text(encoding="utf-8"))
    data["hidden_size"] += 8
    data["num_hidden_layers"] += 1
    (llama / "config.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CheckpointError) as info:
        build_from_components(config, llama, folders["clip"], folders["sd"])
    hidden, layers = config.llm.hidden_size, config.llm.num_hidden_layers
    assert f"hidden_size={hidden + 8} (config: {hidden})" in str(info.value)
    assert f"num_hidden_layers={layers + 1} (config: {layers})" in str(info.value)


def test_wrong_tensors_are_reported(folders, config, tmp_path):
    llama = _copy(folders["llm"], tmp_path)
    weights = _weights(llama)
    del weights["lm_head.weight"]
    save_file(weights, str(llama / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no lm_head.weight"):
        build_from_components(config, llama, folders["clip"], folders["sd"])

    clip = _copy(folders["clip"], tmp_path)
    weights = _weights(clip)
    weights["vision_model.extra.weight"] = torch.zeros(1)
    weights["vision_model.pre_layrnorm.weight"] = torch.zeros(3)
    save_file(weights, str(clip / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"pre_layrnorm.weight has shape \[3\]"):
        build_from_components(config, folders["llm"], clip, folders["sd"])
    del weights["vision_model.pre_layrnorm.weight"]
    save_file(weights, str(clip / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no place in the model: vision_model.extra.weight"):
        build_from_components(config, folders["llm"], clip, folders["sd"])
