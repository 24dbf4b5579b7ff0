"""A small stand-in for MMInterleaved used by the training tests, and the data it trains on.

Same forward signature and output as the real model (loss, loss_txt, loss_img), official-style parameter names
(so the §3.3 freezing and parameter-group rules apply), the official text-target ignore rules (checked here
against the golden forward case) and random draws (noise, timesteps, CFG drop) from the global torch RNG, so
that exact-resume tests exercise RNG restoration. Subprocess runs load it with ``PYTHONPATH=tests`` and
``model.factory=test_train_standin:build``.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from comfy_mm_interleaved.config import ImageDecoderConfig, MMInterleavedConfig, SpecialTokens

from .conftest import load_case

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ["square", "circle"]
WORDS = (
    "a the is big small it what colour of this shape picture shows and then ? . : answer question describe".split()
    + list(COLOURS)
    + SHAPES
)


def standin_config() -> MMInterleavedConfig:
    return MMInterleavedConfig(
        orig_vocab_size=60,
        txt_vocab_size=62,
        num_img_token=4,
        encoder_image_size=32,
        special_tokens=SpecialTokens(
            bos_token_id=1, eos_token_id=2, pad_token_id=59, boi_token_id=60, image_token_id=61
        ),
        image_decoder=ImageDecoderConfig(image_size=16),
    )


def _module(**children: nn.Module) -> nn.Module:
    m = nn.Module()
    for name, child in children.items():
        m.add_module(name, child)
    return m


class StandInModel(nn.Module):
    def __init__(self, config: MMInterleavedConfig, hidden: int = 32) -> None:
        super().__init__()
        self.config = config
        vocab = config.txt_vocab_size
        vision = _module(
            embeddings=_module(patch_embedding=nn.Conv2d(3, hidden, 8, 8)),
            adapter_spm=_module(fc1=nn.Linear(hidden, hidden)),
        )
        self.visual_tokenizer = _module(
            encoder=_module(vision_model=vision), pos_ln=nn.LayerNorm(hidden), proj=nn.Linear(hidden, hidden)
        )
        cross = _module(
            norm1=_module(),
            attn=_module(sampling_offsets=nn.Linear(hidden, hidden), value_proj=nn.Linear(hidden, hidden)),
        )
        cross.register_parameter("gate", nn.Parameter(torch.full((1,), 0.5)))
        cross.norm1.register_parameter("weight", nn.Parameter(torch.ones(hidden)))
        attn = _module(**{n: nn.Linear(hidden, hidden, bias=False) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.mm_decoder = _module(
            embed_tokens=nn.Embedding(vocab, hidden),
            layers=nn.ModuleList([_module(self_attn=attn, llama_cross_attn=cross)]),
        )
        self.text_decoder = _module(head=nn.Linear(hidden, vocab), head_new=nn.Linear(hidden, 2))
        unet = _module(conv_in=nn.Conv2d(4, 4, 3, padding=1))
        vae = _module(encoder=nn.Conv2d(3, 4, 4, 4))
        self.image_decoder = _module(decoder=_module(unet=unet, vae=vae))
        self.image_decoder.register_parameter("neg_prompt_embeds", nn.Parameter(torch.zeros(1, 4)))
        self.context_feat_proj = nn.Linear(hidden, 4)
        self.soi_token = nn.Parameter(torch.zeros(1, hidden))
        self.calls = 0

    # ---------------------------------------------------------------------------------------------------------
    def text_targets(self, text_ids, attention_mask, dataset_name, text_loss_mask=None):  # noqa: ANN001, ANN201
        """Official ignore rules (FIXTURES §5.4) plus the SFT answer mask: targets [B, T-1], -100 = ignored."""
        st = self.config.special_tokens
        gt = text_ids[:, 1:].clone()
        prev = text_ids[:, :-1]
        ignore = (gt == st.pad_token_id) | (gt == st.image_token_id) | (attention_mask[:, 1:] == 0)
        ignore |= gt == st.bos_token_id
        ignore |= (gt == st.boi_token_id) & (prev == st.bos_token_id)
        if dataset_name in self.config.dataset_to_ignore_noimage_cond_loss:
            seen_image = torch.zeros_like(text_ids, dtype=torch.bool)
            for b in range(text_ids.shape[0]):
                seen = False
                for t in range(text_ids.shape[1]):
                    tok = int(text_ids[b, t])
                    seen = (seen and tok != st.bos_token_id) or tok == st.boi_token_id
                    seen_image[b, t] = seen
            ignore |= ~seen_image[:, 1:]
        if text_loss_mask is not None:
            ignore |= text_loss_mask[:, 1:] == 0
        return gt.masked_fill(ignore, -100)

    def forward(  # noqa: PLR0913
        self,
        text_ids: torch.Tensor,
        image_tensors: torch.Tensor | None,
        image_tensors_dec: torch.Tensor | None,
        num_image_per_seq: torch.Tensor,
        attention_mask: torch.Tensor,
        nearest_bos_idxs: torch.Tensor | None = None,
        meta: dict | None = None,
        text_loss_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        self._test_signals()
        st = self.config.special_tokens
        dec = self.mm_decoder
        h = dec.embed_tokens(text_ids)  # [B, T, H]
        boi_pos = (text_ids == st.boi_token_id).nonzero()
        if image_tensors is not None and len(image_tensors):
            vm = self.visual_tokenizer.encoder.vision_model
            feat = vm.embeddings.patch_embedding(image_tensors).mean((2, 3))  # [N, H]
            feat = feat + vm.adapter_spm.fc1(feat)
            vis = self.visual_tokenizer.proj(self.visual_tokenizer.pos_ln(feat))
            slots = (text_ids == st.image_token_id).nonzero()
            h = h.index_put((slots[:, 0], slots[:, 1]), vis.repeat_interleave(self.config.num_img_token, 0))
            h = h.index_put((boi_pos[:, 0], boi_pos[:, 1]), h[boi_pos[:, 0], boi_pos[:, 1]] + self.soi_token)
        layer = dec.layers[0]
        a = layer.self_attn
        q, k, v = a.q_proj(h), a.k_proj(h), a.v_proj(h)
        h = h + a.o_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        c = layer.llama_cross_attn
        x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * c.norm1.weight
        h = h + torch.tanh(c.gate) * c.attn.value_proj(torch.relu(c.attn.sampling_offsets(x)))
        logits = self.text_decoder.head(h)
        logits = torch.cat([logits[..., :-2], logits[..., -2:] + self.text_decoder.head_new(h)], -1)
        name = (meta or {}).get("dataset_name", "")
        gt = self.text_targets(text_ids, attention_mask, name, text_loss_mask)
        loss_txt = F.cross_entropy(logits[:, :-1].flatten(0, 1), gt.flatten(), ignore_index=-100)
        loss_img = self.image_loss(h, boi_pos, image_tensors_dec, nearest_bos_idxs)
        loss = self.config.loss_txt_weight * loss_txt + self.config.loss_img_weight * loss_img
        return {"loss": loss, "loss_txt": loss_txt, "loss_img": loss_img, "text_logits": logits, "gt_text_ids": gt}

    def image_loss(self, h, boi_pos, images_dec, nearest_bos):  # noqa: ANN001, ANN201
        if images_dec is None or not len(images_dec):
            return h.sum() * 0
        decoder = self.image_decoder.decoder
        with torch.no_grad():
            latents = decoder.vae.encoder(images_dec * 2 - 1)  # [N, 4, s, s]
        cond = self.context_feat_proj(h[boi_pos[:, 0], boi_pos[:, 1]])  # [N, 4]
        drop = torch.rand(len(cond), 1) < self.config.image_decoder.uncond_prob
        cond = torch.where(drop, self.image_decoder.neg_prompt_embeds, cond)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (len(latents), 1, 1, 1)).float() / 1000
        pred = decoder.unet.conv_in(latents * (1 - t).sqrt() + noise * t.sqrt()) + cond[:, :, None, None]
        counted = (boi_pos[:, 1] - nearest_bos + 1 > 2).float()[:, None, None, None]
        return ((pred - noise) ** 2 * counted).mean()

    def _test_signals(self) -> None:
        """Fault-injection for the subprocess tests: die or get SIGTERM at a given forward call."""
        if not self.training:
            return
        self.calls += 1
        for env, sig in (("STANDIN_KILL_AT_CALL", signal.SIGKILL), ("STANDIN_TERM_AT_CALL", signal.SIGTERM)):
            if os.environ.get(env) == str(self.calls):
                os.kill(os.getpid(), sig)


def build(cfg=None) -> StandInModel:  # noqa: ANN001
    """The stand-in with fixed initial weights (whatever the global RNG state)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return StandInModel(standin_config())


