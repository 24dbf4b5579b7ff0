"""Interleaved generation: our engine vs what the official loop computes, same model, same story, same run.

    python bench/generate.py [--golden ../shared/golden] [--segments 4] [--tokens 90] [--steps 30] [--repeats 2]
    python bench/generate.py --baseline-op gather            # the baseline without the op difference (see below)
    python bench/generate.py --estimate-13b                  # memory plan of the 13B model in bf16 (meta build)
    python bench/generate.py --gpu-13b [--offload sequential] [--budget-gib 22]    # measured on a GPU

Story (the official demo's settings, ``mm_inference.yaml``): a prompt text and an image, then ``--segments`` times
(``--tokens`` tokens of text, then an image of ``--steps`` DDPM steps with guidance 7.5). The demo decodes up to 90
new tokens with nucleus sampling and repetition penalty 1.3; here every text step decodes exactly ``--tokens``
(default 90) tokens greedily with repetition penalty 1.3, so the run is deterministic and both paths must produce
the same tokens and images. Both run the same tiny official-config model (the golden tiny checkpoint, converted)
on the CPU in float32.

* ours: ``InterleavedEngine`` with every cache on (image features by pixel hash, per-layer MMFS values, the
  document's KV cache extended step by step, diffusion components built once, the source image's UNet-side MMFS
  values projected once per image) and the library's default deformable-sampling op (the gather fallback on a CPU).
* baseline (:class:`OfficialLoop`): what the official ``inference.py`` loop computes, on the same model weights:

  - every step re-encodes every image of the context; an image step also encodes the gray placeholder of the
    image being drawn and runs one forward over the whole prompt with the placeholder's ``<|image|>`` tokens
    (``MMInterleaved.generate_images``); a text step runs the whole context, then decodes with a KV cache kept
    only inside the call (HF ``generate``);
  - MMFS as the official module computes it (:class:`OfficialMMFS`): values projected from the features at every
    call (every LLM MMFS layer at every token; every UNet MMFS block at every UNet call, after the block's feature
    LayerNorm, on the CFG batch of 2: :class:`OfficialMMFSNet`), the query repeated per image slot and transformed
    on the ``[N, n_img, Lq, d_query]`` tensor (``W_dom q + E[r]``) before ``sampling_offsets`` /
    ``attention_weights``, the null slot as the release's extra logit column;
  - the deformable-sampling core: the official op is Deformable-DETR's CUDA extension, which has no CPU
    implementation; the only way the official code computes MMFS (and the ViT-Adapter's deformable attention) on a
    CPU is its PyTorch ``ms_deform_attn_core_pytorch`` (``grid_sample`` per level; it is how the golden fixtures
    were produced), which is our ``ops/reference.py``: the baseline runs with ``MMI_MSDA_BACKEND=reference``
    (``--baseline-op gather`` gives it our op instead, to separate the two effects);
  - the official code rebuilds its ``DiffusionPipeline`` from disk for every image (with its own UNet and scheduler
    passed in, so the VAE is re-read and re-built): the baseline builds a new VAE and loads its weights from the
    model folder for every image. (The pipeline also loads SD's CLIP text encoder and tokenizer, unused since
    prompt embeddings are given; the converted model folder has no text encoder, so that load is not emulated.)

Before timing, every MMFS of the baseline is checked against ours on a random case (same numbers to 1e-5).

``--gpu-13b`` builds the 13B configuration with random bf16 weights (about 30 GB of host memory, no download) and
runs a short interleaved story (text, image, text) on the GPU with the chosen offload, reporting the measured peak
(``torch.cuda.max_memory_allocated``) per phase next to the meta-device estimate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from comfy_mm_interleaved.checkpoint import load_state_dict_from_folder  # noqa: E402
from comfy_mm_interleaved.config import ImageDecoderConfig, MMInterleavedConfig  # noqa: E402
from comfy_mm_interleaved.convert import convert_official  # noqa: E402
from comfy_mm_interleaved.inference import (  # noqa: E402
    CachePolicy,
    EncodedImage,
    ImageOptions,
    ImagePart,
    Interleaved,
    InterleavedEngine,
    TextOptions,
)
from comfy_mm_interleaved.inference.memory import GIB, estimate_peaks, resolve_placement  # noqa: E402
from comfy_mm_interleaved.models.mmfs import MASKED_LOGIT, MMFS, image_recency_index  # noqa: E402
from comfy_mm_interleaved.models.unet_mmfs import MMFSNet, MMFSNetContext  # noqa: E402
from comfy_mm_interleaved.ops import ms_deform_attn  # noqa: E402
from comfy_mm_interleaved.ops.backend import backend_for  # noqa: E402
from comfy_mm_interleaved.tokenizer import build_word_tokenizer  # noqa: E402

VAE_PREFIX = "image_decoder.decoder.vae."
# "cpu": this process's CPU time (with one torch thread, the work done, unaffected by other jobs on a shared box)
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
MMFS_CHECK_ATOL = 1e-5  # max|official - ours| <= atol * max(1, max|ours|)


def word_tokenizer(config: MMInterleavedConfig):
    """A tokenizer in which the word ``w<i>`` is token id ``i`` (every ordinary id of the vocabulary)."""
    tokens = config.special_tokens
    fixed = {0, tokens.bos_token_id, tokens.eos_token_id, tokens.pad_token_id}
    return build_word_tokenizer(
        [f"w{i}" for i in range(config.orig_vocab_size) if i not in fixed], tokens, config.orig_vocab_size
    )


def tiny_model_dir(golden: Path, folder: Path) -> Path:
    """The golden tiny release converted to our format, with a word tokenizer in ``tokenizer/``."""
    model = convert_official(
        golden / "mm_interleaved_pretrain_tiny", folder / "model", config=golden / "tiny_config.json"
    )
    word_tokenizer(MMInterleavedConfig.from_official_tiny(golden / "tiny_config.json")).save_pretrained(
        str(model / "tokenizer")
    )
    return model


@contextlib.contextmanager
def msda_backend(name: str | None) -> Iterator[None]:
    """Run with ``MMI_MSDA_BACKEND=name`` (None: leave the environment as it is)."""
    old = os.environ.get("MMI_MSDA_BACKEND")
    if name is not None:
        os.environ["MMI_MSDA_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MMI_MSDA_BACKEND", None)
        else:
            os.environ["MMI_MSDA_BACKEND"] = old


# ----------------------------------------------------------------------------------------------------------------
# MMFS the way the official module computes it


class OfficialMMFS(MMFS):
    """:class:`MMFS` computed as the release's ``MMFS.forward`` does (same parameters, same numbers).

    Per call: values projected from the features (unless the caller projected them in the same call, as
    ``GatedMMFSCrossAttention`` does from uncached features); the query repeated for every image slot and
    transformed there, ``q_n = W_dom q + b_dom + E[r_n]`` as a ``[N, n_img, Lq, d_query]`` tensor, then
    ``sampling_offsets`` and ``attention_weights`` on it; masked images get -10000; the last logit column of every
    (image, level) group is set to -log(n_img * L) (together one null slot of logit 0) before one softmax over
    ``n_img * L * (P + 1)`` entries; offsets x (s_l / base) / (W, H) around the reference point; the sampling op
    (``ms_deform_attn``, whose implementation ``MMI_MSDA_BACKEND`` chooses); plus the null weight x ``ignore_token``,
    then ``output_proj``. Offsets, logits and locations in the query's dtype, as the release.
    """

    @classmethod
    def like(cls, module: MMFS) -> OfficialMMFS:
        """An ``OfficialMMFS`` with ``module``'s configuration and a copy of its parameters (same device/dtype)."""
        shapes = (module.scale_ratios * module.base_spatial_shape).round().long().tolist()
        official = cls(
            d_query=module.d_query,
            d_value=module.d_value,
            d_out=module.d_out,
            value_dim=module.value_dim,
            n_levels=module.n_levels,
            n_heads=module.n_heads,
            n_points=module.n_points,
            spatial_shapes=shapes,
            base_spatial_shape=module.base_spatial_shape,
            max_num_images=module.max_num_images,
            offset_init_magnitude=module.offset_init_magnitude,
        )
        official.load_state_dict(module.state_dict())
        return official.to(module.value_proj.weight).train(module.training)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor | None,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        attention_mask: torch.Tensor,
        values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As :meth:`MMFS.forward`: query [N, Lq, d_query], reference_points [N or 1, Lq, 1, 2], input_flatten
        [N, n_img, S, d_value] (or ``values`` [N, n_img*S, heads, head_dim]), attention_mask [N, n_img] or
        [N, Lq', n_img] (Lq' != Lq: its last row) -> [N, Lq, d_out]."""
        n, lq, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        if values is None:
            values = self.project_values(input_flatten)
        visible = attention_mask[:, None] if attention_mask.dim() == 2 else attention_mask
        visible = visible if visible.shape[1] == lq else visible[:, -1:]
        visible = (visible > 0).to(query.dtype).expand(n, lq, visible.shape[-1])  # [N, Lq, n_img]
        n_img = visible.shape[-1]

        recency = image_recency_index(visible).transpose(1, 2)  # [N, n_img, Lq]
        per_image = self.dynamic_offset_mask(query[:, None].repeat(1, n_img, 1, 1)) + self.query_relpos(recency)
        offsets = self.sampling_offsets(per_image).view(n, n_img, lq, heads, 1, points, 2)
        logits = self.attention_weights(per_image).view(n, n_img, lq, heads, levels, points + 1)

        masked = (1.0 - visible.transpose(1, 2))[..., None, None, None] * MASKED_LOGIT  # [N, n_img, Lq, 1, 1, 1]
        null_column = logits.new_full((*logits.shape[:-1], 1), -math.log(n_img * levels))
        logits = torch.cat([logits[..., :points] + masked, null_column], dim=-1)
        logits = logits.permute(0, 2, 3, 1, 4, 5).reshape(n, lq, heads, n_img * levels * (points + 1))
        probs = logits.softmax(-1).view(n, lq, heads, n_img * levels, points + 1)
        weights = probs[..., :points].contiguous()  # [N, Lq, H, n_img*L, P]
        null_weight = probs[..., points].sum(-1)  # [N, Lq, H]

        offsets = offsets * self.scale_ratios.to(offsets.dtype).view(levels, 1, 1)  # [N, n_img, Lq, H, L, P, 2]
        offsets = offsets.permute(0, 2, 3, 1, 4, 5, 6).reshape(n, lq, heads, n_img * levels, points, 2)
        size_xy = spatial_shapes.flip(-1).to(offsets.dtype)  # [n_img*L, 2] (W, H)
        ref = reference_points[:, :, 0].to(offsets.dtype)[:, :, None, None, None]  # [N or 1, Lq, 1, 1, 1, 2]
        locations = (ref + offsets / size_xy[:, None]).to(values.dtype)
        sampled = ms_deform_attn(values, spatial_shapes, level_start_index, locations, weights)  # [N, Lq, H*dh]
        null = null_weight[..., None] * self.ignore_token.view(1, 1, heads, self.head_dim).to(null_weight.dtype)
        return self.output_proj((sampled + null.reshape(n, lq, self.value_dim).to(sampled.dtype)).to(query.dtype))


@dataclass
class SourcePyramid(MMFSNetContext):
    """An :class:`MMFSNetContext` that carries the source image's raw pyramid instead of projected values."""

    pyramid: list[torch.Tensor] | None = None  # n_levels maps [B, feature_dim, h_l, w_l]

    def repeat_batch(self, times: int) -> SourcePyramid:
        repeated = super().repeat_batch(times)
        return replace(repeated, pyramid=[torch.cat([level] * times) for level in self.pyramid])


