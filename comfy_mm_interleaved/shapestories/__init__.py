"""ShapeStories: the synthetic interleaved image-text corpus of the embedded model, and its scorer.

- :mod:`.rules`: vocabulary, palette, geometry and the :class:`Attributes` of one image;
- :mod:`.render`: drawing one image (4x supersampled, box-filtered);
- :mod:`.generate`: seeded documents (caption, generation, story, question), the training stream, the fixed
  validation/test sets and :func:`write_split`;
- :mod:`.score`: reading images back, caption parsing, the metrics and the report;
- :mod:`.contact_sheet`: a PNG overview of documents.
"""

from .generate import (
    KINDS,
    WORDS,
    Change,
    Document,
    caption,
    caption_sentence,
    fixed_split,
    make_document,
    make_split,
    training_stream,
    write_split,
)
from .render import render, render_array
from .rules import Attributes
from .score import (
    ShapeStoriesReport,
    StoryOutput,
    caption_accuracy,
    generation_accuracy,
    parse_caption,
    read_image,
    story_consistency,
)

__all__ = [
    "KINDS",
    "WORDS",
    "Attributes",
    "Change",
    "Document",
    "ShapeStoriesReport",
    "StoryOutput",
    "caption",
    "caption_accuracy",
    "caption_sentence",
    "fixed_split",
    "generation_accuracy",
    "make_document",
    "make_split",
    "parse_caption",
    "read_image",
    "render",
    "render_array",
    "story_consistency",
    "training_stream",
    "write_split",
]
