"""Token selection on hand-made tables: processors (hand values and transformers' own processors), greedy,
seeded sampling, beam search (hand-checked case; one beam = greedy)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from comfy_mm_interleaved.inference.options import TextOptions
from comfy_mm_interleaved.inference.sampling import (
    TokenRules,
    beam_search,
    decode,
    repetition_penalty,
    temperature_scale,
    top_k_filter,
    top_p_filter,
)

INF = float("-inf")


def markov(table: dict[int | None, list[float]]):
    """(first logits [1, V], advance): the next-token probabilities depend on the last token only."""
    log = {k: torch.tensor(v).log() for k, v in table.items()}
    fed: list[list[int]] = [[]]

    def advance(tokens: torch.Tensor, origin: torch.Tensor | None) -> torch.Tensor:
        rows = [0] * len(tokens) if origin is None else origin.tolist()
        fed[:] = [fed[r] + [int(t)] for r, t in zip(rows, tokens)]
        return torch.stack([log[int(t)] for t in tokens])

    return log[None][None], advance, fed


# a hand-checkable beam case: 0 = end token, 1 = A, 2 = B
STOP, A, B = 0, 1, 2
STORY = {None: [0.0, 0.6, 0.4], A: [0.25, 0.45, 0.3], B: [0.9, 0.05, 0.05]}
RULES = TokenRules(stop_ids=(STOP,))


# ------------------------------------------------------------------------------------------------------------
def test_repetition_penalty_hand_values() -> None:
    scores = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = repetition_penalty(scores, [[0, 1, 1]], 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]  # positive / 2, negative * 2, once per distinct token
    assert repetition_penalty(scores, [[0]], 1.0) is scores


def test_filters_hand_values() -> None:
    assert top_k_filter(torch.tensor([[1.0, 3.0, 2.0, 3.0]]), 2).tolist() == [[INF, 3.0, INF, 3.0]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    # ascending cumulative probabilities 0.05, 0.2, 0.5, 1.0: top_p 0.7 drops those <= 0.3
    kept = top_p_filter(probs.log(), 0.7)
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(probs.log(), 0.01)).tolist() == [[True, False, False, False]]
    assert temperature_scale(torch.tensor([[2.0, -4.0]]), 2.0).tolist() == [[1.0, -2.0]]


@pytest.mark.parametrize("seed", [0, 1])
def test_processors_match_transformers(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(3, 40, generator=generator) * 3
    history = torch.randint(0, 40, (3, 7), generator=generator)
    ours = repetition_penalty(scores, history.tolist(), 1.3)
    assert torch.equal(ours, RepetitionPenaltyLogitsProcessor(1.3)(history, scores.clone()))
    assert torch.equal(top_k_filter(scores, 5), TopKLogitsWarper(5)(history, scores.clone()))
    assert torch.equal(top_p_filter(scores, 0.8), TopPLogitsWarper(0.8)(history, scores.clone()))
    assert torch.equal(temperature_scale(scores, 0.7), TemperatureLogitsWarper(0.7)(history, scores.clone()))


# ------------------------------------------------------------------------------------------------------------
def test_greedy_follows_the_argmax_and_stops() -> None:
    first, advance, _ = markov(STORY)
    # argmax: A (0.6), then A (0.45), A, ... never the end token
    assert decode(first, advance, TextOptions(), RULES, 3).tokens == [A, A, A]
    # B is followed by the end token: forced first token B via a ban on A
    first, advance, _ = markov(STORY)
    out = decode(first, advance, TextOptions(), TokenRules((STOP,), banned_ids=(A,)), 5)
    assert (out.tokens, out.stop_id) == ([B], STOP)


def test_min_new_tokens_delays_the_end_token() -> None:
    first, advance, _ = markov(STORY)
    out = decode(first, advance, TextOptions(min_new_tokens=2), TokenRules((STOP,), banned_ids=(A,)), 5)
    # after B: end token forbidden at index 1, so B (0.05 ties with A, banned) follows, then the end token
    assert (out.tokens, out.stop_id) == ([B, B], STOP)


def test_repetition_penalty_changes_greedy_choice() -> None:
    first, advance, _ = markov(STORY)
    # A again would have logit log .45; penalised x1.6: log(.45)*1.6 = -1.278 < log .3 = -1.204, so B wins
    out = decode(first, advance, TextOptions(repetition_penalty=1.6), RULES, 2)
    assert out.tokens == [A, B]


def test_sampling_is_reproducible_per_seed() -> None:
    generator = torch.Generator().manual_seed(3)
    table = {None: torch.rand(30, generator=generator).tolist()}
    table.update({t: torch.rand(30, generator=generator).tolist() for t in range(30)})
    rules = TokenRules(stop_ids=(0,))

    def run(seed: int) -> list[int]:
        first, advance, _ = markov(table)
        options = TextOptions(do_sample=True, seed=seed, temperature=1.3, top_k=20, top_p=0.95, min_new_tokens=30)
        return decode(first, advance, options, rules, 30).tokens

    assert run(7) == run(7)
    assert run(7) != run(8)
    first, advance, _ = markov(table)
    greedy = decode(first, advance, TextOptions(min_new_tokens=30), rules, 30).tokens
    assert run(7) != greedy


# ------------------------------------------------------------------------------------------------------------
def test_beam_search_hand_checked_case() -> None:
    """Greedy writes A A A (probability .6 * .45 * .45 = .1215, HF score log(.1215) / 4 = -0.527); two beams also
    find "B <end>" (.4 * .9 = .36, score log(.36) / 2 = -0.511), which wins."""
    first, advance, fed = markov(STORY)
    out = beam_search(first, advance, TextOptions(num_beams=2), RULES, 3)
    assert (out.tokens, out.stop_id) == ([B], STOP)
    assert math.log(0.36) / 2 > math.log(0.6 * 0.45 * 0.45) / 4
    assert len(fed) == 2  # two beams were advanced
    # with one token allowed, the running beams compete: A (log .6 / 2) beats B (log .4 / 2)
    first, advance, _ = markov(STORY)
    out = beam_search(first, advance, TextOptions(num_beams=2), RULES, 1)
    assert (out.tokens, out.stop_id) == ([A], None)


def test_one_beam_is_greedy() -> None:
    generator = torch.Generator().manual_seed(5)
    table = {None: torch.rand(12, generator=generator).tolist()}
    table.update({t: torch.rand(12, generator=generator).tolist() for t in range(12)})
    options = TextOptions(min_new_tokens=8)
    first, advance, _ = markov(table)
    greedy = decode(first, advance, options, TokenRules((0,)), 8)
    first, advance, _ = markov(table)
    beam = beam_search(first, advance, TextOptions(min_new_tokens=8, num_beams=1), TokenRules((0,)), 8)
    assert beam.tokens == greedy.tokens and len(greedy.tokens) == 8


def test_invalid_text_options_are_refused() -> None:
    bad = [
        dict(max_new_tokens=0),
        dict(temperature=0.0),
        dict(top_p=0.0),
        dict(top_k=-1),
        dict(repetition_penalty=0.0),
        dict(num_beams=0),
        dict(num_beams=2, do_sample=True),
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            TextOptions(**kwargs).validate()
    with pytest.raises(ValueError, match=r"min_new_tokens \(9\) is larger than max_new_tokens \(8\)"):
        TextOptions(max_new_tokens=8, min_new_tokens=9).validate()
    TextOptions(max_new_tokens=8, min_new_tokens=8).validate()  # equal: exactly 8 tokens
