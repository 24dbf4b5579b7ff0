"""Generation nodes: text, image, and the automatic interleaved loop.

Each continues the incoming context (never changes it) and returns the extended one. Progress: one bar step per
generated token and per diffusion step, and ComfyUI's interrupt is checked at each of them (see ``progress.py``).
Settings are checked by ComfyUI against each widget's range before anything runs; the engine rejects what only
it can judge (an empty context, a document longer than the model's window) with a message that says what to change.
"""

from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io
from comfy_execution.graph_utils import ExecutionBlocker
from PIL import Image

from comfy_mm_interleaved.inference import ImageOptions, Interleaved, TextOptions
from comfy_mm_interleaved.inference.document import ImagePart, TextPart
from comfy_mm_interleaved.models.diffusion import SCHEDULERS

from .context import context_input, context_output
from .loader import LoadedModel
from .progress import ComfyProgress
from .types import CATEGORY, MMIModel, check_choice

GENERATE_CATEGORY = f"{CATEGORY}/generate"
SEED_MAX = 2**53 - 1  # the largest integer the frontend (JavaScript numbers) keeps exactly
TEXT_DEFAULTS = TextOptions()
IMAGE_DEFAULTS = ImageOptions()


def model_input() -> io.Input:
    return MMIModel.Input("model", tooltip="The model from 'Load MM-Interleaved model'.")


def seed_input(name: str, default: int, what: str) -> io.Input:
    return io.Int.Input(
        name, default=default, min=0, max=SEED_MAX, control_after_generate=True, tooltip=f"Random seed of {what}."
    )


def text_inputs(max_new_tokens: int) -> list[io.Input]:
    """Text decoding widgets (defaults: greedy decoding, as the engine's ``TextOptions``)."""
    return [
        io.Int.Input(
            "max_new_tokens", default=max_new_tokens, min=1, max=4096, tooltip="At most this many new text tokens."
        ),
        io.Int.Input(
            "min_new_tokens",
            default=TEXT_DEFAULTS.min_new_tokens,
            min=0,
            max=4096,
            tooltip="The text may not end (or ask for an image) before this many tokens.",
        ),
        io.Boolean.Input(
            "do_sample", default=TEXT_DEFAULTS.do_sample, tooltip="Sample tokens (on) or always take the likeliest."
        ),
        io.Float.Input(
            "temperature",
            default=TEXT_DEFAULTS.temperature,
            min=0.01,
            max=5.0,
            step=0.05,
            tooltip="Sampling temperature (only with do_sample).",
        ),
        io.Int.Input(
            "top_k", default=TEXT_DEFAULTS.top_k, min=0, max=1000, tooltip="Sample among the k likeliest (0 = off)."
        ),
        io.Float.Input(
            "top_p",
            default=TEXT_DEFAULTS.top_p,
            min=0.01,
            max=1.0,
            step=0.01,
            tooltip="Nucleus sampling: the smallest set of tokens with this total probability (1 = off).",
        ),
        io.Float.Input(
            "repetition_penalty",
            default=TEXT_DEFAULTS.repetition_penalty,
            min=0.5,
            max=3.0,
            step=0.05,
            tooltip="Penalise tokens already generated (1 = off; the official demo uses 1.3).",
        ),
        io.Int.Input(
            "num_beams",
            default=TEXT_DEFAULTS.num_beams,
            min=1,
            max=16,
            tooltip="Beam search width (1 = off; not combined with do_sample).",
        ),
        seed_input("seed", TEXT_DEFAULTS.seed, "text sampling"),
    ]


def image_inputs(seed_name: str) -> list[io.Input]:
    """Diffusion widgets (defaults: the official demo's, as the engine's ``ImageOptions``)."""
    return [
        io.Int.Input("steps", default=IMAGE_DEFAULTS.num_inference_steps, min=1, max=1000, tooltip="Denoising steps."),
        io.Float.Input(
            "guidance",
            default=IMAGE_DEFAULTS.guidance_scale,
            min=0.0,
            max=30.0,
            step=0.1,
            tooltip="Classifier-free guidance scale (1 or less = off).",
        ),
        io.Combo.Input(
            "scheduler",
            options=list(SCHEDULERS),
            default=IMAGE_DEFAULTS.scheduler,
            tooltip="Diffusion sampler (ddpm is the official one).",
        ),
        seed_input(seed_name, IMAGE_DEFAULTS.seed, "the image noise (image k of a call uses seed + k)"),
    ]


def image_options(steps: int, guidance: float, scheduler: str, seed: int, count: int = 1) -> ImageOptions:
    return ImageOptions(
        num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler, seed=seed, num_images=count
    )


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor | ExecutionBlocker:
    """RGB PIL images -> ComfyUI IMAGE [N, H, W, 3] in [0, 1]. No images: an ``ExecutionBlocker`` that silently skips
    the nodes fed by this output (an empty IMAGE batch would make ComfyUI's own Save/Preview Image nodes fail)."""
    if not images:
        return ExecutionBlocker(None)
    return torch.from_numpy(np.stack([np.asarray(image) for image in images])).float() / 255.0


