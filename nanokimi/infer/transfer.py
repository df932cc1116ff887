"""Moving a running request from one engine to another (disaggregated prefill/decode, docs/disagg.md).

    state, tensors = export_request(prefill_engine, "r1")     # after a step; frees the request there
    import_request(decode_engine, state, tensors)             # continues exactly where it stopped

A request can move once every unfinished sample has all its tokens but the newest computed (after any
step that sampled them). `tensors` holds, per unfinished sample i and layer l, the sample's whole blocks
in block order (`"i.l.c_kv"` / `"i.l.k_rope"` [nb, bs, ...] for MLA, `"i.l.k"` / `"i.l.v"` for GQA) and
its KDA state slot (`"i.l.conv"` [K-1, C], `"i.l.state"` [H, Dk, Dv]); `RequestState` is the host side
(tokens, random stream, text so far), small and picklable. The receiving engine gives the request fresh
blocks and a state slot, writes the tensors into them and puts its samples in the running batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nanokimi.infer.params import SamplingParams
from nanokimi.infer.scheduler import FINISHED, RUNNING
from nanokimi.model.cache import RecurrentCache


@dataclass
class SequenceState:
    index: int
    tokens: list[int]
    num_computed: int
    rng_state: tuple
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list | None
    detok_offsets: tuple[int, int]
    run_tokens: int


@dataclass
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    metrics: dict
    num_cached_tokens: int
    sequences: list[SequenceState] = field(default_factory=list)


def ready_to_export(engine, request_id: str) -> bool:
    """Whether every unfinished sample of the request has computed its prompt and all tokens but its newest."""
    request = engine.requests.get(request_id)
    if request is None:
        return False
    live = [s for s in request.sequences if s.status != FINISHED]
    return all(s.status == RUNNING and s.remaining == 1 and s.num_computed >= s.num_prompt and not s.draft
               for s in live)


def layer_tensors(engine, block_table: list[int], state_slot: int | None, prefix: str = "",
                  layers: range | None = None, recurrent: bool = True) -> dict:
    """Copies of one sample's cache: its blocks of every attention layer, its state slot of every KDA layer
    (of `layers` only, when given; no KDA state with recurrent=False), named "<prefix><layer>.<field>" in
    layer order."""
    cache = engine.runner.cache
    index = torch.tensor(block_table, dtype=torch.long, device=engine.device)
    out = {}
    for layer_index in layers if layers is not None else range(len(cache.layers)):
        layer = cache.layers[layer_index]
        for name, pool in vars(layer).items():
            if isinstance(layer, RecurrentCache):
                if recurrent:
                    out[f"{prefix}{layer_index}.{name}"] = pool[state_slot].clone()
            else:
                out[f"{prefix}{layer_index}.{name}"] = pool.index_select(0, index)
    return out


def sample_layout(engine, num_blocks: int, prefix: str = "",
                  recurrent: bool = True) -> list[tuple[str, tuple[int, ...], str]]:
    """The `tensor_layout` of layer_tensors over num_blocks blocks, without touching the cache."""
    out = []
    for layer_index, layer in enumerate(engine.runner.cache.layers):
        for name, pool in vars(layer).items():
            if isinstance(layer, RecurrentCache) and not recurrent:
                continue
            shape = tuple(pool.shape[1:]) if isinstance(layer, RecurrentCache) else (num_blocks, *pool.shape[1:])
            out.append((f"{prefix}{layer_index}.{name}", shape, str(pool.dtype).removeprefix("torch.")))
    return out


def export_request(engine, request_id: str, release: bool = True,
                   with_tensors: bool = True) -> tuple[RequestState, dict[str, torch.Tensor]]:
    """The request's host state and cache tensors (device copies, ordered layer by layer per sample; none
    with with_tensors=False, when they were sent as they were computed). release=True removes it from the
    engine without an output (its blocks return to the pool)."""
    if not ready_to_export(engine, request_id):
        raise ValueError(f"export_request: request {request_id!r} is unknown or has tokens still to compute; "
                         "export after the step that sampled its newest tokens.")
    request = engine.requests[request_id]
    bs = engine.block_size
    state = RequestState(request.request_id, list(request.prompt_token_ids), request.params, request.prompt,
                         dict(request.metrics), request.num_cached_tokens)
    tensors = {}
    for seq in request.sequences:
        out = seq.output
        state.sequences.append(SequenceState(seq.index, list(seq.tokens), seq.num_computed, seq.rng.getstate(),
                                             list(out.token_ids), out.text, out.finish_reason,
                                             None if out.logprobs is None else list(out.logprobs),
                                             seq.detok_offsets, seq.run_tokens))
        if seq.status != FINISHED and with_tensors:
            blocks = seq.block_table[:-(-seq.num_computed // bs)]
            tensors.update(layer_tensors(engine, blocks, seq.state_slot, f"{seq.index}."))
    if release:
        for seq in request.sequences:
            if seq.status != FINISHED:
                engine.scheduler.finish(seq)
                if engine.drafter is not None:
                    engine.drafter.release(seq)
        del engine.requests[request_id]
    return state, tensors


def tensor_layout(tensors: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype name) of each tensor in order: what a receiver allocates before the data arrives."""
    return [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in tensors.items()]


