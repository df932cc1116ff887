"""What a request asks for (SamplingParams) and what it gets back (RequestOutput, CompletionOutput)."""
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """Per-request sampling. temperature 0 is greedy; top_k 0 and top_p 1 keep the whole vocabulary.

    seed makes the request's samples reproducible whatever else is in the batch (None: a fresh random
    seed). n samples share the prompt; sample i uses a seed derived from (seed, i). stop strings end a
    sample and are cut from its text; stop_token_ids (and the tokenizer's end ids unless ignore_eos)
    end it too. group_id: the engine's Seer options (context-aware scheduling, suffix drafting) treat
    requests with the same group_id (and the n samples of one request) as one group. logprobs=k returns,
    per generated token, the log-probabilities of the top k tokens and of the chosen one (under the
    model's raw distribution).

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
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {message}.")


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
