"""A nanokimi model class for EleutherAI's lm-evaluation-harness (`pip install -e ".[lmeval]"`).

    python -m nanokimi.tasks.lm_eval_adapter --model nanokimi --model_args ckpt=runs/tiny --tasks arc_easy

runs `lm_eval` with the class registered (lm_eval finds model classes only in modules already imported;
`import nanokimi.tasks.lm_eval_adapter` does the same from Python before `lm_eval.simple_evaluate`).
loglikelihood scores the continuation's tokens under one full forward pass (the context left-truncated
to the model's positions); loglikelihood_rolling scores a document in windows of the model's length,
each token once; generate_until samples through `nanokimi.tasks.evaluate.model_generate_fn`, the context
cut on the left so that it and max_gen_toks fit the model's positions.
"""
from __future__ import annotations

import sys

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from nanokimi.tasks.evaluate import model_generate_fn


@register_model("nanokimi")
class NanokimiLM(LM):
    def __init__(self, ckpt: str, device: str | None = None, max_gen_toks: int = 256, batch_size=1, **_ignored):
        super().__init__()
        from nanokimi.infer.sample import load_for_sampling

        model, tokenizer = load_for_sampling(ckpt, device)
        self.model, self.tokenizer, self.max_gen_toks = model, tokenizer, int(max_gen_toks)
        self.max_length = model.config.max_position_embeddings
        self._device = next(model.parameters()).device

    @torch.no_grad()
    def _token_logprobs(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [T] -> (log p(ids[t] | ids[:t]) for t >= 1 [T-1], whether each was the argmax [T-1])."""
        tokens = torch.tensor([ids], device=self._device)  # [1, T]
        logprobs = self.model(tokens[:, :-1]).float().log_softmax(-1)[0]  # [T-1, V]
        targets = tokens[0, 1:]
        return logprobs.gather(-1, targets[:, None])[:, 0].cpu(), (logprobs.argmax(-1) == targets).cpu()

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens, tokenised together where the context's tokens are a prefix."""
        context_ids = self.tokenizer.encode(context) if context else []
        whole = self.tokenizer.encode(context + continuation)
        if whole[:len(context_ids)] == context_ids:
            continuation_ids = whole[len(context_ids):]
        else:
            continuation_ids = self.tokenizer.encode(continuation)
        return [self.tokenizer.eot_id] + context_ids, continuation_ids

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, continuation = request.args
            context_ids, continuation_ids = self._split(context, continuation)
            if not continuation_ids:
                results.append((0.0, True))
                continue
            ids = (context_ids + continuation_ids)[-(self.max_length + 1):]
            logprobs, greedy = self._token_logprobs(ids)
            count = len(continuation_ids)
            results.append((float(logprobs[-count:].sum()), bool(greedy[-count:].all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in requests:
            ids = [self.tokenizer.eot_id] + self.tokenizer.encode(request.args[0])
            total, scored = 0.0, 1  # ids[0] is the prefix; every later token is scored exactly once
            while scored < len(ids):
                end = min(scored + self.max_length, len(ids))
                start = max(0, end - self.max_length - 1)
                logprobs, _ = self._token_logprobs(ids[start:end])
                total += float(logprobs[scored - start - 1:].sum())
                scored = end
            results.append(total)
        return results

    def _fit(self, context: str, room: int) -> str:
        """The context cut on the left to its last `room` tokens (lm_eval's prompts may exceed the model)."""
        ids = self.tokenizer.encode(context)
        return context if len(ids) <= room else self.tokenizer.decode(ids[-room:])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same settings go to the generator together (equal-length prompts share a batch)."""
        generate_fn = model_generate_fn(self.model, self.tokenizer)
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            gen_kwargs = request.args[1]
            until = gen_kwargs.get("until", [])
            until = (until,) if isinstance(until, str) else tuple(until)
            temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample", False) else 0.0
            max_tokens = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            groups.setdefault((until, temperature, max_tokens), []).append(i)
        results = [""] * len(requests)
        for (until, temperature, max_tokens), members in groups.items():
            max_tokens = min(max_tokens, self.max_length - 1)
            contexts = [self._fit(requests[i].args[0], self.max_length - max_tokens) for i in members]
            outputs = generate_fn(contexts, 1, temperature, max_tokens, 0, until)
            for i, completions in zip(members, outputs):
                results[i] = completions[0].text
        return results


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
