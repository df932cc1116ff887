"""Shared by the serve tests: a tiny hybrid checkpoint (KDA + MLA + GQA, MoE) with a real BPE tokenizer."""
import json
from pathlib import Path

import torch

from nanokimi import ModelConfig, build_model
from nanokimi.checkpoint import save_checkpoint
from nanokimi.data import Tokenizer

TINY = dict(vocab_size=512, hidden_size=64, num_layers=3, mixers="KAG", num_heads=4, num_kv_heads=2, head_dim=16,
            kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, kda_num_heads=2,
            kda_head_dim=16, intermediate_size=96, num_experts=6, num_experts_per_tok=2,
            moe_intermediate_size=32, routed_scaling_factor=1.5, max_position_embeddings=512)


def make_checkpoint(root: Path, **overrides) -> Path:
    texts = [Path(json.__file__).read_text(), Path(torch.__file__).read_text()]
    tokenizer = Tokenizer.train(texts, vocab_size=TINY["vocab_size"])
    tokenizer.save(root / "tokenizer.json")
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**TINY, **overrides})).eval()
    return save_checkpoint(root / "tiny" / "checkpoint", model, tokenizer_file=root / "tokenizer.json")
