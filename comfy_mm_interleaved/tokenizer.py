"""Text tokenizers and the official interleaved token layout.

The released model uses Vicuna's LlamaTokenizer (loaded from a local folder) with two added tokens,
``<|beginofimage|>`` (BOI) and ``<|image|>``. Tiny test and demo models use a word-level tokenizer built
in-process. Either way a document becomes::

    <s> text ... <|beginofimage|> <|image|> x num_img_token  text ... </s>

with the spaces around an image stripped (the text before an image and the text after it are tokenized as
separate chunks, exactly as a SentencePiece tokenizer splits a string at special tokens).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import SpecialTokens

BOI_TOKEN = "<|beginofimage|>"
IMAGE_TOKEN = "<|image|>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"


@dataclass(frozen=True)
class TextSegment:
    """A piece of text; ``loss=False`` marks prompt text whose tokens are never text-loss targets (SFT)."""

    text: str
    loss: bool = True


@dataclass(frozen=True)
class ImageSegment:
    """One image of a document; ``source`` is whatever the image loader understands (path, bytes, PIL image)."""

    source: Any = None
    name: str = ""


Segment = TextSegment | ImageSegment


@dataclass
class EncodedDocument:
    """Token ids of one ``<s> ... </s>`` document.

    ``loss_mask[t]`` is 1 when token t may be a text-loss target (0 for prompt tokens of instruction data);
    the model's own ignore rules (pad, ``<|image|>``, ``<s>``, image-first BOI) apply on top of it.
    """

    ids: list[int]
    loss_mask: list[int]
    images: list[ImageSegment] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def build_word_tokenizer(
    words: Iterable[str],
    special: SpecialTokens,
    orig_vocab_size: int,
    *,
    split_punctuation: bool = False,
    lowercase: bool = False,
):
    """A whitespace word-level tokenizer whose special ids match ``special`` (tiny models, tests, demos).

    ``split_punctuation``: punctuation is split off words (``left.`` -> ``left`` ``.``; list ``.`` / ``?`` among the
    words) and decoding puts it back without the space (``left.``); ``lowercase``: input is lower-cased first.

    Layout: ``<unk>`` 0, ``<s>``/``</s>``/``<pad>`` at their configured ids, the words in order from the first
    free id, unused filler tokens up to ``orig_vocab_size``, then BOI and ``<|image|>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fixed = {
        UNK_TOKEN: 0,
        BOS_TOKEN: special.bos_token_id,
        EOS_TOKEN: special.eos_token_id,
        PAD_TOKEN: special.pad_token_id,
        BOI_TOKEN: special.boi_token_id,
        IMAGE_TOKEN: special.image_token_id,
    }
    if len(set(fixed.values())) != len(fixed):
        raise ValueError(f"special token ids must be distinct, got {fixed}")
    if sorted((special.boi_token_id, special.image_token_id)) != [orig_vocab_size, orig_vocab_size + 1]:
        raise ValueError(
            f"BOI/<|image|> ids {special.boi_token_id}/{special.image_token_id} must be orig_vocab_size "
            f"{orig_vocab_size} and {orig_vocab_size + 1} (the official layout)"
        )
    vocab = dict(fixed)
    free = (i for i in range(orig_vocab_size) if i not in fixed.values())
    for word in dict.fromkeys(words):  # de-duplicated, order kept
        if word in vocab:
            continue
        try:
            vocab[word] = next(free)
        except StopIteration:
            raise ValueError(f"{len(vocab)} words do not fit in orig_vocab_size={orig_vocab_size}") from None
    for i in free:
        vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    if split_punctuation:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    else:
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if lowercase:
        from tokenizers import normalizers

        tok.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        clean_up_tokenization_spaces=split_punctuation,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[BOI_TOKEN, IMAGE_TOKEN],
    )


def load_tokenizer(path: str | Path, special: SpecialTokens):
    """Load a tokenizer from a local folder (never the hub) and add BOI/``<|image|>`` as the official code does.

    For Vicuna the pad id is 31999, an ordinary vocabulary entry; the resulting ids are checked against
    ``special`` so a tokenizer that does not belong to the model is rejected early.
    """
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} not found; point model.tokenizer at a local folder")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    missing = [t for t in (BOI_TOKEN, IMAGE_TOKEN) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.pad_token_id != special.pad_token_id:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(special.pad_token_id)
    check_tokenizer(tokenizer, special)
    return tokenizer


def check_tokenizer(tokenizer, special: SpecialTokens) -> None:
    """Raise ValueError when the tokenizer's special ids differ from the model config's."""
    got = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "boi_token_id": tokenizer.convert_tokens_to_ids(BOI_TOKEN),
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    }
    wrong = {k: (v, getattr(special, k)) for k, v in got.items() if v != getattr(special, k)}
    if wrong:
        raise ValueError(f"tokenizer does not match the model's special tokens (tokenizer, config): {wrong}")


def encode_document(
    tokenizer, segments: Sequence[Segment | str], special: SpecialTokens, num_img_token: int
) -> EncodedDocument:
    """Token ids of one document: ``<s>`` + text chunks and image sub-sequences + ``</s>``.

    Plain strings are text segments with loss. Text next to an image loses its adjoining whitespace; empty
    chunks vanish. ``<s>`` carries the loss flag of the first text segment, an image run that of the text before it
    (a prompt's image is prompt), ``</s>`` that of the last text (it ends the answer in SFT data).
    """
    items = [TextSegment(s) if isinstance(s, str) else s for s in segments]
    texts = [s for s in items if isinstance(s, TextSegment)]
    last_loss = texts[0].loss if texts else True  # an image takes the flag of the text before it (or the first)
    ids, mask, images = [special.bos_token_id], [int(last_loss)], []
    image_run = [special.boi_token_id] + [special.image_token_id] * num_img_token
    for i, seg in enumerate(items):
        if isinstance(seg, ImageSegment):
            ids += image_run
            mask += [int(last_loss)] * len(image_run)
            images.append(seg)
            continue
        if not isinstance(seg, TextSegment):
            raise TypeError(f"document segment {i} is a {type(seg).__name__}; use str, TextSegment or ImageSegment")
        text = seg.text
        if i > 0 and isinstance(items[i - 1], ImageSegment):
            text = text.lstrip()
        if i + 1 < len(items) and isinstance(items[i + 1], ImageSegment):
            text = text.rstrip()
        if not text.strip():
            continue
        chunk = tokenizer.encode(text, add_special_tokens=False)
        ids += chunk
        mask += [int(seg.loss)] * len(chunk)
        last_loss = seg.loss
    ids.append(special.eos_token_id)
    mask.append(int(last_loss))
    return EncodedDocument(ids=ids, loss_mask=mask, images=images)
