"""Speed machinery that knows nothing of the model: torch.compile and dynamo settings live here."""
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
