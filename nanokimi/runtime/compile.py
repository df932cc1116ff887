"""The one place nanokimi calls torch.compile and sets dynamo's limits."""
import torch


def raise_recompile_limits(limit: int = 64) -> None:
    """Each layer instance may add a guard set to a shared code object; 16+ layers exceed the default 8."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < limit:
            setattr(config, name, limit)
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < 8 * limit:
            setattr(config, name, 8 * limit)


def compile_fn(fn, **options):
    """torch.compile(fn, **options) with dynamo's recompile limits raised first. `fn` may be a function, a bound
    method or an nn.Module; options are torch.compile's (fullgraph, dynamic, mode, options)."""
    raise_recompile_limits()
    return torch.compile(fn, **options)


def compile_module_(module: torch.nn.Module, **options) -> None:
    """Compile `module` in place (`module.compile`: state_dict keys do not change), limits raised first."""
    raise_recompile_limits()
    module.compile(**options)
