"""Fast training paths on one GPU: per-module torch.compile, and a one-line report of which path each
component takes.

    model = compile_model(build_model(cfg).cuda())
    print(describe_paths(model, "cuda"))   # kda=fla (...) | moe=grouped_mm (bf16) | attention=SDPA flash ... | compile=on (...)

The blocks are compiled one module at a time (norms, mixer, FFN), not the whole model: dynamo inlines
nn.Module calls, so the graphs of identical layers are shared, compile time stays short, and a
component that cannot be traced (the fla KDA kernels, excluded with torch.compiler.disable in
model/kda.py) only breaks its own graph. Under FSDP2, compile after sharding: each sharded unit's forward
is compiled and FSDP's hooks stay eager around it.
"""
import torch
import torch.nn.functional as F
from torch import nn

from nanokimi.model.attention import GroupedQueryAttention, MultiHeadLatentAttention
from nanokimi.model.kda import KimiDeltaAttention
from nanokimi.model.moe import MoE
from nanokimi.model.residual import PreNormResidual
from nanokimi.model.rope import Rotary
from nanokimi.runtime import compile_fn, raise_recompile_limits
from nanokimi.runtime.attention import attention_backend
from nanokimi.runtime.compile import compile_module_
from nanokimi.runtime.graphs import capture


def compile_model(model: nn.Module, fullgraph: bool = True, loss: bool = True, mode: str | None = None,
                  scope: str = "auto") -> nn.Module:
    """Compile the blocks in place (state_dict keys do not change) and, with loss=True, the chunked
    LM-head + cross-entropy, and the Attention Residuals ops when the model has them. Returns the same model.

    scope="module": each block's two norms, token mixer and FFN separately (fullgraph applies to all but
    KDA mixers, whose kernel call is a deliberate graph break, and MoE FFNs, whose per-expert fallback outside
    bf16 breaks the graph; in bf16 they compile to one graph all the same). scope="block": each whole block as one
    graph (residual adds fuse with the norms; needs the plain PreNorm residual; blocks with a KDA mixer
    compile with graph breaks around the kernel, which costs CPU time at every break). scope="auto"
    (default): whole blocks where the block has no graph break and the residual is PreNorm, modules
    elsewhere (KDA blocks, AttnRes models, blocks holding FSDP2 units) - the fastest measured on an H100
    (docs/performance.md)."""
    if scope not in ("auto", "module", "block"):
        raise ValueError(f"scope must be 'auto', 'module' or 'block', got {scope!r}.")
    raise_recompile_limits()
    cfg = model.config
    device = model.embed.weight.device
    for module in model.modules():  # build RoPE tables now so compiled graphs never see them change
        if isinstance(module, Rotary):
            module.ensure_length(min(cfg.max_position_embeddings, 131072), device)
    plain = isinstance(model.residual, PreNormResidual)
    if scope == "block" and not plain:
        raise ValueError(f"scope='block' needs the plain PreNorm residual; this model has attn_res={cfg.attn_res!r}. "
                         "Use scope='module'.")
    for block in model.layers:
        has_break = isinstance(block.mixer, KimiDeltaAttention)
        # MoE outside bf16 (fp32 on CPU under compile, fp32/fp16 on CUDA) falls back to a per-expert loop whose
        # shapes depend on the routing: a graph break there, so its FFN never asks for one whole graph
        moe = isinstance(block.ffn, MoE)
        sharded = has_sharded_parts(block)  # FSDP2 units inside (nanokimi.train.distributed): hooks stay outside graphs
        if scope == "block" and sharded:
            raise ValueError("scope='block' cannot compile a block whose mixer/FFN are FSDP2 units; use scope='auto'.")
        if scope == "block" or (scope == "auto" and plain and not has_break and not sharded):
            _compile_module(block, fullgraph=fullgraph and not has_break and not moe, mode=mode)
            continue
        _compile_module(block.mixer_norm, fullgraph=fullgraph, mode=mode)
        _compile_module(block.ffn_norm, fullgraph=fullgraph, mode=mode)
        _compile_module(block.mixer, fullgraph=fullgraph and not has_break, mode=mode)
        _compile_module(block.ffn, fullgraph=fullgraph and not moe, mode=mode)
    _compile_module(model.norm, fullgraph=fullgraph, mode=mode)
    if hasattr(model.residual, "compile_kernels"):  # Attention Residuals: its phase-1 / merge ops, fused
        model.residual.compile_kernels(mode)
    if loss:
        model._chunk_loss_sum = compile_fn(model._chunk_loss_sum, fullgraph=fullgraph, mode=mode)
    return model


