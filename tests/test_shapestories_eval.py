"""The ShapeStories benchmark: ``eval shapes`` end to end on a real tiny model, and the scoring path on ground truth.

- End to end: the real tiny ``MMInterleaved`` (random weights, MMFS made active, see ``test_mmfs_ablation``) with a
  word-level ShapeStories tokenizer, saved as a model folder and run through the public CLI. A random model scores
  whatever it scores; the test checks that every count is the number of documents / steps the split holds, that the
  ratios follow from the counts, that the files agree with each other, and that the ablation block is a separate
  run whose drawn images differ.
- Ground truth: the true captions (as the tokenizer would give them back, followed by more text) and the true
  renders go through the same scoring functions as a model's outputs; they must score 100 % at 64 px (>= 99 % at
  32 px, the bound of SHAPESTORIES.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from comfy_mm_interleaved.checkpoint import save_pretrained
from comfy_mm_interleaved.cli import main
from comfy_mm_interleaved.config import MMInterleavedConfig
from comfy_mm_interleaved.inference import engine as engine_module
from comfy_mm_interleaved.shapestories import caption_sentence, fixed_split
from comfy_mm_interleaved.shapestories.contact_sheet import PAD
from comfy_mm_interleaved.shapestories.evaluate import (
    TASKS,
    EvalOptions,
    TextForm,
    build_sets,
    first_sentence,
    score_set,
    split_question,
)
from comfy_mm_interleaved.shapestories.render import render
from comfy_mm_interleaved.tokenizer import build_word_tokenizer
from test_mmfs_ablation import TOKENIZER_WORDS, active_model, tiny_config, word_tokenizer

LIMIT = 2
SHEET_STORIES = 2
CELL, TEXT_WIDTH = 64, 180  # contact_sheet defaults used by the CLI
CONTINUATION = " it turns blue. it moves to top left."  # what a model may write after the sentence that is scored


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shapes_model") / "model"
    model = active_model()
    save_pretrained(model, folder)
    word_tokenizer(model.config).save_pretrained(str(folder / "tokenizer"))
    return folder


def run_cli(*arguments: str) -> int:
    return main(["eval", "shapes", "--no-progress", "--threads", "1", "--steps", "2", *arguments])


@pytest.fixture(scope="module")
def evaluated(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes_eval")
    status = run_cli(
        "--model", str(model_dir), "--out", str(out), "--limit", str(LIMIT), "--extra-step",
        "--tasks", ",".join(TASKS), "--sheet-stories", str(SHEET_STORIES),
    )  # fmt: skip
    assert status == 0
    return out


def tallies(tree: Any, path: str = "") -> list[tuple[str, dict]]:
    """Every {correct, total, ratio} dict of a report tree, with its path."""
    if isinstance(tree, dict) and set(tree) == {"correct", "total", "ratio"}:
        return [(path, tree)]
    if isinstance(tree, dict):
        return [t for key, value in tree.items() for t in tallies(value, f"{path}/{key}")]
    return []


def story_step_counts(steps_per_story: list[int]) -> tuple[int, dict[str, int], dict[str, int]]:
    """(total steps, steps per step index, steps per story length) of stories with these step counts."""
    by_step = {str(k): sum(n >= k for n in steps_per_story) for k in range(1, max(steps_per_story) + 1)}
    by_length = {str(n): n * steps_per_story.count(n) for n in sorted(set(steps_per_story))}
    return sum(steps_per_story), by_step, by_length


# ----------------------------------------------------------------------------------------------------------------
# End to end through the CLI


def test_report_counts_and_ratios(evaluated: Path, model_dir: Path) -> None:
    report = json.loads((evaluated / "report.json").read_text(encoding="utf-8"))
    assert report["benchmark"] == "shapestories"
    assert report["model"]["folder"] == str(model_dir.resolve()) and report["model"]["embedded"] is False
    assert report["model"]["config_sha256"] == hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
    settings = report["settings"]
    assert settings["limit_per_task"] == LIMIT and settings["text_form"] == "spaced"
    assert settings["mmfs_settings"] == ["on", "off"] and settings["sampling"]["image"]["steps"] == 2
    assert report["documents"] == {"caption": 2, "generation": 2, "story": 2, "question": 2, "story_extra_step": 2}
    assert set(report["results"]) == {"mmfs_on", "mmfs_off"}

    stories = [d for d in fixed_split("test", LIMIT) if d.kind == "story"]
    steps, by_step, by_length = story_step_counts([len(d.changes) for d in stories])
    for setting, results in report["results"].items():
        assert results["caption"]["exact"]["total"] == LIMIT
        assert all(t["total"] == LIMIT for t in results["caption"]["attributes"].values())
        assert results["generation"]["all_correct"]["total"] == LIMIT
        assert results["question"]["exact"]["total"] == LIMIT
        assert sum(t["total"] for t in results["question"]["by_topic"].values()) == LIMIT
        story = results["story"]
        assert story["overall"]["total"] == steps == story["changed_right"]["total"] == story["others_kept"]["total"]
        assert {k: t["total"] for k, t in story["by_step"].items()} == by_step
        assert {k: t["total"] for k, t in story["by_length"].items()} == by_length
        assert sum(t["total"] for t in story["by_change"].values()) == steps
        assert sum(t["correct"] for t in story["by_step"].values()) == story["overall"]["correct"]
        extra = results["story_extra_step"]
        assert extra["overall"]["total"] == 4 * LIMIT  # one step more than the 3 of the longest training story
        assert {k: t["total"] for k, t in extra["by_step"].items()} == {str(k): LIMIT for k in range(1, 5)}
        for path, tally in tallies(results, setting):
            assert 0 <= tally["correct"] <= tally["total"], path
            assert tally["ratio"] == (tally["correct"] / tally["total"] if tally["total"] else None), path

    summary = report["summary"]
    for setting in ("on", "off"):
        results = report["results"][f"mmfs_{setting}"]
        assert summary[f"mmfs_{setting}"] == {
            "caption_accuracy": results["caption"]["exact"]["ratio"],
            "generation_accuracy": results["generation"]["all_correct"]["ratio"],
            "story_consistency": results["story"]["overall"]["ratio"],
            "question_accuracy": results["question"]["exact"]["ratio"],
            "story_consistency_extra_step": results["story_extra_step"]["overall"]["ratio"],
        }
    on, off = summary["mmfs_on"], summary["mmfs_off"]
    assert summary["ablation_drop"] == {k: on[k] - off[k] for k in on}
    assert summary["meets_targets"] == {k: on[k] >= t for k, t in summary["targets"].items()}
    timings = report["timings"]
    assert timings["images_generated"] == 2 * (LIMIT + steps + 4 * LIMIT)  # generation + story + extra, per setting
    assert set(timings["per_set_seconds"]) == {"mmfs_on", "mmfs_off"}
    assert report["files"] == {
        "report": "report.json",
        "outputs": "outputs.jsonl",
        "contact_sheet": "contact_sheet.png",
    }


def test_outputs_agree_with_the_report(evaluated: Path) -> None:
    """The per-document file holds what was scored: re-deriving the counts from it gives the report's counts."""
    report = json.loads((evaluated / "report.json").read_text(encoding="utf-8"))
    lines = [json.loads(line) for line in (evaluated / "outputs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 2 * 5 * LIMIT  # settings x sets x documents
    form = TextForm(spaced=True)
    split = fixed_split("test", LIMIT)
    for setting in ("on", "off"):
        results = report["results"][f"mmfs_{setting}"]
        mine = {name: [x for x in lines if x["mmfs"] == setting and x["set"] == name] for name in report["documents"]}
        captions = [d for d in split if d.kind == "caption"]
        assert [x["document"] for x in mine["caption"]] == [d.text for d in captions]
        right = sum(first_sentence(form.from_model(x["generated"])) == caption_sentence(d.images[0])
                    for x, d in zip(mine["caption"], captions))  # fmt: skip
        assert right == results["caption"]["exact"]["correct"]
        generations = [d for d in split if d.kind == "generation"]
        right = sum(x["read"][0] == d.images[0].labels() for x, d in zip(mine["generation"], generations))
        assert right == results["generation"]["all_correct"]["correct"]
        stories = [d for d in split if d.kind == "story"]
        assert [len(x["read"]) for x in mine["story"]] == [len(d.changes) for d in stories]


def test_contact_sheet_size_and_ablation_rows(evaluated: Path) -> None:
    """Rows per story: truth, MMFS on, MMFS off; the given first image is the same in each, the drawn ones differ
    between the settings (the ablation really ran)."""
    stories = [d for d in fixed_split("test", LIMIT) if d.kind == "story"][:SHEET_STORIES]
    with Image.open(evaluated / "contact_sheet.png") as sheet:
        sheet.load()
    row_height = CELL + 2 * PAD
    width = max(PAD + (len(d.changes) + 1) * (CELL + TEXT_WIDTH + 2 * PAD) for d in stories)  # label + segments
    assert sheet.size == (width, 3 * len(stories) * row_height)

    def image_box(row: int, image: int) -> Image.Image:
        left = PAD + (TEXT_WIDTH + PAD) + image * (CELL + PAD + TEXT_WIDTH + PAD)
        top = row * row_height + PAD
        return sheet.crop((left, top, left + CELL, top + CELL))

    truth, on, off = 0, 1, 2
    given = render(stories[0].images[0], CELL)
    for row in (truth, on, off):
        assert image_box(row, 0).tobytes() == given.tobytes()
    assert image_box(truth, 1).tobytes() == render(stories[0].images[1], CELL).tobytes()
    assert image_box(on, 1).tobytes() != image_box(off, 1).tobytes()


def test_cli_ablation_choice_and_determinism(evaluated: Path, model_dir: Path, tmp_path: Path) -> None:
    """``--ablation off`` runs the model as it is only, and reproduces the first run's numbers (fixed seeds)."""
    status = run_cli("--model", str(model_dir), "--out", str(tmp_path), "--limit", str(LIMIT), "--ablation", "off",
                     "--tasks", "caption,generation", "--sheet-stories", "0")  # fmt: skip
    assert status == 0
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    first = json.loads((evaluated / "report.json").read_text(encoding="utf-8"))
    assert set(report["results"]) == {"mmfs_on"} and "ablation_drop" not in report["summary"]
    for name in ("caption", "generation"):
        assert report["results"]["mmfs_on"][name] == first["results"]["mmfs_on"][name]
    assert report["files"]["contact_sheet"] is None and not (tmp_path / "contact_sheet.png").exists()


def test_cli_jobs_give_the_same_outputs(
    evaluated: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--jobs 2`` (two worker processes, each its own engine) writes exactly the outputs of the one-process run."""
    status = run_cli("--model", str(model_dir), "--out", str(tmp_path), "--limit", "2", "--tasks", "caption,story",
                     "--sheet-stories", "0", "--jobs", "2")  # fmt: skip
    assert status == 0
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report["settings"]["jobs"] == 2
    first = [json.loads(line) for line in (evaluated / "outputs.jsonl").read_text(encoding="utf-8").splitlines()]
    again = [json.loads(line) for line in (tmp_path / "outputs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert again == [r for r in first if r["set"] in ("caption", "story") and r["index"] < 2]
    assert run_cli("--model", str(model_dir), "--out", str(tmp_path), "--jobs", "0") == 1
    assert "--jobs must be >= 1" in capsys.readouterr().err


def test_cli_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(engine_module, "EMBEDDED_MODEL_DIR", tmp_path / "not-shipped")
    assert run_cli("--out", str(tmp_path), "--limit", "1") == 1
    assert "embedded default model is not shipped" in capsys.readouterr().err
    assert run_cli("--out", str(tmp_path), "--tasks", "caption,drawing") == 1
    assert "tasks must be one or more of" in capsys.readouterr().err
    assert run_cli("--out", str(tmp_path), "--limit", "0") == 1
    assert "limit must be a positive" in capsys.readouterr().err
    assert run_cli("--out", str(tmp_path), "--tasks", "caption", "--extra-step") == 1
    assert "extra-step" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# The evaluation code on ground truth


def test_text_form_and_stopping_rule() -> None:
    spaced = TextForm(spaced=True)
    assert spaced.to_model("a small red circle at top left. it turns blue.") == (
        "a small red circle at top left . it turns blue ."
    )
    assert spaced.to_model("what colour is it?") == "what colour is it ?"
    assert spaced.from_model(" a small  red circle at top left . it") == "a small red circle at top left. it"
    plain = TextForm(spaced=False)
    assert plain.from_model("red . ") == "red ."  # a plain tokenizer's output keeps its spacing
    assert first_sentence("a small red circle at top left. it turns blue.") == "a small red circle at top left."
    assert first_sentence(" top left") == "top left"
    assert first_sentence("") == ""
    assert first_sentence(". red.") == "."
    assert TextForm.of(word_tokenizer(tiny_config())).spaced
    attached = [*TOKENIZER_WORDS, "left."]
    config = MMInterleavedConfig.tiny(len(attached) + 4)
    assert not TextForm.of(build_word_tokenizer(attached, config.special_tokens, config.orig_vocab_size)).spaced


def test_image_seeds_are_fixed_and_distinct() -> None:
    options = EvalOptions(seed=5)
    seeds = {
        (s, d, k): options.image_seed(s, d, k) for s in ("generation", "story") for d in range(3) for k in range(3)
    }
    assert len(set(seeds.values())) == len(seeds)
    assert seeds == {key: EvalOptions(seed=5).image_seed(*key) for key in seeds}
    assert EvalOptions(seed=6).image_seed("story", 0, 0) != seeds[("story", 0, 0)]


def truth_outputs(eval_set, image_size: int, form: TextForm, tokenizer) -> list[Any]:
    """The ground truth in the form a model's outputs take: generated texts as the tokenizer decodes them
    (followed by more text, cut by the stopping rule), images rendered at ``image_size``."""

    def generated(sentence: str) -> str:
        ids = tokenizer.encode(form.to_model(sentence + CONTINUATION), add_special_tokens=False)
        return tokenizer.decode(ids, skip_special_tokens=True)

    documents = eval_set.documents
    if eval_set.task == "caption":
        return [generated(caption_sentence(d.images[0])) for d in documents]
    if eval_set.task == "question":
        return [generated(split_question(d)[1]) for d in documents]
    if eval_set.task == "generation":
        return [render(d.images[0], image_size) for d in documents]
    return [[render(a, image_size) for a in d.images[1:]] for d in documents]


@pytest.mark.parametrize("image_size, bound", [(64, 1.0), (32, 0.99)])
def test_ground_truth_scores_full_marks(image_size: int, bound: float) -> None:
    """The whole test split (256 documents per kind, and the extra-step stories) through the scoring path."""
    tokenizer = word_tokenizer(tiny_config())
    form = TextForm.of(tokenizer)
    sets = build_sets(TASKS, extra_step=True)
    assert [len(s.documents) for s in sets] == [256] * 5
    for eval_set in sets:
        result = score_set(eval_set, truth_outputs(eval_set, image_size, form, tokenizer), form, image_size)
        if eval_set.task in ("caption", "question"):
            assert result["exact"]["ratio"] == 1.0, eval_set.name
        elif eval_set.task == "generation":
            assert result["all_correct"]["ratio"] >= bound, (eval_set.name, result["all_correct"])
            assert result["unreadable"] == 0
        else:
            assert result["overall"]["ratio"] >= bound, (eval_set.name, result["overall"])
            assert result["overall"]["total"] == sum(len(d.changes) for d in eval_set.documents)
