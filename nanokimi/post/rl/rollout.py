"""Rollouts: k responses per prompt from the live policy, with partial rollouts (Kimi k1.5).

A backend turns requests (token ids so far, new-token budget, seed) into continuations with the chosen
tokens' log-probs. `EngineBackend` drives `nanokimi.infer.Engine` over the model it is given: in one process
the very nn.Module the optimizer updates (weights shared in memory, no copy; with FSDP2 each rank's full-weight
replica, see loop.py); `ReferenceBackend` is the readable naive form (a full forward per token) that tests
compare against.

Partial rollouts: with `segment_tokens` > 0 a response gets at most that many new tokens per iteration;
an unfinished response stays in the buffer and is continued in the next iteration from its own tokens
(by the then-current policy). A group goes to training once all of its k responses have finished.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def derive_seed(*parts) -> int:
    """A 62-bit seed from any parts (stable across processes and machines)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


@dataclass
class Response:
    token_ids: list[int] = field(default_factory=list)
    engine_logprobs: list[float | None] = field(default_factory=list)  # per token, from the backend
    segment_start: int = 0  # token_ids[segment_start:] were generated in the latest iteration
    finish_reason: str | None = None  # "stop" (a stop token / string) or "length" (max_tokens); None while unfinished
    segments: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Group:
    """One prompt and its k responses. `example` is the task's Example (id, answer, difficulty)."""
    id: int
    example: object
    prompt_ids: list[int]
    responses: list[Response]

    @property
    def finished(self) -> bool:
        return all(r.finished for r in self.responses)


class ReferenceBackend:
    """Generation by the definition: a full forward over prompt + tokens so far for every new token, then a
    draw from softmax(logits / temperature) (top-p filtered) with the request's own generator."""

    def __init__(self, model, tokenizer, stop: tuple[str, ...] = (), stop_token_ids: set[int] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.stop = tuple(stop)
        self.stop_token_ids = set(stop_token_ids if stop_token_ids is not None else _stop_ids(tokenizer))

    @torch.no_grad()
    def generate(self, requests: list[tuple[list[int], int, int]], temperature: float,
                 top_p: float = 1.0) -> list[tuple[list[int], list[float], str | None]]:
        from nanokimi.infer.generate import sample_next

        device = self.model.embed.weight.device
        was_training = self.model.training
        self.model.eval()
        results = []
        for ids, budget, seed in requests:
            generator = torch.Generator(device=device).manual_seed(seed)
            tokens, logprobs, reason = [], [], None
            while len(tokens) < budget:
                logits = self.model(torch.tensor([ids + tokens], device=device))[0, -1:]  # [1, V]
                token = int(sample_next(logits, temperature, top_p, generator=generator)[0])
                logprobs.append(float(F.log_softmax(logits.float(), -1)[0, token]))
                tokens.append(token)
                if token in self.stop_token_ids or (self.stop and any(s in self.tokenizer.decode(tokens)
                                                                      for s in self.stop)):
                    reason = "stop"
                    break
            results.append((tokens, logprobs, reason))
        self.model.train(was_training)
        return results


class EngineBackend:
    """Generation through nanokimi.infer.Engine over the live model. The engine reads the model's parameters
    in place (the optimizer updates them in place, so even captured CUDA graphs see new weights). Every call
    starts by forgetting the prefix cache (its KV may come from weights since updated); within a call the k
    samples of a prompt share its cached prefix."""

    def __init__(self, model, tokenizer, stop: tuple[str, ...] = (), max_num_seqs: int = 256,
                 max_cache_tokens: int | None = None, max_step_tokens: int = 4096, prefix_caching: bool = True,
                 speculative: str | None = None, num_speculative_tokens: int = 4, scheduling: str = "fcfs",
                 chunk_tokens: int = 0):
        self.model, self.tokenizer, self.stop = model, tokenizer, list(stop)
        self.engine_kwargs = dict(max_num_seqs=max_num_seqs, max_cache_tokens=max_cache_tokens,
                                  max_step_tokens=max_step_tokens, enable_prefix_caching=prefix_caching,
                                  speculative=speculative, num_speculative_tokens=num_speculative_tokens,
                                  scheduling=scheduling, chunk_tokens=chunk_tokens)
        self.engine = None
        self.counter = 0

    def _engine(self):
        if self.engine is None:
            from nanokimi.infer import Engine
            self.engine = Engine(self.model, self.tokenizer, **self.engine_kwargs)
            self.engine.stream_outputs = False  # only finished responses are read: no per-step outputs or text
        return self.engine

    @torch.no_grad()
    def generate(self, requests: list[tuple[list[int], int, int]], temperature: float,
                 top_p: float = 1.0) -> list[tuple[list[int], list[float], str | None]]:
        was_training = self.model.training
        self.model.eval()
        recording = [m for m in self.model.modules() if getattr(m, "record_max_logits", False)]
        for module in recording:  # QK-Clip statistics come from the trainer's forward, not from generation
            module.record_max_logits = False
        try:
            done = self._run(requests, temperature, top_p)
        finally:
            self.model.train(was_training)
            for module in recording:
                module.record_max_logits = True
        results = []
        for out in done:
            tokens = list(out.token_ids)
            entries = out.logprobs or [None] * len(tokens)
            logprobs = [entry.get(t) if entry else None for t, entry in zip(tokens, entries)]
            reason = "stop" if out.finish_reason == "stop" else None  # "length" = the segment's budget ran out
            results.append((tokens, logprobs, reason))
        return results

    def _run(self, requests, temperature: float, top_p: float) -> list:
        """The engine's completions of `requests`, in their order."""
        from nanokimi.infer import SamplingParams

        engine = self._engine()
        engine.reset_prefix_cache()
        ids = []
        for prompt, budget, seed in requests:
            self.counter += 1
            ids.append(f"r{self.counter}")
            group = hashlib.blake2b(repr(prompt).encode(), digest_size=8).hexdigest()  # a prompt's k samples: one group
            engine.add_request(ids[-1], prompt, SamplingParams(max_tokens=budget, temperature=temperature, top_p=top_p,
                                                               seed=seed, stop=self.stop or None, logprobs=0,
                                                               group_id=group))
        done = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0]
        return [done[rid] for rid in ids]

    def stats(self) -> dict:
        return {} if self.engine is None else self.engine.stats()


