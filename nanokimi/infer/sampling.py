"""Per-row sampling for the engine: each row has its own temperature, top-k, top-p and random stream.

A row's draw uses one uniform number from that sample's own random stream and the row's own logits only
(inverse CDF over the sorted, filtered distribution), so a seeded request samples the same tokens
whatever else shares its batch. All rows are drawn in one batched computation: the per-row parameters go
to the device in one copy, and `sample_step` brings the tokens (and logprobs) back in one copy.
"""
from itertools import chain

import torch

from nanokimi.runtime.host import host_tensor


def sample_rows(logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float],
                uniforms: list[float]) -> torch.Tensor:
    """logits [R, V] -> token ids [R] (long, on logits' device). temperature 0 is greedy (argmax of the
    logits as they are); top_k 0 keeps every token; top_p keeps the smallest set of most likely tokens whose
    probability reaches it (always at least the top token); uniforms [R] in [0, 1) drive the draws."""
    sampled_rows = [i for i, t in enumerate(temperature) if t > 0]
    if not sampled_rows:
        return logits.argmax(dim=-1)
    device = logits.device
    vocab = logits.shape[-1]
    # one host-to-device copy of every sampled row's parameters (float64 holds the indices and k exactly)
    every = len(sampled_rows) == len(temperature)  # (RL: every row samples; no row selection)
    if every:
        columns = (temperature, [k or vocab for k in top_k], top_p, uniforms)
    else:
        columns = ([temperature[i] for i in sampled_rows], [top_k[i] or vocab for i in sampled_rows],
                   [top_p[i] for i in sampled_rows], [uniforms[i] for i in sampled_rows], sampled_rows)
    table = torch.cat([host_tensor(c, torch.float64) for c in columns]).to(device).view(len(columns), -1)
    temp, k, p, u = table[0].float(), table[1].long(), table[2].float(), table[3]
    rows = None if every else table[4].long()
    greedy = None if every else logits.argmax(dim=-1)
    scaled = (logits if every else logits.index_select(0, rows)).float() / temp[:, None]  # [S, V]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=device)[None, :]
    sorted_logits = sorted_logits.masked_fill(rank >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the strictly better tokens
    sorted_logits = sorted_logits.masked_fill((mass_before >= p[:, None]) & (rank > 0), float("-inf"))
    cdf = sorted_logits.softmax(-1).double().cumsum(-1)  # [S, V]
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=vocab - 1)
    tokens = order.gather(1, index).squeeze(1)
    return tokens if every else greedy.index_copy(0, rows, tokens)


def apply_penalties(logits: torch.Tensor, rows: list[int], params: list, outputs: list[list[int]],
                    prompts: list[torch.Tensor | None], held: list[frozenset[int]] | None = None) -> torch.Tensor:
    """logits [N, V] with rows `rows` adjusted by their SamplingParams (`params`, one per row in rows), given each
    row's output tokens so far and its prompt's distinct token ids (a CPU long tensor; None where the row has no
    repetition penalty): + logit_bias; repetition_penalty r on every token of the prompt or the output (a logit
    l > 0 becomes l / r, else l * r); - frequency_penalty x count in the output - presence_penalty if the token
    occurs there; -inf for the row's `held` ids (min_tokens: its stop ids while the output is shorter). Returns a
    copy in at least float32 (the other rows unchanged). The host work is a few flat tensors (no Python per
    token), so a thousand penalized rows cost milliseconds, not tens of them."""
    device, vocab, R = logits.device, logits.shape[-1], len(rows)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    row_index = host_tensor(rows).to(device)
    adjusted = logits.index_select(0, row_index).to(dtype)  # [R, V], R = len(rows)
    biased = [(r, token, value) for r, p in enumerate(params) for token, value in (p.logit_bias or {}).items()]
    if biased:
        where = torch.tensor([(r, token) for r, token, _ in biased], device=device).t()
        adjusted.index_put_((where[0], where[1]),
                            torch.tensor([v for *_, v in biased], dtype=dtype, device=device), accumulate=True)
    owners = torch.arange(R).repeat_interleave(host_tensor([len(tokens) for tokens in outputs]))
    tokens = host_tensor(list(chain.from_iterable(outputs)))
    counts = torch.zeros(R, vocab, dtype=dtype, device=device).index_put_(
        (owners.to(device), tokens.to(device)), torch.ones(len(tokens), dtype=dtype, device=device), accumulate=True)
    if any(p.repetition_penalty != 1 for p in params):
        seen = counts > 0
        penalized = [r for r, prompt in enumerate(prompts) if prompt is not None]
        in_prompt = torch.cat([prompts[r] for r in penalized])
        owners = host_tensor(penalized).repeat_interleave(host_tensor([len(prompts[r]) for r in penalized]))
        seen[owners.to(device), in_prompt.to(device)] = True
        penalty = torch.tensor([p.repetition_penalty for p in params], dtype=dtype, device=device)[:, None]
        adjusted = torch.where(seen, torch.where(adjusted > 0, adjusted / penalty, adjusted * penalty), adjusted)
    frequency = torch.tensor([p.frequency_penalty for p in params], dtype=dtype, device=device)[:, None]
    presence = torch.tensor([p.presence_penalty for p in params], dtype=dtype, device=device)[:, None]
    adjusted = adjusted - frequency * counts - presence * (counts > 0)
    barred = [(r, token) for r, ids in enumerate(held or ()) for token in ids]
    if barred:
        where = torch.tensor(barred, device=device).t()
        adjusted = adjusted.index_put((where[0], where[1]), torch.tensor(float("-inf"), dtype=dtype, device=device))
    return logits.to(dtype).index_copy(0, row_index, adjusted)


