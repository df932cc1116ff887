"""Speculative decoding for the engine: drafters that propose continuations from tokens already seen, and
the rule that accepts a draft so that the output keeps the model's distribution.

A running sequence whose last token is x and whose drafter proposes d_1..d_k runs the k+1 tokens
[x, d_1, .., d_k] in one forward; the logits at position i give p_i, the model's distribution of the token
after d_i (after x for i = 0). At every position the engine draws the token plain decoding would draw there:
the argmax of p_i for greedy requests, and for sampled ones the plain sampler's draw from p_i (temperature,
top-k, top-p; `sampling.sample_rows`) with the uniform number the sequence's random stream would hand
plain decoding for that output position. d_{i+1} is accepted while it equals the draw at position i; the
first draw that differs, or the draw after the last draft, is emitted too, and the stream advances by one
number per emitted token, as plain decoding's does. So a draft changes how many tokens a step emits, never
which: greedy and seeded sampled requests emit the very tokens they emit without speculation (given the same
logits). The drafts are deterministic, so a draft token d is accepted with probability p(d), what the
standard rejection rule "accept with probability min(1, p(d) / q(d))" gives for a point-mass draft q: the
coupling costs no acceptance.

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
import random
from collections import deque
from itertools import islice

import torch

from nanokimi.infer.sampling import sample_rows

MAX_NGRAM = 4  # the longest suffix matched
MIN_NGRAM = 2  # shorter matches propose nothing (one token of context drafts mostly noise)
ENTRIES_PER_KEY = 32  # continuations remembered per n-gram (the most recent)
POSITION_BITS = 32  # an occurrence packs (list number, position) in one integer
POSITION_MASK = (1 << POSITION_BITS) - 1


class NgramIndex:
    """n-grams (MAX_NGRAM down to MIN_NGRAM tokens) of some token lists -> where they occurred: (list, the
    index after the n-gram). Lists are held by reference, so a list that grows extends its continuations.

    An occurrence is one integer, (the list's number << POSITION_BITS) | position. Each n-gram maps to its most
    recent occurrence, and each occurrence to the one of the same n-gram before it: dicts of integers, so
    indexing a token leaves no object that Python's garbage collector has to walk. (With tuples in deques, the
    collector's passes over a rollout of a thousand sequences cost twice the indexing itself.)"""

    def __init__(self):
        self.latest: dict[tuple, int] = {}  # n-gram -> its most recent occurrence
        self.earlier: dict[int, int] = {}  # (occurrence << 2) | (n - MIN_NGRAM) -> the n-gram's occurrence before
        self.lists: list[list[int]] = []  # the indexed token lists, by number
        self.numbers: dict[int, int] = {}  # id(list) -> its number

    def add(self, tokens: list[int], start: int, end: int) -> None:
        """Index the n-grams of `tokens` that end at positions start..end-1."""
        number = self.numbers.get(id(tokens))
        if number is None:
            number = self.numbers[id(tokens)] = len(self.lists)
            self.lists.append(tokens)
        base = number << POSITION_BITS
        latest, earlier = self.latest, self.earlier
        for p in range(start, end):
            here = base | (p + 1)
            for n in range(MIN_NGRAM, min(MAX_NGRAM, p + 1) + 1):
                key = tuple(tokens[p - n + 1:p + 1])
                before = latest.get(key)
                if before is not None and before != here:
                    earlier[(here << 2) | (n - MIN_NGRAM)] = before
                latest[key] = here

    def occurrences(self, ngram: tuple) -> list[tuple[list[int], int]]:
        """Of the last ENTRIES_PER_KEY occurrences of `ngram`, those that something followed, most recent first."""
        found = []
        packed, n = self.latest.get(ngram), len(ngram) - MIN_NGRAM
        for _ in range(ENTRIES_PER_KEY):  # a bounded walk, whatever order positions were indexed in
            if packed is None:
                break
            toks, pos = self.lists[packed >> POSITION_BITS], packed & POSITION_MASK
            if pos < len(toks):  # the sequence's own last n-gram has nothing after it yet
                found.append((toks, pos))
            packed = self.earlier.get((packed << 2) | n)
        return found

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the longest indexed n-gram ending `tokens`: token by token the
        continuation most matches agree on (the most recent wins a tie)."""
        for n in range(min(MAX_NGRAM, len(tokens)), MIN_NGRAM - 1, -1):
            candidates = self.occurrences(tuple(tokens[-n:]))
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
                best = max(votes, key=votes.get)  # dicts keep insertion order: ties go to the most recent
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


class SampleStream(random.Random):
    """A sample's random stream, one uniform per sampled token, that can look ahead: `peek(n)` returns the next n
    numbers without taking them (a verify step draws each position with the number plain decoding would use
    there) and `random()` takes the next. Peeked numbers wait in a buffer; saving and restoring the generator's
    625-word state instead cost 10 us per verify row. Only random() sees the buffer (the engine uses no other
    method); getstate/setstate and pickling carry it."""

    def seed(self, *args, **kwargs) -> None:
        self.ahead = deque()
        super().seed(*args, **kwargs)

    def random(self) -> float:
        return self.ahead.popleft() if self.ahead else super().random()

    def peek(self, count: int) -> list[float]:
        while len(self.ahead) < count:
            self.ahead.append(super().random())
        return list(islice(self.ahead, count))

    def getstate(self):
        return super().getstate(), tuple(self.ahead)

    def setstate(self, state) -> None:
        generator, ahead = state
        super().setstate(generator)
        self.ahead = deque(ahead)


def verify_uniforms(rng: SampleStream, temperature: float, count: int) -> list[float]:
    """The numbers a verify row's `count` positions are drawn with: the next `count` of the sequence's stream
    (not taken yet: `take_emitted` takes one per emitted token), zeros for a greedy request."""
    if temperature == 0:
        return [0.0] * count
    return rng.peek(count)


def take_emitted(rng, temperature: float, emitted: list[int]) -> None:
    """Advance a sampled request's stream by one number per emitted token, as plain decoding takes them."""
    if temperature > 0:
        for _ in emitted:
            rng.random()


def plain_draws(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, rng) -> list[int]:
    """logits [T, V] -> the token plain decoding draws at each of the T positions (the plain sampler; the argmax
    at temperature 0) with the stream's next T numbers, not taken."""
    rows = logits.shape[0]
    return sample_rows(logits, [temperature] * rows, [top_k] * rows, [top_p] * rows,
                       verify_uniforms(rng, temperature, rows)).tolist()


def accept_matching(draws: list[int], draft: list[int]) -> list[int]:
    """The emitted tokens: the drafts while each equals the draw at its place, then the draw after them."""
    out = []
    for i, d in enumerate(draft):
        if draws[i] != d:
            break
        out.append(d)
    out.append(draws[len(out)])
    return out


def accept_draft(logits: torch.Tensor, draft: list[int], temperature: float, top_k: int, top_p: float,
                 rng) -> list[int]:
    """One verified draft by the rule of the module docstring: logits [len(draft) + 1, V]; rng: the sequence's
    random.Random, advanced by one number per emitted token of a sampled request. 1..len(draft)+1 tokens."""
    emitted = accept_matching(plain_draws(logits, temperature, top_k, top_p, rng), draft)
    take_emitted(rng, temperature, emitted)
    return emitted
