"""delta-jax: long-context inference with Delta Attention prefill and DELTA decoding."""

from delta_jax.config import ConfigError, DecodeConfig, ModelConfig, PrefillConfig
from delta_jax.engine import Engine, GenerateOutput, ScoreOutput

__all__ = ["ConfigError", "DecodeConfig", "Engine", "GenerateOutput", "ModelConfig", "PrefillConfig",
           "ScoreOutput"]
