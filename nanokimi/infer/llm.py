"""Offline generation in vLLM's style: build once, generate for many prompts at once.

    llm = LLM("runs/tiny")
    outs = llm.generate(["def main(", "import os"], SamplingParams(max_tokens=64, temperature=0.8, seed=1))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason
"""
from pathlib import Path

import torch
from torch import nn

from nanokimi.checkpoint import load_model_checkpoint, resolve_checkpoint
from nanokimi.infer.engine import Engine, sample_seed
from nanokimi.infer.nbce import nbce_generate
from nanokimi.infer.params import RequestOutput, SamplingParams

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"LLM: dtype must be 'auto', a torch.dtype or one of {sorted(DTYPES)}; got {dtype!r}.")
    return DTYPES[dtype]


def load_checkpoint_tokenizer(path: Path):
    """The checkpoint's tokenizer (nanokimi.data.load_tokenizer: tokenizer.json or Kimi's tiktoken.model +
    tokenizer_config.json), or None when it carries none."""
    from nanokimi.data import load_tokenizer
    from nanokimi.data.tokenizer import HF_TOKENIZER, TIKTOKEN_MODEL

    if not any((path / name).is_file() for name in (HF_TOKENIZER, TIKTOKEN_MODEL)):
        return None
    return load_tokenizer(path)


class LLM:
    """model: a nanokimi checkpoint (run folder or checkpoint folder) or a Transformer (then pass the
    tokenizer, or none and give prompt_token_ids; text outputs are then empty). A Hugging Face folder
    is loaded with nanokimi.interop.load_hf(path) first. engine_kwargs go to Engine."""

    def __init__(self, model: str | Path | nn.Module, device="auto", dtype="auto", tokenizer=None, **engine_kwargs):
        if isinstance(model, nn.Module):
            device = model.embed.weight.device if device == "auto" else torch.device(device)
            if dtype != "auto":
                model = model.to(device=device, dtype=resolve_dtype(dtype, device))
            else:
                model = model.to(device)
        else:
            path = resolve_checkpoint(model)
            device = resolve_device(device)
            model = load_model_checkpoint(path, device).to(resolve_dtype(dtype, device))
            if tokenizer is None:
                tokenizer = load_checkpoint_tokenizer(path)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.engine = Engine(self.model, tokenizer, **engine_kwargs)
        self.engine.stream_outputs = False  # generate() waits for whole outputs
        self._next_id = 0

    def generate(self, prompts: str | list[str] | None = None,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 prompt_token_ids: list[list[int]] | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Outputs in the order of the prompts. Text prompts need a tokenizer."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("LLM.generate: give either prompts (text) or prompt_token_ids, not both or neither.")
        texts: list[str | None]
        if prompts is not None:
            if self.tokenizer is None:
                raise ValueError("LLM.generate: text prompts need a tokenizer; pass prompt_token_ids instead.")
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            ids = [self.tokenizer.encode(t) for t in texts]
        else:
            ids = [list(p) for p in prompt_token_ids]
            texts = [None] * len(ids)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(ids):
                raise ValueError(f"LLM.generate: {len(sampling_params)} sampling_params for {len(ids)} prompts.")
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(ids)
        engine = self.engine
        order = []
        nbce: dict[str, tuple[list[int], str | None, SamplingParams]] = {}
        try:
            for prompt_ids, text, p in zip(ids, texts, params):
                request_id = f"llm-{self._next_id}"
                self._next_id += 1
                if p.nbce_window is not None:  # NBCE requests run on their own decoder after the engine's
                    nbce[request_id] = (prompt_ids, text, p)
                else:
                    engine.add_request(request_id, prompt_ids, p, prompt=text)
                order.append(request_id)
        except ValueError:
            for request_id in order:
                engine.abort(request_id)
            engine.step()  # flush the aborted outputs
            raise
        finished: dict[str, RequestOutput] = {}
        progress = None
        if use_tqdm:
            from tqdm import tqdm
            progress = tqdm(total=len(order), desc="generate", unit="req", leave=False)
        wanted = set(order) - set(nbce)
        while len(finished) < len(wanted):
            for out in engine.step():
                if out.finished and out.request_id in wanted and out.request_id not in finished:
                    finished[out.request_id] = out
                    if progress is not None:
                        progress.update(1)
        for request_id, (prompt_ids, text, p) in nbce.items():
            finished[request_id] = self._generate_nbce(request_id, prompt_ids, text, p)
            if progress is not None:
                progress.update(1)
        if progress is not None:
            progress.close()
        return [finished[r] for r in order]

    def _generate_nbce(self, request_id: str, prompt_ids: list[int], text: str | None,
                       params: SamplingParams) -> RequestOutput:
        if self.tokenizer is None:
            raise ValueError("LLM.generate: NBCE (nbce_window) splits the prompt's text and needs a tokenizer.")
        seed = params.seed if params.seed is not None else sample_seed(None, 0)
        prompt = text if text is not None else self.tokenizer.decode(prompt_ids)
        return nbce_generate(self.model, self.tokenizer, request_id, prompt, params,
                             [sample_seed(seed, i) for i in range(params.n)], prompt_ids)

    def stats(self) -> dict:
        return self.engine.stats()
