"""The ShapeStories benchmark of an :class:`~comfy_mm_interleaved.inference.InterleavedEngine`.

Every document of the fixed test split (:func:`fixed_split`) becomes a prompt in the document format of
SHAPESTORIES.md; the model continues it and the scorer (:mod:`.score`) judges the result. ``<image>`` below is an
image: a ground-truth render at the image decoder's size, or one the model drew.

- **caption**: prompt ``<image>``. Greedy text; generation ends at ``</s>``, at ``<|beginofimage|>`` or after
  ``max_text_tokens`` new tokens. The caption is the generated text up to and including its first ``.`` (all of it
  when there is none), compared exactly with the true caption sentence.
- **question** (only if the model was trained on it): prompt ``<image> what colour is it?`` (or shape / where),
  the same rule; the answer sentence (``red.``) is compared exactly.
- **generation**: prompt ``a small red circle at top left.``; the model draws the next image. Right when all four
  attributes read from it are the prompted ones.
- **story**: prompt ``<image> a small red circle at top left. it turns blue.`` with the first image given; the model
  draws the image after every change sentence from the document so far, which holds the model's OWN earlier
  images: ``<image> caption. change 1. <drawn 1> change 2. <drawn 2> ...``. Scored by :func:`story_consistency`
  per step, per story length and overall. The **extra-step** set holds stories with one step more than the longest
  training story (generalisation), scored the same way.

Text form: a word-level tokenizer whose words carry no punctuation (``left.`` is unknown to it) is given the text
with a space before every ``.`` / ``?`` (``at top left .``), as it was trained; its output is put back into the
document form (``at top left.``) before scoring. Other tokenizers see and produce the document form itself.

Sampling is deterministic: text is greedy; image ``k`` of document ``i`` of a set uses a seed derived from
(``seed``, set, ``i``, ``k``), the same with and without MMFS, so the ablation compares paired samples. The MMFS
ablation (:meth:`InterleavedEngine.mmfs_ablation`) runs every set again with the LLM gates contributing zero and
no UNet MMFS residuals. Documents are generated one at a time (the engine continues one document per call).
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ..inference.document import Interleaved
from ..inference.options import ImageOptions, TextOptions
from .generate import MAX_STEPS, QUESTIONS, SPLIT_SEEDS, Document, fixed_split, make_split
from .render import render
from .score import (
    ShapeStoriesReport,
    StoryOutput,
    Tally,
    caption_accuracy,
    generation_accuracy,
    read_image,
    story_consistency,
)

TASKS: tuple[str, ...] = ("caption", "generation", "story", "question")
DEFAULT_TASKS: tuple[str, ...] = ("caption", "generation", "story")
EXTRA_STEP_SET = "story_extra_step"
SET_NAMES: tuple[str, ...] = (*TASKS, EXTRA_STEP_SET)  # the seed of a set's images derives from its index here
MMFS_SETTINGS: dict[str, bool] = {"on": True, "off": False}  # report key mmfs_<name> -> MMFS switched on?
SPLIT = "test"
# The targets of the embedded model (with MMFS on) and the report's summary names of the headline metrics.
TARGETS: dict[str, float] = {"caption_accuracy": 0.95, "generation_accuracy": 0.90, "story_consistency": 0.85}
PUNCTUATION_PATTERN = re.compile(r"\s*([.?])")


# ----------------------------------------------------------------------------------------------------------------
# Options, text form and the sets


@dataclass
class EvalOptions:
    """Decoding settings: greedy text of at most ``max_text_tokens`` tokens; images with ``steps`` diffusion steps
    of ``scheduler`` at ``guidance_scale``; ``seed`` the base of every image seed."""

    steps: int = 25
    guidance_scale: float = 1.0
    scheduler: str = "ddim"
    seed: int = 0
    max_text_tokens: int = 16

    def text_options(self) -> TextOptions:
        options = TextOptions(max_new_tokens=self.max_text_tokens, do_sample=False, stop_on_image=True)
        options.validate()
        return options

    def image_options(self, seed: int) -> ImageOptions:
        return ImageOptions(
            num_inference_steps=self.steps, guidance_scale=self.guidance_scale, scheduler=self.scheduler, seed=seed
        )

    def image_seed(self, set_name: str, document: int, image: int) -> int:
        """The seed of image ``image`` (0-based among the drawn ones) of document ``document`` of ``set_name``."""
        entropy = [self.seed, SET_NAMES.index(set_name), document, image]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0] & 0x7FFFFFFF)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": {"decoding": "greedy", "max_new_tokens": self.max_text_tokens},
            "image": {
                "steps": self.steps,
                "guidance_scale": self.guidance_scale,
                "scheduler": self.scheduler,
                "seed": self.seed,
            },
        }


@dataclass(frozen=True)
class TextForm:
    """How ShapeStories text is written for the model: ``spaced`` = a space before every ``.`` and ``?``."""

    spaced: bool

    @classmethod
    def of(cls, tokenizer: Any) -> TextForm:
        """Spaced when the tokenizer does not know a word with its full stop attached (a word-level tokenizer)."""
        unknown = tokenizer.unk_token_id
        return cls(unknown is not None and unknown in tokenizer.encode("left.", add_special_tokens=False))

    @property
    def name(self) -> str:
        return "spaced" if self.spaced else "plain"

    def to_model(self, text: str) -> str:
        """Document text -> the model's text (``it turns blue.`` -> ``it turns blue .`` when spaced)."""
        return PUNCTUATION_PATTERN.sub(r" \1", text).strip() if self.spaced else text

    def from_model(self, text: str) -> str:
        """Generated text -> document text: whitespace collapsed (and, when spaced, none before ``.`` / ``?``)."""
        text = " ".join(text.split())
        return PUNCTUATION_PATTERN.sub(r"\1", text) if self.spaced else text


