"""SFT end to end: answer-only label masks, and a fine-tuned model that answers held-out questions better."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from comfy_mm_interleaved.tokenizer import build_word_tokenizer
from comfy_mm_interleaved.train.config import TrainConfig
from comfy_mm_interleaved.train.loop import prompt_offsets, train
from comfy_mm_interleaved.train.sources import SourceConfig
from comfy_mm_interleaved.train.stream import StreamConfig, TrainStream

from .test_train_standin import COLOURS, WORDS, build, standin_config, vqa_corpus

CONFIG = standin_config()
PROMPT = "{image}what colour is this shape ?"


def vqa_source(path: Path) -> SourceConfig:
    return SourceConfig("vqa", str(path), image_root=str(path.parent), pack=False, options={"prompt": PROMPT})


def heldout_batch(tok, path: Path, rows: int) -> dict:
    cfg = StreamConfig(
        sources=[vqa_source(path)], seq_len=16, batch_size=rows, num_img_token=CONFIG.num_img_token,
        encoder_image_size=CONFIG.encoder_image_size, decoder_image_size=CONFIG.image_decoder.image_size,
        shuffle_shards=False,
    )  # fmt: skip
    return next(iter(TrainStream(cfg, tok, CONFIG.special_tokens)))


def answer_accuracy(model, batch: dict, answer_ids: set[int]) -> float:
    model.eval()
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if not k.startswith("_")})
    gt, logits = out["gt_text_ids"], out["text_logits"][:, :-1]
    is_answer = torch.isin(gt, torch.tensor(sorted(answer_ids)))
    return float((logits.argmax(-1)[is_answer] == gt[is_answer]).float().mean())


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(WORDS, CONFIG.special_tokens, CONFIG.orig_vocab_size)


def test_sft_labels_cover_answers_only(tok, tmp_path: Path) -> None:
    batch = heldout_batch(tok, vqa_corpus(tmp_path, range(2), "q"), rows=2)
    ids, mask = batch["text_ids"][0], batch["text_loss_mask"][0]
    real = int(batch["attention_mask"][0].sum())
    colour = tok.convert_tokens_to_ids("red")
    answer_pos = real - 2  # ... ? <answer> </s>
    assert int(ids[answer_pos]) == colour and int(ids[real - 1]) == CONFIG.special_tokens.eos_token_id
    assert mask[:real].tolist() == [0] * answer_pos + [1, 1]  # <s>, the image, the question: no loss
    targets = build()(**{k: v for k, v in batch.items() if not k.startswith("_")})["gt_text_ids"]
    assert targets[0][targets[0] != -100].tolist() == [colour, CONFIG.special_tokens.eos_token_id]
    # a forward that only takes ignore_prompt_token_offset gets the first answer position of each row
    assert prompt_offsets(batch["text_loss_mask"], batch["attention_mask"]).tolist() == [answer_pos] * 2
    packed = batch["text_loss_mask"].clone()
    packed[0, real - 1] = 0  # prompt after an answer: packed/multi-turn rows cannot become an offset
    with pytest.raises(ValueError, match="text_loss_mask"):
        prompt_offsets(packed, batch["attention_mask"])


def test_sft_improves_answers_on_heldout_questions(tok, tmp_path: Path) -> None:
    train_set = vqa_corpus(tmp_path / "train", range(32), "t")
    heldout = heldout_batch(tok, vqa_corpus(tmp_path / "heldout", range(100, 112), "h"), rows=12)
    answers = {tok.convert_tokens_to_ids(c) for c in COLOURS}
    model = build()
    before = answer_accuracy(model, heldout, answers)
    cfg = TrainConfig.load(
        None,
        [
            f"train.output_dir={tmp_path / 'out'}",
            "train.max_steps=60",
            "train.save_every=1000",
            "train.eval_every=0",
            "train.log_every=20",
            "train.progress_bar=false",
            "train.cpu=true",
            "optim.lr=0.01",
            "optim.warmup_steps=5",
            "optim.rules=[]",
            "data.seq_len=16",
            "data.batch_size=8",
            "model.tokenizer_words=null",
        ],
    )
    cfg.data.sources = [vqa_source(train_set)]
    result = train(cfg, model=model, tokenizer=tok)
    assert result.step == 60
    after = answer_accuracy(model, heldout, answers)
    print(f"held-out answer accuracy before {before:.2f}, after {after:.2f}")
    assert before <= 0.5 and after >= 0.9, (before, after)
