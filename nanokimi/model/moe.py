"""Feed-forward layers: dense SwiGLU and the DeepSeek-V3 / Kimi style Mixture of Experts.

Router: sigmoid scores in fp32; experts are chosen on scores + correction bias (optionally only from
the best groups), but weighted by the raw scores (renormalised, times routed_scaling_factor).
Experts run as grouped matmuls over tokens sorted by expert; load balance comes from nudging the
correction bias after each step (`update_router_bias`), with no auxiliary loss.
"""
import torch
import torch.nn.functional as F
from torch import nn

from nanokimi.config import ModelConfig


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, k] fp32, expert indices [N, k])."""
        with torch.autocast(x.device.type, enabled=False):  # autocast would run this matmul in bf16
            scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))  # [N, E]
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            grouped = choice.view(x.shape[0], self.n_group, -1)  # [N, G, E/G]
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # [N, G]
            best_groups = group_score.topk(self.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best_groups, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, indices


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether F.grouped_mm can take x: bf16, or fp32 on the CPU in eager mode (its meta kernel, which
    torch.compile traces with, accepts bf16 only), and a torch that has it."""
    if not hasattr(F, "grouped_mm"):
        return False
    cpu_fp32 = x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling()
    return x.dtype == torch.bfloat16 or cpu_fp32


def to_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in the autocast dtype when autocast is on for its device, else unchanged."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows x[ends[e-1]:ends[e]] times w[e] for every expert e. x [N, K], w [E, K, M] -> [N, M].

    Under autocast both operands go to the autocast dtype first (autocast does not cover grouped_mm),
    so bf16 training reaches the fused kernel. Without a usable F.grouped_mm it falls back to one
    matmul per expert, which reads the counts on the host (a device sync).
    """
    x = to_autocast_dtype(x)
    w = w.to(x.dtype)
    if grouped_mm_supported(x):
        return F.grouped_mm(x, w, offs=ends.to(torch.int32))
    return matmul_per_expert(x, w, ends)


@torch.compiler.disable
def matmul_per_expert(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The fallback of grouped_matmul: its shapes depend on the routing, so it stays out of compiled graphs."""
    counts = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
    return torch.cat([chunk @ w[e] for e, chunk in enumerate(x.split(counts)) if counts[e]] or [x.new_zeros(0, w.shape[-1])])


class GatherRows(torch.autograd.Function):
    """x[perm // group] for a permutation perm of range(group * len(x)), with its inverse: row j of the
    result is row perm[j] // group of x, so each row of x appears `group` times. The backward is the gather
    grad[inverse] summed over each row's `group` copies, rather than autograd's default scatter-add
    (index_put with accumulate sorts or uses atomics)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor, group: int = 1) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.group = group
        return x[perm // group] if group > 1 else x[perm]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        grad = grad[inverse]
        if ctx.group > 1:
            grad = grad.view(-1, ctx.group, *grad.shape[1:]).sum(1)
        return grad, None, None, None


DENSE_EXPERTS_ELEMENTS = 1 << 24  # every expert on every row when rows x experts x max(2I, D) is at most this


class Experts(nn.Module):
    """All routed experts as stacked weights: gate_up [E, 2I, D] (gate rows first), down [E, D, I]."""

    def __init__(self, num_experts: int, hidden: int, inner: int):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * inner, hidden))
        self.down = nn.Parameter(torch.empty(num_experts, hidden, inner))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], weights/indices [N, k] -> (out [N, D], tokens per expert [E]).

        The N*k (token, choice) slots are sorted by expert; every move between slot order and expert
        order is a permutation (gathers both ways, no scatter-adds), and the k outputs of a token are
        summed in slot order."""
        E, (N, k), D = self.gate_up.shape[0], indices.shape, x.shape[-1]
        if (not grouped_mm_supported(to_autocast_dtype(x))
                and N * E * max(self.gate_up.shape[1], D) <= DENSE_EXPERTS_ELEMENTS):
            return self.all_experts(x, weights, indices)
        flat = indices.flatten()  # [N*k] expert of each slot
        order = flat.argsort(stable=True)  # expert-sorted position -> slot
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(N * k, device=order.device))
        experts = torch.arange(E, device=flat.device, dtype=flat.dtype)
        ends = torch.searchsorted(flat[order], experts, right=True)  # [E]; bincount would sync on CUDA
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        sorted_x = GatherRows.apply(to_autocast_dtype(x), order, inverse, k)  # [N*k, D], cast before the gather
        h = grouped_matmul(sorted_x, self.gate_up.transpose(1, 2), ends)  # [N*k, 2I]
        gate, up = h.chunk(2, dim=-1)
        y = grouped_matmul(F.silu(gate) * up, self.down.transpose(1, 2), ends)  # [N*k, D], expert order
        y = GatherRows.apply(y, inverse, order).view(N, k, D)  # slot order
        acc = torch.promote_types(y.dtype, torch.float32)  # bf16 outputs summed in fp32
        out = (y.to(acc) * weights.unsqueeze(-1).to(acc)).sum(1)  # [N, D]
        return out.to(x.dtype), counts

    def all_experts(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """forward's sum with every expert on every row, each expert's output weighted by the row's routing
        weight for it (0 where the row did not choose it). Its shapes do not depend on the routing: no host
        read of expert counts, so a step can be captured in a CUDA graph or compiled whole. Taken where
        grouped_mm cannot take x's dtype (fp32 or fp64 on CUDA, compiled fp32) and the rows are few (a decode
        step): E/k times the arithmetic, every expert's weights read once, as a decode step reads them anyway."""
        E, I2, D = self.gate_up.shape
        N = x.shape[0]
        h = (x @ self.gate_up.reshape(E * I2, D).t()).view(N, E, I2)  # [N, E, 2I]
        gate, up = h.chunk(2, dim=-1)
        routing = torch.zeros(N, E, dtype=x.dtype, device=x.device).scatter_(1, indices, weights.to(x.dtype))
        a = F.silu(gate) * up * routing.unsqueeze(-1)  # [N, E, I]
        acc = torch.promote_types(x.dtype, torch.float32)
        out = torch.bmm(a.transpose(0, 1), self.down.transpose(1, 2)).sum(0, dtype=acc)  # [E, N, D] -> [N, D]
        slots = indices.flatten()
        counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, slots, torch.ones_like(slots))
        return out.to(x.dtype), counts


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.router = Router(cfg)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared = (SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)
                       if cfg.num_shared_experts > 0 else None)
        self.register_buffer("expert_load", torch.zeros(cfg.num_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, indices = self.router(flat)
        out, counts = self.experts(flat, weights, indices)
        if self.training:
            self.expert_load += counts.to(self.expert_load.dtype)
        out = out.view(B, T, D)
        return out if self.shared is None else out + self.shared(x)


@torch.no_grad()
def update_router_bias(model: nn.Module, rate: float = 1e-3) -> None:
    """Aux-loss-free balancing: move each expert's correction bias up if it got fewer tokens than the
    mean since the last call, down if more; then clear the counts. Call after each optimizer step."""
    for module in model.modules():  # no host check of the load: an empty load gives sign(0) = 0, no sync
        if isinstance(module, MoE):
            load = module.expert_load
            module.router.e_score_correction_bias += rate * torch.sign(load.mean() - load)
            load.zero_()