def first_sentence(text: str) -> str:
    """The stopping rule of generated text: everything up to and including the first ``.`` (stripped); the whole
    text when it has none."""
    end = text.find(".")
    return (text if end < 0 else text[: end + 1]).strip()


def split_question(document: Document) -> tuple[str, str]:
    """A question document's (question, answer): ``what colour is it?``, ``red.``"""
    question, _, answer = document.segments[1].partition("? ")
    return question + "?", answer


@dataclass(frozen=True)
class EvalSet:
    """Documents evaluated together: ``name`` is the report key, ``task`` the prompt and scoring of its documents."""

    name: str
    task: str
    documents: tuple[Document, ...]


def build_sets(
    tasks: Sequence[str] = DEFAULT_TASKS,
    limit: int | None = None,
    extra_step: bool = False,
    train_max_steps: int = MAX_STEPS,
) -> list[EvalSet]:
    """The test-split documents of each task (``limit`` per kind, default all 256), and with ``extra_step`` the
    stories of exactly ``train_max_steps + 1`` steps (test seed; their ``limit`` likewise)."""
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise ValueError(f"tasks must be one or more of {', '.join(TASKS)}; got {list(tasks)}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of documents per task, got {limit!r}")
    if not isinstance(train_max_steps, int) or train_max_steps < 1:
        raise ValueError(f"train_max_steps must be >= 1 (the longest training story), got {train_max_steps!r}")
    if extra_step and "story" not in tasks:
        raise ValueError("the extra-step stories belong to the story task: add 'story' to the tasks")
    split = fixed_split(SPLIT, limit)
    sets = [EvalSet(t, t, tuple(d for d in split if d.kind == t)) for t in TASKS if t in tasks]
    if extra_step:
        steps = train_max_steps + 1
        per_kind = len(next(s for s in sets if s.task == "story").documents)
        stories = make_split(SPLIT_SEEDS[SPLIT], per_kind, kinds=("story",), min_steps=steps, max_steps=steps)
        sets.append(EvalSet(EXTRA_STEP_SET, "story", tuple(stories)))
    return sets


# ----------------------------------------------------------------------------------------------------------------
# Running the model: one prompt per document


