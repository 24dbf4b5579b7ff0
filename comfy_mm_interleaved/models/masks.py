"""Where the images are in a packed batch, and the masks and indices derived from it (all vectorised).

A row holds one or more documents ``<s> ... </s>``; an image is ``<BOI>`` followed by ``num_img_token``
``<|image|>`` tokens. Images are numbered in row-major order of their BOI ("global index", the order of
``image_tensors``); an image's "slot" is its index inside its row. See FIXTURES.md sections 2 and 5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SpecialTokens

IGNORE_INDEX = -100


def last_position(hits: torch.Tensor) -> torch.Tensor:
    """``hits`` [B, L] bool -> [B, L] long: position of the last hit at or before each position, -1 if none."""
    positions = torch.arange(hits.shape[1], device=hits.device).expand_as(hits)
    return torch.where(hits, positions, -1).cummax(dim=1).values


@dataclass
class ImageLayout:
    """Positions of the images of a batch. ``n`` = number of images, ``B`` = rows."""

    row: torch.Tensor  # [n] row of each image
    boi: torch.Tensor  # [n] position of its BOI token
    slot: torch.Tensor  # [n] index of the image inside its row
    num_slots: int  # max images in a row, at least 1 (an invisible all-zero slot stands for "no image")
    token_doc_start: torch.Tensor  # [B, L] position of the last <s> at or before each token, -1 if none

    @property
    def num_images(self) -> int:
        return self.row.shape[0]

    def image_doc_start(self) -> torch.Tensor:
        """[n] position of the last <s> before each BOI in its row, 0 if none (official ``nearest_bos_idxs``)."""
        return self.token_doc_start[self.row, self.boi].clamp(min=0)


def image_layout(
    text_ids: torch.Tensor, num_image_per_seq: torch.Tensor, tokens: SpecialTokens, num_img_token: int
) -> ImageLayout:
    """Locate the images of ``text_ids`` [B, L] and check them against ``num_image_per_seq`` [B]."""
    batch, length = text_ids.shape
    if num_image_per_seq.shape != (batch,):
        raise ValueError(
            f"num_image_per_seq has shape {tuple(num_image_per_seq.shape)}; expected ({batch},), one count per row"
        )
    is_boi = text_ids == tokens.boi_token_id
    boi_per_row = is_boi.sum(1)
    if not torch.equal(boi_per_row, num_image_per_seq.to(boi_per_row)):
        raise ValueError(
            f"each image needs one <BOI> token (id {tokens.boi_token_id}): the rows hold {boi_per_row.tolist()} "
            f"BOI tokens but num_image_per_seq says {num_image_per_seq.tolist()}"
        )
    row, boi = is_boi.nonzero(as_tuple=True)
    _check_image_tokens(text_ids, row, boi, tokens.image_token_id, num_img_token)
    first_of_row = torch.cumsum(boi_per_row, 0) - boi_per_row
    slot = torch.arange(row.shape[0], device=text_ids.device) - first_of_row[row]
    return ImageLayout(
        row=row,
        boi=boi,
        slot=slot,
        num_slots=max(1, int(boi_per_row.max())) if batch else 1,
        token_doc_start=last_position(text_ids == tokens.bos_token_id),
    )


def _check_image_tokens(
    text_ids: torch.Tensor, row: torch.Tensor, boi: torch.Tensor, image_token_id: int, num_img_token: int
) -> None:
    """Every BOI must be followed by exactly ``num_img_token`` image tokens, and there must be no others."""
    total = int((text_ids == image_token_id).sum())
    expected = row.shape[0] * num_img_token
    offsets = torch.arange(1, num_img_token + 1, device=text_ids.device)
    positions = boi[:, None] + offsets  # [n, K]
    inside = positions < text_ids.shape[1]
    follows = text_ids[row[:, None], positions.clamp(max=text_ids.shape[1] - 1)] == image_token_id
    if total != expected or not bool((inside & follows).all()):
        raise ValueError(
            f"each <BOI> must be followed by {num_img_token} <|image|> tokens (id {image_token_id}) and no other "
            f"<|image|> token may appear: found {total} image tokens for {row.shape[0]} BOI tokens"
        )


def llm_visibility(layout: ImageLayout, batch: int, length: int) -> torch.Tensor:
    """[B, L, num_slots] bool: token t sees image slot n iff BOI_n + 1 <= t and BOI_n + 1 > last <s> at or before t"""
    device = layout.token_doc_start.device
    first_image_token = torch.full((batch, layout.num_slots), -1, dtype=torch.long, device=device)
    first_image_token[layout.row, layout.slot] = layout.boi + 1
    first = first_image_token[:, None, :]  # [B, 1, N]
    position = torch.arange(length, device=device)[None, :, None]
    return (first != -1) & (first <= position) & (first > layout.token_doc_start[:, :, None])


def text_targets(
    text_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokens: SpecialTokens,
    ignore_text_without_image: bool = False,
    prompt_length: int | torch.Tensor = 0,
    text_loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token targets [B, L-1] with ``IGNORE_INDEX`` where the official model computes no loss.

    ``targets[:, j]`` is token ``j + 1``, predicted at position ``j``. Ignored: pad, ``<|image|>``, masked
    positions, ``<s>``, a BOI right after ``<s>``, the first ``prompt_length`` tokens of each row (int or [B]),
    with ``ignore_text_without_image`` every token with no BOI at or before it in its document, and every token
    ``t`` with ``text_loss_mask[:, t] == 0`` (``text_loss_mask`` [B, L] indexes the *target* token, the way the
    data marks SFT prompt tokens; column 0 is never a target and is not read).
    """
    targets = text_ids.clone()
    positions = torch.arange(text_ids.shape[1], device=text_ids.device)
    prompt_length = torch.as_tensor(prompt_length, device=text_ids.device).reshape(-1, 1)
    targets = targets.masked_fill(positions[None, :] < prompt_length, IGNORE_INDEX)
    if ignore_text_without_image:
        doc_start = last_position(text_ids == tokens.bos_token_id).clamp(min=0)
        last_boi = last_position(text_ids == tokens.boi_token_id)
        targets = targets.masked_fill((last_boi < doc_start) | (last_boi == -1), IGNORE_INDEX)
    nxt, prev = text_ids[:, 1:], text_ids[:, :-1]
    ignore = (
        (nxt == tokens.pad_token_id)
        | (nxt == tokens.image_token_id)
        | (attention_mask[:, 1:] == 0)
        | (nxt == tokens.bos_token_id)
        | ((prev == tokens.bos_token_id) & (nxt == tokens.boi_token_id))
    )
    if text_loss_mask is not None:
        if text_loss_mask.shape != text_ids.shape:
            raise ValueError(
                f"text_loss_mask {tuple(text_loss_mask.shape)} must match text_ids {tuple(text_ids.shape)} "
                "(1 where token t may be a text-loss target)"
            )
        ignore = ignore | (text_loss_mask[:, 1:].to(text_ids.device) == 0)
    return targets[:, 1:].masked_fill(ignore, IGNORE_INDEX)


def context_positions(layout: ImageLayout, doc_start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's context rows: positions BOI, BOI-1, ..., doc_start (reversed), padded to the longest.

    Returns positions [n, L_max] (clamped to 0 on padding) and the validity mask [n, L_max] (bool).
    """
    lengths = layout.boi - doc_start + 1
    longest = int(lengths.max()) if lengths.numel() else 0
    steps = torch.arange(longest, device=lengths.device)
    valid = steps[None, :] < lengths[:, None]
    return (layout.boi[:, None] - steps[None, :]).clamp(min=0), valid


def unet_mmfs_source(layout: ImageLayout, doc_start: torch.Tensor) -> torch.Tensor:
    """[n] global index of the image whose features the UNet-side MMFS of each image reads, -1 if none:
    the previous image, if it is in the same row at or after the image's document start."""
    previous = torch.arange(layout.num_images, device=layout.row.device) - 1
    clamped = previous.clamp(min=0)
    has_source = (previous >= 0) & (layout.row[clamped] == layout.row) & (layout.boi[clamped] >= doc_start)
    return torch.where(has_source, previous, -1)