def _stop_ids(tokenizer) -> set[int]:
    ids = getattr(tokenizer, "stop_ids", None)
    return set(ids) if ids else {tokenizer.eot_id}


class RolloutBuffer:
    """Groups in flight. `run(new_groups)` generates one iteration: every unfinished response of the buffered
    groups and of the new ones gets up to `segment_tokens` (0 = all remaining) new tokens, capped at
    `max_tokens` in all; returns the groups that finished, keeps the rest for the next iteration."""

    def __init__(self, backend, max_tokens: int, segment_tokens: int = 0, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, tokenizer=None, stop: tuple[str, ...] = ()):
        self.backend, self.max_tokens, self.segment_tokens = backend, max_tokens, segment_tokens
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.pending: list[Group] = []

    def run(self, new_groups: list[Group], step: int) -> tuple[list[Group], int]:
        """(finished groups, tokens generated in this iteration)."""
        groups = self.pending + new_groups
        work = []
        for group in groups:
            for i, response in enumerate(group.responses):
                if response.finished:
                    response.segment_start = len(response.token_ids)  # nothing new this iteration
                    continue
                remaining = self.max_tokens - len(response.token_ids)
                budget = remaining if self.segment_tokens <= 0 else min(self.segment_tokens, remaining)
                seed = derive_seed(self.seed, group.id, i, len(response.token_ids))
                work.append((response, (group.prompt_ids + response.token_ids, budget, seed)))
        outputs = self.backend.generate([request for _, request in work], self.temperature, self.top_p)
        generated = 0
        for (response, _), (tokens, logprobs, reason) in zip(work, outputs):
            response.segment_start = len(response.token_ids)
            response.token_ids += tokens
            response.engine_logprobs += logprobs
            response.segments += 1
            generated += len(tokens)
            if reason != "stop" and self.stop:
                reason = self._cut_at_stop(response)
            if reason == "stop":
                response.finish_reason = "stop"
            elif len(response.token_ids) >= self.max_tokens:
                response.finish_reason = "length"
        self.pending = [g for g in groups if not g.finished]
        return [g for g in groups if g.finished], generated

    def _cut_at_stop(self, response: Response) -> str | None:
        """A stop string may span two segments (the backend saw only its own part): cut the response after the
        first token whose text completes one, as an uncut generation would have stopped there."""
        if not any(s in self.tokenizer.decode(response.token_ids) for s in self.stop):
            return None
        for end in range(response.segment_start + 1, len(response.token_ids) + 1):
            if any(s in self.tokenizer.decode(response.token_ids[:end]) for s in self.stop):
                del response.token_ids[end:], response.engine_logprobs[end:]
                return "stop"
        return None

    def state_dict(self) -> list[dict]:
        return [{"id": g.id, "example": g.example, "prompt_ids": g.prompt_ids,
                 "responses": [vars(r).copy() for r in g.responses]} for g in self.pending]

    def load_state_dict(self, state: list[dict]) -> None:
        self.pending = [Group(s["id"], s["example"], list(s["prompt_ids"]), [Response(**r) for r in s["responses"]])
                        for s in state]