@dataclass
class Runner:
    """Turns documents into prompts for ``engine`` and collects what it generates."""

    engine: Any  # InterleavedEngine
    options: EvalOptions
    form: TextForm
    image_size: int

    def caption(self, eval_set: EvalSet, index: int) -> str:
        image = render(eval_set.documents[index].images[0], self.image_size)
        return self._text(Interleaved([image]))

    def question(self, eval_set: EvalSet, index: int) -> str:
        document = eval_set.documents[index]
        question, _ = split_question(document)
        return self._text(Interleaved([render(document.images[0], self.image_size), self.form.to_model(question)]))

    def generation(self, eval_set: EvalSet, index: int) -> Image.Image:
        prompt = Interleaved([self.form.to_model(eval_set.documents[index].segments[0])])
        return self._image(prompt, self.options.image_seed(eval_set.name, index, 0))

    def story(self, eval_set: EvalSet, index: int) -> list[Image.Image]:
        """The drawn images of a story (the first image is given): each from the document so far."""
        document = eval_set.documents[index]
        prompt = Interleaved([render(document.segments[0], self.image_size)])
        drawn: list[Image.Image] = []
        for segment in document.segments[1:]:
            if isinstance(segment, str):
                prompt = prompt.append_text(self.form.to_model(segment))
                continue
            drawn.append(self._image(prompt, self.options.image_seed(eval_set.name, index, len(drawn))))
            prompt = prompt.append_image(drawn[-1])
        return drawn

    def _text(self, prompt: Interleaved) -> str:
        return self.engine.generate_text(prompt, self.options.text_options()).text

    def _image(self, prompt: Interleaved, seed: int) -> Image.Image:
        return self.engine.generate_images(prompt, self.options.image_options(seed)).images[0]


# ----------------------------------------------------------------------------------------------------------------
# Scoring: the same functions score a model's outputs and (in the tests) the ground truth


def _metrics_dict(**metrics: Any) -> dict[str, Any]:
    return ShapeStoriesReport(**metrics).to_dict()


def score_captions(documents: Sequence[Document], generated: Sequence[str], form: TextForm) -> dict[str, Any]:
    """Exact-match caption accuracy of generated texts (first sentence, document form) and per-attribute accuracy."""
    predictions = [first_sentence(form.from_model(text)) for text in generated]
    return _metrics_dict(caption=caption_accuracy(predictions, [d.images[0] for d in documents]))["caption"]


def score_questions(documents: Sequence[Document], generated: Sequence[str], form: TextForm) -> dict[str, Any]:
    """Exact-match answers (first sentence, document form), overall and per question topic."""
    _check_pairs(documents, generated)
    topics = {question: topic for topic, question in QUESTIONS.items()}
    exact, by_topic = Tally(), {topic: Tally() for topic in QUESTIONS}
    for document, text in zip(documents, generated):
        question, answer = split_question(document)
        right = first_sentence(form.from_model(text)) == answer
        exact.add(right)
        by_topic[topics[question]].add(right)
    return {"exact": exact.to_dict(), "by_topic": {t: tally.to_dict() for t, tally in by_topic.items()}}


def score_generation(documents: Sequence[Document], images: Sequence[Image.Image]) -> dict[str, Any]:
    """How many drawn images show all four prompted attributes (and each attribute on its own)."""
    metrics = generation_accuracy(images, [d.images[0] for d in documents])
    return _metrics_dict(generation=metrics)["generation"]


def score_stories(
    documents: Sequence[Document], drawn: Sequence[Sequence[Image.Image]], image_size: int
) -> dict[str, Any]:
    """Story consistency of the drawn images (the first image of each story is its ground-truth render): per step,
    per changed attribute, overall, and ``by_length`` (stories grouped by their number of steps)."""
    _check_pairs(documents, drawn)
    stories = [
        StoryOutput(d.changes, [render(d.images[0], image_size), *images]) for d, images in zip(documents, drawn)
    ]
    result = _metrics_dict(story=story_consistency(stories))["story"]
    lengths = sorted({len(s.changes) for s in stories})
    by_length = {n: story_consistency([s for s in stories if len(s.changes) == n]).overall for n in lengths}
    result["by_length"] = {str(n): tally.to_dict() for n, tally in by_length.items()}
    return result


