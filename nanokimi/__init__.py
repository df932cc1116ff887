"""nanokimi: Kimi-family LLMs (KDA, MLA, MoE, MoBA, AttnRes, Muon) in plain PyTorch."""
from nanokimi.config import ConfigError, ModelConfig
from nanokimi.model import Transformer, build_model

__all__ = ["ConfigError", "ModelConfig", "Transformer", "build_model"]
__version__ = "0.1.0"
