"""A training-only attribute probe on the image decoder's prompt (a ShapeStories training aid; not official).

Why: a ShapeStories prompt ends with the column word (``... at top left.``). Next-token training never needs that
word at its own position (the next token is always ``.``), so the LLM stores other things there, the decoder's
prompt embeddings carry almost no column, and the UNet draws the column at chance (docs/BENCHMARKS.md, "where the
column is lost"). The diffusion loss alone did not pull the column through in 100 k documents.

What: :class:`AttributeProbedMMInterleaved` is :class:`MMInterleaved` plus one linear head that reads the mean of
each image's 77 prompt embeddings ([n, 77, D] -> [n, D] -> 17 logits) and classifies the *target image's* colour,
shape, size, row and column. The labels are read from the target image's pixels by the ShapeStories scorer, so
the data pipeline needs no extra fields. During training the model's loss becomes::

    loss = w_txt * loss_txt + w_img * loss_img + probe_weight * mean_over_attributes(CE(probe logits, labels))

which forces every attribute of the drawn image into the prompt the UNet reads. The head exists only in training;
``export-checkpoint --drop attribute_probe.`` leaves a plain model folder. Images the scorer cannot read (none in
ShapeStories renders at 64 px) and images outside the image loss are ignored by the probe.

Use it through the training config::

    model:
      factory: comfy_mm_interleaved.shapestories.probe:build_probed_model
      init_from: comfy_mm_interleaved/embedded
      factory_options: {probe_weight: 0.1}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..models.mm_interleaved import ImageConditioning, MMInterleaved, MMInterleavedOutput
from .rules import COLOURS, COLUMNS, ROWS, SHAPES, SIZES
from .score import read_image

PROBED_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": COLOURS,
    "shape": SHAPES,
    "size": SIZES,
    "row": ROWS,
    "column": COLUMNS,
}
PROBE_PREFIX = "attribute_probe."
IGNORE = -100


def attribute_labels(images: torch.Tensor) -> torch.Tensor:
    """Class indices [n, 5] (colour, shape, size, row, column) of images [n, 3, S, S] in [0, 1], read by the
    ShapeStories scorer; a row of ``-100`` for an image it cannot read (no shape, or several blobs)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [n, 3, S, S] in [0, 1], got shape {tuple(images.shape)}")
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    labels = np.full((len(pixels), len(PROBED_ATTRIBUTES)), IGNORE, dtype=np.int64)
    for i, image in enumerate(pixels):
        reading = read_image(image)
        if reading is None:
            continue
        labels[i] = [names.index(getattr(reading, attr)) for attr, names in PROBED_ATTRIBUTES.items()]
    return torch.from_numpy(labels).to(images.device)


@dataclass
class ProbedOutput(MMInterleavedOutput):
    loss_probe: torch.Tensor | None = None
    scalars: dict[str, torch.Tensor] = field(default_factory=dict)  # probe accuracy per attribute, for the logs


class AttributeProbedMMInterleaved(MMInterleaved):
    """:class:`MMInterleaved` whose training loss also asks a linear head to read the target image's attributes
    from the decoder's mean prompt embedding (module docstring)."""

    def __init__(self, config, probe_weight: float = 0.1) -> None:  # noqa: ANN001
        super().__init__(config)
        if probe_weight < 0:
            raise ValueError(f"probe_weight must be >= 0, got {probe_weight}")
        if self.image_decoder is None:
            raise ValueError("the attribute probe reads the image decoder's prompt: build the model with one")
        self.probe_weight = float(probe_weight)
        width = self.image_decoder.neg_prompt_embeds.shape[-1]
        self.attribute_probe = nn.Linear(width, sum(len(v) for v in PROBED_ATTRIBUTES.values()))
        self._probe_terms: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None

    def image_loss(
        self,
        image_tensors_dec: torch.Tensor,
        conditioning: ImageConditioning,
        draws=None,  # noqa: ANN001
        image_loss_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss_img, outputs = super().image_loss(image_tensors_dec, conditioning, draws, image_loss_mask)
        used = self.images_in_loss(conditioning, image_loss_mask)
        self._probe_terms = self.probe_loss(outputs["prompt_embeds"], image_tensors_dec, used)
        return loss_img, outputs

    def probe_loss(
        self, prompt_embeds: torch.Tensor, images_dec: torch.Tensor, used: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean cross-entropy over the five attributes of the images in ``used`` [n] and each one's accuracy."""
        labels = attribute_labels(images_dec)  # [n, 5]
        labels = torch.where(used[:, None].to(labels.device), labels, IGNORE)
        logits = self.attribute_probe(prompt_embeds.float().mean(1))  # [n, 17]
        parts = logits.split([len(values) for values in PROBED_ATTRIBUTES.values()], dim=-1)
        losses, scalars = [], {}
        for name, part, target in zip(PROBED_ATTRIBUTES, parts, labels.unbind(-1)):
            known = target != IGNORE
            count = known.sum().clamp(min=1)  # sum / max(count, 1): zero (with a graph) when nothing is probed
            losses.append(F.cross_entropy(part, target, ignore_index=IGNORE, reduction="sum") / count)
            correct = (part.argmax(-1) == target) & known
            scalars[f"probe_acc/{name}"] = (correct.sum() / count).detach().float()
        return torch.stack(losses).mean(), scalars

    def forward(self, *args: Any, **kwargs: Any) -> MMInterleavedOutput:
        self._probe_terms = None
        out = super().forward(*args, **kwargs)
        if self._probe_terms is None:
            return out
        loss_probe, scalars = self._probe_terms
        self._probe_terms = None
        return ProbedOutput(
            loss=out.loss + self.probe_weight * loss_probe,
            loss_txt=out.loss_txt,
            loss_img=out.loss_img,
            text_logits=out.text_logits,
            intermediates=out.intermediates,
            loss_probe=loss_probe.detach(),
            scalars=scalars,
        )


def probed_from(model: MMInterleaved, probe_weight: float = 0.1, seed: int = 0) -> AttributeProbedMMInterleaved:
    """The probed model with ``model``'s weights and a fresh head (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probed = AttributeProbedMMInterleaved(model.config, probe_weight)
    missing, unexpected = probed.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not name.startswith(PROBE_PREFIX) for name in missing):
        raise ValueError(f"weights do not fit the probed model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return probed


def build_probed_model(cfg) -> AttributeProbedMMInterleaved:  # noqa: ANN001
    """``model.factory`` of the training config: ``model.init_from`` (a model folder) plus the probe;
    ``model.factory_options``: ``probe_weight`` (default 0.1), ``probe_seed`` (default 0)."""
    from ..checkpoint import from_pretrained

    options = dict(cfg.model.factory_options or {})
    unknown = set(options) - {"probe_weight", "probe_seed"}
    if unknown:
        raise ValueError(f"model.factory_options: unknown keys {sorted(unknown)}; known: probe_weight, probe_seed")
    if not cfg.model.init_from:
        raise ValueError("the attribute probe starts from a trained model: set model.init_from to a model folder")
    base = from_pretrained(cfg.model.init_from)
    return probed_from(base, float(options.get("probe_weight", 0.1)), int(options.get("probe_seed", 0)))
