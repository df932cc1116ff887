"""What a request asks for (SamplingParams) and what it gets back (RequestOutput, CompletionOutput)."""
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice


@dataclass
class SamplingParams:
    """Per-request sampling. temperature 0 is greedy; top_k 0 and top_p 1 keep the whole vocabulary.

    seed makes the request's samples reproducible whatever else is in the batch (None: a fresh random
    seed). n samples share the prompt; sample i uses a seed derived from (seed, i). stop strings end a
    sample and are cut from its text; stop_token_ids (and the tokenizer's end ids unless ignore_eos)
    end it too. group_id: the engine's Seer options (context-aware scheduling, suffix drafting) treat
    requests with the same group_id (and the n samples of one request) as one group. logprobs=k returns,
    per generated token, the log-probabilities of the top k tokens and of the chosen one (under the
    model's raw distribution, or the adjusted one below when a penalty or bias is set).

    Adjustments of the logits before temperature, top-k and top-p, in this order (nanokimi.infer.sampling.
    apply_penalties): logit_bias {token id: value in [-100, 100]} is added (OpenAI's); repetition_penalty r > 0
    divides the positive logits and multiplies the negative ones of every token in the prompt or the output so
    far (1 = off; CTRL's, as HF and vLLM have it); frequency_penalty (times the token's count in the output so
    far) and presence_penalty (once if it occurs) are subtracted, both in [-2, 2] (OpenAI's); min_tokens m (vLLM's)
    sets the stop ids (end-of-text unless ignore_eos, and stop_token_ids) to -inf while fewer than m tokens are
    out. A request with any of them decodes without speculative drafts.

    nbce_window=W decodes with NBCE (nanokimi.infer.nbce): the context is cut at nbce_separator into windows
    of at most W tokens (each with the query, the text after the last separator), and each step combines
    them as (beta + 1) * pool(log p_window) - beta * log p_no_context, pool "min_entropy" or "mean".
    """
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    n: int = 1
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    logprobs: int | None = None
    ignore_eos: bool = False
    nbce_window: int | None = None
    nbce_beta: float = 0.25
    nbce_pooling: str = "min_entropy"
    nbce_separator: str = "\n"
    group_id: str | None = None  # requests sharing it form a group (RL: one prompt's k samples; docs/seer.md)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0  # the end ids (ignore_eos aside) and stop_token_ids cannot end a sample before this many

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (isinstance(self.n, int) and self.n >= 1, f"n must be >= 1, got {self.n}"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
             f"logprobs must be None or an int >= 0, got {self.logprobs}"),
            (self.seed is None or isinstance(self.seed, int), f"seed must be an int or None, got {self.seed!r}"),
            (not self.stop or all(isinstance(s, str) and s for s in self.stop),
             f"stop must be a list of non-empty strings, got {self.stop!r}"),
            (self.nbce_window is None or (isinstance(self.nbce_window, int) and self.nbce_window >= 2),
             f"nbce_window must be None (off) or an int >= 2 (tokens per window), got {self.nbce_window!r}"),
            (isinstance(self.nbce_beta, (int, float)) and self.nbce_beta >= 0,
             f"nbce_beta must be a number >= 0, got {self.nbce_beta!r}"),
            (self.nbce_pooling in ("min_entropy", "mean"),
             f"nbce_pooling must be 'min_entropy' or 'mean', got {self.nbce_pooling!r}"),
            (isinstance(self.nbce_separator, str) and self.nbce_separator != "",
             f"nbce_separator must be a non-empty string, got {self.nbce_separator!r}"),
            (_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}"),
            (_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}"),
            (_number(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}"),
            (self.logit_bias is None or (isinstance(self.logit_bias, dict) and all(
                isinstance(t, int) and t >= 0 and _number(b) and -100 <= b <= 100 for t, b in self.logit_bias.items())),
             f"logit_bias must map token ids (ints >= 0) to numbers in [-100, 100], got {self.logit_bias!r}"),
            (isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be an int in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}"),
            (self.nbce_window is None or not self.penalized,
             "penalties, logit_bias and min_tokens are not applied by NBCE decoding (nbce_window); leave them unset"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {message}.")

    @property
    def penalized(self) -> bool:
        """Whether a penalty, a logit bias or min_tokens adjusts the logits (apply_penalties)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.logit_bias or self.min_tokens)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


@dataclass
class CompletionOutput:
    """One sample: token_ids and text are cumulative; finish_reason None while it runs."""
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    """A request's state after a step: its n samples, whether all are done, cached prompt tokens, times."""
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)  # arrival_time, first_token_time, finished_time (time.monotonic)
    prompt: str | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


class TokenPrefix(Sequence):
    """The first `length` items of a list that only grows (a running sample's tokens or logprobs): a snapshot
    that costs nothing to take, where a copy costs the whole output at every step of a stream (O(L^2) over a
    generation of L tokens). Reads like a tuple: slices are tuples, it equals a tuple or list with the same
    items, and it pickles as a tuple."""
    __slots__ = ("items", "length")

    def __init__(self, items: list, length: int | None = None):
        self.items = items
        self.length = len(items) if length is None else length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index):
        if isinstance(index, slice):
            r = range(self.length)[index]
            return tuple(self.items[r.start:r.stop]) if r.step == 1 else tuple(self.items[i] for i in r)
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        return self.items[index % self.length]

    def __iter__(self):
        return islice(self.items, self.length)

    def __eq__(self, other) -> bool:
        if not isinstance(other, (TokenPrefix, tuple, list)):
            return NotImplemented
        return len(other) == self.length and all(a == b for a, b in zip(self, other))

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __reduce__(self):
        return tuple, (tuple(self),)

    def __repr__(self) -> str:
        return f"TokenPrefix({list(self)!r})"
