"""MM-Interleaved: visual tokenizer -> decoder LLM with MMFS -> text head and (per image) the image decoder.

Training forward (OFFICIAL_MODEL.md sections 1.3-1.7, FIXTURES.md section 5)::

    images ----> visual_tokenizer ----> vis_embed [n, K, D] and 4 feature maps per image
    text_ids --> token embeddings, vis_embed scattered into the <|image|> slots, + soi_token on every <BOI>
             --> mm_decoder (LLaMA + MMFS over the multi-scale maps of the visible images) --> hidden [B, L, D]
    hidden --> text_decoder --> logits --> next-token CE                                      (loss_txt)
    hidden --> per <BOI>: rows doc-start..BOI reversed --> context_feat_proj + 1-D sin-cos
           --> image_decoder (Q-Former -> UNet + MMFS over the previous image's maps) --> ε-MSE  (loss_img)
    loss = loss_txt_weight * loss_txt + loss_img_weight * loss_img

State-dict keys are the official ones: ``visual_tokenizer.*``, ``mm_decoder.*``, ``text_decoder.*``,
``image_decoder.*``, ``context_feat_proj.*``, ``soi_token``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from ..config import MMInterleavedConfig
from .diffusion import DiffusionDraws
from .image_decoder import ImageDecoder
from .llm import MMDecoder, MMFSInputs, flatten_levels, slot_spatial_layout
from .masks import (
    IGNORE_INDEX,
    ImageLayout,
    context_positions,
    image_layout,
    llm_visibility,
    text_targets,
    unet_mmfs_source,
)
from .mmfs import image_recency_index
from .posembed import sincos_1d
from .text_head import TextDecoder
from .visual_tokenizer import VisualTokenizer, VisualTokenizerOutput

# names of ImageDecoder.training_loss intermediates in the golden fixtures
_IMAGE_DECODER_NAMES = {
    "prompt_embeds": "imgdec.prompt_embeds",
    "encoder_hidden_states": "imgdec.unet_encoder_hidden_states",
    "cfg_uncond_mask": "rng.cfg_uncond_mask",
    "noise": "rng.diffusion_noise",
    "timesteps": "rng.timesteps",
}


@dataclass
class MMInterleavedOutput:
    loss: torch.Tensor  # loss_txt_weight * loss_txt (+ loss_img_weight * loss_img)
    loss_txt: torch.Tensor
    loss_img: torch.Tensor | None  # None without image decoder, decoder images or images
    text_logits: torch.Tensor  # [B, L, txt_vocab_size]
    intermediates: dict[str, torch.Tensor] | None = None  # fixture names, with return_intermediates=True


@dataclass
class ImageConditioning:
    """What the image decoder gets for every image of the batch (global image order)."""

    context_features: torch.Tensor  # [n, L_max, D]: hidden states BOI..doc start, projected + sin-cos
    context_mask: torch.Tensor  # [n, L_max] long, 1 on real rows
    mmfs_features: list[torch.Tensor]  # per pyramid level [n, C, h, w]: the source image's maps (zeros if none)
    mmfs_mask: torch.Tensor  # [n, 1] long, 1 if the image has a source image
    mmfs_source: torch.Tensor  # [n] global index of the source image, -1 if none
    loss_mask: torch.Tensor  # [n] bool, context longer than <s><BOI> (images with text before them)


@dataclass
class TextGenerationState:
    """KV-cached decoding state of a batch of left-padded prompts (see :meth:`MMInterleaved.start_text`)."""

    cache: DynamicCache
    attention_mask: torch.Tensor  # [B, L + steps]
    next_position: torch.Tensor  # [B, 1] LLM position of the next token
    mmfs: MMFSInputs  # visibility = the prompt's last row, values projected once
    logits: torch.Tensor  # [B, txt_vocab_size] logits of the next token


@dataclass
class TextGenerationOutput:
    text_ids: torch.Tensor  # [B, T] generated ids (pad after a row's end token)
    step_logits: torch.Tensor  # [B, T, txt_vocab_size] raw logits that chose each id


class MMInterleaved(nn.Module):
    """The whole model. ``with_visual_tokenizer`` / ``with_image_decoder`` = False leave those parts out (their
    keys then are absent from the state dict): text-only use, or feeding precomputed image features."""

    def __init__(
        self, config: MMInterleavedConfig, *, with_visual_tokenizer: bool = True, with_image_decoder: bool = True
    ) -> None:
        super().__init__()
        self.config = config
        hidden = config.llm.hidden_size
        self.visual_tokenizer = VisualTokenizer(config) if with_visual_tokenizer else None
        self.mm_decoder = MMDecoder(config)
        self.text_decoder = TextDecoder(config)
        self.image_decoder = ImageDecoder(config) if with_image_decoder else None
        self.context_feat_proj = nn.Linear(hidden, hidden)
        self.soi_token = nn.Parameter(torch.zeros(1, hidden))
        if config.image_context_embeddings:
            self.context_embed_gate = nn.Parameter(torch.zeros(hidden))
        layer = config.image_context_layer
        if layer is not None and not 1 <= layer < config.llm.num_hidden_layers:
            raise ValueError(
                f"image_context_layer must be None (the final hidden states) or 1..{config.llm.num_hidden_layers - 1} "
                f"(the output of that many LLM layers), got {layer}"
            )

    @property
    def separate_image_context(self) -> bool:
        """Whether the hidden states that condition the image decoder differ from the text head's."""
        return self.config.image_context_layer is not None or self.config.image_context_embeddings

    def run_llm(self, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The LLM (``mm_decoder``, same keyword arguments) -> (final hidden states [B, L, D] for the text head,
        the hidden states that condition the image decoder [B, L, D]: the same tensor unless
        ``config.image_context_layer`` picks an earlier layer, whose output then goes through the final RMSNorm, or
        ``config.image_context_embeddings`` adds the gated, normalised input embeddings)."""
        layer = self.config.image_context_layer
        if layer is None:
            hidden = self.mm_decoder(**kwargs).last_hidden_state
            context = hidden
        else:
            captured: list[torch.Tensor] = []
            handle = self.mm_decoder.layers[layer - 1].register_forward_hook(lambda _m, _a, out: captured.append(out))
            try:
                hidden = self.mm_decoder(**kwargs).last_hidden_state
            finally:
                handle.remove()
            context = self.mm_decoder.norm(captured[0])
        if self.config.image_context_embeddings:
            embeds = kwargs["inputs_embeds"]  # [B, L, D]
            context = context + self.context_embed_gate.to(context.dtype) * self.mm_decoder.norm(embeds)
        return hidden, context

    # ------------------------------------------------------------------------------------------------------
    # training forward
    def forward(
        self,
        text_ids: torch.Tensor,
        image_tensors: torch.Tensor | None = None,
        image_tensors_dec: torch.Tensor | None = None,
        num_image_per_seq: torch.Tensor | Sequence[int] | None = None,
        attention_mask: torch.Tensor | None = None,
        nearest_bos_idxs: torch.Tensor | None = None,
        meta: Mapping[str, Any] | None = None,
        dataset_name: str | None = None,
        draws: DiffusionDraws | None = None,
        return_intermediates: bool = False,
        ignore_prompt_token_offset: int | torch.Tensor = 0,
        image_loss_mask: torch.Tensor | None = None,
        loss_txt_weight: float | None = None,
        loss_img_weight: float | None = None,
        visual: VisualTokenizerOutput | None = None,
        text_loss_mask: torch.Tensor | None = None,
    ) -> MMInterleavedOutput:
        """One training step's losses.

        text_ids [B, L] (packed rows of documents); image_tensors [n, 3, S, S] in [0, 1], one per <BOI> in row-major
        order (or ``visual``: their precomputed visual-tokenizer output); image_tensors_dec [n, 3, S_dec, S_dec] in [0,
        1] for the diffusion loss (no image loss without them); num_image_per_seq [B] (counted from the BOI tokens if
        None); attention_mask [B, L] (1 = real token); nearest_bos_idxs [n]: each image's document start (if None: the
        last <s> before its BOI, which is what the official data pipeline passes; the official forward itself falls back
        to 0, which differs only for rows packing several documents); ``dataset_name`` (or ``meta["dataset_name"]``)
        selects the official "ignore text without image" rule; ``draws``: the diffusion step's random draws (drawn if
        None); ``ignore_prompt_token_offset``: the first tokens of every row (int or [B]) are not text targets;
        ``text_loss_mask`` [B, L]: 0 where token t must not be a text target (SFT prompts, any turn of any packed
        document; it indexes the target token, on top of the official ignore rules); ``image_loss_mask`` [n] drops
        images from the image loss; the loss weights override the config's.
        """
        attention_mask = self._check_text(text_ids, attention_mask)
        layout = self._layout(text_ids, num_image_per_seq)
        visual = self._visual_input(image_tensors, visual, layout)
        doc_start = self._doc_start(layout, nearest_bos_idxs)
        record: dict[str, torch.Tensor] | None = {} if return_intermediates else None

        embeds = self.embed(text_ids, visual)
        mmfs = self.llm_mmfs_inputs(layout, visual, text_ids.shape)
        with self._recording_mmfs(record):
            hidden, context_hidden = self.run_llm(inputs_embeds=embeds, attention_mask=attention_mask, mmfs=mmfs)
        logits = self.text_decoder(hidden)

        if dataset_name is None and meta is not None:
            dataset_name = meta.get("dataset_name")
        targets = text_targets(
            text_ids,
            attention_mask,
            self.config.special_tokens,
            ignore_text_without_image=dataset_name in self.config.dataset_to_ignore_noimage_cond_loss,
            prompt_length=ignore_prompt_token_offset,
            text_loss_mask=text_loss_mask,
        )
        loss_txt = text_loss(logits, targets)
        txt_weight = self.config.loss_txt_weight if loss_txt_weight is None else loss_txt_weight
        loss = txt_weight * loss_txt

        loss_img, image_outputs, conditioning = None, {}, None
        if layout.num_images:
            conditioning = self.image_conditioning(context_hidden, layout, doc_start, visual.multiscale_features)
            if self.image_decoder is not None and image_tensors_dec is not None:
                self._check_images(image_tensors_dec, layout, "image_tensors_dec")
                loss_img, image_outputs = self.image_loss(image_tensors_dec, conditioning, draws, image_loss_mask)
                img_weight = self.config.loss_img_weight if loss_img_weight is None else loss_img_weight
                loss = loss + img_weight * loss_img

        if record is not None:
            record.update(
                self._named_intermediates(embeds, mmfs, hidden, logits, targets, visual, conditioning, image_outputs)
            )
            record = {name: value.detach() for name, value in record.items()}
        return MMInterleavedOutput(loss, loss_txt, loss_img, logits, record)

    # ------------------------------------------------------------------------------------------------------
    # building blocks
    def encode_images(self, image_tensors: torch.Tensor) -> VisualTokenizerOutput:
        if self.visual_tokenizer is None:
            raise ValueError(
                "this model was built without its visual tokenizer: pass the images' precomputed features "
                "as visual=VisualTokenizerOutput(...)"
            )
        return self.visual_tokenizer(image_tensors)

    def embed(self, text_ids: torch.Tensor, visual: VisualTokenizerOutput | None) -> torch.Tensor:
        """Token embeddings [B, L, D]; <|image|> slots get the visual tokens (row-major), every BOI + soi_token."""
        tokens = self.config.special_tokens
        embeds = self.mm_decoder.embed_tokens(text_ids)
        if visual is not None:
            image_slots = (text_ids == tokens.image_token_id)[..., None]
            embeds = embeds.masked_scatter(image_slots, visual.vis_embed.to(embeds.dtype))
        is_boi = (text_ids == tokens.boi_token_id)[..., None]
        return torch.where(is_boi, embeds + self.soi_token.to(embeds.dtype), embeds)

    def llm_mmfs_inputs(
        self, layout: ImageLayout, visual: VisualTokenizerOutput | None, shape: tuple[int, int] | torch.Size
    ) -> MMFSInputs:
        """Per-row image slots of the LLM-side pyramid levels and the token -> slot visibility mask."""
        batch, length = shape
        dtype = self.mm_decoder.embed_tokens.weight.dtype
        if visual is None:
            sizes = self.config.llm.mmfs.spatial_shapes
            maps = [self.soi_token.new_zeros(0, self.config.image_embed_dim, s, s, dtype=dtype) for s in sizes]
        else:
            maps = [visual.multiscale_features[level].to(dtype) for level in self.config.llm_mmfs_levels]
        per_image, level_shapes = flatten_levels(maps)  # [n, S, C]
        slots = per_image.new_zeros(batch, layout.num_slots, *per_image.shape[1:])
        slots = slots.index_put((layout.row, layout.slot), per_image)
        shapes, starts = slot_spatial_layout(level_shapes, layout.num_slots)
        visibility = llm_visibility(layout, batch, length)
        return MMFSInputs(visibility, shapes, starts, features=slots)

    def image_conditioning(
        self,
        hidden: torch.Tensor,
        layout: ImageLayout,
        doc_start: torch.Tensor,
        multiscale_features: Sequence[torch.Tensor],
    ) -> ImageConditioning:
        """Context features of every image (its document's hidden states up to its BOI, reversed) and the
        source image of its UNet-side MMFS."""
        positions, valid = context_positions(layout, doc_start)
        context = hidden[layout.row[:, None], positions]  # [n, L_max, D]
        context = torch.where(valid[..., None], context, 0.0)
        steps = torch.arange(positions.shape[1], device=hidden.device)
        context = self.context_feat_proj(context) + sincos_1d(hidden.shape[-1], steps, torch.float32).to(context.dtype)

        source = unet_mmfs_source(layout, doc_start)
        has_source = source >= 0
        features = [
            torch.where(has_source[:, None, None, None], multiscale_features[level][source.clamp(min=0)], 0.0)
            for level in self.config.unet_mmfs_levels
        ]
        context_mask = valid.long()
        return ImageConditioning(
            context_features=context,
            context_mask=context_mask,
            mmfs_features=features,
            mmfs_mask=has_source.long()[:, None],
            mmfs_source=source,
            loss_mask=context_mask.sum(1) > 2,
        )

    @staticmethod
    def images_in_loss(conditioning: ImageConditioning, image_loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[n] bool: the images the diffusion loss uses (context beyond ``<s><BOI>``, and ``image_loss_mask``)."""
        loss_mask = conditioning.loss_mask
        if image_loss_mask is not None:
            loss_mask = loss_mask & image_loss_mask.to(loss_mask.device).bool()
        return loss_mask

    def image_loss(
        self,
        image_tensors_dec: torch.Tensor,
        conditioning: ImageConditioning,
        draws: DiffusionDraws | None = None,
        image_loss_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The image decoder's diffusion loss of every image and its intermediates."""
        loss_mask = self.images_in_loss(conditioning, image_loss_mask)
        return self.image_decoder.training_loss(
            image_tensors_dec,
            conditioning.context_features,
            conditioning.context_mask,
            conditioning.mmfs_features,
            conditioning.mmfs_mask,
            loss_mask,
            draws,
        )

    # ------------------------------------------------------------------------------------------------------
    # text generation (greedy; the building blocks serve other decoding strategies)
    @torch.no_grad()
    def start_text(
        self,
        text_ids: torch.Tensor,
        visual: VisualTokenizerOutput | None,
        num_image_per_seq: torch.Tensor | Sequence[int] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> TextGenerationState:
        """Run the prompt (left-padded rows) once and keep its KV cache and its images' MMFS values."""
        attention_mask = self._check_text(text_ids, attention_mask)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generation prompts must be left-padded: attention_mask[:, -1] must be 1 in every row")
        layout = self._layout(text_ids, num_image_per_seq)
        self._check_visual(visual, layout)
        embeds = self.embed(text_ids, visual)
        mmfs = self.llm_mmfs_inputs(layout, visual, text_ids.shape)
        mmfs = MMFSInputs(
            mmfs.visibility,
            mmfs.spatial_shapes,
            mmfs.level_start_index,
            values=self.mm_decoder.project_mmfs_values(mmfs.features),
        )
        positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        cache = DynamicCache(config=self.mm_decoder.config)
        hidden = self.mm_decoder(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            mmfs=mmfs,
        ).last_hidden_state
        return TextGenerationState(
            cache=cache,
            attention_mask=attention_mask,
            next_position=positions[:, -1:] + 1,
            mmfs=mmfs.with_visibility(mmfs.visibility[:, -1:]),
            logits=self.text_decoder(hidden[:, -1]),
        )

    @torch.no_grad()
    def continue_text(self, state: TextGenerationState, token_ids: torch.Tensor) -> TextGenerationState:
        """Feed one new token per row ([B]); generated tokens use plain embeddings and the prompt's last MMFS row."""
        attention_mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(token_ids.shape[0], 1)], 1)
        hidden = self.mm_decoder(
            inputs_embeds=self.mm_decoder.embed_tokens(token_ids[:, None]),
            attention_mask=attention_mask,
            position_ids=state.next_position,
            cache=state.cache,
            use_cache=True,
            mmfs=state.mmfs,
        ).last_hidden_state
        return TextGenerationState(
            state.cache, attention_mask, state.next_position + 1, state.mmfs, self.text_decoder(hidden[:, -1])
        )

    @torch.no_grad()
    def generate_text(
        self,
        text_ids: torch.Tensor,
        image_tensors: torch.Tensor | None = None,
        num_image_per_seq: torch.Tensor | Sequence[int] | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 30,
        min_new_tokens: int = 0,
        eos_token_ids: Sequence[int] | None = None,
        visual: VisualTokenizerOutput | None = None,
    ) -> TextGenerationOutput:
        """Greedy decoding with a KV cache. Stops a row at any of ``eos_token_ids`` (default ``</s>`` and
        ``<BOI>``, as the official model), which are forbidden for the first ``min_new_tokens`` tokens (the
        official ``min_length=m`` counts a placeholder ``<s>``: it is ``min_new_tokens=m-1``)."""
        if max_new_tokens < 1 or min_new_tokens < 0:
            raise ValueError(
                f"need max_new_tokens >= 1 and min_new_tokens >= 0, got {max_new_tokens}, {min_new_tokens}"
            )
        tokens = self.config.special_tokens
        eos = torch.tensor(
            [tokens.eos_token_id, tokens.boi_token_id] if eos_token_ids is None else list(eos_token_ids),
            device=text_ids.device,
        )
        visual = self._visual_input(image_tensors, visual, self._layout(text_ids, num_image_per_seq))
        state = self.start_text(text_ids, visual, num_image_per_seq, attention_mask)
        finished = torch.zeros(text_ids.shape[0], dtype=torch.bool, device=text_ids.device)
        ids, step_logits = [], []
        for step in range(max_new_tokens):
            logits = state.logits
            allowed = logits if step >= min_new_tokens else logits.index_fill(-1, eos, float("-inf"))
            next_ids = allowed.argmax(-1).masked_fill(finished, tokens.pad_token_id)
            ids.append(next_ids)
            step_logits.append(logits)
            finished = finished | torch.isin(next_ids, eos)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            state = self.continue_text(state, next_ids)
        return TextGenerationOutput(torch.stack(ids, 1), torch.stack(step_logits, 1))

    # ------------------------------------------------------------------------------------------------------
    # input checks and bookkeeping
    def _check_text(self, text_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if not torch.is_tensor(text_ids) or text_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"text_ids must be an integer tensor [B, L], got {getattr(text_ids, 'dtype', text_ids)}")
        if text_ids.dim() != 2:
            raise ValueError(f"text_ids must have shape [B, L], got {tuple(text_ids.shape)}; for one row use [None]")
        vocab = self.config.txt_vocab_size
        if text_ids.numel() and (int(text_ids.min()) < 0 or int(text_ids.max()) >= vocab):
            raise ValueError(f"text_ids must be in [0, {vocab}), got [{int(text_ids.min())}, {int(text_ids.max())}]")
        if attention_mask is None:
            return torch.ones_like(text_ids)
        if attention_mask.shape != text_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must match text_ids {tuple(text_ids.shape)}"
            )
        return attention_mask.to(text_ids.device)

    def _layout(self, text_ids: torch.Tensor, num_image_per_seq: torch.Tensor | Sequence[int] | None) -> ImageLayout:
        tokens = self.config.special_tokens
        if num_image_per_seq is None:
            num_image_per_seq = (text_ids == tokens.boi_token_id).sum(1)
        num_image_per_seq = torch.as_tensor(num_image_per_seq, device=text_ids.device).long()
        layout = image_layout(text_ids, num_image_per_seq, tokens, self.config.num_img_token)
        most_visible = int(llm_visibility(layout, *text_ids.shape).sum(-1).max()) if text_ids.numel() else 0
        limit = self.config.llm.mmfs.max_num_images - 1
        if most_visible > limit:
            raise ValueError(
                f"a token sees {most_visible} images of its document but the model's MMFS handles at most {limit}; "
                "split the document or drop earlier images"
            )
        return layout

    @staticmethod
    def _check_images(images: torch.Tensor | None, layout: ImageLayout, name: str) -> None:
        if layout.num_images == 0:
            if images is not None and images.shape[0] != 0:
                raise ValueError(f"{name} holds {images.shape[0]} images but text_ids has no <BOI> token")
            return
        if images is None:
            raise ValueError(f"text_ids has {layout.num_images} <BOI> tokens: pass {name} [n, 3, H, W]")
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{name} must be a tensor [n, 3, H, W], got {tuple(getattr(images, 'shape', ()))}")
        if images.shape[0] != layout.num_images:
            raise ValueError(
                f"{name} holds {images.shape[0]} images but text_ids has {layout.num_images} <BOI> tokens "
                "(one image per <BOI>, in row-major order)"
            )

    def _visual_input(
        self, images: torch.Tensor | None, visual: VisualTokenizerOutput | None, layout: ImageLayout
    ) -> VisualTokenizerOutput | None:
        """The images' visual-tokenizer output: ``visual`` as given, or ``images`` encoded now."""
        if visual is not None:
            if images is not None:
                raise ValueError("pass either image_tensors or their precomputed features (visual=...), not both")
        else:
            self._check_images(images, layout, "image_tensors")
            visual = self.encode_images(images) if layout.num_images else None
        self._check_visual(visual, layout)
        return visual

    def _check_visual(self, visual: VisualTokenizerOutput | None, layout: ImageLayout) -> None:
        if visual is None:
            if layout.num_images:
                raise ValueError(f"text_ids has {layout.num_images} <BOI> tokens but no image features were given")
            return
        expected = (layout.num_images, self.config.num_img_token, self.config.llm.hidden_size)
        if tuple(visual.vis_embed.shape) != expected:
            raise ValueError(
                f"vis_embed must be {list(expected)} (images, tokens, hidden), got {list(visual.vis_embed.shape)}"
            )
        needed = max(*self.config.llm_mmfs_levels, *self.config.unet_mmfs_levels) + 1
        maps = visual.multiscale_features
        if len(maps) < needed or any(
            m.dim() != 4 or m.shape[:2] != (layout.num_images, self.config.image_embed_dim) for m in maps
        ):
            raise ValueError(
                f"multiscale_features must be {needed} maps [{layout.num_images}, {self.config.image_embed_dim}, "
                f"h, w], got {[tuple(m.shape) for m in maps]}"
            )

    @staticmethod
    def _doc_start(layout: ImageLayout, nearest_bos_idxs: torch.Tensor | None) -> torch.Tensor:
        if nearest_bos_idxs is None:
            return layout.image_doc_start()
        doc_start = torch.as_tensor(nearest_bos_idxs, device=layout.boi.device).long()
        if doc_start.shape != (layout.num_images,) or bool(((doc_start < 0) | (doc_start > layout.boi)).any()):
            raise ValueError(
                f"nearest_bos_idxs must hold one position per image ({layout.num_images}) between 0 and its BOI "
                f"position {layout.boi.tolist()}, got {doc_start.tolist()}"
            )
        return doc_start

    @contextmanager
    def _recording_mmfs(self, record: dict[str, torch.Tensor] | None) -> Iterator[None]:
        """With ``record``, store every MMFS block's input, MMFS output and gated output (fixture names)."""
        if record is None:
            yield
            return
        handles = []
        for block in self.mm_decoder.mmfs_layers():
            prefix = f"llm.mmfs.layer{block.layer_idx}"

            def store_block(module, args, output, prefix=prefix):
                record[f"{prefix}.input_hidden"], record[f"{prefix}.gated_out"] = args[0], output

            def store_mmfs(module, args, output, prefix=prefix):
                record[f"{prefix}.mmfs_out"] = output

            handles += [block.register_forward_hook(store_block), block.attn.register_forward_hook(store_mmfs)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _named_intermediates(
        embeds: torch.Tensor,
        mmfs: MMFSInputs,
        hidden: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
        visual: VisualTokenizerOutput | None,
        conditioning: ImageConditioning | None,
        image_outputs: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        named = {
            "llm.mm_embeds": embeds,
            "llm.cross_attention_mask": mmfs.visibility.float(),
            "llm.mmfs_recency_index": image_recency_index(mmfs.visibility),
            "llm.last_hidden_state": hidden,
            "out.text_logits": logits,
            "out.gt_text_ids": targets,
        }
        if visual is not None:
            named["vt.vis_embed"] = visual.vis_embed
            named["vit.last_hidden_state"] = visual.last_hidden_state
            named.update({f"vit.multiscale_features.{k}": m for k, m in enumerate(visual.multiscale_features)})
        if conditioning is not None:
            named.update(
                {
                    "imgdec.context_features": conditioning.context_features,
                    "imgdec.context_attention_mask": conditioning.context_mask,
                    "imgdec.mmfs_mask": conditioning.mmfs_mask,
                    "imgdec.mmfs_source_image": conditioning.mmfs_source,
                }
            )
        for name, value in image_outputs.items():
            if name.startswith("mmfs."):
                named["unet_mmfs." + name.removeprefix("mmfs.")] = value
            else:
                named[_IMAGE_DECODER_NAMES.get(name, "sd." + name)] = value
        return named


def text_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits [B, L, V] against targets [B, L-1] (0 if every target is ignored)."""
    flat = logits[:, :-1].flatten(0, 1).float()
    total = F.cross_entropy(flat, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
