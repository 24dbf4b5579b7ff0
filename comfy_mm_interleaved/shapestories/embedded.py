"""The embedded default model's architecture and tokenizer: the real MM-Interleaved at a tiny size, for ShapeStories.

Every part of the official model is there and runs the same code (CLIP ViT + ViT-Adapter pyramid, Q-Former visual
resampler, LLaMA with tanh-gated MMFS layers, context Q-Former, diffusers UNet with MMFSNet residuals on every skip,
AutoencoderKL); only the sizes and three diffusion settings differ:

- encoder images 32 px, ViT patch 4 (an 8 x 8 grid, pyramid 32/16/8/4), 16 visual tokens per image;
- decoder images 64 px through a small VAE with a 4x (not 8x) down-sampling, so the UNet works on 16 x 16 x 4
  latents (a circle and a triangle of ShapeStories' small size still differ at that resolution); the VAE is trained
  first, on ShapeStories renders, then frozen as the official SD VAE is (:mod:`..train.autoencoder`);
- v-prediction on a cosine schedule (SD-2.1's own choice for its 768 px model), which learns colour and layout from
  a weak text condition far sooner than epsilon-prediction on this data (``TINY_MODEL_PROBE.md``);
- the visual-token projection and the Q-Formers start at ~1/sqrt(width) rather than BLIP-2's 0.02 / 1e-3, since the
  model is trained from scratch.

The tokenizer is word-level over the ShapeStories vocabulary, lower-cases its input and splits ``.`` and ``?`` off
words, so users can type ``A small red circle at top left.``.
"""

from __future__ import annotations

from ..config import MMInterleavedConfig
from ..tokenizer import build_word_tokenizer
from .generate import PUNCTUATION, WORDS

VOCAB_SIZE = 48  # the ShapeStories words + punctuation + <unk>, <s>, </s>, pad, with room to spare
EMBEDDED_WORDS: tuple[str, ...] = (*WORDS, *PUNCTUATION)


def embedded_config() -> MMInterleavedConfig:
    """The architecture of the embedded ShapeStories model (about 3 M parameters)."""
    config = MMInterleavedConfig.tiny(
        VOCAB_SIZE,
        image_size=32,
        patch_size=4,
        vision_width=64,
        vision_layers=4,
        num_img_token=16,
        llm_width=128,
        llm_layers=4,
        mmfs_every=2,
        decoder_image_size=64,
        unet_channels=(32, 64, 64, 64),
        decoder_width=64,
    )
    config.visual_tokenizer.proj_init_std = config.llm.hidden_size**-0.5
    decoder = config.image_decoder
    latent_size = decoder.image_size // 4
    decoder.unet.update(
        sample_size=latent_size,
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=[2, 4, 4, 4],
    )
    decoder.vae.update(
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[16, 32, 64],
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=decoder.image_size,
        scaling_factor=1.0,  # set from the trained VAE's latent statistics (train.autoencoder)
    )
    decoder.scheduler.update(
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        steps_offset=0,
    )
    return config


def build_embedded_tokenizer(config: MMInterleavedConfig | None = None):
    """The embedded model's word-level tokenizer (ids fixed by the vocabulary order of :data:`EMBEDDED_WORDS`)."""
    config = config or embedded_config()
    return build_word_tokenizer(
        EMBEDDED_WORDS, config.special_tokens, config.orig_vocab_size, split_punctuation=True, lowercase=True
    )
