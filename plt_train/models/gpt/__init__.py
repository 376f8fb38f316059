"""The baseline GPT-style decoder (RMSNorm, RoPE, SwiGLU, SDPA or TE attention)."""
from plt_train.config import ConfigError, RunConfig
from plt_train.models.gpt.model import build_gpt


def validate_gpt(cfg: RunConfig, data_parallel: int) -> None:
    if cfg.model.loops != 1:
        raise ConfigError("model.loops", f"{cfg.model.loops} loops need a looped model",
                          "set model.name=looped or model.name=plt")


__all__ = ["build_gpt", "validate_gpt"]
