"""Text metrics of the captioning and VQA benchmarks against values worked out by hand.

- VQA accuracy: hand-made 10-answer examples, the leave-one-out average of min(#matches / 3, 1) computed in the
  comments; the two official quirks (no normalisation when all humans agree; VizWiz compares raw human answers).
- Answer normalisation and MM-Interleaved's short-answer extraction: input -> output pairs derived by hand from the
  official rules.
- Caption tokenizer: the pure-Python stand-in against outputs of the Java PTB tokenizer (pycocoevalcap 1.2,
  ``-preserveLines -lowerCase``, then its punctuation removal) recorded once and written out here.
- BLEU-4 and CIDEr-D on a tiny corpus, the expected values derived step by step from the published formulas.
"""

from __future__ import annotations

import math

import pytest

from comfy_mm_interleaved.eval import text_metrics
from comfy_mm_interleaved.eval.text_metrics import (
    caption_scores,
    extract_short_answer,
    normalize_answer,
    ptb_tokenize,
    resolve_tokenizer,
    vizwiz_accuracy,
    vqa_accuracy,
)

# ------------------------------------------------------------------------------------------------------------------
# VQA accuracy


def test_vqa_accuracy_leave_one_out_hand_computed():
    answers = ["two", "2", "2", "3", "3", "3", "3", "3", "3", "3"]  # humans disagree -> everything normalised
    # "Two." -> "2": 3 humans match. Leaving out one of those 3: 2 matches among 9 -> 2/3; leaving out one of the
    # other 7: 3 matches -> 1. Mean = (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.9, abs=1e-12)
    assert vqa_accuracy("3", answers) == pytest.approx(1.0, abs=1e-12)  # 7 matches: >= 6 in every subset
    assert vqa_accuracy("four", answers) == 0.0
    # one human of ten: left out -> 0 matches -> 0; the other nine subsets hold it once -> 1/3. Mean = 9/3/10 = 0.3
    assert vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(0.3, abs=1e-12)
    # two humans: left out (x2) -> 1/3; the other 8 subsets -> 2/3. Mean = (2/3 + 16/3) / 10 = 0.6
    assert vqa_accuracy("yes", ["yes", "yes"] + ["no"] * 8) == pytest.approx(0.6, abs=1e-12)


def test_vqa_accuracy_official_quirk_all_humans_agree():
    # all ten humans said "yes": the official code compares without normalising (only whitespace is trimmed)
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    # as soon as one human differs, both sides are normalised: "Yes" -> "yes" matches 9 -> 1 in every subset
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["no"]) == pytest.approx(1.0, abs=1e-12)


def test_vizwiz_accuracy_normalises_only_the_prediction():
    assert vizwiz_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert vizwiz_accuracy("unanswerable", ["Unanswerable"] * 10) == 0.0  # human answers are compared raw
    # "The bottle." -> "bottle"; 4 humans: left out (x4) -> 3/3 = 1, others -> 4/3 -> 1. Mean 1
    assert vizwiz_accuracy("The bottle.", ["bottle"] * 4 + ["unanswerable"] * 6) == 1.0


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("A Dog.", "dog"),
        ("two apples, three pears", "2 apples 3 pears"),  # ", " -> removed; number words -> digits
        ("1,000", "1000"),  # a digit,digit comma: every mark is deleted, not spaced
        ("3.5", "3.5"),  # a period before a digit stays
        ("dont", "don't"),
        ("isnt it", "isn't it"),
        ("black/white", "black white"),  # a mark between letters becomes a space
        ("t-shirt", "t shirt"),
        ("yes!", "yes"),
        ("none", "0"),
        ("The  Eiffel\ttower", "eiffel tower"),
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("Yes, it is.", "yes"),  # first clause, lower case
        ("The answer is a red apple", "red apple"),  # after "is ", then after "a "
        ("pieces of cake", "pieces"),  # before " of"
        ("red or blue", "red"),
        ("salt and pepper", "salt"),
        ('"banana"\nmore text', "banana"),
        ("pizza slice", "slice"),  # the official rule cuts at any "a " (here the end of "pizza")
        ("", ""),
    ],
)
def test_extract_short_answer(response, answer):
    assert extract_short_answer(response) == answer


# ------------------------------------------------------------------------------------------------------------------
# Caption tokenizer

JAVA_PTB_OUTPUTS = [  # (caption, Java PTB tokenizer + pycocoevalcap punctuation removal)
    ("A man with a red helmet on a moped. ", "a man with a red helmet on a moped"),
    ("Two dogs' toys aren't here, it's the cat's.", "two dogs toys are n't here it 's the cat 's"),
    ('"Hi," she said (quietly) [really] {ok}.', "hi she said -lrb- quietly -rrb- -lsb- really -rsb- -lcb- ok -rcb-"),
    ("A black-and-white photo of 3.5 cats & 1,000 dogs...", "a black-and-white photo of 3.5 cats & 1,000 dogs"),
    ("I'm sure they'll go; we've seen it: he'd say \"no\".", "i 'm sure they 'll go we 've seen it he 'd say no"),
    ("a/b test with * stars and $5 and 50% off #tag @home", "a/b test with * stars and $ 5 and 50 % off #tag @home"),
    ("Mr. Smith went to St. Louis at 5 p.m. on Jan. 3rd.", "mr. smith went to st. louis at 5 p.m. on jan. 3rd"),
    ("can't won't shouldn't gonna wanna cannot", "ca n't wo n't should n't gon na wan na can not"),
    ("A TV on a table near a U.S. flag", "a tv on a table near a u.s. flag"),
    ("what?!? why... ok -- fine - good", "what ?!? why ok fine good"),
    ("it's 'quoted' ``double'' text", "it 's quoted double text"),
    ("tab\tseparated   spaces", "tab separated spaces"),
    ("A bathroom with a toilet, sink, and shower.", "a bathroom with a toilet sink and shower"),
    ("There's a cat, isn't there? Yes it is.", "there 's a cat is n't there yes it is"),
    ("people's bikes and the kids' toys at 3:00 p.m.", "people 's bikes and the kids toys at 3:00 p.m."),
]  # fmt: skip


