"""Configuration of an MM-Interleaved model: one dataclass per part, serialised to ``config.json``.

``MMInterleavedConfig.official_13b()`` is the released model (Vicuna-13B + CLIP ViT-L/14 + SD-2.1-base);
``MMInterleavedConfig.from_official_tiny(path)`` reads the golden fixtures' ``tiny_config.json``. Every module
is built from these objects only, so one code path serves every size.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The official code's fixed sizes: ``clip_vit_adapter_hf(image_size=224)`` overrides the CLIP config's image size,
# and ``VisualTokenizer(grid_size=16)`` builds its sin-cos table for a 16 x 16 grid.
OFFICIAL_ENCODER_IMAGE_SIZE = 224
OFFICIAL_POS_EMBED_GRID = 16


# JSON values a field of each plain type accepts (JSON has no tuples, and 3 is a valid float)
_JSON_CHECKS: dict[Any, Any] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    type(None): lambda v: v is None,
    list: lambda v: isinstance(v, list | tuple),
    tuple: lambda v: isinstance(v, list | tuple),
    dict: lambda v: isinstance(v, dict),
}


def _fits(hint: Any, value: Any) -> bool:
    """Whether a JSON value can stand for a field typed ``hint``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(option, value) for option in typing.get_args(hint))
    check = _JSON_CHECKS.get(origin or hint)
    if check is not None:
        return check(value)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict | hint)
    return True  # Any and other hints: not checked


def _build(cls: type, data: dict[str, Any]) -> Any:
    """Construct dataclass ``cls`` from a dict, recursing into nested dataclass fields; unknown keys and values of
    the wrong JSON type (a string for a size, ``null`` for a part) are an error that names the field."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}; known keys: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if not _fits(hint, value):
            shown = getattr(hint, "__name__", str(hint))
            raise ValueError(f"{cls.__name__}.{key} = {value!r:.60} is not a valid {shown}")
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = _build(hint, value)
        kwargs[key] = value
    return cls(**kwargs)


class _ConfigBase:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):  # noqa: ANN206
        return _build(cls, dict(data))


@dataclass
class VisionEncoderConfig(_ConfigBase):
    """CLIP ViT (transformers ``CLIPVisionConfig`` fields) plus the ViT-Adapter that builds the 4-level pyramid."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # ViT-Adapter
    conv_inplane: int = 64
    deform_num_heads: int = 16
    n_points: int = 4
    deform_ratio: float = 0.5
    cffn_ratio: float = 0.25
    init_values: float = 0.0
    interaction_indexes: list[list[int]] = field(default_factory=lambda: [[0, 5], [6, 11], [12, 17], [18, 23]])
    n_extra_extractors: int = 2  # extra extractors on the last interaction block
    gradient_checkpointing: bool = False

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class QFormerConfig(_ConfigBase):
    """A BLIP-2 Q-Former driven by learned queries (``Blip2QFormerConfig`` fields + qk-norm)."""

    num_queries: int = 64
    hidden_size: int = 768
    encoder_hidden_size: int = 1024
    cross_attention_frequency: int = 2
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    qk_normalization: bool = False
    gradient_checkpointing: bool = False

    @classmethod
    def from_official(cls, perceiver_config: dict[str, Any], where: str) -> QFormerConfig:
        """An official ``perceiver_config`` (``PerceiverResampler`` arguments, the rest going to
        ``Blip2QFormerConfig``). Keys that cannot change the computation of a query-only Q-Former are dropped; any
        other key this config lacks is refused, rather than silently computing something else."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unused = {"vocab_size", "max_position_embeddings", "pad_token_id", "use_qformer_text_input"}
        position = perceiver_config.get("position_embedding_type", "absolute")
        if position != "absolute":  # relative keys would add distance terms to the attention scores
            raise ValueError(f"{where}: position_embedding_type {position!r} is not supported (only 'absolute')")
        unknown = sorted(set(perceiver_config) - fields - unused - {"position_embedding_type"})
        if unknown:
            raise ValueError(f"{where}: unsupported Q-Former settings {unknown}; supported: {sorted(fields)}")
        return cls(**{k: v for k, v in perceiver_config.items() if k in fields})


@dataclass
class VisualTokenizerConfig(_ConfigBase):
    encoder: VisionEncoderConfig = field(default_factory=VisionEncoderConfig)
    resampler: QFormerConfig = field(default_factory=lambda: QFormerConfig(num_queries=64, qk_normalization=True))
    # std of the visual-token projection's initial weights: the official 1e-3 suits fine-tuning from pretrained
    # parts; a model trained from scratch needs ~1/sqrt(width) or its image tokens start (and stay) near zero
    proj_init_std: float = 1e-3
    # side of the fixed sin-cos table ``pos_embed`` [1 + g*g, C] (resized to each feature map): None = the encoder's
    # patch grid; the official VisualTokenizer hard-codes 16 (= 224 / 14 for CLIP ViT-L/14)
    pos_embed_grid: int | None = None

    @property
    def pos_grid_size(self) -> int:
        return self.encoder.grid_size if self.pos_embed_grid is None else self.pos_embed_grid


@dataclass
class MMFSConfig(_ConfigBase):
    """Hyper-parameters of one family of MMFS attentions (the LLM side or the UNet side)."""

    n_heads: int = 16
    n_points: int = 8
    spatial_shapes: list[int] = field(default_factory=lambda: [32, 16, 8])
    base_spatial_shape: int = 16
    offset_init_magnitude: float = 3.0
    max_num_images: int = 50
    value_dim: int = 1024  # official: int(d_model * ratio)


@dataclass
class LLMConfig(_ConfigBase):
    """The decoder LLM: transformers ``LlamaConfig`` fields, plus where the MMFS layers go."""

    hidden_size: int = 5120
    intermediate_size: int = 13824
    num_hidden_layers: int = 40
    num_attention_heads: int = 40
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    mmfs_every: int = 4  # official ``cross_attention_frequency``: MMFS in layers 0, k, 2k, ...
    mmfs: MMFSConfig = field(default_factory=MMFSConfig)
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"  # transformers attention backend ("eager" is the official maths)

    def mmfs_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if i % self.mmfs_every == 0]


def _sd21_unet() -> dict[str, Any]:
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 1024,
        "attention_head_dim": [5, 10, 20, 20],
        "use_linear_projection": True,
        "dual_cross_attention": False,
        "only_cross_attention": False,
        "num_class_embeds": None,
    }


def _sd21_vae() -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "act_fn": "silu",
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 768,
        "scaling_factor": 0.18215,
    }


def _sd21_scheduler() -> dict[str, Any]:
    """SD-2.1-base's scheduler file as the official code reads it into a DDPMScheduler."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "variance_type": "fixed_small",
        "clip_sample": False,
        "prediction_type": "epsilon",
        "thresholding": False,
        "timestep_spacing": "leading",
        "steps_offset": 1,
    }


