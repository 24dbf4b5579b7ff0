"""The training data stream: sources -> documents -> tokens -> packed rows -> per-rank batches, resumable.

One global, deterministic sequence of *rounds* is defined by the seed alone: round r draws one source (mixture
weights) and takes ``world_size * batch_size`` rows from it; process ``rank`` gets rows
``[rank * B, (rank + 1) * B)`` of the round. Every process (and every DataLoader worker) packs the whole stream,
which is cheap (text only), but decodes only the images of its own rows, so a 2-process run sees exactly the
batches a 1-process run with gradient accumulation 2 sees. Worker w of a process builds the rounds with
``r % num_workers == w``; the DataLoader interleaves workers in order, so batches arrive in round order.

Resume: each batch carries ``_state``, the stream state after its round (round index plus, per source, the epoch,
shard position, record position, the packer's unfinished row and how many rows to drop when replaying from
there). ``TrainStream(..., state=...)`` continues from it exactly.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..config import SpecialTokens
from ..tokenizer import encode_document
from .documents import BadInput, SkipCounter
from .images import DualTransform, load_image
from .packing import PackedRow, Packer, collate_rows, fragments_from_json, fragments_to_json
from .sources import SourceConfig, get_format, list_shards

log = logging.getLogger(__name__)


@dataclass
class StreamConfig:
    """Row packing and batching, shared by all sources of a mixture."""

    sources: list[SourceConfig] = field(default_factory=list)
    seq_len: int = 2048
    batch_size: int = 1  # rows per process per micro-batch
    num_img_token: int = 64
    encoder_image_size: int = 224
    decoder_image_size: int = 512
    # False: no decoder-size images, hence no image loss and no image-decoder compute (SFT whose targets are text
    # only: its image-first documents give the image loss nothing to learn from anyway)
    decoder_images: bool = True
    require_image: bool = True  # official: rows without an image are dropped
    shuffle_shards: bool = True
    shuffle_block: int = 1  # shuffle records inside blocks of this many (1: keep file order)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "shuffle_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")


def record_rng(*parts: Any) -> random.Random:
    return random.Random("/".join(str(p) for p in parts))


class SourceStream:
    """Packed rows of one source, epoch after epoch, with a snapshot-able position."""

    def __init__(self, index: int, cfg: SourceConfig, stream: StreamConfig, tokenizer, special: SpecialTokens):
        self.index = index
        self.cfg = cfg
        self.fmt = get_format(cfg.format)
        self.stream = stream
        self.tokenizer = tokenizer
        self.special = special
        self.shards = list_shards(cfg.shards)
        self.dataset_name = cfg.dataset_name or self.fmt.dataset_name
        self.packer = Packer(
            stream.seq_len,
            special,
            stream.num_img_token,
            truncation=cfg.truncation or self.fmt.truncation,
            max_images=cfg.max_images_per_row or self.fmt.max_images_per_row,
            require_image=stream.require_image,
            pack=cfg.pack,
        )
        self.skips = SkipCounter()
        self.epoch, self.shard_pos, self.record_pos, self.drop_rows = 0, 0, 0, 0
        self._restart()

    # state: where to restart reading + the packer's unfinished row + rows to drop after restarting there
    def state(self) -> dict[str, Any]:
        """JSON-able position: restart reading at (epoch, shard_pos, record_pos) with this unfinished row."""
        return dict(self._boundary, packer=fragments_to_json(self._boundary["packer"]), drop_rows=self._emitted)

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch, self.shard_pos, self.record_pos = state["epoch"], state["shard_pos"], state["record_pos"]
        self.packer.state = fragments_from_json(state["packer"])
        self.drop_rows = state["drop_rows"]
        self._restart()

    def _restart(self) -> None:
        self._boundary = self._snapshot(self.record_pos)
        self._emitted = self.drop_rows
        self._rows = self._generate()

    def next_row(self) -> PackedRow:
        return next(self._rows)

    # ---------------------------------------------------------------------------------------------------------
    def _epoch_shards(self) -> list[str]:
        shards = list(self.shards)
        if self.stream.shuffle_shards:
            record_rng(self.stream.seed, self.index, self.epoch, "shards").shuffle(shards)
        return shards

    def _records(self, shard: str, start: int) -> Iterator[tuple[int, Any]]:
        """(position, raw record) of a shard in (block-shuffled) order, from position ``start`` on."""
        block_size = max(1, self.stream.shuffle_block)
        block: list[Any] = []
        block_start = 0
        reader = self.fmt.reader(shard)
        while True:
            raw = next(reader, None)
            if raw is not None:
                block.append(raw)
            if len(block) == block_size or (raw is None and block):
                if block_start + len(block) > start:
                    order = list(range(len(block)))
                    if block_size > 1:
                        record_rng(self.stream.seed, self.index, self.epoch, shard, block_start).shuffle(order)
                    for i in range(max(0, start - block_start), len(block)):
                        yield block_start + i, block[order[i]]
                block_start += len(block)
                block = []
            if raw is None:
                return

    def _document(self, shard: str, pos: int, raw: Any):
        rng = record_rng(self.stream.seed, self.index, self.epoch, shard, pos)
        doc = self.fmt.parse(raw, rng, self.cfg.options)
        if doc.is_empty():
            raise BadInput("empty_document", f"record {pos} of {shard} has no text and no image")
        return encode_document(self.tokenizer, doc.segments, self.special, self.stream.num_img_token)

    def _generate(self) -> Iterator[PackedRow]:
        to_drop = self.drop_rows
        while True:
            shards = self._epoch_shards()
            produced = False
            while self.shard_pos < len(shards):
                shard = shards[self.shard_pos]
                try:
                    for pos, raw in self._records(shard, self.record_pos):
                        self._boundary = self._snapshot(pos)
                        self._emitted = 0
                        self.record_pos = pos + 1
                        try:
                            rows = self.packer.push(self._document(shard, pos, raw))
                        except BadInput as err:
                            self.skips.skip(err, f"{shard} record {pos}")
                            continue
                        produced = True
                        for row in rows:
                            self._emitted += 1
                            if to_drop > 0:
                                to_drop -= 1
                                continue
                            yield row
                except OSError as err:  # unreadable shard: skip the rest of it
                    self.skips.skip(BadInput("unreadable_shard", f"{shard}: {err}"))
                self.shard_pos, self.record_pos = self.shard_pos + 1, 0
            self._boundary = self._snapshot(0)
            self._emitted = 0
            for row in self.packer.flush():
                self._emitted += 1
                if to_drop > 0:
                    to_drop -= 1
                    continue
                yield row
            if not produced:
                where = f"{self.cfg.format}: {self.cfg.shards}"
                raise ValueError(f"data source {self.index} ({where}) has no usable record; see the skip warnings")
            self.epoch, self.shard_pos, self.record_pos = self.epoch + 1, 0, 0
            log.info("data source %d (%s) starts epoch %d", self.index, self.dataset_name, self.epoch)

    def _snapshot(self, record_pos: int) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "shard_pos": self.shard_pos,
            "record_pos": record_pos,
            "packer": self.packer.state,
        }


class TrainStream(IterableDataset):
    """Per-process micro-batches of the global round sequence (see the module docstring)."""

    def __init__(
        self,
        cfg: StreamConfig,
        tokenizer,
        special: SpecialTokens,
        rank: int = 0,
        world_size: int = 1,
        state: dict[str, Any] | None = None,
    ) -> None:
        if not cfg.sources:
            raise ValueError("the data config has no source; add at least one entry under data.sources")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.special = special
        self.rank = rank
        self.world_size = world_size
        self.state = state
        self.transform = DualTransform(cfg.encoder_image_size, cfg.decoder_image_size if cfg.decoder_images else None)
        weights = [s.weight for s in cfg.sources]
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"source weights must be >= 0 with a positive sum, got {weights}")
        self.weights = weights

    def source_of_round(self, round_index: int) -> int:
        return record_rng(self.cfg.seed, "round", round_index).choices(range(len(self.weights)), self.weights)[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        streams = [SourceStream(i, s, self.cfg, self.tokenizer, self.special) for i, s in enumerate(self.cfg.sources)]
        round_index = 0
        if self.state is not None:
            round_index = self.state["round"]
            for stream, st in zip(streams, self.state["sources"]):
                stream.load_state(st)
        rows_per_round = self.world_size * self.cfg.batch_size
        while True:
            mine = round_index % num_workers == worker
            source = streams[self.source_of_round(round_index)]
            rows = [source.next_row() for _ in range(rows_per_round)]
            round_index += 1
            if not mine:
                for s in streams:
                    s.skips.take()
                continue
            packing_skips = {}
            for s in streams:
                packing_skips.update({f"{s.dataset_name}/{k}": v for k, v in s.skips.take().items()})
            start = self.rank * self.cfg.batch_size
            batch, image_skips = self.materialize(rows[start : start + self.cfg.batch_size], source)
            batch["_state"] = {"round": round_index, "sources": [s.state() for s in streams]}
            batch["_index"] = (round_index - 1) * self.world_size + self.rank  # global micro-batch position
            skips = {f"{source.dataset_name}/{k}": v for k, v in image_skips.items()}
            if self.rank == 0:  # packing happens identically on every process: count it once
                for k, v in packing_skips.items():
                    skips[k] = skips.get(k, 0) + v
            batch["_skipped"] = skips
            yield batch

    def materialize(self, rows: list[PackedRow], source: SourceStream) -> tuple[dict[str, Any], dict[str, int]]:
        """Decode and transform the images of ``rows``; a document whose image fails is dropped from its row."""
        counter = SkipCounter()
        out_rows, out_images = [], []
        for row in rows:
            ids: list[int] = []
            mask: list[int] = []
            images = []
            for frag in row.fragments:
                try:
                    decoded = [self.transform(load_image(im.source, source.cfg.image_root)) for im in frag.images]
                except BadInput as err:
                    counter.skip(err, source.dataset_name)
                    continue
                ids += frag.ids
                mask += frag.loss_mask
                images += decoded
            out_rows.append((ids, mask))
            out_images.append(images)
        batch = collate_rows(out_rows, out_images, self.cfg.seq_len, self.special, source.dataset_name)
        return batch, counter.take()


def move_batch(batch: dict[str, Any], device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a stream batch into (model kwargs on ``device``, bookkeeping ``_state``/``_skipped``)."""
    extra = {k: batch[k] for k in batch if k.startswith("_")}
    model_kwargs = {
        k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
        for k, v in batch.items()
        if not k.startswith("_")
    }
    return model_kwargs, extra
