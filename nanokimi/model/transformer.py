"""The Kimi-family decoder: embeddings, a stack of (token mixer, FFN) blocks, final norm, LM head.

The mixer of each layer comes from the config's pattern (K = KDA, A = MLA, B = MLA with MoBA, G = GQA);
the FFN is dense SwiGLU for the first `first_k_dense` layers and MoE after (when num_experts > 0).
"""
import torch
import torch.nn.functional as F
from torch import nn

from nanokimi.config import ModelConfig
from nanokimi.model.attention import GroupedQueryAttention, MultiHeadLatentAttention
from nanokimi.model.cache import ModelCache
from nanokimi.model.kda import KimiDeltaAttention
from nanokimi.model.moe import MoE, Experts, Router, SwiGLU
from nanokimi.model.norm import RMSNorm
from nanokimi.model.packing import Documents
from nanokimi.model.paged import PagedBatch, paged_mixer_forward
from nanokimi.model.residual import PreNormResidual


def make_mixer(letter: str, cfg: ModelConfig) -> nn.Module:
    if letter == "K":
        return KimiDeltaAttention(cfg)
    if letter in "AB":
        return MultiHeadLatentAttention(cfg, moba=letter == "B")
    return GroupedQueryAttention(cfg)


def make_residual(cfg: ModelConfig) -> nn.Module:
    if cfg.attn_res == "none":
        return PreNormResidual()
    from nanokimi.model.attn_res import AttentionResiduals
    return AttentionResiduals(cfg.hidden_size, 2 * cfg.num_layers, mode=cfg.attn_res,
                              num_blocks=cfg.attn_res_blocks, eps=cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.mixer_kind = cfg.layer_mixers[index]
        self.mixer_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mixer = make_mixer(self.mixer_kind, cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(index) else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cache=None, pos=0, documents: Documents | None = None) -> torch.Tensor:
        """The whole block with the plain PreNorm residual: x [B, T, D] -> [B, T, D]. (Other residual
        schemes drive the two sublayers one at a time from Transformer.hidden_states.)"""
        x = x + self.mix(self.mixer_norm(x), cache, pos, documents)
        return x + self.ffn(self.ffn_norm(x))

    def mix(self, x: torch.Tensor, cache=None, pos=0, documents: Documents | None = None) -> torch.Tensor:
        """The token mixer; a PagedBatch as `pos` selects the paged engine's path (nanokimi.model.paged)."""
        if isinstance(pos, PagedBatch):
            return paged_mixer_forward(self.mixer, x, cache, pos)
        return self.mixer(x, cache, pos, documents=documents)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.residual = make_residual(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        if self.embed.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, Experts):
                nn.init.normal_(module.gate_up, std=std)
                nn.init.normal_(module.down, std=std)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, std=std)
                module.e_score_correction_bias.zero_()
            elif isinstance(module, KimiDeltaAttention):
                module.reset_decay_parameters()
        for module in self.modules():  # convs are short filters: a wider init keeps them alive
            if isinstance(module, nn.Conv1d):
                nn.init.uniform_(module.weight, -module.weight.shape[-1] ** -0.5, module.weight.shape[-1] ** -0.5)
        if hasattr(self.residual, "reset_parameters"):
            self.residual.reset_parameters()

    def new_cache(self, batch_size: int, max_len: int) -> ModelCache:
        device, dtype = self.embed.weight.device, self.embed.weight.dtype
        return ModelCache([b.mixer.new_cache(batch_size, max_len, device, dtype) for b in self.layers],
                          batch_size, max_len)

    def hidden_states(self, input_ids: torch.Tensor, cache: ModelCache | None = None,
                      position: torch.Tensor | None = None, batch: PagedBatch | None = None,
                      documents: Documents | None = None) -> torch.Tensor:
        """input_ids [B, T] -> final-normed hidden states [B, T, D].

        `documents` (training on packed rows, no cache) keeps the documents of each row apart: see
        nanokimi.model.packing.

        `position` (a 0-d long device tensor, with a cache) selects the fixed-shape decode path used
        under CUDA graphs: tokens are written at that position and attention runs over the whole
        cache under a length mask. The caller owns the position then; cache.pos is not advanced.
        `batch` (with a PagedCache as cache) runs the inference engine's packed step: input_ids [1, N].
        """
        B, T = input_ids.shape
        pos = 0
        if batch is not None:
            pos = batch
        elif cache is not None:
            cache.check_room(B, T)
            pos = cache.pos if position is None else position
        elif position is not None:
            raise ValueError("position= selects the fixed-shape decode path and needs cache= as well.")
        # each sublayer's pre-norm, and None after the last: start() gets the first and add() the next one, which
        # AttnRes fuses into the kernel that computes that sublayer's input (phase 1's or the merge's)
        norms = [norm for block in self.layers for norm in (block.mixer_norm, block.ffn_norm)] + [None]
        state = self.residual.start(self.embed(input_ids), norms[0])
        plain = isinstance(self.residual, PreNormResidual)
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            if plain:
                state = block(state, layer_cache, pos, documents=documents)
                continue
            x = self.residual.normed_input(state, 2 * i, block.mixer_norm)
            state = self.residual.add(state, 2 * i, block.mix(x, layer_cache, pos, documents), norms[2 * i + 1])
            x = self.residual.normed_input(state, 2 * i + 1, block.ffn_norm)
            state = self.residual.add(state, 2 * i + 1, block.ffn(x), norms[2 * i + 2])
        if cache is not None and position is None and batch is None:
            cache.pos += T
        return self.norm(self.residual.finish(state))

    def forward(self, input_ids: torch.Tensor, cache: ModelCache | None = None,
                position: torch.Tensor | None = None, documents: Documents | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]. See hidden_states for `position` and `documents`."""
        return self.lm_head(self.hidden_states(input_ids, cache, position, documents=documents))

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 8192,
             documents: Documents | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over the targets that are not -100. The LM head runs over chunks of
        tokens, each recomputed in the backward pass, so fp32 logits for the whole batch never exist at once.
        chunk_tokens=0 runs the whole batch in one piece with no recompute (faster when the [N, vocab] logits
        fit in memory). `documents`: packed rows (see hidden_states)."""
        h = self.hidden_states(input_ids, documents=documents).flatten(0, 1)  # [N, D]
        targets = targets.flatten()
        if chunk_tokens == 0:
            return self._chunk_loss_sum(h, targets) / targets.ne(-100).sum().clamp(min=1)
        total = h.new_zeros((), dtype=torch.float32)
        for start in range(0, h.shape[0], chunk_tokens):
            piece = (h[start:start + chunk_tokens], targets[start:start + chunk_tokens])
            if torch.is_grad_enabled():
                total = total + torch.utils.checkpoint.checkpoint(self._chunk_loss_sum, *piece, use_reentrant=False)
            else:
                total = total + self._chunk_loss_sum(*piece)
        return total / targets.ne(-100).sum().clamp(min=1)

    def _chunk_loss_sum(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.lm_head(h).float(), targets, reduction="sum", ignore_index=-100)
