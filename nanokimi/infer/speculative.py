"""Speculative decoding for the engine: drafters that propose continuations from tokens already seen, and
the rule that accepts a draft so that the output keeps the model's distribution.

A running sequence whose last token is x and whose drafter proposes d_1..d_k runs the k+1 tokens
[x, d_1, .., d_k] in one forward; the logits at position i give p_i, the model's distribution of the token
after d_i (after x for i = 0). The drafts are deterministic (q_i is a point mass on d_i), so the standard
rejection rule "accept d_i with probability min(1, p_i(d_i) / q_i(d_i)), on rejection sample from
norm(max(0, p_i - q_i))" becomes: accept d_i with probability p_i(d_i); on rejection sample from p_i with
d_i removed and renormalised; when every draft is accepted, sample one more token from p_k. Each emitted
token then has exactly the distribution p of plain sampling: P(emit t) = p(d) [t = d] + (1 - p(d)) *
p(t) [t != d] / (1 - p(d)) = p(t). Greedy (temperature 0) accepts d_i while it equals argmax p_i and then
emits that argmax, so it emits the very tokens plain greedy decoding emits. p is the filtered distribution
that plain sampling draws from (temperature, top-k, top-p); all draws use the sequence's own random stream.

Drafters:
- "ngram" (prompt lookup): the longest recent n-gram of the sequence's own tokens (prompt and output) that
  ends the sequence and occurred before; the draft is what followed it.
- "suffix" (Seer's grouped drafting): the same match over every sequence of the group (the n samples of a
  request, and requests sharing SamplingParams.group_id) and their prompt; where several continuations
  match, the draft follows the one most of them agree on, token by token (a suffix tree's branch counts).
The draft length adapts per sequence: it follows the moving average of accepted lengths (one more than
that, capped at num_speculative_tokens).
"""
import math
from collections import deque

import torch

MAX_NGRAM = 4  # the longest suffix matched
MIN_NGRAM = 2  # shorter matches propose nothing (one token of context drafts mostly noise)
ENTRIES_PER_KEY = 32  # continuations remembered per n-gram (the most recent)


