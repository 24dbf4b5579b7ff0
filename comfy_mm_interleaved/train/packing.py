"""Packing documents into fixed-length rows, and collating rows into the model's batch.

Rules (official ``concat_sample`` / ``extract_seq``):

* documents ``<s> ... </s>`` are concatenated into rows of ``seq_len`` tokens; LLM positions keep counting and
  there is no document masking in the LLM (the model restricts MMFS and image context to the document through
  ``nearest_bos_idxs``);
* ``truncation="sample"`` (LAION-style pairs): a document is never split; a row ends before the first document
  that does not fit; documents longer than a row are skipped;
* ``truncation="image"`` (MMC4): rows are filled to ``seq_len`` and a document continues in the next row (without
  a new ``<s>``), but never inside an image: the row ends before a BOI whose ``<|image|>`` run would not fit;
* at most ``max_images`` images per row; rows without any image are dropped when ``require_image`` (official);
* ``pack=False``: one document per row, padded (SFT).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import torch

from ..config import SpecialTokens
from ..tokenizer import EncodedDocument, ImageSegment
from .documents import BadInput


@dataclass(frozen=True)
class Fragment:
    """A contiguous piece of one document inside a row."""

    ids: tuple[int, ...]
    loss_mask: tuple[int, ...]
    images: tuple[ImageSegment, ...]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class PackedRow:
    fragments: tuple[Fragment, ...]

    @property
    def num_images(self) -> int:
        return sum(len(f.images) for f in self.fragments)


class Packer:
    """Greedy row builder. ``state`` is an immutable tuple of the current row's fragments (cheap snapshots)."""

    def __init__(
        self,
        seq_len: int,
        special: SpecialTokens,
        num_img_token: int,
        truncation: str = "sample",
        max_images: int = 30,
        require_image: bool = True,
        pack: bool = True,
    ) -> None:
        if truncation not in ("sample", "image"):
            raise ValueError(f"truncation must be 'sample' or 'image', got {truncation!r}")
        if seq_len < num_img_token + 3:
            raise ValueError(f"seq_len {seq_len} cannot hold one image ({num_img_token} tokens + BOI + <s> + </s>)")
        self.seq_len = seq_len
        self.special = special
        self.num_img_token = num_img_token
        self.truncation = truncation
        self.max_images = max_images
        self.require_image = require_image
        self.pack = pack
        self.state: tuple[Fragment, ...] = ()

    # ---------------------------------------------------------------------------------------------------------
    def push(self, doc: EncodedDocument) -> list[PackedRow]:
        """Add one document; returns the rows it completed. Raises BadInput for documents that cannot fit."""
        n_images = len(doc.images)
        if self.truncation == "sample" and (len(doc) > self.seq_len or n_images > self.max_images):
            raise BadInput(
                "over_long_document",
                f"{len(doc)} tokens / {n_images} images > row of {self.seq_len} tokens / {self.max_images} images",
            )
        rest = Fragment(tuple(doc.ids), tuple(doc.loss_mask), tuple(doc.images))
        if not self.pack:
            if len(doc) > self.seq_len:
                raise BadInput("over_long_document", f"{len(doc)} tokens > row of {self.seq_len} tokens")
            self.state = (rest,)
            return self._emit()
        rows: list[PackedRow] = []
        while rest is not None:
            used = sum(len(f) for f in self.state)
            used_images = sum(len(f.images) for f in self.state)
            cut = self._cut(rest, self.seq_len - used, self.max_images - used_images)
            if cut == len(rest):
                self.state += (rest,)
                rest = None
            elif cut == 0 and not self.state:
                raise BadInput("over_long_document", "a single image run does not fit in a row")
            else:
                if cut > 0:
                    self.state += (self._slice(rest, 0, cut),)
                    rest = self._slice(rest, cut, len(rest))
                rows += self._emit()
        return rows

    def flush(self) -> list[PackedRow]:
        """The last, partly filled row (end of an epoch)."""
        return self._emit()

    # ---------------------------------------------------------------------------------------------------------
    def _cut(self, frag: Fragment, space: int, image_space: int) -> int:
        """How many leading tokens of ``frag`` go into the current row (``len(frag)`` = all of it)."""
        boi = self.special.boi_token_id
        bois = [i for i, t in enumerate(frag.ids) if t == boi]
        if len(frag) <= space and len(bois) <= image_space:
            return len(frag)
        if self.truncation == "sample":
            return 0
        cut = min(space, len(frag))
        if len(bois) > image_space:  # stop right after the last image that still fits
            cut = min(cut, bois[image_space] if image_space >= 0 else 0)
        for pos in bois:  # never split an image run
            if pos < cut < pos + 1 + self.num_img_token:
                cut = pos
        return max(cut, 0)

    def _slice(self, frag: Fragment, start: int, stop: int) -> Fragment:
        images_before = sum(1 for t in frag.ids[:start] if t == self.special.boi_token_id)
        images_in = sum(1 for t in frag.ids[start:stop] if t == self.special.boi_token_id)
        return Fragment(
            frag.ids[start:stop], frag.loss_mask[start:stop], frag.images[images_before : images_before + images_in]
        )

    def _emit(self) -> list[PackedRow]:
        row, self.state = PackedRow(self.state), ()
        if not row.fragments or (self.require_image and row.num_images == 0):
            return []
        return [row]


