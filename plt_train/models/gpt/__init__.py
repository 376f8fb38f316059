"""The baseline GPT-style decoder (RMSNorm, RoPE, SwiGLU, SDPA or TE attention)."""
from plt_train.models.gpt.model import build_gpt

__all__ = ["build_gpt"]
