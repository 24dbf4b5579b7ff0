"""``eval shapes``: the ShapeStories benchmark (:mod:`comfy_mm_interleaved.shapestories.evaluate`).

    python -m comfy_mm_interleaved eval shapes [--model DIR] [--out DIR] [--limit N] [--ablation both|on|off] \\
        [--extra-step] [--seed N] [--steps N] [--tasks caption,generation,story]

Writes ``<out>/report.json`` (summary, every metric as counts and ratios per set and MMFS setting, settings, model
folder and config hash, code revision, timings), ``<out>/outputs.jsonl`` (per document: the generated text or the
labels read from the drawn images) and ``<out>/contact_sheet.png`` (the first stories: truth, then the drawn images
of each MMFS setting). Prints the report path.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import add_model_arguments, check_ranges, eval_task, git_revision, load_engine

DEFAULT_OUT = Path("output") / "eval-shapes"
# --ablation: which MMFS settings run ("on" = the ablation is on, i.e. MMFS switched off)
ABLATION_SETTINGS: dict[str, tuple[str, ...]] = {"both": ("on", "off"), "off": ("on",), "on": ("off",)}
SCHEDULER_CHOICES = ["ddpm", "ddim", "euler", "euler_ancestral", "dpmpp_2m"]


def _arguments(parser: argparse.ArgumentParser) -> None:
    from ..shapestories.generate import MAX_STEPS

    add_model_arguments(parser)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all 256)")
    parser.add_argument(
        "--tasks",
        default="caption,generation,story",
        help="comma-separated tasks: caption, generation, story, question (default caption,generation,story)",
    )
    parser.add_argument(
        "--ablation",
        choices=sorted(ABLATION_SETTINGS),
        default="both",
        help="MMFS ablation: both = with and without MMFS (default), off = the model as it is only, "
        "on = only with MMFS switched off (LLM gates contribute zero, no UNet residuals)",
    )
    parser.add_argument(
        "--extra-step", action="store_true", help="also stories with one step more than the longest training story"
    )
    parser.add_argument(
        "--max-steps", type=int, default=MAX_STEPS, help=f"longest training story in steps (default {MAX_STEPS})"
    )
    parser.add_argument("--seed", type=int, default=0, help="base seed of the images (default 0)")
    parser.add_argument("--steps", type=int, default=25, help="diffusion steps per image (default 25)")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (default 1)")
    parser.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default="ddim")
    parser.add_argument("--max-text-tokens", type=int, default=16, help="new tokens per caption / answer (16)")
    parser.add_argument(
        "--sheet-stories", type=int, default=8, help="stories on the contact sheet (default 8; 0: no sheet)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="worker processes, each with its own copy of the model and one torch thread (CPU evaluation on N "
        "cores); the outputs are the same for any value (default 1)",
    )


def _options(args: argparse.Namespace):
    from ..shapestories.evaluate import EvalOptions

    checks = {
        "--steps": args.steps >= 1,
        "--guidance-scale": args.guidance_scale >= 0,
        "--max-text-tokens": args.max_text_tokens >= 1,
        "--sheet-stories": args.sheet_stories >= 0,
    }
    check_ranges(checks, "--steps and --max-text-tokens must be >= 1, --guidance-scale and --sheet-stories >= 0")
    return EvalOptions(args.steps, args.guidance_scale, args.scheduler, args.seed, args.max_text_tokens)


@eval_task("shapes", "ShapeStories: caption / generation accuracy, story consistency, MMFS ablation", _arguments)
def run_shapes(args: argparse.Namespace) -> int:
    from ..inference.engine import InterleavedEngine
    from ..shapestories.contact_sheet import contact_sheet
    from ..shapestories.evaluate import SPLIT, build_sets, evaluate
    from ..shapestories.generate import SPLIT_SEEDS

    options = _options(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    sets = build_sets(tasks, args.limit, args.extra_step, args.max_steps)  # input checked before loading the model
    settings = ABLATION_SETTINGS[args.ablation]
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    engine, model, load_seconds = load_engine(args)
    factory = functools.partial(
        InterleavedEngine.from_pretrained, model["folder"], dtype=args.dtype, device=args.device
    )
    start = time.perf_counter()
    evaluation = evaluate(
        engine, sets, options, settings, progress=not args.no_progress, jobs=args.jobs, engine_factory=factory
    )
    evaluate_seconds = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str | None] = {"report": "report.json", "outputs": "outputs.jsonl", "contact_sheet": None}
    rows = evaluation.story_rows(args.sheet_stories)
    if rows:
        contact_sheet(rows, image_size=evaluation.image_size, path=args.out / "contact_sheet.png")
        files["contact_sheet"] = "contact_sheet.png"
    with (args.out / "outputs.jsonl").open("w", encoding="utf-8") as out:
        out.writelines(json.dumps(line) + "\n" for line in evaluation.records())
    report: dict[str, Any] = {
        "benchmark": "shapestories",
        "model": model,
        "code": git_revision(),
        "settings": {
            "split": SPLIT,
            "split_seed": SPLIT_SEEDS[SPLIT],
            "limit_per_task": args.limit,
            "tasks": tasks,
            "extra_step": args.extra_step,
            "train_max_steps": args.max_steps,
            "ablation": args.ablation,
            "mmfs_settings": list(settings),
            "text_form": evaluation.form.name,
            "image_size": evaluation.image_size,
            "sampling": options.to_dict(),
            "dtype": args.dtype,
            "placement": engine.placement.to_dict(),
            "threads": _torch_threads(),
            "jobs": args.jobs,
        },
        **evaluation.report(),
        "timings": {
            "load_seconds": round(load_seconds, 3),
            "evaluate_seconds": round(evaluate_seconds, 3),
            "per_set_seconds": {f"mmfs_{s}": seconds for s, seconds in evaluation.seconds.items()},
            "engine_seconds_per_phase": {k: round(v, 3) for k, v in engine.stats.seconds.items()},
            "images_generated": engine.stats.images_generated,
            "tokens_generated": engine.stats.tokens_generated,
        },
        "files": files,
    }
    path = args.out / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for name, values in report["summary"].items():
        print(f"{name}: {json.dumps(values)}", file=sys.stderr)
    print(path)
    return 0


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()
