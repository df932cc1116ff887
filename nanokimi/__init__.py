"""nanokimi: Kimi-family LLMs (KDA, MLA, MoE, MoBA, AttnRes, Muon) in plain PyTorch."""
__all__ = ["ConfigError", "ModelConfig", "Transformer", "build_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """Import torch-backed names on first use, so `import nanokimi.tasks` (graders, no torch) stays light."""
    if name in ("ConfigError", "ModelConfig"):
        from nanokimi import config
        return getattr(config, name)
    if name in ("Transformer", "build_model"):
        from nanokimi import model
        return getattr(model, name)
    raise AttributeError(f"module 'nanokimi' has no attribute {name!r}")