def _logprob_parts(logits: torch.Tensor, chosen: torch.Tensor, width: int) -> list[torch.Tensor]:
    """Flat float64 tensors to copy to the host: the chosen tokens' log-probabilities [R], and when width > 0
    the top-width log-probabilities [R * width] and their token ids [R * width] (raw distribution)."""
    logp = logits.float().log_softmax(-1)  # [R, V]
    parts = [logp.gather(1, chosen[:, None]).squeeze(1).double()]
    if width > 0:
        top = logp.topk(width, dim=-1)
        parts += [top.values.double().flatten(), top.indices.double().flatten()]
    return parts


def _logprob_entries(host: list[float], chosen: list[int], k: list[int]) -> list[dict[int, float]]:
    """The per-row dicts from _logprob_parts' values on the host (host: their concatenation)."""
    rows, width = len(k), max(k)
    if width == 0:  # only the chosen tokens' (RL's logprobs=0)
        return [{token: value} for token, value in zip(chosen, host[:rows])]
    out = []
    for r, kr in enumerate(k):
        start = rows + r * width
        entry = dict(zip(map(int, host[start + rows * width:start + rows * width + kr]), host[start:start + kr]))
        entry[chosen[r]] = host[r]
        out.append(entry)
    return out


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: list[int]) -> list[dict[int, float]]:
    """Per row: the log-probabilities of its k most likely tokens and of the chosen one (raw distribution)."""
    host = torch.cat(_logprob_parts(logits, chosen, max(k))).tolist()
    return _logprob_entries(host, chosen.tolist(), k)


def sample_step(logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float],
                uniforms: list[float], logprobs: list[int | None]) -> tuple[list[int], list[dict[int, float] | None]]:
    """sample_rows, then top_logprobs for the rows whose logprobs is not None, with one device-to-host copy of
    everything: (token ids, per row its logprobs dict or None)."""
    tokens = sample_rows(logits, temperature, top_k, top_p, uniforms)
    wanted = [i for i, k in enumerate(logprobs) if k is not None]
    if not wanted:
        return tokens.tolist(), [None] * len(logprobs)
    k = [logprobs[i] for i in wanted]
    if len(wanted) == len(logprobs):  # (RL: every row wants its token's logprob: no row selection)
        parts = _logprob_parts(logits, tokens, max(k))
    else:
        index = host_tensor(wanted).to(logits.device)
        parts = _logprob_parts(logits.index_select(0, index), tokens.index_select(0, index), max(k))
    host = torch.cat([tokens.double()] + parts).tolist()  # token ids are exact in float64
    chosen = list(map(int, host[:len(logprobs)]))
    if len(wanted) == len(logprobs):
        return chosen, _logprob_entries(host[len(logprobs):], chosen, k)
    entries: list[dict[int, float] | None] = [None] * len(logprobs)
    for i, entry in zip(wanted, _logprob_entries(host[len(logprobs):], [chosen[i] for i in wanted], k)):
        entries[i] = entry
    return chosen, entries
