"""NBCE (Naive Bayes-based Context Extension): decode from a context longer than the model's window.

The prompt is context + query, the query being the text after the last `nbce_separator`. The context's
pieces (split at the separator) are packed, from the end, into windows that hold at most `nbce_window`
tokens each together with the query; every window (+ query) and the query alone (the empty context) run
as rows of a batch. At each step, with log p_k the next-token log-probabilities of window k and log p_0
those of the query alone:

    log p = (beta + 1) * pool_k(log p_k) - beta * log p_0

pool "min_entropy" takes the window whose distribution has the least entropy, "mean" averages log p_k
over the windows. The chosen token is appended to every row. Sampling then runs the engine's own sampler
(sample_rows) on log p, so temperature, top-k, top-p and seeds mean what they mean for plain requests.

Rows of equal length share one batch and one cache (model.new_cache); rows of different lengths run as
separate batches, so no padding ever enters the model and one window with beta = 0 is plain decoding.
"""
import time

import torch
from torch import nn

from nanokimi.infer.params import CompletionOutput, RequestOutput, SamplingParams
from nanokimi.infer.sampling import sample_rows, top_logprobs

POOLINGS = ("min_entropy", "mean")


def nbce_combine(window_logprobs: torch.Tensor, empty_logprobs: torch.Tensor | None, beta: float,
                 pooling: str = "min_entropy") -> torch.Tensor:
    """window_logprobs [K, V] and empty_logprobs [V] (log-softmaxed; None only when beta = 0) -> the
    combined, renormalised log-probabilities [V] (float32)."""
    if pooling not in POOLINGS:
        raise ValueError(f"nbce_pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}.")
    logp = window_logprobs.float()  # [K, V]
    if pooling == "min_entropy":
        entropy = -(logp.exp() * logp).nan_to_num().sum(-1)  # [K]; 0 * log 0 counts as 0
        pooled = logp[entropy.argmin()]  # [V]
    else:
        pooled = logp.mean(0)  # [V]
    if beta == 0:
        combined = pooled
    else:
        if empty_logprobs is None:
            raise ValueError("nbce: beta != 0 needs the empty-context distribution.")
        combined = (beta + 1) * pooled - beta * empty_logprobs.float()
    return combined.log_softmax(-1)


def nbce_windows(tokenizer, text: str, window: int, separator: str = "\n") -> tuple[list[list[int]], list[int]]:
    """(windows as token ids, each ending with the query; the query's ids). Pieces are the text split after
    each separator; they are packed from the end of the context, so the last window holds the most recent
    context. A piece too long for any window is cut into token chunks. A prompt that fits in one window
    gives exactly its own tokenization."""
    cut = text.rfind(separator)
    context, query = (text[:cut + len(separator)], text[cut + len(separator):]) if cut >= 0 else ("", text)
    query_ids = tokenizer.encode(query) if query else []
    room = window - len(query_ids)
    if room < 1 and context:
        raise ValueError(f"nbce: the query (the text after the last separator {separator!r}) has {len(query_ids)} "
                         f"tokens, no room for context in nbce_window={window}; raise nbce_window.")
    if room < 0:  # no separator at all: the whole prompt is the query, and it would run past the window
        raise ValueError(f"nbce: the prompt has no separator {separator!r}, so all of it ({len(query_ids)} tokens) is "
                         f"the query, more than nbce_window={window}; separate the context from the query.")
    pieces = [p + separator for p in context.split(separator)[:-1]] if context else []
    counts = [len(tokenizer.encode(p)) for p in pieces]  # each piece on its own: an estimate of its share
    windows: list[list[int]] = []
    end = len(pieces)  # pieces[:end] are still to pack, from the back
    while end > 0:
        start, used = end, len(query_ids)
        while start > 0 and used + counts[start - 1] <= window:
            used += counts[start - 1]
            start -= 1
        ids = tokenizer.encode("".join(pieces[start:end]) + query) if start < end else []
        while len(ids) > window and end - start > 1:  # encoded together it came out longer: give pieces back
            start += 1
            ids = tokenizer.encode("".join(pieces[start:end]) + query)
        if start < end and len(ids) <= window:
            windows.append(ids)
            end = start
            continue
        piece_ids = tokenizer.encode(pieces[end - 1])  # one piece longer than a window: token chunks of it
        for stop in range(len(piece_ids), 0, -room):
            windows.append(piece_ids[max(0, stop - room):stop] + query_ids)
        end -= 1
    if not windows:
        windows.append(tokenizer.encode(query))
    windows.reverse()
    if not windows[-1]:
        raise ValueError("nbce: the prompt is empty; give at least one token.")
    return windows, query_ids