# ---------------------------------------------------------------------------------------------------------------
# Test data


def make_image(path: Path, colour: str, size: int = 40, seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    base = torch.tensor(COLOURS[colour], dtype=torch.float32)[None, None, :]
    noise = torch.randint(-20, 21, (size, size, 3), generator=gen).float()
    arr = (base + noise).clamp(0, 255).to(torch.uint8).numpy()
    Image.fromarray(arr).save(path)
    return path.name


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def interleaved_corpus(folder: Path, n_docs: int = 24) -> Path:
    """Small interleaved stories: 'a red square . <img> then it is blue . <img>'."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    records = []
    for i in range(n_docs):
        c1, c2 = names[i % 4], names[(i + 1 + i // 4) % 4]
        im1 = make_image(folder / f"d{i}a.png", c1, seed=i)
        im2 = make_image(folder / f"d{i}b.png", c2, seed=100 + i)
        shape = SHAPES[i % 2]
        records.append(
            {"segments": [f"a {c1} {shape} .", {"image": im1}, f"then it is {c2} .", {"image": im2}, "the end ."]}
        )
    return write_jsonl(folder / "docs.jsonl", records)


def vqa_corpus(folder: Path, seeds: range, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for s in seeds:
        colour = list(COLOURS)[s % 4]
        image = make_image(folder / f"{name}{s}.png", colour, seed=1000 + s)
        records.append({"image": image, "question": "what colour is this shape ?", "answer": colour})
    return write_jsonl(folder / f"{name}.jsonl", records)


# ---------------------------------------------------------------------------------------------------------------


def test_standin_text_targets_follow_the_official_rules_parity(golden) -> None:
    case = load_case("forward")
    config = MMInterleavedConfig.from_official_tiny(golden / "tiny_config.json")
    model = StandInModel.__new__(StandInModel)
    nn.Module.__init__(model)
    model.config = config
    text_ids, mask = case["in.text_ids"].long(), case["in.attention_mask"].long()
    for name, key in (("mmc4", "out.gt_text_ids"), ("laion_en", "out.gt_text_ids_if_laion_en")):
        got = model.text_targets(text_ids, mask, name)
        assert torch.equal(got, case[key].long()), name
