"""``InterleavedEngine``: exact, cached MM-Interleaved generation of text and images in interleaved documents.

    engine = InterleavedEngine.from_pretrained("models/mm-interleaved", dtype="bfloat16", offload=True)
    doc = Interleaved(["A cat on a mat.", Image.open("cat.png"), "Then the cat"])
    story = engine.generate(doc, mode="auto", max_segments=4)            # text, image, text, ...

What the official loop recomputes and this engine keeps (:class:`CachePolicy`, all on by default):

* ``image_features``: every image's visual-tokenizer output, keyed by a hash of its pixels, across calls (an image
  used twice, or a document extended step by step, is encoded once);
* ``mmfs_values``: every image's MMFS value projections, once per LLM layer, reused by every token;
* ``context``: the KV cache and hidden states of the last document: a call whose document starts with it runs only
  the new tokens through the LLM. This is exact: LLM attention is causal and an image is visible to MMFS only from
  its first ``<|image|>`` token on, so appending text or images never changes the earlier positions;
* ``kv_cache``: the KV cache while decoding (off = one full forward per token, the reference path of the tests).

MMFS ablation (:meth:`InterleavedEngine.mmfs_ablation`, :mod:`..models.ablation`): the context cache is keyed by
the model's MMFS switches, so a document run with MMFS on is recomputed with it off and vice versa; image features
and MMFS value projections do not depend on the switches and stay cached.

The diffusion components are built once (they are part of the loaded model) and the UNet-side MMFS values of the
source image are projected once per image.

Document semantics: generation continues a document (``<s>`` + segments, no ``</s>``). Text generation stops at
``</s>`` or, with ``stop_on_image``, at ``<|beginofimage|>``: then the returned document ends with a *pending*
image, which :meth:`generate_images` resolves. The context of image k is the document up to its
``<|beginofimage|>`` (reversed, official); its UNet MMFS reads the previous image of the document.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import DynamicCache

from .. import checkpoint
from ..config import MMInterleavedConfig
from ..models.ablation import mmfs_ablation, mmfs_state, mmfs_switches
from ..models.diffusion import DiffusionStep
from ..models.image_decoder import ImageDecoder
from ..models.latent_preview import LatentToRGB, to_preview_image
from ..models.llm import MMFSInputs, flatten_levels, slot_spatial_layout
from ..models.masks import image_layout, llm_visibility
from ..models.visual_tokenizer import VisualTokenizerOutput, preprocess_images
from ..tokenizer import check_tokenizer, load_tokenizer
from .document import ImagePart, Interleaved, as_images, tensor_to_images
from .memory import GROUPS, Offloader, PeakMemory, Placement, group_modules, resolve_placement
from .options import ImageOptions, TextOptions
from .progress import ProgressCallback, report
from .sampling import TokenRules, decode
from .tokens import DocumentTokens, document_tokens

MODES = ("text", "image", "auto")  # of InterleavedEngine.generate
LINEAR_PREVIEW_MAX_ERROR = 0.05  # a sampling preview's latent-to-RGB map is used up to this colour error (0 to 1)
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parents[1] / "embedded"
TOKENIZER_FOLDER = "tokenizer"
ENCODE_BATCH = 8  # images per visual-tokenizer call


# ----------------------------------------------------------------------------------------------------------------
# Public data types


@dataclass
class CachePolicy:
    """Which reusable state the engine keeps (see the module docstring)."""

    image_features: bool = True
    mmfs_values: bool = True
    context: bool = True
    kv_cache: bool = True

    @classmethod
    def none(cls) -> CachePolicy:
        """Nothing reused: images re-encoded, one full forward per token (the tests' reference)."""
        return cls(image_features=False, mmfs_values=False, context=False, kv_cache=False)

    @classmethod
    def official(cls) -> CachePolicy:
        """What the official loop reuses: the KV cache within one call, nothing else."""
        return cls(image_features=False, mmfs_values=False, context=False, kv_cache=True)


@dataclass
class EncodedImage:
    """One image's visual-tokenizer output as the engine caches it."""

    key: str
    vis_embed: torch.Tensor  # [num_img_token, D_llm] (language device and dtype)
    multiscale_features: list[torch.Tensor]  # pyramid maps [C, h_l, w_l] (vision device and dtype)
    llm_features: torch.Tensor  # [S, C]: the LLM-side levels flattened (language device and dtype)
    level_shapes: torch.Tensor  # [n_llm_levels, 2] (H, W)
    llm_values: dict[int, torch.Tensor] | None = None  # MMFS layer -> [1, S, heads, head_dim], once computed


@dataclass
class TextResult:
    text: str  # the generated text (end token excluded)
    ends_with_image: bool  # stopped at <|beginofimage|>: ``document`` ends with a pending image
    document: Interleaved  # the input document + the text (+ the pending image)
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False  # stopped at </s> (end of document)


@dataclass
class ImageResult:
    images: list[Image.Image]  # num_images RGB images
    document: Interleaved  # the input document (pending image resolved) + the first image
    tensors: torch.Tensor | None = None  # [num_images, 3, S, S] float in [0, 1] (CPU), before 8-bit rounding


@dataclass
class InjectedNoise:
    """The sampler's random draws, injected instead of drawn (parity tests): initial latents [N, C, h, w] (unit
    normal) and one variance noise per step (DDPM)."""

    init_latents: torch.Tensor
    variance_noises: Sequence[torch.Tensor] | None = None


@dataclass
class EngineStats:
    """Counters of the work done (tests check that nothing is recomputed) and time per phase (seconds)."""

    images_encoded: int = 0
    image_cache_hits: int = 0
    llm_tokens: int = 0  # token positions run through the LLM
    reused_tokens: int = 0  # prompt positions taken from the context cache
    tokens_generated: int = 0
    images_generated: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def add_time(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


@dataclass
class _Context:
    """The LLM state of the last document: ids, per-position image keys (for ``<|image|>`` tokens), KV cache,
    final hidden states (kept as chunks, concatenated when needed) and the MMFS switches it was computed with."""

    ids: list[int]
    keys: list[str | None]
    cache: DynamicCache | None
    chunks: list[torch.Tensor]  # [1, l_i, D] pieces of the final hidden states
    mmfs: tuple[bool, ...]
    # pieces of the hidden states that condition the image decoder, when they differ from the text head's
    context_chunks: list[torch.Tensor] | None = None

    @property
    def hidden(self) -> torch.Tensor:
        if len(self.chunks) > 1:
            self.chunks = [torch.cat(self.chunks, 1)]
        return self.chunks[0]

    @property
    def context_hidden(self) -> torch.Tensor:
        """[1, L, D] hidden states that condition the image decoder."""
        if self.context_chunks is None:
            return self.hidden
        if len(self.context_chunks) > 1:
            self.context_chunks = [torch.cat(self.context_chunks, 1)]
        return self.context_chunks[0]

    def append(self, hidden: torch.Tensor, context_hidden: torch.Tensor) -> None:
        self.chunks.append(hidden)
        if self.context_chunks is not None:
            self.context_chunks.append(context_hidden)

    def common_prefix(self, ids: Sequence[int], keys: Sequence[str | None]) -> int:
        length = min(len(ids), len(self.ids))
        for i in range(length):
            if ids[i] != self.ids[i] or keys[i] != self.keys[i]:
                return i
        return length


def resolve_model_dir(model_dir: str | Path | None) -> Path:
    """``model_dir``, or the embedded default model folder when None."""
    if model_dir is not None:
        folder = Path(model_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder {folder} does not exist")
        return folder
    if (EMBEDDED_MODEL_DIR / checkpoint.CONFIG_FILE).is_file():
        return EMBEDDED_MODEL_DIR
    raise ValueError(
        f"no model given and the embedded default model is not shipped yet ({EMBEDDED_MODEL_DIR} is missing); "
        "pass a model folder (--model DIR, or model_dir=...)"
    )


# ----------------------------------------------------------------------------------------------------------------


class InterleavedEngine:
    """Holds the model, its tokenizer and every reusable cache; see the module docstring.

    ``max_cached_images``: encoded images kept (least recently used dropped first; at 13B in bf16 an image costs
    about 40 MB: its pyramid and its per-layer MMFS values).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        placement: Placement | None = None,
        caching: CachePolicy | None = None,
        max_cached_images: int = 32,
        offload_budget_bytes: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.config: MMInterleavedConfig = model.config
        check_tokenizer(tokenizer, self.config.special_tokens)
        self.tokenizer = tokenizer
        self.placement = placement or _placement_of(model)
        self.caching = caching or CachePolicy()
        self.offloader = Offloader(model, self.placement, offload_budget_bytes)
        self.peak_memory = PeakMemory(self._devices())
        self.max_cached_images = max_cached_images
        self.stats = EngineStats()
        self._features: OrderedDict[str, EncodedImage] = OrderedDict()
        self._context: _Context | None = None
        self._empty_values: dict[int, torch.Tensor] | None = None
        self._mmfs_switches = mmfs_switches(model)
        self._latent_to_rgb: LatentToRGB | None = None  # fitted on the first preview asked for

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path | None = None,
        *,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device | dict | None = None,
        offload: bool | str = False,
        resident_layers: int | None = None,
        caching: CachePolicy | None = None,
        offload_budget_bytes: int | None = None,
    ) -> InterleavedEngine:
        """Load a model folder (``None``: the embedded default model) and its ``tokenizer/`` subfolder.

        ``dtype``: float32 / bfloat16 / float16 (the VAE stays float32); ``device``: one device or a map over groups
        / components (see :mod:`.memory`), default CUDA when available; ``offload``: False, ``"model"``,
        ``"sequential"`` or True (sequential; ``resident_layers`` LLM layers stay on the device, by default as
        many as fit in ``offload_budget_bytes``, itself by default the device's free memory less a reserve)."""
        folder = resolve_model_dir(model_dir)
        placement = resolve_placement(dtype, device, offload, resident_layers)
        tokenizer_dir = folder / TOKENIZER_FOLDER
        if not tokenizer_dir.is_dir():
            raise FileNotFoundError(
                f"model folder {folder} has no {TOKENIZER_FOLDER}/ subfolder; save the tokenizer there with "
                f"tokenizer.save_pretrained('{tokenizer_dir}')"
            )
        devices = {c: str(d) for c, d in placement.component_devices().items()}
        model = checkpoint.from_pretrained(folder, dtype=placement.dtype, device=devices)
        if model.image_decoder is not None:
            model.image_decoder.decoder.vae.float()  # the official pipeline decodes in float32 (memory.py)
        tokenizer = load_tokenizer(tokenizer_dir, model.config.special_tokens)
        return cls(model, tokenizer, placement=placement, caching=caching, offload_budget_bytes=offload_budget_bytes)

    # ------------------------------------------------------------------------------------------------------
    # devices and phases
    def _devices(self) -> list[torch.device]:
        if self.placement.offload != "none":
            return [self.placement.execution_device]
        return list(self.placement.devices.values())

    def _device(self, group: str) -> torch.device:
        if self.placement.offload != "none":
            return self.placement.execution_device
        return self.placement.devices[group]

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.model.mm_decoder.embed_tokens.weight.dtype

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with self.offloader.phase(name), self.peak_memory.measure(name):
            yield
        self.stats.add_time(name, time.perf_counter() - start)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Drop the reusable LLM state when a generation is interrupted half-way."""
        try:
            yield
        except BaseException:
            self._context = None
            raise

    @contextlib.contextmanager
    def mmfs_ablation(self) -> Iterator[None]:
        """Generate with every MMFS switched off (LLM gates contribute zero, no UNet residuals); see the module
        docstring for what stays cached."""
        with mmfs_ablation(self.model):
            yield

    def clear_cache(self) -> None:
        """Forget every cached image and the document context."""
        self._features.clear()
        self._context = None
        self._empty_values = None

    def memory_report(self) -> dict:
        return {"placement": self.placement.to_dict(), **self.peak_memory.report()}

    # ------------------------------------------------------------------------------------------------------
    # images
    def encode_images(self, images: Any, progress: ProgressCallback | None = None) -> list[EncodedImage]:
        """Encode images (PIL, paths, ComfyUI tensors, ``ImagePart`` or a list of them); cached by pixel hash."""
        items = images if isinstance(images, list | tuple) else [images]
        parts: list[ImagePart] = []
        for i, item in enumerate(items):
            if isinstance(item, ImagePart):
                if item.pending:
                    raise ValueError(f"image {i} is a pending image (no pixels) and cannot be encoded")
                parts.append(item)
            else:
                parts += [ImagePart(img) for img in as_images(item, name=f"image {i}")]
        return self._encode_parts(parts, progress)

    def _encode_parts(self, parts: Sequence[ImagePart], progress: ProgressCallback | None) -> list[EncodedImage]:
        if parts and self.model.visual_tokenizer is None:
            raise ValueError("this model was loaded without its visual tokenizer, so it cannot read images")
        found: dict[str, EncodedImage] = {}
        missing: dict[str, ImagePart] = {}
        for part in parts:
            if part.key in found or part.key in missing:
                continue
            cached = self._features.get(part.key) if self.caching.image_features else None
            if cached is not None:
                self._features.move_to_end(part.key)
                found[part.key] = cached
                self.stats.image_cache_hits += 1
            else:
                missing[part.key] = part
        todo = list(missing.values())
        for start in range(0, len(todo), ENCODE_BATCH):
            batch = todo[start : start + ENCODE_BATCH]
            for done, (part, encoded) in enumerate(zip(batch, self._encode_batch(batch)), start=start + 1):
                found[part.key] = encoded
                report(progress, "encode", done, len(todo))
        if self.caching.image_features:
            for key in missing:
                self._features[key] = found[key]
            while len(self._features) > self.max_cached_images:
                self._features.popitem(last=False)
        return [found[p.key] for p in parts]

    @torch.no_grad()
    def _encode_batch(self, parts: Sequence[ImagePart]) -> list[EncodedImage]:
        size = self.config.visual_tokenizer.encoder.image_size
        vision = self._device("vision")
        pixels = preprocess_images([p.image for p in parts], size).to(vision)
        with self._phase("encode"):
            out = self.model.visual_tokenizer(pixels)
        self.stats.images_encoded += len(parts)
        language, dtype = self._device("language"), self.llm_dtype
        llm_maps = [out.multiscale_features[level] for level in self.config.llm_mmfs_levels]
        flat, level_shapes = flatten_levels(llm_maps)  # [n, S, C]
        return [
            EncodedImage(
                key=part.key,
                vis_embed=out.vis_embed[i].to(language, dtype),
                multiscale_features=[m[i] for m in out.multiscale_features],
                llm_features=flat[i].to(language, dtype),
                level_shapes=level_shapes.to(language),
            )
            for i, part in enumerate(parts)
        ]

    def _values_of(self, features: torch.Tensor) -> dict[int, torch.Tensor]:
        """MMFS values of every LLM MMFS layer for features [1, n, S, C]."""
        decoder = self.model.mm_decoder
        with self.offloader.loaded(list(decoder.mmfs_layers())):
            return decoder.project_mmfs_values(features)

    def _mmfs_inputs(self, encoded: Sequence[EncodedImage], visibility: torch.Tensor) -> MMFSInputs:
        """MMFS inputs of one row over the document's images (one invisible zero slot when there is none)."""
        device, dtype = self._device("language"), self.llm_dtype
        if encoded:
            features = torch.stack([e.llm_features for e in encoded])[None]  # [1, n, S, C]
            level_shapes = encoded[0].level_shapes
        else:
            sizes = self.config.llm.mmfs.spatial_shapes
            level_shapes = torch.tensor([[s, s] for s in sizes], device=device)
            features = torch.zeros(1, 1, sum(s * s for s in sizes), self.config.image_embed_dim, device=device)
            features = features.to(dtype)
        shapes, starts = slot_spatial_layout(level_shapes, features.shape[1])
        if not self.caching.mmfs_values:
            return MMFSInputs(visibility, shapes, starts, features=features)
        if encoded:
            for e in encoded:
                if e.llm_values is None:
                    e.llm_values = self._values_of(e.llm_features[None, None])
            values = {layer: torch.cat([e.llm_values[layer] for e in encoded], 1) for layer in encoded[0].llm_values}
        else:
            if self._empty_values is None:
                self._empty_values = self._values_of(features)
            values = self._empty_values
        return MMFSInputs(visibility, shapes, starts, features=features, values=values)

    # ------------------------------------------------------------------------------------------------------
    # the LLM over a document, with the context cache
    def _visibility(self, ids: Sequence[int], num_images: int) -> torch.Tensor:
        """[1, L, max(n, 1)] MMFS visibility of every position (a trailing bare <BOI> sees the earlier images)."""
        tokens, k = self.config.special_tokens, self.config.num_img_token
        device = self._device("language")
        padded = list(ids) + ([tokens.image_token_id] * k if ids[-1] == tokens.boi_token_id else [])
        text_ids = torch.tensor([padded], device=device)
        layout = image_layout(text_ids, (text_ids == tokens.boi_token_id).sum(1), tokens, k)
        visible = llm_visibility(layout, 1, len(padded))[:, : len(ids), : max(num_images, 1)]
        return visible if num_images else torch.zeros_like(visible)

    def _position_keys(self, ids: Sequence[int], encoded: Sequence[EncodedImage]) -> list[str | None]:
        tokens = self.config.special_tokens
        keys: list[str | None] = []
        image = -1
        for token in ids:
            image += token == tokens.boi_token_id
            keys.append(encoded[image].key if token == tokens.image_token_id else None)
        return keys

    def _image_rows(self, ids: Sequence[int], start: int, encoded: Sequence[EncodedImage]) -> torch.Tensor | None:
        """The visual tokens of the ``<|image|>`` positions from ``start`` on, in order [m, D]."""
        tokens = self.config.special_tokens
        rows, image, offset = [], -1, 0
        for position, token in enumerate(ids):
            if token == tokens.boi_token_id:
                image, offset = image + 1, 0
            elif token == tokens.image_token_id:
                if position >= start:
                    rows.append(encoded[image].vis_embed[offset])
                offset += 1
        return torch.stack(rows) if rows else None

    def _run_llm(
        self, ids: Sequence[int], start: int, encoded: Sequence[EncodedImage], cache: DynamicCache | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(final, image-conditioning) hidden states [1, L - start, D] of positions start.. (the cache holds
        positions < start); see ``MMInterleaved.run_llm``."""
        device = self._device("language")
        text_ids = torch.tensor([list(ids)], device=device)
        rows = self._image_rows(ids, start, encoded)
        visual = None if rows is None else VisualTokenizerOutput(rows[None], [], None)
        embeds = self.model.embed(text_ids[:, start:], visual)
        mmfs = self._mmfs_inputs(encoded, self._visibility(ids, len(encoded))[:, start:])
        out = self.model.run_llm(inputs_embeds=embeds, cache=cache, use_cache=cache is not None, mmfs=mmfs)
        self.stats.llm_tokens += len(ids) - start
        return out

    def _new_context(self, ids: list[int], keys: list[str | None], cache: DynamicCache | None, mmfs) -> _Context:  # noqa: ANN001
        separate = self.model.separate_image_context
        return _Context(list(ids), list(keys), cache, [], mmfs, [] if separate else None)

    @torch.no_grad()
    def _prefill(self, ids: list[int], encoded: Sequence[EncodedImage]) -> _Context:
        """The document's LLM state, reusing the longest matching prefix of the cached context."""
        keys = self._position_keys(ids, encoded)
        mmfs = mmfs_state(self._mmfs_switches)
        if not self.caching.kv_cache:
            fresh = self._new_context(ids, keys, None, mmfs)
            fresh.append(*self._run_llm(ids, 0, encoded, None))
            return fresh
        context = self._context if self.caching.context else None
        if context is not None and context.mmfs != mmfs:
            context = None  # computed with other MMFS switches
        self._context = None  # invalid until the update below completes
        reuse = context.common_prefix(ids, keys) if context is not None else 0
        if reuse == 0:
            fresh = self._new_context(ids, keys, DynamicCache(config=self.model.mm_decoder.config), mmfs)
        else:
            cache = context.cache
            cache.crop(reuse - cache.get_seq_length())
            fresh = self._new_context(ids, keys, cache, mmfs)
            fresh.append(context.hidden[:, :reuse], context.context_hidden[:, :reuse])
        if reuse < len(ids):
            fresh.append(*self._run_llm(ids, reuse, encoded, fresh.cache))
        self.stats.reused_tokens += reuse
        return fresh

    def _keep(self, context: _Context) -> None:
        if self.caching.context and self.caching.kv_cache:
            self._context = context

    # ------------------------------------------------------------------------------------------------------
    # checks
    def _check_document(self, doc: Interleaved, extra_images: int) -> None:
        if not isinstance(doc, Interleaved):
            raise TypeError(f"expected an Interleaved document, got {type(doc).__name__}")
        if doc.without_pending_image().is_empty():
            raise ValueError("the document is empty: give it at least one text segment or image to continue")
        limit = self.config.llm.mmfs.max_num_images - 1
        if doc.num_images + extra_images > limit:
            count = f"{doc.num_images} images" + (" plus the one to draw" if extra_images else "")
            raise ValueError(
                f"the document holds {count} but the model reads at most {limit} images per document; split it "
                "or drop earlier images"
            )

    def _text_prompt(self, doc: Interleaved) -> DocumentTokens:
        """The tokens of ``doc`` as a text prompt, after the checks that text generation needs."""
        self._check_document(doc, 0)
        if doc.ends_with_pending_image:
            raise ValueError("the document ends with a pending image: generate it first (generate_images)")
        prompt = document_tokens(doc, self.tokenizer, self.config)
        self._check_length(len(prompt.ids), 1, "text generation")
        return prompt

    def _image_prompt(self, doc: Interleaved) -> DocumentTokens:
        """The tokens of ``doc`` without its pending image, after the checks that drawing its next image needs."""
        base = doc.without_pending_image()
        self._check_document(base, 1)
        prompt = document_tokens(base, self.tokenizer, self.config)
        self._check_length(len(prompt.ids), 1 + self.config.num_img_token, "an image")
        return prompt

    def check_can_continue(self, doc: Interleaved, mode: str = "auto") -> None:
        """Raise the error :meth:`generate` would raise before its first step (an empty document, too many images,
        no room in the context window), without running the model: to check a batch of documents up front."""
        _check_mode(mode)
        if mode == "image" or (mode == "auto" and doc.ends_with_pending_image):
            self._image_decoder()
            self._image_prompt(doc)
        else:
            self._text_prompt(doc)

    def _image_decoder(self) -> ImageDecoder:
        """The model's image decoder, or the error of a model loaded without one."""
        if self.model.image_decoder is None:
            raise ValueError("this model was loaded without its image decoder, so it cannot draw images")
        return self.model.image_decoder

    def _check_length(self, length: int, needed: int, what: str) -> None:
        window = self.config.llm.max_position_embeddings
        if length + needed > window:
            raise ValueError(
                f"the document is {length} tokens and {what} needs {needed} more, but the model's context window "
                f"is {window} tokens; shorten the document (fewer words or images)"
            )

    def _rules(self, options: TextOptions) -> TokenRules:
        tokens = self.config.special_tokens
        stops = (tokens.eos_token_id, tokens.boi_token_id) if options.stop_on_image else (tokens.eos_token_id,)
        banned = (tokens.bos_token_id, tokens.image_token_id)
        return TokenRules(stops, banned if options.stop_on_image else (*banned, tokens.boi_token_id))

    @torch.no_grad()
    def next_token_logits(self, doc: Interleaved) -> torch.Tensor:
        """Raw logits [txt_vocab_size] of the token after ``doc`` (uses and updates the context cache)."""
        self._check_document(doc, 0)
        if doc.ends_with_pending_image:
            raise ValueError("the document ends with a pending image: generate it first (generate_images)")
        prompt = document_tokens(doc, self.tokenizer, self.config)
        self._check_length(len(prompt.ids), 0, "scoring")
        encoded = self._encode_parts(prompt.images, None)
        with self._guard(), self._phase("text"):
            context = self._prefill(prompt.ids, encoded)
            self._keep(context)
            return self.model.text_decoder(context.hidden[:, -1])[0].float()

    # ------------------------------------------------------------------------------------------------------
    # text
    @torch.no_grad()
    def generate_text(
        self, doc: Interleaved, options: TextOptions | None = None, progress: ProgressCallback | None = None
    ) -> TextResult:
        """Continue ``doc`` with text (see :class:`TextOptions`); the document must not end with a pending image."""
        options = options or TextOptions()
        options.validate()
        prompt = self._text_prompt(doc)
        budget = min(options.max_new_tokens, self.config.llm.max_position_embeddings - len(prompt.ids))
        encoded = self._encode_parts(prompt.images, progress)
        with self._guard(), self._phase("text"):
            context = self._prefill(prompt.ids, encoded)
            logits = self.model.text_decoder(context.hidden[:, -1])
            advance = self._advance_fn(context, encoded, options.num_beams > 1)
            decoded = decode(
                logits, advance, options, self._rules(options), budget, lambda s, t: report(progress, "text", s, t)
            )
            if options.num_beams > 1 and context.cache is not None:
                context.cache.batch_select_indices(torch.tensor([0], device=logits.device))
                context.cache.crop(len(context.ids) - context.cache.get_seq_length())
            self._keep(context)
        self.stats.tokens_generated += len(decoded.tokens)
        tokens = self.config.special_tokens
        text = self.tokenizer.decode(decoded.tokens, skip_special_tokens=True) if decoded.tokens else ""
        document = doc.append_text(text, decoded.tokens) if decoded.tokens else doc
        ends_with_image = decoded.stop_id == tokens.boi_token_id
        if ends_with_image:
            document = document.append_pending_image()
        return TextResult(text, ends_with_image, document, decoded.tokens, decoded.stop_id == tokens.eos_token_id)

    def _advance_fn(self, context: _Context, encoded: Sequence[EncodedImage], beams: bool):
        """``advance(tokens [B], origin [B] | None) -> logits [B, V]`` over ``context`` (see ``sampling``)."""
        model = self.model
        if context.cache is None:  # reference path: one full forward per token and sequence
            sequences = [list(context.ids)]

            def advance_full(tokens: torch.Tensor, origin: torch.Tensor | None) -> torch.Tensor:
                nonlocal sequences
                rows = [0] * len(tokens) if origin is None else origin.tolist()
                sequences = [sequences[r] + [int(t)] for r, t in zip(rows, tokens)]
                hidden = [self._run_llm(s, 0, encoded, None)[0][:, -1] for s in sequences]
                return model.text_decoder(torch.cat(hidden))

            return advance_full

        last_row = self._visibility(context.ids, len(encoded))[:, -1:]
        by_batch = {1: self._mmfs_inputs(encoded, last_row)}

        def advance(tokens: torch.Tensor, origin: torch.Tensor | None) -> torch.Tensor:
            if origin is not None:
                context.cache.reorder_cache(origin)
            if len(tokens) not in by_batch:
                by_batch[len(tokens)] = _expand_mmfs(by_batch[1], len(tokens))
            step_mmfs = by_batch[len(tokens)]
            embeds = model.embed(tokens[:, None], None)
            hidden, context_hidden = model.run_llm(
                inputs_embeds=embeds, cache=context.cache, use_cache=True, mmfs=step_mmfs
            )
            self.stats.llm_tokens += len(tokens)
            if not beams:
                context.ids.append(int(tokens[0]))
                context.keys.append(None)
                context.append(hidden, context_hidden)
            return model.text_decoder(hidden[:, -1])

        return advance

    # ------------------------------------------------------------------------------------------------------
    # images
    @torch.no_grad()
    def generate_images(
        self,
        doc: Interleaved,
        options: ImageOptions | None = None,
        progress: ProgressCallback | None = None,
        *,
        noise: InjectedNoise | None = None,
    ) -> ImageResult:
        """Draw the next image of ``doc`` (its pending image, or a new one at its end): ``options.num_images``
        samples; the returned document gets the first."""
        image_decoder = self._image_decoder()
        options = options or ImageOptions()
        options.validate(image_decoder.config.image_size)
        base = doc.without_pending_image()
        prompt = self._image_prompt(doc)
        tokens = self.config.special_tokens
        ids = prompt.ids + [tokens.boi_token_id]
        encoded = self._encode_parts(prompt.images, progress)
        with self._guard(), self._phase("text"):
            context = self._prefill(ids, encoded)
            self._keep(context)
            condition = self._image_condition(context, encoded)
        with self._phase("image"):
            images = self._sample(condition, options, progress, noise)
        if not torch.isfinite(images).all():
            raise ValueError(
                f"the sampler diverged: the drawn image has NaN or infinite values ({options.scheduler}, "
                f"{options.num_inference_steps} steps, {images.dtype}); try another scheduler or step count, or "
                "float32 on a CPU"
            )
        self.stats.images_generated += len(images)
        pil = tensor_to_images(images.permute(0, 2, 3, 1), "generated image")
        return ImageResult(pil, base.append_image(pil[0]), images.float().cpu())

    def _image_condition(self, context: _Context, encoded: Sequence[EncodedImage]) -> dict[str, Any]:
        """Context features of the new image (its <BOI> is the last position) and its UNet MMFS source, via
        ``MMInterleaved.image_conditioning`` over the document with the new image as a zero placeholder."""
        tokens, k = self.config.special_tokens, self.config.num_img_token
        language = self._device("language")
        text_ids = torch.tensor([context.ids + [tokens.image_token_id] * k], device=language)
        layout = image_layout(text_ids, (text_ids == tokens.boi_token_id).sum(1), tokens, k)
        maps = []  # per pyramid level [n + 1, C, h, w]: the document's images, then the new one as zeros
        for level in range(max(self.config.unet_mmfs_levels) + 1):
            size = self.config.visual_tokenizer.encoder.grid_size * 4 // 2**level
            placeholder = torch.zeros(self.config.image_embed_dim, size, size, device=language, dtype=self.llm_dtype)
            maps.append(torch.stack([*(e.multiscale_features[level].to(placeholder) for e in encoded), placeholder]))
        conditioning = self.model.image_conditioning(context.context_hidden, layout, layout.image_doc_start(), maps)
        return {
            "context_features": conditioning.context_features[-1:],
            "context_mask": conditioning.context_mask[-1:],
            "mmfs_features": [f[-1:] for f in conditioning.mmfs_features],
            "mmfs_mask": conditioning.mmfs_mask[-1:],
        }

    def _sample(
        self,
        condition: dict[str, Any],
        options: ImageOptions,
        progress: ProgressCallback | None,
        noise: InjectedNoise | None,
    ) -> torch.Tensor:
        decoder = self.model.image_decoder
        device = self._device("diffusion")
        dtype = decoder.neg_prompt_embeds.dtype
        n = options.num_images
        context = condition["context_features"].to(device, dtype)
        prompt = decoder.prompt_embeds(context, condition["context_mask"].to(device)).expand(n, -1, -1)
        features = [f.to(device, dtype).expand(n, -1, -1, -1) for f in condition["mmfs_features"]]
        mask = condition["mmfs_mask"].to(device).expand(n, -1)
        generator = None
        if noise is None:
            generators = [torch.Generator(device=device).manual_seed(options.seed + i) for i in range(n)]
            generator = generators[0] if n == 1 else generators
        steps = options.num_inference_steps
        return decoder.sample(
            prompt,
            features,
            mask,
            num_inference_steps=steps,
            guidance_scale=options.guidance_scale,
            scheduler=options.scheduler,
            generator=generator,
            init_latents=None if noise is None else noise.init_latents.to(device),
            variance_noises=None if noise is None else noise.variance_noises,
            callback=lambda step: report(progress, "image", step.index + 1, steps, lambda: self._preview(step)),
        )

    def _preview(self, step: DiffusionStep) -> Image.Image:
        """A picture of the first image of a sampling step, from the scheduler's clean-latent estimate (else the
        step's latents): through a latent-to-RGB map fitted once to this model's VAE when that map is faithful
        (colour error at most ``LINEAR_PREVIEW_MAX_ERROR``, as for SD's VAE), else through the VAE's decoder."""
        decoder = self.model.image_decoder.decoder
        size = self.model.image_decoder.config.image_size
        if self._latent_to_rgb is None:  # called inside the image phase: the VAE is where it computes
            self._latent_to_rgb = LatentToRGB.fit(decoder, size)
        latents = step.denoised if step.denoised is not None else step.latents_out
        if self._latent_to_rgb.error <= LINEAR_PREVIEW_MAX_ERROR:
            return self._latent_to_rgb.image(latents, size)
        return to_preview_image(decoder.decode(latents[:1])[0].permute(1, 2, 0))

    # ------------------------------------------------------------------------------------------------------
    # the interleaved loop
    def generate(
        self,
        doc: Interleaved,
        mode: str = "auto",
        text_options: TextOptions | None = None,
        image_options: ImageOptions | None = None,
        max_segments: int = 4,
        progress: ProgressCallback | None = None,
        *,
        force_image_after_text: bool = False,
    ) -> Interleaved:
        """Continue ``doc``: ``mode="text"`` one text segment, ``"image"`` one image, ``"auto"`` up to
        ``max_segments`` steps where a document ending with a pending image gets its image and any other gets
        text (which may end by asking for an image). Auto stops at ``</s>``, and before a step for which the
        context window or the model's image limit has no room. ``force_image_after_text`` (official
        ``force_gen_image_next``) asks for an image after every text step. Text step k uses ``seed + k``."""
        _check_mode(mode)
        text_options = text_options or TextOptions()
        image_options = image_options or ImageOptions()
        if mode == "text":
            return self.generate_text(doc, text_options, progress).document
        if mode == "image":
            return self.generate_images(doc, image_options, progress).document
        if not isinstance(max_segments, int) or max_segments < 1:
            raise ValueError(f"max_segments must be >= 1, got {max_segments!r}")
        for step in range(max_segments):
            if doc.ends_with_pending_image:
                if not self._has_room(doc, image=True):
                    break
                doc = self.generate_images(doc, image_options, progress).document
                continue
            if step and not self._has_room(doc, image=False):
                break
            result = self.generate_text(doc, replace(text_options, seed=text_options.seed + step), progress)
            doc = result.document
            if result.finished:
                break
            if force_image_after_text and step + 1 < max_segments and not doc.ends_with_pending_image:
                doc = doc.append_pending_image()
        return doc

    def _has_room(self, doc: Interleaved, image: bool) -> bool:
        length = len(document_tokens(doc, self.tokenizer, self.config).ids)
        window = self.config.llm.max_position_embeddings
        if image:
            limit = self.config.llm.mmfs.max_num_images - 1
            return doc.num_images + 1 <= limit and length + 1 + self.config.num_img_token <= window
        return length < window

    def document_length(self, doc: Interleaved) -> int:
        """Number of prompt tokens of ``doc`` (a pending image counts as its <BOI> + image tokens)."""
        extra = 1 + self.config.num_img_token if doc.ends_with_pending_image else 0
        return len(document_tokens(doc, self.tokenizer, self.config).ids) + extra


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be 'text', 'image' or 'auto', got {mode!r}")


def _expand_mmfs(mmfs: MMFSInputs, batch: int) -> MMFSInputs:
    """The same MMFS inputs for ``batch`` rows (beam search; the sampling op needs contiguous values)."""
    values = None
    if mmfs.values is not None:
        values = {k: v.expand(batch, *v.shape[1:]).contiguous() for k, v in mmfs.values.items()}
    features = None if mmfs.features is None else mmfs.features.expand(batch, *mmfs.features.shape[1:])
    visibility = mmfs.visibility.expand(batch, *mmfs.visibility.shape[1:])
    return MMFSInputs(visibility, mmfs.spatial_shapes, mmfs.level_start_index, features, values)


def _placement_of(model: torch.nn.Module) -> Placement:
    """The placement of an already-loaded model (no offload): each group's device from its first weight."""
    devices = {}
    for group in GROUPS:
        params = [p for m in group_modules(model, group) for p in m.parameters()]
        devices[group] = params[0].device if params else torch.device("cpu")
    return Placement(model.mm_decoder.embed_tokens.weight.dtype, devices)
