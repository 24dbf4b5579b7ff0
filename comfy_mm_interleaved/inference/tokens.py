"""Token ids of an :class:`Interleaved` document in the official layout (prompt form: no closing ``</s>``).

    <s> text ... <|beginofimage|> <|image|> x num_img_token  text ...

Text the user wrote is tokenised by :func:`comfy_mm_interleaved.tokenizer.encode_document` (whitespace next to an
image stripped, each segment tokenised on its own); model-generated text keeps the ids it was generated as. Text may
not contain the special tokens ``<s>``, ``</s>``, ``<|beginofimage|>`` or ``<|image|>`` (they would change the
document structure).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MMInterleavedConfig
from ..tokenizer import ImageSegment, TextSegment, encode_document
from .document import ImagePart, Interleaved, TextPart


@dataclass
class DocumentTokens:
    ids: list[int]  # <s> + segments, no </s>
    images: list[ImagePart]  # one per <|beginofimage|>, in order


def _special_ids(config: MMInterleavedConfig) -> dict[int, str]:
    tokens = config.special_tokens
    return {
        tokens.bos_token_id: "<s>",
        tokens.eos_token_id: "</s>",
        tokens.boi_token_id: "<|beginofimage|>",
        tokens.image_token_id: "<|image|>",
    }


def _check_text_ids(ids: list[int] | tuple[int, ...], config: MMInterleavedConfig, where: str) -> None:
    special = _special_ids(config)
    found = sorted({special[i] for i in ids if i in special})
    if found:
        raise ValueError(f"{where} contains the special token(s) {found}; remove them from the text")
    bad = [i for i in ids if not 0 <= i < config.orig_vocab_size]
    if bad:
        raise ValueError(f"{where} has token ids outside the text vocabulary [0, {config.orig_vocab_size}): {bad[:5]}")


def _encode_run(tokenizer, run: list[tuple[int, TextPart | ImagePart]], config: MMInterleavedConfig) -> list[int]:
    """Ids of consecutive user segments (text and images), without the <s> ... </s> that encode_document adds."""
    for index, seg in run:
        if isinstance(seg, TextPart):
            _check_text_ids(tokenizer.encode(seg.text, add_special_tokens=False), config, f"text segment {index}")
    segments = [ImageSegment(seg) if isinstance(seg, ImagePart) else TextSegment(seg.text) for _, seg in run]
    encoded = encode_document(tokenizer, segments, config.special_tokens, config.num_img_token)
    return encoded.ids[1:-1]


def document_tokens(doc: Interleaved, tokenizer, config: MMInterleavedConfig) -> DocumentTokens:
    """The prompt ids of ``doc`` (a pending last image is left out: the caller adds its ``<|beginofimage|>``)."""
    ids = [config.special_tokens.bos_token_id]
    images: list[ImagePart] = []
    run: list[tuple[int, TextPart | ImagePart]] = []
    for index, seg in enumerate(doc.without_pending_image()):
        if isinstance(seg, TextPart) and seg.token_ids is not None:
            ids += _encode_run(tokenizer, run, config) if run else []
            run = []
            _check_text_ids(seg.token_ids, config, f"text segment {index}")
            ids += seg.token_ids
            continue
        run.append((index, seg))
        if isinstance(seg, ImagePart):
            images.append(seg)
    if run:
        ids += _encode_run(tokenizer, run, config)
    return DocumentTokens(ids, images)
