"""Batched generation with the model's preallocated cache: chunked prefill, then one token per step.

    out = generate(model, ids, max_new_tokens=128, temperature=0.8, top_p=0.95, seed=0)   # [B, T+128]

The decode step has two equivalent forms. The plain one calls `model(tok, cache=cache)` and advances
`cache.pos` (a Python int that slices the caches). The fixed-shape one, `DecodeStep`, passes the
position as a device tensor: new keys/latents are written with index_copy_ and attention runs over
the whole cache under a length mask, so every step launches the same kernels on the same buffers and
can be captured once in a CUDA graph and replayed. On the CPU it runs eagerly (that is how it is tested).
"""
import warnings

import torch
from torch import nn

from nanokimi.model.cache import ModelCache
from nanokimi.model.rope import Rotary
from nanokimi.runtime import compile_fn
from nanokimi.runtime.graphs import capture


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. temperature == 0 is greedy (argmax); otherwise softmax of
    logits / temperature restricted to the top_k largest (0 = all) and to the smallest set whose
    probability reaches top_p (1.0 = all), then one draw per row."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got temperature={temperature}, "
                         f"top_p={top_p}, top_k={top_k}.")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the strictly better tokens
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))  # keeps the top token
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class DecodeStep:
    """One fixed-shape decode step over `cache`: `step(tokens [B], position: int) -> logits [B, V]`.

    With graph=True (CUDA only) the step is captured once in a CUDA graph on static input buffers
    and replayed; `compile=True` first wraps the forward in torch.compile. Capturing runs the step a
    few times, which writes into the cache: build a DecodeStep before the prefill (generate does) or
    call `cache.reset()` afterwards. The returned logits tensor is reused by the next call.
    """

    def __init__(self, model: nn.Module, cache: ModelCache, graph: bool = False, compile: bool = False):
        self.model, self.cache = model, cache
        device = model.embed.weight.device
        for module in model.modules():
            if isinstance(module, Rotary):
                module.ensure_length(cache.max_len, device)
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)  # [B, 1]
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.forward = compile_fn(model, dynamic=False) if compile else model  # raises the recompile limit
        self.graph = None
        self.logits = None
        if graph:
            self._capture()

    def _run(self) -> torch.Tensor:
        return self.forward(self.tokens, cache=self.cache, position=self.position)[:, -1]  # [B, V]

    @torch.no_grad()
    def _capture(self) -> None:
        if self.tokens.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the model on a CUDA device; use graph=False on the CPU.")
        saved_pos = self.cache.pos
        self.cache.pos = 0
        self.graph = capture(self._run, warmup=3)  # warm-up: lazy inits, cuBLAS workspaces, compilation
        self.logits = self.graph.output
        self.cache.pos = saved_pos

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """tokens [B] at `position` (tokens already in the cache before them) -> logits [B, V]."""
        if not 0 <= position < self.cache.max_len:
            raise ValueError(f"position {position} is outside the cache of {self.cache.max_len} tokens; "
                             "make it larger with model.new_cache(max_len=...).")
        self.tokens.copy_(tokens.view(-1, 1))
        self.position.fill_(position)  # cache.pos stays put: compiled code guards on it
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.logits


def release_decode_graphs(model: nn.Module) -> None:
    """Drop the decode steps (CUDA graphs and caches) that generate(keep_graph=True) kept on the model."""
    model.__dict__.pop("_kept_decode_steps", None)


def _want_graph(use_cuda_graph, device: torch.device) -> bool:
    if use_cuda_graph not in (True, False, "auto"):
        raise ValueError(f"use_cuda_graph must be True, False or 'auto', got {use_cuda_graph!r}.")
    if use_cuda_graph is True and device.type != "cuda":
        raise ValueError("use_cuda_graph=True needs the model on a CUDA device; pass 'auto' or False.")
    return device.type == "cuda" and use_cuda_graph is not False


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None, eos_id: int | None = None,
             prefill_chunk: int = 2048, use_cuda_graph: bool | str = "auto", compile: bool = False,
             fixed_shape: bool | None = None, keep_graph: bool = False) -> torch.Tensor:
    """input_ids [B, T] -> [B, T + max_new_tokens] (prompt, then the new tokens).

    temperature=0 is greedy. seed makes sampling reproducible (a private generator; the global RNG is
    untouched). Rows that produce eos_id keep emitting eos_id; the loop stops early once every row
    has (checked every 16 steps, as the check waits for the GPU). The prompt is prefilled in chunks
    of prefill_chunk tokens. use_cuda_graph="auto" captures the decode step on CUDA (falling back
    to the eager step, with a warning, if capture fails); compile=True also torch.compiles it.
    fixed_shape forces the fixed-shape step without a graph (default: only when graphing).
    keep_graph=True keeps the captured step and its cache on the model, so later calls with the same
    batch size and total length skip the capture (benchmarks); `release_decode_graphs(model)` frees them.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, prompt_len] with prompt_len >= 1, got shape {tuple(input_ids.shape)}.")
    if max_new_tokens < 0 or prefill_chunk < 1:
        raise ValueError(f"need max_new_tokens >= 0 and prefill_chunk >= 1, got {max_new_tokens} and {prefill_chunk}.")
    device = model.embed.weight.device
    input_ids = input_ids.to(device)
    B, T = input_ids.shape
    out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=device)
    out[:, :T] = input_ids
    if max_new_tokens == 0:
        return out
    was_training = model.training
    model.eval()
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    key = (B, T + max_new_tokens, compile)
    kept = getattr(model, "_kept_decode_steps", {})
    step = kept.get(key) if _want_graph(use_cuda_graph, device) else None
    cache = step.cache if step is not None else model.new_cache(B, T + max_new_tokens)
    cache.reset()

    if step is None and _want_graph(use_cuda_graph, device):
        try:
            step = DecodeStep(model, cache, graph=True, compile=compile)
            if keep_graph:
                model._kept_decode_steps = {**kept, key: step}
        except Exception as error:  # noqa: BLE001 - any capture failure leaves the eager path, which is correct
            if use_cuda_graph is True:
                raise
            warnings.warn(f"CUDA graph capture of the decode step failed ({type(error).__name__}: {error}); "
                          "decoding eagerly.")
        cache.reset()
    if step is None and fixed_shape:
        step = DecodeStep(model, cache, graph=False, compile=compile)
        cache.reset()

    for start in range(0, T, prefill_chunk):
        logits = model(input_ids[:, start:start + prefill_chunk], cache=cache)[:, -1]  # [B, V]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, top_k, generator)  # [B]
        if eos_id is not None:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        out[:, T + i] = token
        if i == max_new_tokens - 1:
            break
        if eos_id is not None and i % 16 == 15 and bool(finished.all()):
            out[:, T + i + 1:] = eos_id
            break
        if step is None:
            logits = model(token[:, None], cache=cache)[:, -1]
        else:
            logits = step(token, T + i)
    model.train(was_training)
    return out
