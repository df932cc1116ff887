"""Checkpoint interop: Hugging Face transformers layouts (kimi_linear, deepseek_v3) in and out."""
from nanokimi.interop.hf import LAYOUTS, config_from_hf, config_to_hf, infer_layout, load_hf, save_hf

__all__ = ["LAYOUTS", "config_from_hf", "config_to_hf", "infer_layout", "load_hf", "save_hf"]