@dataclass
class ImageDecoderConfig(_ConfigBase):
    """Context resampler (77 x D prompt embeddings), diffusers UNet + MMFSNet, VAE and noise scheduler."""

    image_size: int = 512
    prompt_length: int = 77
    uncond_prob: float = 0.1
    resampler: QFormerConfig = field(
        default_factory=lambda: QFormerConfig(
            num_queries=77,
            hidden_size=1024,
            encoder_hidden_size=5120,
            cross_attention_frequency=1,
            num_hidden_layers=1,
            num_attention_heads=16,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )
    unet: dict[str, Any] = field(default_factory=_sd21_unet)
    vae: dict[str, Any] = field(default_factory=_sd21_vae)
    scheduler: dict[str, Any] = field(default_factory=_sd21_scheduler)
    mmfs: MMFSConfig = field(
        default_factory=lambda: MMFSConfig(
            n_heads=16,
            n_points=8,
            spatial_shapes=[64, 32, 16, 8],
            base_spatial_shape=64,  # per block: [64, 32, 16, 8][block // 3] // (512 // image_size)
            offset_init_magnitude=1.0,
            max_num_images=10,
            value_dim=1024,  # official MMFSBlock attn_dim (d_model), ratio 1.0
        )
    )
    vae_scale_factor: int = 8
    vae_encode_batch_size: int = 32  # official ``vae_encode_mini_bs``: frozen-VAE encode in chunks of this many
    gradient_checkpointing: bool = False  # UNet blocks and MMFSNet blocks (official training: on)

    @property
    def downsample_factor(self) -> int:
        return 512 // self.image_size


@dataclass
class SpecialTokens(_ConfigBase):
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 31999
    boi_token_id: int = 32000  # <|beginofimage|>, "soi" in the official code
    image_token_id: int = 32001  # <|image|>

    @property
    def all_ids(self) -> tuple[int, ...]:
        """<s>, </s>, pad, <BOI> and <|image|>."""
        return (self.bos_token_id, self.eos_token_id, self.pad_token_id, self.boi_token_id, self.image_token_id)


@dataclass
class MMInterleavedConfig(_ConfigBase):
    orig_vocab_size: int = 32000
    txt_vocab_size: int = 32002
    num_img_token: int = 64
    image_embed_dim: int = 1024  # channels of the ViT-Adapter pyramid (= CLIP hidden)
    encoder_image_size: int = 224
    special_tokens: SpecialTokens = field(default_factory=SpecialTokens)
    visual_tokenizer: VisualTokenizerConfig = field(default_factory=VisualTokenizerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    image_decoder: ImageDecoderConfig = field(default_factory=ImageDecoderConfig)
    loss_txt_weight: float = 1.0
    loss_img_weight: float = 10.0
    # Which LLM hidden states condition the image decoder. None (official): the final ones, after the final RMSNorm.
    # k in 1..num_hidden_layers-1: the output of LLM layer k (layers 0..k-1 applied), through the final RMSNorm --
    # the choice SD-2 makes for its text encoder (its penultimate layer), for a small LLM whose last layer keeps
    # little but the next-token prediction (docs/BENCHMARKS.md, embedded model).
    image_context_layer: int | None = None
    # True: the image decoder's context also gets the LLM's input embeddings (through the final RMSNorm), scaled per
    # channel by ``context_embed_gate`` (zero-initialised: a model trained without it computes the same function until
    # the gate learns). Not official. For a small LLM that does not carry every prompt word to a position the decoder
    # uses (the embedded model's column word, docs/BENCHMARKS.md).
    image_context_embeddings: bool = False
    dataset_to_ignore_noimage_cond_loss: list[str] = field(default_factory=lambda: ["laion_en", "laion_coco"])
    # Levels of the 4-level pyramid fed to each MMFS family (LLM: 32/16/8; UNet: all four).
    llm_mmfs_levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    unet_mmfs_levels: list[int] = field(default_factory=lambda: [0, 1, 2, 3])

    # -------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        encoder = self.visual_tokenizer.encoder.image_size
        if self.encoder_image_size != encoder:  # the data pipeline reads one, the vision encoder the other
            raise ValueError(
                f"encoder_image_size ({self.encoder_image_size}) must equal visual_tokenizer.encoder.image_size "
                f"({encoder}): both are the side of the images the vision encoder reads"
            )

    @classmethod
    def official_13b(cls) -> MMInterleavedConfig:
        return cls()

    @classmethod
    def tiny(
        cls,
        vocab_size: int,
        *,
        image_size: int = 32,
        patch_size: int = 8,
        vision_width: int = 32,
        vision_layers: int = 4,
        num_img_token: int = 8,
        llm_width: int = 64,
        llm_layers: int = 2,
        mmfs_every: int = 2,
        decoder_image_size: int = 64,
        unet_channels: tuple[int, int, int, int] = (4, 8, 16, 16),
        decoder_width: int = 32,
        prompt_length: int = 77,
    ) -> MMInterleavedConfig:
        """The real architecture at a size that trains a step in a fraction of a second on one CPU thread (tests,
        benchmarks, and the starting point of the embedded ShapeStories model). Every part and code path is there:
        CLIP ViT + ViT-Adapter pyramid, Q-Former visual resampler, LLaMA with MMFS layers, context Q-Former, UNet
        with MMFSNet, VAE, text head.

        ``vocab_size``: the tokenizer's vocabulary without BOI / ``<|image|>`` (``orig_vocab_size``); ids are ``<s>`` 1,
        ``</s>`` 2, pad ``vocab_size - 1`` (an ordinary id, as 31999 in the release), BOI ``vocab_size``, ``<|image|>``
        ``vocab_size + 1`` (``build_word_tokenizer(words, config.special_tokens, vocab_size)`` needs ``vocab_size >=
        len(words) + 4``). ``image_size`` / ``patch_size``: the encoder's input and ViT grid ``g = image_size //
        patch_size`` (even; the adapter pyramid is 4g, 2g, g, g/2 and the LLM's MMFS reads the last three);
        ``vision_layers``: ViT depth, split into the adapter's 4 layer groups (a multiple of 4); ``num_img_token``:
        visual tokens per image; ``llm_layers`` / ``mmfs_every``: LLaMA depth and MMFS in layers 0, k, 2k, ...;
        ``decoder_image_size``: the diffusion side's images (64 to 512, dividing 512: the official MMFSNet shape rule);
        ``unet_channels``: UNet and VAE block widths (4 blocks, multiples of 4); ``decoder_width``: the UNet's
        cross-attention width (= context Q-Former width, a multiple of 4); ``prompt_length``: the context Q-Former's
        queries. ``llm_width`` and ``vision_width`` are multiples of 8 (4 heads each; RoPE and the adapter's half-width
        values need an even head width). Heads, MMFS points and the remaining hyper-parameters are fixed at small values
        or the official ones; the Q-Formers start at N(0, 1/width) (BLIP-2's 0.02 suits width 768: at width 64 it leaves
        the visual tokens of a model trained from scratch almost independent of the image) and the LLM's MMFS sampling
        points start spread over the same share of the image as the official ones on its 16 x 16 grid.
        """
        if vocab_size < 5:
            raise ValueError(f"vocab_size must hold <unk>, <s>, </s>, pad and a word (>= 5), got {vocab_size}")
        grid = image_size // patch_size
        if image_size % patch_size or grid < 2 or grid % 2:
            raise ValueError(f"image_size / patch_size must be an even integer >= 2, got {image_size} / {patch_size}")
        if vision_layers < 4 or vision_layers % 4:
            raise ValueError(f"vision_layers must be a multiple of 4 (the adapter's 4 groups), got {vision_layers}")
        if decoder_image_size < 64 or 512 % decoder_image_size:
            raise ValueError(f"decoder_image_size must divide 512 and be >= 64, got {decoder_image_size}")
        if len(unet_channels) != 4 or any(c < 4 or c % 4 for c in unet_channels):
            raise ValueError(f"unet_channels must be 4 widths, each a positive multiple of 4, got {unet_channels}")
        # 4 attention heads everywhere: RoPE needs an even head width (LLM); the ViT-Adapter's deformable attention
        # has half the vision width as values, split over 4 heads; the Q-Formers split their width over 4 heads
        for name, width, multiple in (("llm_width", llm_width, 8), ("vision_width", vision_width, 8)):
            if width < multiple or width % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple}, got {width}")
        if decoder_width < 4 or decoder_width % 4:
            raise ValueError(f"decoder_width must be a positive multiple of 4, got {decoder_width}")
        for name, value in (
            ("num_img_token", num_img_token),
            ("llm_layers", llm_layers),
            ("mmfs_every", mmfs_every),
            ("prompt_length", prompt_length),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        per_group = vision_layers // 4
        heads = 4
        vision = VisionEncoderConfig(
            hidden_size=vision_width,
            intermediate_size=2 * vision_width,
            num_hidden_layers=vision_layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=patch_size,
            conv_inplane=16,
            deform_num_heads=heads,
            interaction_indexes=[[i * per_group, (i + 1) * per_group - 1] for i in range(4)],
        )
        visual_resampler = QFormerConfig(
            num_queries=num_img_token,
            hidden_size=llm_width,
            encoder_hidden_size=vision_width,
            num_hidden_layers=2,
            num_attention_heads=heads,
            intermediate_size=2 * llm_width,
            initializer_range=llm_width**-0.5,
            qk_normalization=True,
        )
        llm = LLMConfig(
            hidden_size=llm_width,
            intermediate_size=int(llm_width * 11 / 4),
            num_hidden_layers=llm_layers,
            num_attention_heads=heads,
            mmfs_every=mmfs_every,
            mmfs=MMFSConfig(
                n_heads=heads,
                n_points=4,
                spatial_shapes=[2 * grid, grid, grid // 2],
                base_spatial_shape=grid,
                offset_init_magnitude=3.0 * grid / 16,  # the official spread (3 cells of the 16-cell grid)
                value_dim=vision_width,
            ),
        )
        decoder_resampler = QFormerConfig(
            num_queries=prompt_length,
            hidden_size=decoder_width,
            encoder_hidden_size=llm_width,
            cross_attention_frequency=1,
            num_hidden_layers=1,
            num_attention_heads=heads,
            intermediate_size=2 * decoder_width,
            initializer_range=decoder_width**-0.5,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        latent_size = decoder_image_size // 8
        unet = {
            **_sd21_unet(),
            "sample_size": latent_size,
            "block_out_channels": list(unet_channels),
            "norm_num_groups": 2,
            "cross_attention_dim": decoder_width,
            "attention_head_dim": [max(1, c // 4) for c in unet_channels],
        }
        vae = {
            **_sd21_vae(),
            "block_out_channels": list(unet_channels),
            "norm_num_groups": 2,
            "sample_size": decoder_image_size,
        }
        decoder = ImageDecoderConfig(
            image_size=decoder_image_size,
            prompt_length=prompt_length,
            resampler=decoder_resampler,
            unet=unet,
            vae=vae,
            mmfs=MMFSConfig(
                n_heads=heads,
                n_points=4,
                spatial_shapes=[64, 32, 16, 8],
                base_spatial_shape=64,
                offset_init_magnitude=1.0,
                max_num_images=10,
                value_dim=2 * vision_width,
            ),
        )
        return cls(
            orig_vocab_size=vocab_size,
            txt_vocab_size=vocab_size + 2,
            num_img_token=num_img_token,
            image_embed_dim=vision_width,
            encoder_image_size=image_size,
            special_tokens=SpecialTokens(
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=vocab_size - 1,
                boi_token_id=vocab_size,
                image_token_id=vocab_size + 1,
            ),
            visual_tokenizer=VisualTokenizerConfig(encoder=vision, resampler=visual_resampler),
            llm=llm,
            image_decoder=decoder,
        )

    @classmethod
    def from_official_tiny(cls, tiny_config_json: str | Path) -> MMInterleavedConfig:
        """Read the golden fixtures' ``tiny_config.json`` (official yaml vocabulary)."""
        raw = json.loads(Path(tiny_config_json).read_text(encoding="utf-8"))
        model, folders = raw["model"], raw["pretrained_folders"]
        tok = raw["special_tokens"]
        clip = folders["clip_vision_config"]
        llm = folders["llm_config"]
        vt_q = model["visual_tokenizer_config"]["perceiver_config"]
        dec = model["image_decoder_config"]
        dec_q = dec["perceiver_config"]
        overrides = raw.get("constructor_overrides_not_in_yaml", {})
        conv_inplane = overrides.get("CLIPVisionTransformerAdapter.conv_inplane", {}).get("tiny", 64)
        unet_attn_dim = overrides.get("MMFSBlock.attn_dim (UNet-side MMFS d_model)", {}).get("tiny", 1024)
        hard = raw["hard_coded_in_official_code"]
        llm_mmfs, unet_mmfs = hard["llm_mmfs"], hard["unet_mmfs"]
        image_embed_dim = model["image_embed_dim"]
        # clip_vit_adapter_hf sets the CLIP config's image_size to 224 (whatever the folder says); the ViT-Adapter's
        # pyramid is then 4g, 2g, g, g/2 with g = 224 // patch, and the LLM's MMFS reads the maps whose side is in
        # ``spatial_shapes`` (in pyramid order)
        encoder_size = OFFICIAL_ENCODER_IMAGE_SIZE
        grid = encoder_size // clip["patch_size"]
        pyramid = [4 * grid, 2 * grid, grid, grid // 2]
        llm_levels = [level for level, side in enumerate(pyramid) if side in model["spatial_shapes"]]
        if len(llm_levels) != len(model["spatial_shapes"]):
            raise ValueError(
                f"spatial_shapes {model['spatial_shapes']} must be sides of the ViT-Adapter pyramid {pyramid} "
                f"(image size {encoder_size}, patch {clip['patch_size']})"
            )
        sched = {
            k: v
            for k, v in raw["resolved_ddpm_scheduler_config"].items()
            if not k.startswith("_") and k not in ("set_alpha_to_one", "skip_prk_steps")
        }
        return cls(
            orig_vocab_size=tok["orig_txt_vocab_size"],
            txt_vocab_size=model["txt_vocab_size"],
            num_img_token=model["num_img_token"],
            image_embed_dim=image_embed_dim,
            special_tokens=SpecialTokens(
                bos_token_id=tok["bos_token_id"],
                eos_token_id=tok["eos_token_id"],
                pad_token_id=tok["pad_token_id"],
                boi_token_id=tok["boi_token_id"],
                image_token_id=tok["image_token_id"],
            ),
            visual_tokenizer=VisualTokenizerConfig(
                encoder=VisionEncoderConfig(
                    hidden_size=clip["hidden_size"],
                    intermediate_size=clip["intermediate_size"],
                    num_hidden_layers=clip["num_hidden_layers"],
                    num_attention_heads=clip["num_attention_heads"],
                    image_size=encoder_size,
                    patch_size=clip["patch_size"],
                    hidden_act=clip["hidden_act"],
                    layer_norm_eps=clip["layer_norm_eps"],
                    conv_inplane=conv_inplane,
                    deform_num_heads=clip["num_attention_heads"],
                ),
                resampler=QFormerConfig.from_official(vt_q, "visual_tokenizer_config.perceiver_config"),
                pos_embed_grid=OFFICIAL_POS_EMBED_GRID,
            ),
            llm=LLMConfig(
                hidden_size=llm["hidden_size"],
                intermediate_size=llm["intermediate_size"],
                num_hidden_layers=llm["num_hidden_layers"],
                num_attention_heads=llm["num_attention_heads"],
                max_position_embeddings=llm["max_position_embeddings"],
                rms_norm_eps=llm["rms_norm_eps"],
                num_key_value_heads=llm.get("num_key_value_heads"),
                rope_theta=llm.get("rope_theta", 10000.0),
                hidden_act=llm.get("hidden_act", "silu"),
                mmfs_every=model["cross_attention_frequency"],
                mmfs=MMFSConfig(
                    n_heads=llm_mmfs["n_heads"],
                    n_points=llm_mmfs["n_points"],
                    spatial_shapes=list(model["spatial_shapes"]),
                    base_spatial_shape=llm_mmfs["base_spatial_shape"],
                    offset_init_magnitude=llm_mmfs["offset_init_magnitude"],
                    max_num_images=llm_mmfs["max_num_image_per_seq"],
                    # MMFS(d_model=hidden, ratio=vision/hidden) has int(d_model * ratio) value channels: the float
                    # product can fall just short of the vision width (e.g. 88 and 120 give 119)
                    value_dim=int(llm["hidden_size"] * (image_embed_dim / llm["hidden_size"])),
                ),
            ),
            image_decoder=ImageDecoderConfig(
                image_size=dec["image_size"],
                prompt_length=dec["seq_len"],
                uncond_prob=dec["uncond_prob"],
                resampler=QFormerConfig.from_official(dec_q, "image_decoder_config.perceiver_config"),
                unet=dict(folders["unet_config"]),
                vae=dict(folders["vae_config"]),
                scheduler=sched,
                mmfs=MMFSConfig(
                    n_heads=unet_mmfs["n_heads"],
                    n_points=unet_mmfs["n_points"],
                    spatial_shapes=list(unet_mmfs["constructor_spatial_shapes"]),
                    base_spatial_shape=unet_mmfs["constructor_spatial_shapes"][0],
                    offset_init_magnitude=float(unet_mmfs["offset_init_magnitude"]),
                    max_num_images=unet_mmfs["max_num_image_per_seq"],
                    value_dim=unet_attn_dim,
                ),
            ),
            loss_txt_weight=model["loss_txt_weight"],
            loss_img_weight=model["loss_img_weight"],
            dataset_to_ignore_noimage_cond_loss=list(model["dataset_to_ignore_noimage_cond_loss"]),
            llm_mmfs_levels=llm_levels,
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> MMInterleavedConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}: is this an MM-Interleaved model folder?") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); re-save or re-convert the model") from None
        return cls.from_dict(data)