class NgramIndex:
    """n-grams (MAX_NGRAM down to MIN_NGRAM tokens) of some token lists -> where they occurred: (list, the
    index after the n-gram). Lists are held by reference, so a list that grows extends its continuations."""

    def __init__(self):
        self.entries: dict[tuple, deque] = {}

    def add(self, tokens: list[int], start: int, end: int) -> None:
        """Index the n-grams of `tokens` that end at positions start..end-1."""
        for p in range(start, end):
            for n in range(MIN_NGRAM, MAX_NGRAM + 1):
                if p - n + 1 < 0:
                    break
                key = tuple(tokens[p - n + 1:p + 1])
                bucket = self.entries.get(key)
                if bucket is None:
                    bucket = self.entries[key] = deque(maxlen=ENTRIES_PER_KEY)
                bucket.append((tokens, p + 1))

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the longest indexed n-gram ending `tokens`: token by token the
        continuation most matches agree on (the most recent wins a tie)."""
        for n in range(min(MAX_NGRAM, len(tokens)), MIN_NGRAM - 1, -1):
            bucket = self.entries.get(tuple(tokens[-n:]))
            if not bucket:
                continue
            candidates = [(toks, pos) for toks, pos in bucket if pos < len(toks) and not
                          (toks is tokens and pos >= len(tokens))]
            draft = []
            while candidates and len(draft) < limit:
                i = len(draft)
                votes: dict[int, int] = {}
                for toks, pos in candidates:
                    if pos + i < len(toks):
                        t = toks[pos + i]
                        votes[t] = votes.get(t, 0) + 1
                if not votes:
                    break
                best = max(votes, key=votes.get)  # dicts keep insertion order: ties go to the first seen
                draft.append(best)
                candidates = [(toks, pos) for toks, pos in candidates if pos + i < len(toks) and toks[pos + i] == best]
            if draft:
                return draft
        return []


class Drafter:
    """Proposes drafts for running sequences. scope "sequence" (ngram: the sequence's own tokens) or
    "group" (suffix: all sequences of its group). The engine calls `track` when a sequence is added,
    `propose` before a decode step, `observe` after tokens were appended and `release` when it finishes."""

    def __init__(self, scope: str):
        if scope not in ("sequence", "group"):
            raise ValueError(f"Drafter scope must be 'sequence' or 'group', got {scope!r}.")
        self.scope = scope
        self.indexes: dict = {}  # key -> (NgramIndex, live sequences, prompts indexed)
        self.indexed: dict[int, int] = {}  # id(sequence) -> tokens indexed so far

    def _key(self, seq):
        if self.scope == "sequence":
            return id(seq)
        return ("group", seq.request.params.group_id) if seq.request.params.group_id is not None else \
            ("request", seq.request.request_id)

    def track(self, seq) -> None:
        key = self._key(seq)
        index, live, prompts = self.indexes.setdefault(key, (NgramIndex(), set(), set()))
        live.add(id(seq))
        prompt = tuple(seq.tokens[:seq.num_prompt])
        if prompt in prompts:  # a sibling indexed this prompt already: index only what this one generates
            self.indexed[id(seq)] = seq.num_prompt
        else:
            prompts.add(prompt)
            index.add(seq.tokens, 0, seq.num_prompt)
            self.indexed[id(seq)] = seq.num_prompt

    def observe(self, seq) -> None:
        index = self.indexes[self._key(seq)][0]
        start = self.indexed[id(seq)]
        index.add(seq.tokens, start, len(seq.tokens))
        self.indexed[id(seq)] = len(seq.tokens)

    def propose(self, seq, limit: int) -> list[int]:
        if limit <= 0:
            return []
        return self.indexes[self._key(seq)][0].propose(seq.tokens, limit)

    def release(self, seq) -> None:
        key = self._key(seq)
        entry = self.indexes.get(key)
        self.indexed.pop(id(seq), None)
        if entry is not None:
            entry[1].discard(id(seq))
            if not entry[1]:
                del self.indexes[key]


def make_drafter(speculative) -> Drafter | None:
    """None, "ngram", "suffix", or an object with Drafter's methods (tests pass their own)."""
    if speculative is None:
        return None
    if speculative == "ngram":
        return Drafter("sequence")
    if speculative == "suffix":
        return Drafter("group")
    if isinstance(speculative, str):
        raise ValueError(f"speculative must be None, 'ngram' or 'suffix', got {speculative!r}.")
    return speculative


def next_draft_length(ema: float | None, maximum: int) -> int:
    """The draft length after a moving average `ema` of accepted draft tokens (None: nothing measured yet)."""
    if ema is None:
        return maximum
    return max(1, min(maximum, math.floor(ema) + 1))


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [T, V] -> the distribution plain sampling draws from [T, V] (float64): softmax(logits / t)
    restricted to the top_k tokens and to the smallest most likely set reaching top_p (as sample_rows)."""
    scaled = logits.double() / temperature
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(scaled.shape[-1], device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(rank >= (top_k or scaled.shape[-1]), float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    sorted_logits = sorted_logits.masked_fill((mass_before >= top_p) & (rank > 0), float("-inf"))
    return torch.zeros_like(scaled).scatter(1, order, sorted_logits.softmax(-1))


def _draw(probs: torch.Tensor, u: float) -> int:
    """Inverse CDF draw from probs [V] with the uniform u in [0, 1)."""
    cdf = probs.cumsum(0)
    index = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype, device=cdf.device),
                                   right=True)[0])
    return min(index, probs.shape[0] - 1)


def accept_draft(logits: torch.Tensor, draft: list[int], temperature: float, top_k: int, top_p: float,
                 rng) -> list[int]:
    """The tokens a verified draft emits: the accepted drafts, then one token sampled by the rule (the
    module docstring). logits [len(draft) + 1, V]; rng: the sequence's random.Random. 1..len(draft)+1 tokens."""
    if temperature == 0:
        return accept_greedy(logits.argmax(dim=-1).tolist(), draft)
    return accept_sampled(filtered_probs(logits, temperature, top_k, top_p).cpu(), draft, rng)


def accept_greedy(best: list[int], draft: list[int]) -> list[int]:
    """Greedy: the drafts while each equals the argmax `best[i]` at its place, then the argmax after them."""
    out = []
    for i, d in enumerate(draft):
        if best[i] != d:
            break
        out.append(d)
    out.append(best[len(out)])
    return out


def accept_sampled(probs: torch.Tensor, draft: list[int], rng) -> list[int]:
    """Sampling: probs [len(draft) + 1, V] (filtered_probs, on the CPU); the rule of the module docstring."""
    out = []
    for i, d in enumerate(draft):
        if rng.random() < float(probs[i, d]):
            out.append(d)
            continue
        residual = probs[i].clone()
        residual[d] = 0.0
        out.append(_draw(residual, rng.random()))
        return out
    out.append(_draw(probs[len(draft)], rng.random()))
    return out