def score_set(eval_set: EvalSet, outputs: Sequence[Any], form: TextForm, image_size: int) -> dict[str, Any]:
    """The metrics of one set's outputs (texts for caption / question, images for generation, drawn image lists
    for stories)."""
    if eval_set.task == "caption":
        return score_captions(eval_set.documents, outputs, form)
    if eval_set.task == "question":
        return score_questions(eval_set.documents, outputs, form)
    if eval_set.task == "generation":
        return score_generation(eval_set.documents, outputs)
    return score_stories(eval_set.documents, outputs, image_size)


def _check_pairs(documents: Sequence[Any], outputs: Sequence[Any]) -> None:
    if len(documents) != len(outputs):
        raise ValueError(f"{len(documents)} documents but {len(outputs)} outputs: they must pair up")


def ratio_of(result: dict[str, Any], task: str) -> float | None:
    """The headline ratio of one set's metrics: exact captions / answers, all-correct images, consistent steps."""
    key = {"caption": "exact", "question": "exact", "generation": "all_correct", "story": "overall"}[task]
    return result[key]["ratio"]


# ----------------------------------------------------------------------------------------------------------------
# The whole evaluation


@dataclass
class Evaluation:
    """Outputs, metrics and timings of every set under every MMFS setting (``"on"`` / ``"off"``)."""

    sets: list[EvalSet]
    form: TextForm
    image_size: int
    outputs: dict[str, dict[str, list[Any]]] = field(default_factory=dict)  # setting -> set name -> outputs
    results: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # setting -> set name -> metrics
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # setting -> set name -> seconds

    def summary(self) -> dict[str, Any]:
        """Headline ratios per setting, the drop from MMFS on to off, and whether the targets are met (MMFS on)."""
        names = {
            "caption": "caption_accuracy",
            "question": "question_accuracy",
            "generation": "generation_accuracy",
            "story": "story_consistency",
            EXTRA_STEP_SET: "story_consistency_extra_step",
        }
        headline = {
            f"mmfs_{setting}": {names[s.name]: ratio_of(results[s.name], s.task) for s in self.sets}
            for setting, results in self.results.items()
        }
        summary: dict[str, Any] = {**headline, "targets": TARGETS}
        if "mmfs_on" in headline and "mmfs_off" in headline:
            on, off = headline["mmfs_on"], headline["mmfs_off"]
            summary["ablation_drop"] = {k: on[k] - off[k] for k in on if on[k] is not None and off[k] is not None}
        if "mmfs_on" in headline:
            on = headline["mmfs_on"]
            summary["meets_targets"] = {k: on[k] >= target for k, target in TARGETS.items() if on.get(k) is not None}
        return summary

    def report(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "results": {f"mmfs_{setting}": results for setting, results in self.results.items()},
            "documents": {s.name: len(s.documents) for s in self.sets},
        }

    def records(self) -> list[dict[str, Any]]:
        """One line per setting and document: the prompt document, what the model generated (texts) or what the
        scorer read from its images (labels; None for an unreadable image)."""
        lines = []
        for setting, by_set in self.outputs.items():
            for eval_set in self.sets:
                for index, (document, output) in enumerate(zip(eval_set.documents, by_set[eval_set.name])):
                    line = {"mmfs": setting, "set": eval_set.name, "index": index, "document": document.text}
                    if eval_set.task in ("caption", "question"):
                        line["generated"] = output
                    else:
                        images = [output] if eval_set.task == "generation" else output
                        line["read"] = [_labels(image) for image in images]
                    lines.append(line)
        return lines

    def story_rows(self, count: int) -> list[list[dict[str, Any]]]:
        """Contact-sheet rows of the first ``count`` stories: the ground truth, then each setting's drawn images in
        place of the true ones (the given first image and the text are the truth's)."""
        eval_set = next((s for s in self.sets if s.task == "story"), None)
        if eval_set is None:
            return []
        rows = []
        for index, document in enumerate(eval_set.documents[:count]):
            truth = document.to_interleaved(self.image_size)
            rows.append([{"text": f"{eval_set.name} {index}: truth"}, *truth])
            for setting, by_set in self.outputs.items():
                drawn = iter(by_set[eval_set.name][index])
                items = [truth[0]] + [{"image": next(drawn)} if "image" in item else item for item in truth[1:]]
                rows.append([{"text": f"{eval_set.name} {index}: MMFS {setting}"}, *items])
        return rows