def empty_like_layout(layout, device) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, dtype=getattr(torch, dtype), device=device) for name, shape, dtype in layout}


def can_import(engine, state: RequestState) -> bool:
    """Whether the engine has the free blocks, state slots and batch room for the request now."""
    bs = engine.block_size
    live = [s for s in state.sequences if s.finish_reason is None]
    blocks = sum(-(-s.num_computed // bs) for s in live)
    slots = engine.slots is None or len(engine.slots.free) + len(engine.slots.snapshots) >= len(live)
    room = len(engine.scheduler.running) + len(live) <= engine.scheduler.max_num_seqs
    return blocks <= engine.pool.num_free and slots and room


def import_request(engine, state: RequestState, tensors: dict[str, torch.Tensor]) -> None:
    """Add an exported request to this engine; its next step decodes it as the exporting engine would have.
    The caller checks `can_import` first (a ValueError otherwise). Full prompt blocks join the prefix cache."""
    if engine.drafter is not None:
        raise ValueError("import_request: engines with speculative decoding cannot take transferred requests.")
    if not can_import(engine, state):
        raise ValueError(f"import_request: no room for request {state.request_id!r} (blocks, state slots or "
                         "max_num_seqs); retry after requests finish.")
    engine.add_request(state.request_id, state.prompt_token_ids, state.params,
                       arrival_time=state.metrics.get("arrival_time"), prompt=state.prompt)
    request = engine.requests[state.request_id]
    for key in ("first_scheduled_time", "first_token_time", "last_token_time"):
        request.metrics[key] = state.metrics.get(key)
    request.num_cached_tokens = state.num_cached_tokens
    scheduler, cache, bs = engine.scheduler, engine.runner.cache, engine.block_size
    for seq, saved in zip(request.sequences, state.sequences):
        seq.tokens, seq.num_computed = list(saved.tokens), saved.num_computed
        seq.rng.setstate(saved.rng_state)
        seq.output.token_ids, seq.output.text = list(saved.token_ids), saved.text
        seq.output.logprobs = None if saved.logprobs is None else list(saved.logprobs)
        seq.output.finish_reason, seq.detok_offsets, seq.run_tokens = saved.finish_reason, saved.detok_offsets, \
            saved.run_tokens
        if saved.finish_reason is not None:
            scheduler.finish(seq)
            continue
        scheduler.waiting.remove(seq)
        seq.block_table = [engine.pool.allocate() for _ in range(-(-seq.num_computed // bs))]
        index = torch.tensor(seq.block_table, dtype=torch.long, device=engine.device)
        if engine.slots is not None:
            seq.state_slot = engine.slots.allocate()
        for layer_index, layer in enumerate(cache.layers):
            for name, pool in vars(layer).items():
                data = tensors[f"{seq.index}.{layer_index}.{name}"].to(pool.device)
                if isinstance(layer, RecurrentCache):
                    pool[seq.state_slot].copy_(data)
                else:
                    pool.index_copy_(0, index, data)
        if engine.prefix_caching:
            full = min(seq.num_computed, seq.num_prompt) // bs
            seq.ensure_hashes(full)
            for i in range(full):
                engine.pool.register(seq.block_table[i], seq.hashes[i])
        seq.status = RUNNING
        scheduler.running.append(seq)
    if request.finished:
        del engine.requests[state.request_id]
