"""Per-row sampling for the engine: each row has its own temperature, top-k, top-p and random stream.

A row's draw uses one uniform number from that sample's own random stream and the row's own logits only
(inverse CDF over the sorted, filtered distribution), so a seeded request samples the same tokens
whatever else shares its batch.
"""
import torch


def sample_rows(logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float],
                uniforms: list[float]) -> torch.Tensor:
    """logits [R, V] -> token ids [R] (long, on logits' device). temperature 0 is greedy (argmax of the
    logits as they are); top_k 0 keeps every token; top_p keeps the smallest set of most likely tokens whose
    probability reaches it (always at least the top token); uniforms [R] in [0, 1) drive the draws."""
    greedy = logits.argmax(dim=-1)
    sampled_rows = [i for i, t in enumerate(temperature) if t > 0]
    if not sampled_rows:
        return greedy
    device = logits.device
    rows = torch.tensor(sampled_rows, device=device)
    temp = torch.tensor([temperature[i] for i in sampled_rows], device=device, dtype=torch.float32)
    k = torch.tensor([top_k[i] or logits.shape[-1] for i in sampled_rows], device=device)
    p = torch.tensor([top_p[i] for i in sampled_rows], device=device, dtype=torch.float32)
    u = torch.tensor([uniforms[i] for i in sampled_rows], device=device, dtype=torch.float64)
    scaled = logits.index_select(0, rows).float() / temp[:, None]  # [S, V]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(scaled.shape[-1], device=device)[None, :]
    sorted_logits = sorted_logits.masked_fill(rank >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the strictly better tokens
    sorted_logits = sorted_logits.masked_fill((mass_before >= p[:, None]) & (rank > 0), float("-inf"))
    cdf = sorted_logits.softmax(-1).double().cumsum(-1)  # [S, V]
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=scaled.shape[-1] - 1)
    tokens = order.gather(1, index).squeeze(1)
    return greedy.index_copy(0, rows, tokens)


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: list[int]) -> list[dict[int, float]]:
    """Per row: the log-probabilities of its k most likely tokens and of the chosen one (raw distribution)."""
    logp = logits.float().log_softmax(-1)  # [R, V]
    width = max(k)
    top = logp.topk(width, dim=-1) if width > 0 else None
    chosen_logp = logp.gather(1, chosen[:, None]).squeeze(1).tolist()
    chosen = chosen.tolist()
    values = top.values.tolist() if top is not None else None
    indices = top.indices.tolist() if top is not None else None
    out = []
    for r, kr in enumerate(k):
        entry = {} if top is None else dict(zip(indices[r][:kr], values[r][:kr]))
        entry[chosen[r]] = chosen_logp[r]
        out.append(entry)
    return out
