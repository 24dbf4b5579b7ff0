"""Training-loop overhead: our accelerate loop vs a plain PyTorch loop, same tiny model, same data, same run.

    python bench/train.py [--steps 8] [--batch 2] [--seq-len 96] [--golden ../shared/golden] [--device cpu]

Both loops train the real MMInterleaved at ``MMInterleavedConfig.tiny`` (or, with ``--golden``, the golden fixtures'
tiny official config; random init) on the same synthetic interleaved corpus through
the same data stream (packing, image decoding), with AdamW and the same gradient clipping; ours adds accelerate,
parameter groups, the schedule, logging and the per-step SIGTERM check (checkpoints off). Each loop runs in its own
subprocess (peak memory = max RSS on CPU, max allocated on CUDA), alternating twice; the best time of each counts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WORDS = "a the is big small then it shape red green blue yellow square circle end .".split()
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def make_corpus(folder: Path, n_docs: int = 32) -> Path:
    from PIL import Image

    names = list(COLOURS)
    lines = []
    for i in range(n_docs):
        a, b = names[i % 4], names[(i + 1) % 4]
        Image.new("RGB", (96, 96), COLOURS[a]).save(folder / f"{i}a.png")
        Image.new("RGB", (96, 96), COLOURS[b]).save(folder / f"{i}b.png")
        segs = [f"a {a} square .", {"image": f"{i}a.png"}, f"then it is {b} .", {"image": f"{i}b.png"}, "the end ."]
        lines.append(json.dumps({"segments": segs}))
    path = folder / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def setup(args: argparse.Namespace, folder: Path):
    from comfy_mm_interleaved.config import MMInterleavedConfig
    from comfy_mm_interleaved.models.mm_interleaved import MMInterleaved
    from comfy_mm_interleaved.tokenizer import build_word_tokenizer
    from comfy_mm_interleaved.train.config import TrainConfig
    from comfy_mm_interleaved.train.sources import SourceConfig

    if args.golden:
        config = MMInterleavedConfig.from_official_tiny(Path(args.golden) / "tiny_config.json")
    else:
        config = MMInterleavedConfig.tiny(len(WORDS) + 4)  # + <unk>, <s>, </s>, <pad>
    torch.manual_seed(0)
    model = MMInterleaved(config)
    tokenizer = build_word_tokenizer(WORDS, config.special_tokens, config.orig_vocab_size)
    cfg = TrainConfig.load(
        None,
        [
            f"train.output_dir={folder / 'out'}",
            f"train.max_steps={args.steps + args.warmup}",
            "train.save_every=0",
            "train.eval_every=0",
            f"train.log_every={args.steps + args.warmup}",
            "train.progress_bar=false",
            f"train.cpu={args.device == 'cpu'}",
            f"data.seq_len={args.seq_len}",
            f"data.batch_size={args.batch}",
            "optim.warmup_steps=0",
        ],
    )
    corpus = make_corpus(folder)
    cfg.data.sources = [SourceConfig("interleaved", str(corpus), image_root=str(folder))]
    return cfg, model, tokenizer


def run_ours(cfg, model, tokenizer, args) -> float:  # noqa: ANN001
    from comfy_mm_interleaved.train.loop import Trainer

    trainer = Trainer(cfg, model=model, tokenizer=tokenizer)
    cfg.train.max_steps = args.warmup
    trainer.train()  # warm-up steps, not timed
    cfg.train.max_steps = args.warmup + args.steps
    sync(args.device)
    start = time.perf_counter()
    trainer.train()
    sync(args.device)
    return time.perf_counter() - start


def run_plain(cfg, model, tokenizer, args) -> float:  # noqa: ANN001
    from comfy_mm_interleaved.train.loop import sync_stream_with_model
    from comfy_mm_interleaved.train.params import apply_freezing
    from comfy_mm_interleaved.train.stream import TrainStream, move_batch

    device = torch.device(args.device)
    sync_stream_with_model(cfg.data, model.config)
    apply_freezing(model, "official")
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.995), eps=1e-6, weight_decay=0.05)
    batches = iter(TrainStream(cfg.data, tokenizer, model.config.special_tokens))
    start = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(args.device)
            start = time.perf_counter()
        kwargs, _ = move_batch(next(batches), device)
        loss = model(**kwargs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(args.device)
    return time.perf_counter() - start


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(int(os.environ.get("MMI_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        cfg, model, tokenizer = setup(args, Path(tmp))
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        seconds = (run_ours if args.mode == "ours" else run_plain)(cfg, model, tokenizer, args)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": args.mode, "samples_per_s": args.steps * args.batch / seconds, "peak_mib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--golden", default=None, help="golden fixture folder: bench its tiny official config instead")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mode", choices=["ours", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        child(args)
        return
    results: dict[str, list[dict]] = {"plain": [], "ours": []}
    for _ in range(args.repeats):
        for mode in ("plain", "ours"):
            cmd = [sys.executable, __file__, "--mode", mode] + sys.argv[1:]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[mode].append(json.loads(out))
    best = {m: max(r, key=lambda x: x["samples_per_s"]) for m, r in results.items()}
    for mode in ("plain", "ours"):
        b = best[mode]
        print(f"{mode:>5}: {b['samples_per_s']:.3f} samples/s, peak {b['peak_mib']:.0f} MiB")
    overhead = best["plain"]["samples_per_s"] / best["ours"]["samples_per_s"] - 1
    print(
        f"overhead of our loop: {overhead * 100:+.1f} % time per sample (goal <= 10 %), "
        f"memory {best['ours']['peak_mib'] / best['plain']['peak_mib']:.2f}x"
    )


if __name__ == "__main__":
    main()
