"""Text metrics of the captioning and VQA benchmarks.

**VQA accuracy** follows the official evaluation code (GT-Vision-Lab ``vqaEval.py``, which MM-Interleaved ships for
VQAv2 / OK-VQA / TextVQA; the VizWiz variant for VizWiz): an answer scores ``min(#humans who gave it / 3, 1)``
averaged over the 10 leave-one-out subsets of the 10 human answers, i.e. for each human answer left out, the matches
among the other nine. Before matching, answers are normalised (:func:`normalize_answer`: punctuation, number words to
digits, articles dropped, contractions restored). Two quirks of the official code are kept on purpose, because the
published numbers depend on them:

- VQAv2 toolkit (:func:`vqa_accuracy`): answers are normalised only when the humans disagree (all ten the same:
  exact match after trimming whitespace);
- VizWiz toolkit (:func:`vizwiz_accuracy`): the prediction is always normalised, the human answers never.

MM-Interleaved first cuts the generated text down to a short answer (:func:`extract_short_answer`, the official
``extract_answer``: first line / sentence / clause, lower case, the words after "is"/"are"/"a"/"an"/"the" ...).

**Captions**: BLEU-4 and CIDEr (CIDEr-D as in the COCO caption toolkit: sigma 6, clipped tf-idf n-gram vectors)
from pycocoevalcap's own scorers, on captions tokenised by the Stanford PTB tokenizer of pycocoevalcap when ``java``
is on the PATH, otherwise by :func:`ptb_tokenize`, a pure-Python tokenizer that mimics it (lower case, punctuation
tokens removed, clitics such as ``n't`` / ``'s`` split off, brackets written ``-lrb-`` ... as the Java tokenizer
writes them after lower-casing); the report names the tokenizer used. Scores are given x100, as in papers.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

# ----------------------------------------------------------------------------------------------------------------
# VQA answers

# fmt: off
CONTRACTIONS = {  # the official table, oddities included ("somebody'd" -> "somebodyd"; capitalised keys never match)
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
# fmt: on
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The official pattern is written "(?!<=\d)(\.)(?!\d)" (a typo for a look-behind): it removes every period that is not
# followed by a digit, which is what this does.
_PERIOD = re.compile(r"\.(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"\d,\d")
HUMANS_PER_MATCH = 3  # an answer given by 3 of the other humans is fully right


def _trim(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Official punctuation rule: a mark next to a space (or any mark, when the text has a digit,digit comma) is
    deleted, otherwise replaced by a space; then periods not followed by a digit are deleted."""
    glue = _COMMA_IN_NUMBER.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        out = out.replace(mark, "" if glue or f"{mark} " in text or f" {mark}" in text else " ")
    return _PERIOD.sub("", out)


def process_digits_articles(text: str) -> str:
    """Lower case, number words to digits, articles dropped, contractions restored, single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(text: str) -> str:
    """The official answer normalisation (whitespace, punctuation, digits / articles / contractions)."""
    return process_digits_articles(process_punctuation(_trim(text)))


def _leave_one_out(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the human answers left out of min(1, #other humans who gave ``prediction`` / 3)."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    matches = sum(answer == prediction for answer in answers)
    scores = [min(1.0, (matches - (answer == prediction)) / HUMANS_PER_MATCH) for answer in answers]
    return sum(scores) / len(scores)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one answer against the human ``answers`` (VQAv2 toolkit: normalised only when the
    humans disagree)."""
    prediction, answers = _trim(prediction), [_trim(a) for a in answers]
    if len(set(answers)) > 1:
        prediction, answers = normalize_answer(prediction), [normalize_answer(a) for a in answers]
    return _leave_one_out(prediction, answers)