def continuation(before: Interleaved, after: Interleaved) -> list[TextPart | ImagePart]:
    """The segments ``after`` added to ``before`` (a pending image of ``before`` counts as not there)."""
    return list(after.segments[len(before.without_pending_image()) :])


class GenerateText(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MMI_GenerateText",
            display_name="Generate text",
            category=GENERATE_CATEGORY,
            description="Continues the context with text (a caption, an answer, the next sentence of a story).",
            inputs=[
                model_input(),
                context_input("The document to continue."),
                *text_inputs(max_new_tokens=TEXT_DEFAULTS.max_new_tokens),
                io.Boolean.Input(
                    "stop_on_image",
                    default=TEXT_DEFAULTS.stop_on_image,
                    tooltip="Stop where the model starts an image (the context then ends with a pending image for "
                    "'Generate image'); off: the model never starts an image here.",
                ),
            ],
            outputs=[
                io.String.Output(display_name="text", tooltip="The generated text."),
                context_output("The document with the text appended."),
            ],
        )

    @classmethod
    def execute(cls, model: LoadedModel, context: Interleaved, **options: object) -> io.NodeOutput:
        if context.ends_with_pending_image:
            raise ValueError(
                "Generate text: the context ends where the model asked for an image (the previous text node stopped "
                "there with stop_on_image). Connect 'Generate image' (or 'Append image(s)') before this node, use "
                "'Generate interleaved (auto)', or turn stop_on_image off on the previous 'Generate text'."
            )
        result = model.engine_ready().generate_text(context, TextOptions(**options), progress=ComfyProgress())
        return io.NodeOutput(result.text, result.document)


class GenerateImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MMI_GenerateImage",
            display_name="Generate image",
            category=GENERATE_CATEGORY,
            description="Draws the next image of the context (conditioned on everything before it, and on the "
            "previous image).",
            inputs=[
                model_input(),
                context_input("The document to continue."),
                *image_inputs("seed"),
                io.Int.Input("count", default=1, min=1, max=64, tooltip="How many alternatives to draw."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="The drawn images [count, H, W, 3]."),
                context_output("The document with the first image appended."),
            ],
        )

    @classmethod
    def validate_inputs(cls, scheduler: str) -> bool | str:
        return check_choice(scheduler, SCHEDULERS)

    @classmethod
    def execute(
        cls,
        model: LoadedModel,
        context: Interleaved,
        steps: int,
        guidance: float,
        scheduler: str,
        seed: int,
        count: int,
    ) -> io.NodeOutput:
        engine = model.engine_ready()
        options = image_options(steps, guidance, scheduler, seed, count)
        result = engine.generate_images(context, options, progress=ComfyProgress())
        images = result.tensors.permute(0, 2, 3, 1).contiguous()
        return io.NodeOutput(images, result.document)


class GenerateInterleaved(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MMI_GenerateInterleaved",
            display_name="Generate interleaved (auto)",
            category=GENERATE_CATEGORY,
            description="Continues the context with up to N segments, text and images alternating as the model "
            "decides (an image wherever the text asks for one).",
            inputs=[
                model_input(),
                context_input("The document to continue."),
                io.Int.Input(
                    "max_segments",
                    default=4,
                    min=1,
                    max=64,
                    tooltip="At most this many new segments (each text or image counts one); stops earlier at the "
                    "end of the document.",
                ),
                io.Boolean.Input(
                    "image_after_text",
                    default=False,
                    tooltip="Ask for an image after every text segment (official force_gen_image_next).",
                ),
                *text_inputs(max_new_tokens=32),
                *image_inputs("image_seed"),
            ],
            outputs=[
                io.Image.Output(
                    display_name="images",
                    tooltip="The new images, in order [N, H, W, 3]. When the model drew none, the nodes fed by this "
                    "output are skipped (the text and context outputs still run).",
                ),
                io.String.Output(display_name="text", tooltip="The new text segments, one per line."),
                context_output("The continued document."),
            ],
        )

    @classmethod
    def validate_inputs(cls, scheduler: str) -> bool | str:
        return check_choice(scheduler, SCHEDULERS)

    @classmethod
    def execute(
        cls,
        model: LoadedModel,
        context: Interleaved,
        max_segments: int,
        image_after_text: bool,
        steps: int,
        guidance: float,
        scheduler: str,
        image_seed: int,
        **text: object,
    ) -> io.NodeOutput:
        engine = model.engine_ready()
        document = engine.generate(
            context,
            mode="auto",
            text_options=TextOptions(**text),
            image_options=image_options(steps, guidance, scheduler, image_seed),
            max_segments=max_segments,
            progress=ComfyProgress(),
            force_image_after_text=image_after_text,
        )
        new = continuation(context, document)
        images = [s.image for s in new if isinstance(s, ImagePart) and not s.pending]
        lines = [s.text.strip() for s in new if isinstance(s, TextPart) and s.text.strip()]
        return io.NodeOutput(images_to_tensor(images), "\n".join(lines), document)
