"""Hugging Face safetensors and GGUF -> orbax conversion; restore onto a sharding; built-in models."""

from .builtin import BUILTIN, cache_dir, resolve
from .convert_hf import convert
from .io import CheckpointError, is_converted, load_config, load_params, param_shapes, save_params

__all__ = [
    "BUILTIN", "CheckpointError", "cache_dir", "convert", "is_converted", "load_config", "load_params",
    "param_shapes", "resolve", "save_params",
]