class _RowGroup:
    """Rows of equal length decoding in step through one cache."""

    def __init__(self, model: nn.Module, rows: list[list[int]], indices: list[int], max_new: int):
        self.indices = indices
        device = model.embed.weight.device
        self.cache = model.new_cache(len(rows), len(rows[0]) + max_new)
        self.first = torch.tensor(rows, device=device)  # [G, L]

    def start(self, model: nn.Module) -> torch.Tensor:
        return model(self.first, cache=self.cache)[:, -1]  # [G, V]

    def step(self, model: nn.Module, token: int) -> torch.Tensor:
        ids = torch.full((len(self.indices), 1), token, device=self.first.device, dtype=torch.long)
        return model(ids, cache=self.cache)[:, -1]  # [G, V]


@torch.no_grad()
def nbce_decode(model: nn.Module, windows: list[list[int]], empty: list[int] | None, params: SamplingParams,
                seed: int, eos_ids: set[int], tokenizer=None) -> CompletionOutput:
    """One sample: window rows [K][L_k] and the empty-context row (None when beta = 0) decoded together."""
    context = model.config.max_position_embeddings
    rows = windows + ([empty] if empty is not None else [])
    longest = max(len(r) for r in rows)
    if longest + params.max_tokens > context:
        raise ValueError(f"nbce: a window of {longest} tokens + max_tokens {params.max_tokens} exceeds the model's "
                         f"context of {context}; lower nbce_window or max_tokens.")
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_length.setdefault(len(row), []).append(i)
    groups = [_RowGroup(model, [rows[i] for i in idx], idx, params.max_tokens) for idx in by_length.values()]
    generator = torch.Generator().manual_seed(seed)
    out = CompletionOutput(0, logprobs=[] if params.logprobs is not None else None)
    logits = [None] * len(rows)
    for group in groups:
        for i, row_logits in zip(group.indices, group.start(model)):
            logits[i] = row_logits
    while True:
        logp = torch.stack(logits).float().log_softmax(-1)  # [K (+1), V]
        combined = nbce_combine(logp[:len(windows)], logp[len(windows)] if empty is not None else None,
                                params.nbce_beta, params.nbce_pooling)[None]  # [1, V]
        u = torch.rand((), generator=generator, dtype=torch.float64).item() if params.temperature > 0 else 0.0
        token_t = sample_rows(combined, [params.temperature], [params.top_k], [params.top_p], [u])
        token = int(token_t[0])
        if out.logprobs is not None:
            out.logprobs.append(top_logprobs(combined, token_t, [params.logprobs])[0])
        out.token_ids.append(token)
        stopped = token in (params.stop_token_ids or ()) or (not params.ignore_eos and token in eos_ids)
        if tokenizer is not None:
            out.text = tokenizer.decode(out.token_ids[:-1] if stopped else out.token_ids)
        if stopped:
            out.finish_reason = "stop"
        elif params.stop and any(s in out.text for s in params.stop):
            out.text = out.text[:min(out.text.find(s) for s in params.stop if s in out.text)]
            out.finish_reason = "stop"
        elif len(out.token_ids) >= params.max_tokens:
            out.finish_reason = "length"
        if out.finish_reason is not None:
            return out
        for group in groups:
            for i, row_logits in zip(group.indices, group.step(model, token)):
                logits[i] = row_logits


def nbce_generate(model: nn.Module, tokenizer, request_id: str, prompt: str, params: SamplingParams,
                  seeds: list[int], prompt_token_ids: list[int] | None = None) -> RequestOutput:
    """A finished RequestOutput for one NBCE request (params.n samples, sample i seeded by seeds[i]). The windows
    come from the prompt's text; prompt_token_ids (default: the text encoded) is only reported back."""
    if tokenizer is None:
        raise ValueError("nbce: NBCE splits the prompt's text into windows and needs a tokenizer.")
    arrival = time.monotonic()
    windows, query = nbce_windows(tokenizer, prompt, params.nbce_window, params.nbce_separator)
    if params.nbce_beta != 0 and not query:
        raise ValueError(f"nbce: the prompt ends with the separator {params.nbce_separator!r}, so there is no query "
                         "for the empty-context row; end the prompt with the question, or set nbce_beta=0.")
    eos_ids = set(getattr(tokenizer, "stop_ids", None) or {tokenizer.eot_id})
    was_training = model.training
    model.eval()
    outputs = []
    for i, seed in enumerate(seeds):
        sample = nbce_decode(model, windows, query if params.nbce_beta != 0 else None, params, seed, eos_ids,
                             tokenizer)
        sample.index = i
        outputs.append(sample)
    model.train(was_training)
    metrics = {"arrival_time": arrival, "finished_time": time.monotonic(), "nbce_windows": len(windows),
               "nbce_window_tokens": [len(w) for w in windows]}
    ids = tokenizer.encode(prompt) if prompt_token_ids is None else prompt_token_ids
    return RequestOutput(request_id, ids, outputs, True, 0, metrics, prompt)