@pytest.mark.parametrize(("caption", "expected"), JAVA_PTB_OUTPUTS)
def test_python_tokenizer_matches_java_ptb(caption, expected):
    assert ptb_tokenize(caption) == expected


def test_auto_tokenizer_without_java_is_python(monkeypatch):
    monkeypatch.setattr(text_metrics.shutil, "which", lambda name: None)
    assert resolve_tokenizer("auto") == "python"
    with pytest.raises(ValueError, match="java on the PATH"):
        resolve_tokenizer("ptb-java")
    monkeypatch.setattr(text_metrics.shutil, "which", lambda name: "/usr/bin/java")
    assert resolve_tokenizer("auto") == "ptb-java"
    with pytest.raises(ValueError, match="unknown caption tokenizer"):
        resolve_tokenizer("spacy")


# ------------------------------------------------------------------------------------------------------------------
# BLEU-4 and CIDEr-D

BLEU_REFERENCES = {
    "A": ["A cat sits on a mat.", "The cat is on the mat."],
    "B": ["A dog runs fast.", "The dog is running."],
}
BLEU_PREDICTIONS = {"A": "a cat sits on the mat", "B": "A dog runs"}


def test_bleu_hand_computed():
    # A: hypothesis "a cat sits on the mat" (6 words), clipped matches per n = 6/6, 5/5, 3/4 ("sits on the" is in
    #    neither reference), 1/3 (only "a cat sits on"); closest reference length 6.
    # B: "a dog runs" (3 words): 3/3, 2/2, 1/1, 0/0; closest reference length 4 (both are 4).
    # Corpus: matches [9, 7, 4, 1] of [9, 7, 5, 3]; length 9 against 10 -> brevity penalty exp(1 - 10/9).
    brevity = math.exp(1 - 10 / 9)
    expected = {
        "BLEU_1": brevity,
        "BLEU_2": brevity * (1 * 1) ** (1 / 2),
        "BLEU_3": brevity * (1 * 1 * 4 / 5) ** (1 / 3),
        "BLEU_4": brevity * (1 * 1 * 4 / 5 * 1 / 3) ** (1 / 4),
    }
    scores = caption_scores(BLEU_REFERENCES, BLEU_PREDICTIONS, "python")
    for name, value in expected.items():
        assert scores[name] == pytest.approx(100 * value, rel=1e-7), name


CIDER_REFERENCES = {"A": ["A red cat."], "B": ["A blue dog."]}
ONE_OVER_SQRT2 = 2**-0.5


@pytest.mark.parametrize(
    ("hypothesis_b", "score_b"),
    [
        # "a blue cat" vs "a blue dog": 1-grams: "a" has df 2 -> idf log(2/2) = 0; blue, cat, dog: idf log 2 (cat: df 1
        # from image A). Clipped dot = blue only = l^2 over norms (sqrt(2) l)^2 -> 1/2. 2-grams: "a blue" matches of
        # {"a blue", "blue cat"} vs {"a blue", "blue dog"} -> 1/2. 3-grams: none. Same length.
        # Mean over n=1..4 of [1/2, 1/2, 0, 0] x 10 = 2.5
        ("a blue cat", 2.5),
        # "blue dog" vs "a blue dog": 1-grams {blue, dog} vs {a (weight 0), blue, dog} -> 2 l^2 / (sqrt2 l)^2 = 1;
        # 2-grams {"blue dog"} vs {"a blue", "blue dog"} -> l^2 / (l * sqrt2 l) = 1/sqrt2; 3-grams: none.
        # Length (the code counts bigrams) 1 vs 2 -> Gaussian penalty exp(-1 / (2 * 6^2)).
        ("blue dog", 10 * (1 + ONE_OVER_SQRT2) / 4 * math.exp(-1 / 72)),
    ],
)
def test_cider_hand_computed(hypothesis_b, score_b):
    # Image A: "a red cat" vs itself: every n-gram vector equal and non-zero for n = 1, 2, 3 (cosine 1), none for n = 4
    # -> mean [1, 1, 1, 0] x 10 = 7.5. CIDEr = mean over the 2 images, x100.
    scores = caption_scores(CIDER_REFERENCES, {"A": "a red cat", "B": hypothesis_b}, "python")
    assert scores["CIDEr"] == pytest.approx(100 * (7.5 + score_b) / 2, rel=1e-9)


def test_caption_scores_bad_input():
    with pytest.raises(ValueError, match="same keys"):
        caption_scores({"A": ["x"]}, {"B": "x"}, "python")
    with pytest.raises(ValueError, match="without reference captions"):
        caption_scores({"A": []}, {"A": "x"}, "python")
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_accuracy("yes", [])
