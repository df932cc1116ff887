"""nanokimi: Kimi-family LLMs (KDA, MLA, MoE, MoBA, AttnRes, Muon) in plain PyTorch."""
from nanokimi.config import ConfigError, ModelConfig

__all__ = ["ConfigError", "ModelConfig"]
__version__ = "0.1.0"
