"""Token selection: logits processors (HF semantics), greedy / seeded sampling, beam search.

The decoders here know nothing about the model: they get the logits of the first new token and an ``advance``
function that feeds one token per sequence and returns the next logits, so they are tested on hand-made tables.

    advance(tokens [B], origin [B] | None) -> logits [B, V]

``origin[b]`` is the row of the previous batch that sequence b continues (beam search reorders and expands its
beams; ``None`` for a single sequence).

Processing order, as HF ``generate``: repetition penalty, forbidden tokens (always banned ids, end tokens before
``min_new_tokens``), then for sampling temperature, top-k and top-p. Beam search applies the processors to the
log-softmax scores, as HF does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .options import TextOptions

Advance = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
StepHook = Callable[[int, int], None]  # (step, total), called once per chosen token / beam step


@dataclass(frozen=True)
class TokenRules:
    """``stop_ids`` end a sequence (and are not part of it); they are forbidden for the first ``min_new_tokens``
    tokens. ``banned_ids`` are never generated."""

    stop_ids: tuple[int, ...]
    banned_ids: tuple[int, ...] = ()


@dataclass
class Decoded:
    tokens: list[int]  # generated ids, stop token excluded
    stop_id: int | None  # the end token that ended the sequence, None when the token budget ran out


# ----------------------------------------------------------------------------------------------------------------
# Logits processors (each takes and returns float scores [B, V])


def repetition_penalty(scores: torch.Tensor, history: Sequence[Sequence[int]], penalty: float) -> torch.Tensor:
    """HF ``RepetitionPenaltyLogitsProcessor``: every token of row b's history gets score / penalty if the score
    is positive, score * penalty otherwise (once per distinct token)."""
    if penalty == 1.0 or not any(history):
        return scores
    scores = scores.clone()
    for row, ids in enumerate(history):
        if not ids:
            continue
        index = torch.tensor(sorted(set(ids)), device=scores.device)
        picked = scores[row, index]
        scores[row, index] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores


def forbid(scores: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    if not token_ids:
        return scores
    return scores.index_fill(-1, torch.tensor(list(token_ids), device=scores.device), float("-inf"))


def temperature_scale(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    return scores if temperature == 1.0 else scores / temperature


def top_k_filter(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` best scores of each row (ties with the k-th are kept, as HF); 0 = off."""
    if top_k <= 0 or top_k >= scores.shape[-1]:
        return scores
    kth = scores.topk(top_k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """HF nucleus filter: drop the lowest-probability tokens whose cumulative probability is <= 1 - top_p
    (the most likely token always stays); 1 = off."""
    if top_p >= 1.0:
        return scores
    sorted_scores, order = scores.sort(dim=-1)  # ascending
    cumulative = sorted_scores.softmax(-1).cumsum(-1)
    remove_sorted = cumulative <= 1 - top_p
    remove_sorted[..., -1] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def process(
    scores: torch.Tensor, history: Sequence[Sequence[int]], step: int, options: TextOptions, rules: TokenRules
) -> torch.Tensor:
    """Penalty and forbidden tokens for the token at index ``step`` (0-based) of every row."""
    scores = repetition_penalty(scores, history, options.repetition_penalty)
    scores = forbid(scores, rules.banned_ids)
    if step < options.min_new_tokens:
        scores = forbid(scores, rules.stop_ids)
    return scores


def warp(scores: torch.Tensor, options: TextOptions) -> torch.Tensor:
    """Sampling warpers: temperature, top-k, top-p."""
    return top_p_filter(top_k_filter(temperature_scale(scores, options.temperature), options.top_k), options.top_p)


# ----------------------------------------------------------------------------------------------------------------
# Decoding


def decode(
    first_logits: torch.Tensor,
    advance: Advance,
    options: TextOptions,
    rules: TokenRules,
    max_new_tokens: int,
    on_step: StepHook | None = None,
) -> Decoded:
    """Generate up to ``max_new_tokens`` tokens after a prompt whose next-token logits are ``first_logits`` [1, V].

    Greedy, seeded sampling or beam search, per ``options``. The last chosen token is never fed to ``advance``.
    """
    if first_logits.dim() != 2 or first_logits.shape[0] != 1:
        raise ValueError(f"first_logits must be [1, vocab], got {tuple(first_logits.shape)}")
    if options.num_beams > 1:
        return beam_search(first_logits, advance, options, rules, max_new_tokens, on_step)
    generator = None
    if options.do_sample:
        generator = torch.Generator(device=first_logits.device).manual_seed(options.seed)
    tokens: list[int] = []
    logits = first_logits
    for step in range(max_new_tokens):
        scores = process(logits.float(), [tokens], step, options, rules)
        if generator is not None:
            probs = warp(scores, options).softmax(-1)
            token = int(torch.multinomial(probs, 1, generator=generator)[0, 0])
        else:
            token = int(scores[0].argmax())
        if on_step is not None:
            on_step(step + 1, max_new_tokens)
        if token in rules.stop_ids:
            return Decoded(tokens, token)
        tokens.append(token)
        if step + 1 < max_new_tokens:
            logits = advance(torch.tensor([token], device=logits.device), None)
    return Decoded(tokens, None)


@dataclass
class _Hypothesis:
    score: float  # sum of log-probabilities / length ** length_penalty
    tokens: list[int]
    stop_id: int | None


class _Finished:
    """The best ``num_beams`` finished hypotheses (HF ``BeamHypotheses``)."""

    def __init__(self, num_beams: int, length_penalty: float) -> None:
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.items: list[_Hypothesis] = []

    def score(self, sum_logprobs: float, length: int) -> float:
        return sum_logprobs / length**self.length_penalty

    def add(self, tokens: list[int], sum_logprobs: float, stop_id: int | None) -> None:
        # HF's length is that of its input ids: a placeholder <s> plus the generated tokens (stop token excluded)
        hyp = _Hypothesis(self.score(sum_logprobs, 1 + len(tokens)), tokens, stop_id)
        if len(self.items) < self.num_beams:
            self.items.append(hyp)
        elif hyp.score > min(h.score for h in self.items):
            self.items.remove(min(self.items, key=lambda h: h.score))
            self.items.append(hyp)

    def is_done(self, best_running_sum: float, cur_len: int) -> bool:
        """HF ``early_stopping=False``: no running beam can beat the worst kept hypothesis any more."""
        if len(self.items) < self.num_beams:
            return False
        return min(h.score for h in self.items) >= self.score(best_running_sum, cur_len)


def beam_search(
    first_logits: torch.Tensor,
    advance: Advance,
    options: TextOptions,
    rules: TokenRules,
    max_new_tokens: int,
    on_step: StepHook | None = None,
) -> Decoded:
    """HF beam search (``early_stopping=False``): ``num_beams`` beams; each step keeps the best
    ``max(2, 1 + #stop ids) * num_beams`` candidates, a stop token among the top ``num_beams`` finishes a
    hypothesis; at the end the running beams join the finished ones and the best normalised score wins."""
    beams = options.num_beams
    finished = _Finished(beams, options.length_penalty)
    histories: list[list[int]] = [[]]
    beam_scores = torch.zeros(1, device=first_logits.device, dtype=torch.float32)
    logits = first_logits
    n_candidates = max(2, 1 + len(rules.stop_ids)) * beams
    done = False
    for step in range(max_new_tokens):
        logprobs = process(logits.float().log_softmax(-1), histories, step, options, rules)
        candidates = (beam_scores[:, None] + logprobs).flatten()
        top_scores, top_index = candidates.topk(min(n_candidates, candidates.numel()))
        vocab = logprobs.shape[-1]
        chosen: list[tuple[int, int, float]] = []  # (origin beam, token, sum of log-probs)
        for rank, (score, index) in enumerate(zip(top_scores.tolist(), top_index.tolist())):
            origin, token = divmod(index, vocab)
            if score == float("-inf"):
                break
            if token in rules.stop_ids:
                if rank < beams:
                    finished.add(list(histories[origin]), score, token)
                continue
            chosen.append((origin, token, score))
            if len(chosen) == beams:
                break
        if on_step is not None:
            on_step(step + 1, max_new_tokens)
        if not chosen or finished.is_done(float(top_scores[0]), 1 + step):
            done = True
            break
        histories = [histories[origin] + [token] for origin, token, _ in chosen]
        beam_scores = torch.tensor([s for _, _, s in chosen], device=logits.device)
        if step + 1 < max_new_tokens:
            origins = torch.tensor([o for o, _, _ in chosen], device=logits.device)
            logits = advance(torch.tensor([t for _, t, _ in chosen], device=logits.device), origins)
    if not done or not finished.items:  # budget exhausted: the running beams compete too
        for history, score in zip(histories, beam_scores.tolist()):
            finished.add(list(history), score, None)
    best = max(finished.items, key=lambda h: h.score)
    return Decoded(best.tokens, best.stop_id)
