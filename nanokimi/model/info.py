"""Size facts of a config, computed on the meta device (no memory): parameters, cache bytes."""
from nanokimi.config import ModelConfig
from nanokimi.model import build_model
from nanokimi.model.moe import Experts


def model_info(cfg: ModelConfig, cache_dtype_bytes: int = 2) -> dict:
    """total / activated parameter counts, KV-cache bytes per token, recurrent-state bytes per sequence.

    `activated` counts every parameter one token uses (embedding row excluded as it is a lookup,
    LM head included); `activated_with_embedding` adds the embedding table, the other common convention.
    """
    model = build_model(cfg, device="meta")
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if isinstance(module, Experts):
            per_expert = (module.gate_up.numel() + module.down.numel()) // module.gate_up.shape[0]
            inactive += per_expert * (cfg.num_experts - cfg.num_experts_per_tok)
    embedding = 0 if cfg.tie_word_embeddings else model.embed.weight.numel()
    kv_per_token = state_per_seq = 0
    for letter in cfg.layer_mixers:
        if letter == "G":
            kv_per_token += 2 * cfg.num_kv_heads * cfg.head_dim * cache_dtype_bytes
        elif letter in "AB":
            kv_per_token += (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cache_dtype_bytes
        else:
            inner = cfg.kda_num_heads * cfg.kda_head_dim
            state_per_seq += cfg.kda_num_heads * cfg.kda_head_dim ** 2 * 4
            state_per_seq += (cfg.kda_conv_size - 1) * 3 * inner * cache_dtype_bytes
    return {
        "total_params": total,
        "activated_params": total - inactive - embedding,
        "activated_with_embedding": total - inactive,
        "layers": cfg.layer_mixers,
        "kv_cache_bytes_per_token": kv_per_token,
        "recurrent_state_bytes_per_sequence": state_per_seq,
    }


def format_info(name: str, info: dict) -> str:
    def human(n: float) -> str:
        for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= size:
                return f"{n / size:.2f}{unit}"
        return str(int(n))

    return "\n".join([
        f"model              {name}",
        f"layers             {info['layers']}",
        f"total params       {human(info['total_params'])} ({info['total_params']:,})",
        f"activated params   {human(info['activated_params'])} per token "
        f"({human(info['activated_with_embedding'])} counting the embedding table)",
        f"KV cache           {info['kv_cache_bytes_per_token']:,} bytes per token (bf16)",
        f"recurrent state    {info['recurrent_state_bytes_per_sequence']:,} bytes per sequence (KDA, fp32 state)",
    ])