def _labels(image: Image.Image) -> dict[str, str] | None:
    reading = read_image(image)
    return None if reading is None else reading.labels()


EngineFactory = Callable[[], Any]  # picklable: builds an InterleavedEngine inside a worker process


def evaluate(
    engine: Any,
    sets: Sequence[EvalSet],
    options: EvalOptions | None = None,
    settings: Sequence[str] = ("on", "off"),
    progress: bool = True,
    jobs: int = 1,
    engine_factory: EngineFactory | None = None,
) -> Evaluation:
    """Run and score every set with MMFS on and / or off (``settings``); a progress bar per set on stderr.

    ``jobs`` > 1 spreads the documents of each set over that many worker processes, each with its own engine from
    ``engine_factory`` (one torch thread each). Every document is generated on its own with its own seeds, so the
    outputs are the same as with ``jobs=1``.
    """
    options = options or EvalOptions()
    unknown = [s for s in settings if s not in MMFS_SETTINGS]
    if not settings or unknown:
        raise ValueError(f"settings must be one or both of 'on', 'off' (MMFS switched on / off), got {list(settings)}")
    if jobs < 1 or (jobs > 1 and engine_factory is None):
        raise ValueError(f"jobs must be >= 1 (and > 1 needs an engine_factory for the workers), got {jobs}")
    form = TextForm.of(engine.tokenizer)
    image_size = engine.config.image_decoder.image_size
    runner = Runner(engine, options, form, image_size)
    evaluation = Evaluation(list(sets), form, image_size)
    pool = None
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")  # never fork a process that holds torch threads
        worker_args = (engine_factory, options, list(sets))
        pool = ProcessPoolExecutor(jobs, context, initializer=_start_worker, initargs=worker_args)
    try:
        for setting in settings:
            outputs, results, seconds = {}, {}, {}
            for set_index, eval_set in enumerate(sets):
                start = time.perf_counter()
                label = f"MMFS {setting}: {eval_set.name}"
                if pool is None:
                    with _mmfs_setting(engine, setting):
                        run: Callable[[EvalSet, int], Any] = getattr(runner, eval_set.task)
                        generated = [run(eval_set, i) for i in _progress(len(eval_set.documents), label, progress)]
                else:
                    tasks = [(setting, set_index, i) for i in range(len(eval_set.documents))]
                    chunk = max(1, len(tasks) // (8 * jobs))
                    done = pool.map(_run_in_worker, tasks, chunksize=chunk)
                    generated = list(_progress_over(done, len(tasks), label, progress))
                outputs[eval_set.name] = generated
                seconds[eval_set.name] = round(time.perf_counter() - start, 3)
                results[eval_set.name] = score_set(eval_set, generated, form, image_size)
            evaluation.outputs[setting], evaluation.results[setting], evaluation.seconds[setting] = (
                outputs,
                results,
                seconds,
            )
    finally:
        if pool is not None:
            pool.shutdown()
    return evaluation


def _mmfs_setting(engine: Any, setting: str):
    return contextlib.nullcontext() if MMFS_SETTINGS[setting] else engine.mmfs_ablation()


_WORKER: dict[str, Any] = {}  # a worker process's runner and sets


def _start_worker(engine_factory: EngineFactory, options: EvalOptions, sets: list[EvalSet]) -> None:
    import torch

    torch.set_num_threads(1)
    engine = engine_factory()
    image_size = engine.config.image_decoder.image_size
    _WORKER.update(runner=Runner(engine, options, TextForm.of(engine.tokenizer), image_size), sets=sets)


def _run_in_worker(task: tuple[str, int, int]) -> Any:
    """(MMFS setting, set index, document index) -> the document's output (text, image or drawn images)."""
    setting, set_index, index = task
    runner, eval_set = _WORKER["runner"], _WORKER["sets"][set_index]
    with _mmfs_setting(runner.engine, setting):
        return getattr(runner, eval_set.task)(eval_set, index)


def _progress(total: int, label: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(range(total), desc=label, file=sys.stderr, disable=not enabled, leave=False)


def _progress_over(results: Any, total: int, label: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(results, total=total, desc=label, file=sys.stderr, disable=not enabled, leave=False)
