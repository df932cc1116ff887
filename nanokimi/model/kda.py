"""Kimi Delta Attention layer (Kimi Linear): short causal conv, channel-wise decay, delta rule, gated norm.

    q, k, v = SiLU(CausalDepthwiseConv(W_q x, W_k x, W_v x));  q, k = L2Norm(q), L2Norm(k)
    g       = -exp(A_log[h]) * softplus(W_fb W_fa x + dt_bias)     log-decay per channel [B, T, H, D]
    beta    = sigmoid(W_b x)                                        [B, T, H]
    o       = KDA(q, k, v, g, beta)                                 nanokimi.ops.kda
    out     = W_o(sigmoid(W_gb W_ga x) * RMSNorm_per_head(o))
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from nanokimi.config import ModelConfig
from nanokimi.model.cache import RecurrentCache
from nanokimi.model.packing import Documents
from nanokimi.ops.kda import kda

kda_outside_compile = torch.compiler.disable(kda)  # fla's Triton kernels run as they are; the layer around them compiles


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) + eps)


def causal_depthwise_conv(window: torch.Tensor, weight: torch.Tensor,
                          positions: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal conv as a sum of shifted rows, in the [B, T, C] layout: no transposes, and under
    torch.compile one fused kernel (with the SiLU after it) instead of conv1d's layout copies.
    window [B, K-1+T, C] (K-1 history rows first), weight [C, 1, K] (nn.Conv1d's) -> [B, T, C].
    positions [B, T] (packed documents): each token's index in its document; a tap reaching back further
    than that is dropped, so every document starts from a zero history."""
    K = weight.shape[-1]
    T = window.shape[1] - (K - 1)
    w = weight.squeeze(1).t()  # [K, C]
    out = None
    for j in range(K):
        tap = window[:, j:j + T] * w[j]  # reaches back K-1-j tokens
        if positions is not None and j < K - 1:
            tap = tap * (positions >= K - 1 - j).unsqueeze(-1).to(tap.dtype)
        out = tap if out is None else out + tap
    return out


class KimiDeltaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = H, D = cfg.kda_num_heads, cfg.kda_head_dim
        self.conv_size = cfg.kda_conv_size
        self.eps = cfg.norm_eps
        hidden, inner = cfg.hidden_size, H * D
        self.q_proj = nn.Linear(hidden, inner, bias=False)
        self.k_proj = nn.Linear(hidden, inner, bias=False)
        self.v_proj = nn.Linear(hidden, inner, bias=False)
        self.conv = nn.Conv1d(3 * inner, 3 * inner, cfg.kda_conv_size, groups=3 * inner, bias=False)
        self.f_a_proj = nn.Linear(hidden, D, bias=False)
        self.f_b_proj = nn.Linear(D, inner, bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(inner))
        self.A_log = nn.Parameter(torch.zeros(H))
        self.b_proj = nn.Linear(hidden, H, bias=False)
        self.g_a_proj = nn.Linear(hidden, D, bias=False)
        self.g_b_proj = nn.Linear(D, inner, bias=False)
        self.o_norm_weight = nn.Parameter(torch.ones(D))
        self.o_proj = nn.Linear(inner, hidden, bias=False)

    @torch.no_grad()
    def reset_decay_parameters(self) -> None:
        """A_log = log U(1, 16); dt_bias = inverse softplus of a log-uniform step in [1e-3, 0.1]."""
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(0.1)).exp()
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def new_cache(self, batch_size: int, max_len: int, device, dtype) -> RecurrentCache:
        C = 3 * self.num_heads * self.head_dim
        return RecurrentCache(
            torch.zeros(batch_size, self.conv_size - 1, C, device=device, dtype=dtype),
            torch.zeros(batch_size, self.num_heads, self.head_dim, self.head_dim, device=device, dtype=torch.float32),
        )

    def forward(self, x: torch.Tensor, cache: RecurrentCache | None = None, pos: int = 0,
                documents: Documents | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        if documents is not None and cache is not None:
            raise ValueError("documents= (packed training rows) cannot be combined with a cache.")
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)  # [B, T, 3HD]
        if cache is None:
            history = qkv.new_zeros(B, self.conv_size - 1, qkv.shape[-1])
        else:
            history = cache.conv.to(qkv.dtype)
        window = torch.cat([history, qkv], dim=1)  # [B, K-1+T, 3HD]
        if cache is not None:
            cache.conv.copy_(window[:, window.shape[1] - (self.conv_size - 1):])
        qkv = F.silu(causal_depthwise_conv(window, self.conv.weight.to(qkv.dtype),
                                           None if documents is None else documents.positions))
        q, k, v = (t.reshape(B, T, H, D) for t in qkv.split(H * D, dim=-1))
        q, k = l2_normalize(q).to(v.dtype), l2_normalize(k).to(v.dtype)

        g = self.f_b_proj(self.f_a_proj(x)).float() + self.dt_bias.float()
        g = -self.A_log.float().exp().repeat_interleave(D) * F.softplus(g)  # [B, T, HD]
        beta = torch.sigmoid(self.b_proj(x).float())  # [B, T, H]
        if documents is not None:  # the documents end to end in one row, each from a zero state
            o, _ = kda_outside_compile(*(t.flatten(0, 1).unsqueeze(0) for t in (q, k, v, g.view(B, T, H, D), beta)),
                                       cu_seqlens=documents.cu_seqlens)
            o = o.view(B, T, H, D)
        else:
            o, state = kda_outside_compile(q, k, v, g.view(B, T, H, D), beta,
                           initial_state=None if cache is None else cache.state,
                           output_final_state=cache is not None)
        if cache is not None:
            cache.state.copy_(state)

        gate = self.g_b_proj(self.g_a_proj(x)).view(B, T, H, D)
        o32 = F.rms_norm(o.float(), (D,), self.o_norm_weight.float(), self.eps)
        o = (o32 * torch.sigmoid(gate.float())).to(x.dtype)
        return self.o_proj(o.reshape(B, T, H * D))