class OfficialMMFSNet(MMFSNet):
    """:class:`MMFSNet` as the release's ``MMFSNet.forward`` runs it: at every UNet call the source pyramid is
    flattened again and every block LayerNorms and projects it (``feat_norm`` + ``value_proj``), builds its query
    (LayerNorm + bicubically resized position table) and reference points, and runs its MMFS; a batch entry without
    a source image runs the same computation fully masked (no shortcut)."""

    @classmethod
    def like(cls, net: MMFSNet, config: ImageDecoderConfig) -> OfficialMMFSNet:
        official = cls(config, net.feature_dim)
        official.load_state_dict(net.state_dict())
        reference = next(net.parameters())
        return official.to(reference).train(net.training)

    def prepare(self, features: Sequence[torch.Tensor] | None, mask: torch.Tensor) -> SourcePyramid:
        if features is None:
            raise ValueError("OfficialMMFSNet needs the source pyramid (zeros where mmfs_mask is 0)")
        layout = super().prepare(features, torch.zeros_like(mask))  # checks and level layout; nothing projected
        mask = mask.to(layout.mask.device).view(-1, 1)
        return SourcePyramid(None, layout.spatial_shapes, layout.level_start_index, mask, list(features))

    def forward(
        self,
        mid_sample: torch.Tensor,
        skips: Sequence[torch.Tensor],
        context: MMFSNetContext,
        trace: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if not isinstance(context, SourcePyramid):
            raise TypeError("OfficialMMFSNet runs on the SourcePyramid of its own prepare()")
        flat = torch.cat([f.flatten(2).transpose(1, 2) for f in context.pyramid], dim=1)[:, None]  # [B, 1, S, C]
        outputs = [
            sample + block(sample, context, block.project_values(flat))
            for block, sample in zip(self.blocks, [*skips, mid_sample], strict=True)
        ]
        return outputs[-1], outputs[:-1]


def use_official_mmfs(model: nn.Module) -> None:
    """Make ``model`` (an ``MMInterleaved``) compute every MMFS the official way, in place."""
    decoder = model.image_decoder.decoder
    decoder.mmfs_module = OfficialMMFSNet.like(decoder.mmfs_module, decoder.config)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is MMFS:
                setattr(parent, name, OfficialMMFS.like(child))


def random_mmfs_inputs(module: MMFS, generator: torch.Generator, n_img: int = 3, lq: int = 6) -> dict:
    """A random MMFS call for ``module`` (its own level sizes, 2 rows, every visibility pattern incl. none)."""
    sizes = (module.scale_ratios * module.base_spatial_shape).round().long()
    shapes = torch.stack([sizes, sizes], 1).repeat(n_img, 1)  # [n_img*L, 2]
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    per_image = int(sizes.square().sum())
    visible = torch.randint(0, 2, (2, lq, n_img), generator=generator)
    visible[0, 0] = 0  # a query that sees no image
    return dict(
        query=torch.randn(2, lq, module.d_query, generator=generator),
        reference_points=torch.rand(2, lq, 1, 2, generator=generator),
        input_flatten=torch.randn(2, n_img, per_image, module.d_value, generator=generator),
        spatial_shapes=shapes,
        level_start_index=starts,
        attention_mask=visible,
    )


# ----------------------------------------------------------------------------------------------------------------
# The official loop


class OfficialLoop(InterleavedEngine):
    """The baseline: what the official loop computes (see the module docstring), on the same engine code."""

    def __init__(self, model_dir: Path) -> None:
        loaded = InterleavedEngine.from_pretrained(model_dir, device="cpu", caching=CachePolicy.official())
        use_official_mmfs(loaded.model)
        super().__init__(loaded.model, loaded.tokenizer, placement=loaded.placement, caching=loaded.caching)
        self.model_dir = model_dir
        self._drawing = False  # inside generate_images
        self._placeholder: EncodedImage | None = None  # the gray placeholder's encoding while an image is drawn

    def generate_images(self, doc, options=None, progress=None, *, noise=None):
        decoder = self.model.image_decoder.decoder
        vae = AutoencoderKL.from_config(decoder.config.vae)  # the DiffusionPipeline rebuilt from disk
        weights = load_state_dict_from_folder(self.model_dir, ["vae"])
        vae.load_state_dict({k.removeprefix(VAE_PREFIX): v for k, v in weights.items()})
        decoder.vae = vae.requires_grad_(False).eval()
        self._drawing = True
        try:
            return super().generate_images(doc, options, progress, noise=noise)
        finally:
            self._drawing, self._placeholder = False, None

    def _encode_parts(self, parts, progress):
        """While drawing, the document's images are encoded in one batch with the gray placeholder (official)."""
        if not self._drawing or self._placeholder is not None:
            return super()._encode_parts(parts, progress)
        size = self.config.visual_tokenizer.encoder.image_size
        gray = ImagePart(Image.new("RGB", (size, size), (128, 128, 128)))
        *encoded, self._placeholder = super()._encode_parts([*parts, gray], progress)
        return encoded

    def _run_llm(self, ids, start, encoded, cache):
        """An image's prompt (ending with <BOI>) runs as the official one: with the new image's <|image|> tokens and
        its placeholder, without a cache; the positions up to <BOI> are returned."""
        if self._placeholder is None or ids[-1] != self.config.special_tokens.boi_token_id:
            return super()._run_llm(ids, start, encoded, cache)
        full = list(ids) + [self.config.special_tokens.image_token_id] * self.config.num_img_token
        hidden, context_hidden = super()._run_llm(full, start, [*encoded, self._placeholder], None)
        return hidden[:, : len(ids) - start], context_hidden[:, : len(ids) - start]


# ----------------------------------------------------------------------------------------------------------------
# The story, timed


def story_start(config: MMInterleavedConfig) -> Interleaved:
    pixels = torch.linspace(0, 255, 96 * 96 * 3).reshape(96, 96, 3).to(torch.uint8).numpy()
    return Interleaved(["w11 w12 w13 w14 w15 w16 w17 w18", Image.fromarray(pixels)])


def run_story(engine: InterleavedEngine, args: argparse.Namespace) -> dict:
    doc = story_start(engine.config)
    text_options = TextOptions(
        max_new_tokens=args.tokens, min_new_tokens=args.tokens, repetition_penalty=1.3, stop_on_image=False
    )
    image_options = ImageOptions(num_inference_steps=args.steps, guidance_scale=7.5, seed=42)
    clock = CLOCKS[args.clock]
    text_seconds = image_seconds = 0.0
    tokens, images = [], []
    start, wall_start = clock(), time.perf_counter()
    for _ in range(args.segments):
        begin = clock()
        result = engine.generate_text(doc, text_options)
        text_seconds += clock() - begin
        tokens.append(result.token_ids)
        begin = clock()
        drawn = engine.generate_images(result.document, image_options)
        image_seconds += clock() - begin
        images.append(drawn.tensors)
        doc = drawn.document
    total = clock() - start
    return {
        "seconds": total,
        "wall_seconds": time.perf_counter() - wall_start,
        "text_seconds": text_seconds,
        "image_seconds": image_seconds,
        "tokens_per_second": sum(map(len, tokens)) / text_seconds,
        "seconds_per_image": image_seconds / args.segments,
        "phase_wall_seconds": dict(engine.stats.seconds),  # encode / text (LLM) / image (diffusion sampler)
        "images_encoded": engine.stats.images_encoded,
        "llm_positions": engine.stats.llm_tokens,
        "tokens": tokens,
        "images": torch.cat(images),
    }


def check_official_mmfs(ours: nn.Module, official: nn.Module, official_op: str) -> float:
    """Every MMFS of ``official`` against the same module of ``ours`` on a random call, each with its own op;
    raises unless they agree to ``MMFS_CHECK_ATOL``. Returns the largest relative error."""
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for name, module in official.named_modules():
        if isinstance(module, OfficialMMFS):
            inputs = random_mmfs_inputs(module, generator)
            with torch.no_grad():
                expected = ours.get_submodule(name)(**inputs)
                with msda_backend(official_op):
                    actual = module(**inputs)
            error = float((actual - expected).abs().max()) / max(1.0, float(expected.abs().max()))
            if error > MMFS_CHECK_ATOL:
                raise SystemExit(f"official-way MMFS {name} differs from ours by {error:.2e} (> {MMFS_CHECK_ATOL})")
            worst = max(worst, error)
    return worst


def diffusion_bound(baseline_seconds: float, ours: dict) -> dict:
    """The end-to-end ratio the story allows if all of our work outside the diffusion sampler cost nothing.

    Both paths run the same sampler (30 CFG UNet+MMFSNet steps per image here), so the ratio cannot pass
    ``baseline / our sampler time``. The sampler's share comes from the engine's wall-clock phase timer (the
    ``image`` phase), applied to the run's clock."""
    share = ours["phase_wall_seconds"].get("image", 0.0) / ours["wall_seconds"]
    return {"diffusion_share": share, "ratio_bound": baseline_seconds / max(share * ours["seconds"], 1e-9)}


def bench_cpu(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    ours_op = backend_for(cpu)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model_dir(args.golden, Path(tmp))
        engines = {
            "ours": (lambda: InterleavedEngine.from_pretrained(model_dir, device="cpu"), None),
            "baseline": (lambda: OfficialLoop(model_dir), args.baseline_op),
        }
        mmfs_error = check_official_mmfs(engines["ours"][0]().model, OfficialLoop(model_dir).model, args.baseline_op)
        best: dict[str, dict] = {}
        ratios_per_repeat = []
        for _ in range(args.repeats):  # alternate, keep each engine's best run
            runs = {}
            for name, (make, op) in engines.items():
                with msda_backend(op):
                    runs[name] = run_story(make(), args)
                if name not in best or runs[name]["seconds"] < best[name]["seconds"]:
                    best[name] = runs[name]
            ratios_per_repeat.append(runs["baseline"]["seconds"] / runs["ours"]["seconds"])
    ours, base = best["ours"], best["baseline"]
    if ours["tokens"] != base["tokens"]:
        raise SystemExit("ours and the baseline generated different tokens")
    image_diff = [float((a - b).abs().max()) for a, b in zip(ours["images"], base["images"])]
    print(f"story: prompt + 1 image, then {args.segments} x ({args.tokens} tokens + 1 image, {args.steps} DDPM steps)")
    print(f"times: {args.clock} seconds, {args.threads} torch thread(s), best of {args.repeats}")
    print(f"deformable-sampling op: ours {ours_op}, baseline {args.baseline_op}; official-way MMFS = ours to "
          f"{mmfs_error:.1e} (checked on every MMFS before timing)")  # fmt: skip
    print(f"{'engine':<10}{'end-to-end s':>14}{'text s':>9}{'tokens/s':>10}{'image s':>9}{'s/image':>9}"
          f"{'encodes':>9}{'LLM pos.':>10}")  # fmt: skip
    for name, run in (("ours", ours), ("baseline", base)):
        print(f"{name:<10}{run['seconds']:>14.2f}{run['text_seconds']:>9.2f}{run['tokens_per_second']:>10.1f}"
              f"{run['image_seconds']:>9.2f}{run['seconds_per_image']:>9.3f}{run['images_encoded']:>9}"
              f"{run['llm_positions']:>10}")  # fmt: skip
    for name, run in (("ours", ours), ("baseline", base)):
        phases = ", ".join(f"{phase} {seconds:.2f}" for phase, seconds in run["phase_wall_seconds"].items())
        print(f"{name} wall seconds per phase: {phases}")
    ratios = {
        "end_to_end": base["seconds"] / ours["seconds"],
        "text": base["text_seconds"] / ours["text_seconds"],
        "image": base["image_seconds"] / ours["image_seconds"],
    }
    print(
        f"speed-up (best runs): end to end {ratios['end_to_end']:.2f}x, text {ratios['text']:.2f}x, images "
        f"{ratios['image']:.2f}x; same tokens"
    )
    print("end-to-end ratio of each repeat: " + ", ".join(f"{r:.2f}x" for r in ratios_per_repeat))
    cap = diffusion_bound(base["seconds"], ours)
    print(
        f"bound: the diffusion sampler (the same UNet steps in both paths) is {cap['diffusion_share']:.0%} of our "
        f"time; with everything else at zero, the end-to-end ratio would be {cap['ratio_bound']:.2f}x"
    )
    # each drawn image goes back into the context as 8-bit pixels, so float-level differences of the two paths
    # (~1e-6) can flip a rounding and grow from image to image; the first image shows the numerical agreement
    print("max |ours - baseline| per image: " + ", ".join(f"{d:.1e}" for d in image_diff))
    drop = ("tokens", "images")
    return {
        "ours": {k: v for k, v in ours.items() if k not in drop},
        "baseline": {k: v for k, v in base.items() if k not in drop},
        "ratios": ratios,
        "diffusion_bound": cap,
        "end_to_end_ratio_per_repeat": ratios_per_repeat,
        "msda_backend": {"ours": ours_op, "baseline": args.baseline_op},
        "official_mmfs_max_rel_error": mmfs_error,
        "image_max_abs_diff_per_image": image_diff,
    }


# ----------------------------------------------------------------------------------------------------------------
def estimate_13b(budget_gib: float) -> dict:
    estimate = estimate_peaks(MMInterleavedConfig.official_13b(), "bfloat16", int(budget_gib * GIB))
    print(f"13B in bfloat16 (meta-device build; VAE and fixed tables float32), budget {budget_gib} GiB")
    for name, size in estimate["component_bytes"].items():
        print(f"  {name:<18}{size / GIB:>8.2f} GiB")
    for name, size in estimate["runtime_bytes"].items():
        print(f"  runtime {name:<26}{size / GIB:>8.3f} GiB")
    for mode, size in estimate["peak_bytes"].items():
        print(f"  peak with offload={mode:<12}{size / GIB:>8.2f} GiB")
    print(
        f"  sequential: {estimate['sequential_resident_layers']} of {estimate['llm_layers']} LLM layers resident, "
        f"{estimate['streamed_bytes_per_token'] / GIB:.2f} GiB streamed per LLM forward"
    )
    return estimate


def fill_from_pool(value: torch.Tensor, pool: torch.Tensor, generator: torch.Generator) -> None:
    """Fill ``value`` with consecutive draws of ``pool`` (wrapping around), starting at a random offset."""
    flat, n, size = value.view(-1), value.numel(), pool.numel()
    start = int(torch.randint(size, (1,), generator=generator))
    done = 0
    while done < n:
        take = min(n - done, size - start)
        flat[done : done + take].copy_(pool[start : start + take])
        done, start = done + take, 0


def random_13b_engine(args: argparse.Namespace) -> InterleavedEngine:
    """The 13B model with random weights in host memory (bf16; VAE float32), wrapped with the requested placement."""
    from comfy_mm_interleaved.checkpoint import build_empty_model

    config = MMInterleavedConfig.official_13b()
    if args.size == "tiny":  # a CPU smoke test of this path
        config = MMInterleavedConfig.from_official_tiny(args.golden / "tiny_config.json")
    model = build_empty_model(config)  # parameters on the meta device, buffers real
    # One pool of N(0, 0.02) draws, copied into every parameter at a random offset: drawing 13 G values one by one
    # on the CPU takes minutes, copying takes seconds (memory, not values, is what this path measures).
    generator = torch.Generator().manual_seed(0)
    pool = torch.empty(1 << 24).normal_(0.0, 0.02, generator=generator)
    for name, param in list(model.named_parameters()):
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        dtype = torch.float32 if name.startswith("image_decoder.decoder.vae.") else torch.bfloat16
        value = torch.empty(param.shape, dtype=dtype)
        if "norm" in name or name.endswith("ln.weight"):
            value.fill_(1.0)
        else:
            fill_from_pool(value, pool, generator)
        setattr(module, attr, torch.nn.Parameter(value, requires_grad=False))
    placement = resolve_placement("bfloat16", args.device, args.offload)
    budget = int(args.budget_gib * GIB) if args.budget_gib else None
    if placement.offload == "none":
        model.to(args.device)
    return InterleavedEngine(model.eval(), word_tokenizer(config), placement=placement, offload_budget_bytes=budget)


def gpu_13b(args: argparse.Namespace) -> dict:
    begin = time.perf_counter()
    engine = random_13b_engine(args)
    built = time.perf_counter() - begin
    doc = story_start(engine.config)
    timings = {}
    begin = time.perf_counter()
    doc = engine.generate_text(doc, TextOptions(max_new_tokens=16, min_new_tokens=16, stop_on_image=False)).document
    timings["text_16_tokens_s"] = time.perf_counter() - begin
    begin = time.perf_counter()
    doc = engine.generate_images(doc, ImageOptions(num_inference_steps=args.steps)).document
    timings["image_s"] = time.perf_counter() - begin
    begin = time.perf_counter()
    engine.generate_text(doc, TextOptions(max_new_tokens=8, min_new_tokens=8, stop_on_image=False))
    timings["text_8_tokens_after_image_s"] = time.perf_counter() - begin
    report = engine.memory_report()
    placement = engine.placement
    print(f"{args.size} random bf16, offload={placement.offload}, resident layers {placement.resident_layers}")
    print(f"build {built:.0f} s; " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    for phase, devices in report["cuda_peak_per_phase"].items():
        for device, peaks in devices.items():
            print(f"  {phase:<8}{device:<8} allocated {peaks['allocated'] / GIB:6.2f} GiB"
                  f"  reserved {peaks['reserved'] / GIB:6.2f} GiB")  # fmt: skip
    return {"timings": timings, "memory": report, "build_seconds": built}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--golden", type=Path, default=Path(os.environ.get("MMI_GOLDEN_DIR", REPO.parent / "shared/golden"))
    )
    parser.add_argument("--segments", type=int, default=4, help="images of the story")
    parser.add_argument("--tokens", type=int, default=90, help="text tokens before each image (demo: up to 90)")
    parser.add_argument("--steps", type=int, default=30, help="DDPM steps per image (official demo: 30)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--baseline-op",
        default="reference",
        choices=["reference", "gather"],
        help="the baseline's deformable-sampling op (reference: the official code's only CPU path)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="cpu: process CPU time (shared box)")
    parser.add_argument("--estimate-13b", action="store_true")
    parser.add_argument("--gpu-13b", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="13b", choices=["13b", "tiny"], help="--gpu-13b model (tiny: smoke test)")
    parser.add_argument("--offload", default="sequential", choices=["none", "model", "sequential"])
    parser.add_argument("--budget-gib", type=float, default=22.0, help="device memory the weights may use")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if args.estimate_13b:
        result = estimate_13b(args.budget_gib)
    elif args.gpu_13b:
        result = gpu_13b(args)
    else:
        result = bench_cpu(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