def has_sharded_parts(block: nn.Module) -> bool:
    """Whether a submodule of `block` (not the block itself) is an FSDP2 unit."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for name, m in block.named_modules() if name)


def _compile_module(module: nn.Module, **options) -> None:
    """Compile `module` in place. An FSDP2 unit (nanokimi.train.distributed.shard_model; compile after
    sharding) gets only its forward compiled: FSDP's all-gather / reshard hooks then run eagerly around
    the graph instead of being traced into it (dynamo skips them, which would break a fullgraph)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        module.forward = compile_fn(module.forward, **options)
    else:
        compile_module_(module, **options)


def _is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None or "forward" in vars(module)


def _kda_path(device: torch.device) -> str:
    try:
        from nanokimi.ops.kda import kda_backend
    except ImportError:
        return "torch (nanokimi.ops.kda has no kda_backend)"
    try:
        path, reason = kda_backend(device)
        return f"{path} ({reason})"
    except Exception as error:  # noqa: BLE001 - a report must not fail
        return f"unknown ({type(error).__name__}: {error})"


def _moe_path(device: torch.device, dtype: torch.dtype) -> str:
    if not hasattr(F, "grouped_mm"):
        return f"per-expert loop (torch {torch.__version__} has no F.grouped_mm; host sync per layer)"
    if dtype == torch.bfloat16:
        return "grouped_mm (bf16)"
    if device.type == "cpu" and dtype == torch.float32:
        return "grouped_mm (fp32, cpu)"
    return (f"all experts on few rows, else a per-expert loop ({dtype} on {device.type}: grouped_mm needs bf16 - "
            "use bf16 autocast; the loop syncs with the host per layer)")


def describe_paths(model: nn.Module, device: str | torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """One line: which path KDA, MoE, attention and compile take on `device`, and why.
    dtype is the compute dtype (bf16 under autocast or for a bf16 model)."""
    device = torch.device(device)
    parts = []
    mixers = [block.mixer for block in model.layers]
    if any(isinstance(m, KimiDeltaAttention) for m in mixers):
        parts.append(f"kda={_kda_path(device)}")
    if any(isinstance(m, MoE) for m in model.modules()):
        parts.append(f"moe={_moe_path(device, dtype)}")
    shapes = set()
    for m in mixers:
        if isinstance(m, GroupedQueryAttention):
            shapes.add(("gqa", m.head_dim, m.head_dim))
        elif isinstance(m, MultiHeadLatentAttention):
            shapes.add(("mla" + ("+moba" if m.moba else ""), m.nope_dim + m.rope_dim, m.v_dim))
    for kind, dqk, dv in sorted(shapes):
        try:
            backend = attention_backend(device, dqk, dv, dtype)
        except Exception as error:  # noqa: BLE001
            backend = f"unknown ({type(error).__name__})"
        parts.append(f"attention[{kind} qk={dqk} v={dv}]={backend}")
    compiled = sum(_is_compiled(m) for m in model.modules())
    parts.append(f"compile={'on (' + str(compiled) + ' modules)' if compiled else 'off'}")
    return " | ".join(parts)


def capture_step(step, warmup: int = 3):
    """The whole training step in one CUDA graph: removes the CPU's launch and Python time per step.

    step() must do forward, backward and the optimizer update on tensors that stay where they are (copy
    each new batch into the same input tensors), make no host syncs, and return the loss tensor. Use
    autocast with cache_enabled=False, and optimizers that can be captured (make_optimizer(...,
    capturable=True)); the learning rate is baked in unless the optimizer reads it from a tensor.
    Runs step() `warmup` times on a side stream (compilation and autotuning happen there), then records one
    call (recording runs no kernels), and returns replay() -> the loss tensor, refreshed by each replay. The
    warm-up calls are real steps on whatever the input tensors hold (fill them with a batch first); the
    first replay is the next step."""
    if not torch.cuda.is_available():
        raise RuntimeError("capture_step needs CUDA; on the CPU call the step function itself.")
    graph = capture(step, warmup=warmup)

    def replay() -> torch.Tensor:
        return graph.replay()

    replay.graph = graph.graph
    return replay


def make_optimizer(model: nn.Module, name: str = "adamw", lr: float = 3e-4, weight_decay: float = 0.1,
                   capturable: bool = False):
    """"adamw": torch AdamW, fused on CUDA (one kernel for all parameters; capturable=True for
    capture_step). "muon": nanokimi.optim's Muon + AdamW builder."""
    if name == "muon":
        from nanokimi.optim import build_optimizer
        return build_optimizer(model, "muon", lr=lr, weight_decay=weight_decay)
    if name != "adamw":
        raise ValueError(f"optimizer must be 'adamw' or 'muon', got {name!r}.")
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), fused=fused,
                             capturable=capturable and fused)