def vizwiz_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one answer against the human ``answers`` (VizWiz toolkit: the prediction normalised,
    the human answers compared as they are)."""
    return _leave_one_out(normalize_answer(prediction), list(answers))


def extract_short_answer(response: str) -> str:
    """MM-Interleaved's answer extraction (``vqa_score.extract_answer``) applied before scoring: drop double quotes,
    keep the first line / sentence / clause in lower case, then cut the text at the first "is ", "are ", "a ", "an ",
    "the " (keeping what follows up to the next one), before " of", " or " and " and "."""
    text = response.replace('"', "").strip()
    for separator in ("\n", ".", ",", "!"):
        text = text.split(separator)[0]
    text = text.lower()
    for word in ("is ", "are ", "a ", "an ", "the "):
        if word in text:
            text = text.split(word)[1]
    for word in (" of", " or ", " and "):
        if word in text:
            text = text.split(word)[0]
    return text.strip()


# ----------------------------------------------------------------------------------------------------------------
# Caption tokenisation

# pycocoevalcap's list of removed tokens; the bracket tokens arrive lower-cased (-lrb-), so they are never removed
PTB_REMOVED = frozenset(
    {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "wanna": ("wan", "na"), "gotta": ("got", "ta")}
_CLITICS = ("n't", "'s", "'m", "'d", "'ll", "'re", "'ve")
_CLITIC = re.compile(rf"^(.+?)({'|'.join(_CLITICS)})$")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs etc inc co ltd mt ft ave no jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_TRAILING = re.compile(r"(\.\.\.|[?!]+|[.,;:'`]|--)$")
_LEADING = re.compile(r"^(['`]+|\$)(?=.)")
_ACRONYM = re.compile(r"^([a-z]\.)+$")


def _split_trailing(word: str) -> list[str]:
    """Peel punctuation off the end of a word (a period stays on abbreviations and acronyms such as ``u.s.``)."""
    tail: list[str] = []
    while len(word) > 1:
        if word.endswith(".") and not word.endswith("...") and (_ACRONYM.match(word) or word[:-1] in _ABBREVIATIONS):
            break
        if word.endswith("%") and word[-2].isdigit():
            match_text = "%"
        elif (match := _TRAILING.search(word)) is not None and match.start() > 0:
            match_text = match.group(0)
        else:
            break
        tail.insert(0, match_text)
        word = word[: -len(match_text)]
    return [word, *tail]


def _split_clitics(word: str) -> list[str]:
    if word in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[word])
    match = _CLITIC.match(word)
    return [match.group(1), match.group(2)] if match else [word]


def _tokenize_word(word: str) -> list[str]:
    head: list[str] = []
    while word not in _CLITICS and (match := _LEADING.match(word)) is not None:
        head.append(match.group(1))
        word = word[match.end() :]
    body, *tail = _split_trailing(word)
    return [*head, *_split_clitics(body), *tail]


def ptb_tokenize(caption: str) -> str:
    """Pure-Python stand-in for pycocoevalcap's Java PTB tokenizer: its tokens (lower case), joined by spaces, with
    pycocoevalcap's punctuation tokens removed."""
    text = caption.replace("\n", " ").replace('"', " ").lower()
    for bracket, token in _BRACKETS.items():
        text = text.replace(bracket, f" {token} ")
    tokens = [token for word in text.split() for token in _tokenize_word(word)]
    return " ".join(token for token in tokens if token not in PTB_REMOVED)


TOKENIZERS = ("auto", "ptb-java", "python")


def resolve_tokenizer(name: str) -> str:
    """``auto`` -> ``ptb-java`` when ``java`` is on the PATH, else ``python``."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown caption tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")
    if name == "auto":
        return "ptb-java" if shutil.which("java") else "python"
    if name == "ptb-java" and not shutil.which("java"):
        raise ValueError("the ptb-java caption tokenizer needs java on the PATH; install a JRE or use python")
    return name


def tokenize_captions(captions: Mapping[str, Sequence[str]], tokenizer: str) -> dict[str, list[str]]:
    """Tokenise every caption (``{key: [caption, ...]}``) with ``ptb-java`` or ``python``."""
    if tokenizer == "python":
        return {key: [ptb_tokenize(c) for c in texts] for key, texts in captions.items()}
    if tokenizer != "ptb-java":
        raise ValueError(f"tokenize_captions takes ptb-java or python, got {tokenizer!r}")
    ptb = _import_pycocoevalcap("tokenizer.ptbtokenizer").PTBTokenizer()
    try:  # it writes a temporary file next to its jar, inside the installed package
        tokenized = ptb.tokenize({key: [{"caption": c} for c in texts] for key, texts in captions.items()})
    except OSError as err:
        raise ValueError(f"the Java PTB tokenizer failed ({err}); use --caption-tokenizer python") from err
    if any(len(tokenized.get(key, [])) != len(texts) for key, texts in captions.items()):
        raise ValueError("the Java PTB tokenizer lost captions; use --caption-tokenizer python")
    return {key: list(tokenized[key]) for key in captions}


def _import_pycocoevalcap(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(f"pycocoevalcap.{module}")
    except ImportError as err:
        raise ValueError(
            "caption scores need pycocoevalcap: pip install 'comfy_mm_interleaved[eval]' (or pycocoevalcap==1.2)"
        ) from err


def caption_scores(
    references: Mapping[str, Sequence[str]], predictions: Mapping[str, str], tokenizer: str
) -> dict[str, float]:
    """Corpus BLEU-1..4 and CIDEr (x100) of one predicted caption per key against that key's reference captions,
    both tokenised by ``tokenizer`` (``ptb-java`` or ``python``). Keys must match; at least one reference each."""
    if set(references) != set(predictions):
        raise ValueError("caption_scores needs the same keys in references and predictions")
    empty = [key for key, texts in references.items() if not texts]
    if empty:
        raise ValueError(f"images without reference captions: {empty[:5]}")
    if not predictions:
        return {}
    keys = sorted(references)
    everything = {**{f"r{k}": list(references[k]) for k in keys}, **{f"p{k}": [predictions[k]] for k in keys}}
    both = tokenize_captions(everything, tokenizer)  # one tokenizer run for all captions
    gts = {k: both[f"r{k}"] for k in keys}
    res = {k: both[f"p{k}"] for k in keys}
    bleu, _ = _import_pycocoevalcap("bleu.bleu").Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = _import_pycocoevalcap("cider.cider").Cider().compute_score(gts, res)
    scores = {f"BLEU_{n}": 100.0 * float(value) for n, value in enumerate(bleu, start=1)}
    scores["CIDEr"] = 100.0 * float(cider)
    return scores