def fragments_to_json(fragments: tuple[Fragment, ...]) -> list[dict[str, Any]]:
    """A packer state as JSON-able data (image bytes base64-encoded) for the checkpoint's data position."""
    out = []
    for frag in fragments:
        images = []
        for im in frag.images:
            if isinstance(im.source, bytes | bytearray):
                images.append({"bytes": base64.b64encode(im.source).decode("ascii"), "name": im.name})
            elif isinstance(im.source, str):
                images.append({"path": im.source, "name": im.name})
            else:
                raise TypeError(f"cannot checkpoint an image source of type {type(im.source).__name__}")
        out.append({"ids": list(frag.ids), "loss_mask": list(frag.loss_mask), "images": images})
    return out


def fragments_from_json(data: list[dict[str, Any]]) -> tuple[Fragment, ...]:
    def image(d: dict[str, Any]) -> ImageSegment:
        return ImageSegment(base64.b64decode(d["bytes"]) if "bytes" in d else d["path"], name=d.get("name", ""))

    return tuple(Fragment(tuple(f["ids"]), tuple(f["loss_mask"]), tuple(image(d) for d in f["images"])) for f in data)


def nearest_bos_indices(ids: list[int], bos_token_id: int, boi_token_id: int) -> list[int]:
    """Per BOI of a row: position of the last ``<s>`` strictly before it, 0 when there is none."""
    out, last_bos = [], 0
    for pos, tok in enumerate(ids):
        if tok == bos_token_id:
            last_bos = pos
        elif tok == boi_token_id:
            out.append(last_bos)
    return out


def collate_rows(
    rows: list[tuple[list[int], list[int]]],
    images: list[list[tuple[torch.Tensor, torch.Tensor | None]]],
    seq_len: int,
    special: SpecialTokens,
    dataset_name: str,
) -> dict[str, Any]:
    """Rows (ids, loss mask) and their decoded (encoder, decoder or None) images -> the model's keyword arguments.

    ``text_loss_mask`` [B, T] is present only when some real token is excluded from the text loss (SFT prompts).
    """
    batch = len(rows)
    text_ids = torch.full((batch, seq_len), special.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, seq_len, dtype=torch.long)
    loss_mask = torch.zeros(batch, seq_len, dtype=torch.long)
    nearest: list[int] = []
    for b, (ids, mask) in enumerate(rows):
        text_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, : len(ids)] = 1
        loss_mask[b, : len(ids)] = torch.tensor(mask, dtype=torch.long)
        nearest += nearest_bos_indices(ids, special.bos_token_id, special.boi_token_id)
    flat = [pair for row_images in images for pair in row_images]
    out: dict[str, Any] = {
        "text_ids": text_ids,
        "attention_mask": attention_mask,
        "image_tensors": torch.stack([e for e, _ in flat]) if flat else None,
        "image_tensors_dec": torch.stack([d for _, d in flat]) if flat and flat[0][1] is not None else None,
        "num_image_per_seq": torch.tensor([len(r) for r in images], dtype=torch.long),
        "nearest_bos_idxs": torch.tensor(nearest, dtype=torch.long),
        "meta": {"dataset_name": dataset_name},
    }
    if bool(((loss_mask == 0) & (attention_mask == 1)).any()):
        out["text_loss_mask"] = loss_mask
    return out
