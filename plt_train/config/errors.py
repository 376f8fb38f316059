"""The one error type of a bad configuration."""
from __future__ import annotations


class ConfigError(ValueError):
    """``config error: <field>: <problem>. Fix: <fix>``: one readable line, raised before any
    process group starts, by the schema (an unknown choice), ``config.validate`` (layout,
    batch, optimizer, logging) or a model family's own checks (``plt_train.models``)."""

    def __init__(self, field: str, problem: str, fix: str):
        super().__init__(f"config error: {field}: {problem}. Fix: {fix}")
        self.field = field
