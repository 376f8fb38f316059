"""Metric sinks: a console line, a JSONL file and Weights & Biases, behind one ``log`` call.

Every sink takes ``enabled``: the caller passes True on the logging rank only, so the training
loop can call ``log`` on every rank without ``if rank == 0`` around it.  Metric keys the
console knows how to print: ``loss``, ``lr``, ``grad_norm``, ``step_ms`` and the
``ThroughputMeter`` keys (``tokens_per_s``, ``tflops_per_device``, ``mfu``, ``eta_s``);
anything else is appended.
"""
from __future__ import annotations

import json
import math
import netrc
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, TextIO
from urllib.parse import urlsplit

from plt_train.runtime.console import say

KINDS = ("train", "valid", "downstream")  # downstream: lm-eval tasks (evaluation/)


def to_python(metrics: Mapping[str, Any]) -> Dict[str, Any]:
    """Tensors and numpy scalars become Python numbers (``.item()``), so every sink sees plain
    values and no sink holds a reference to a device tensor."""
    return {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}


def format_duration(seconds: float) -> str:
    """``45s``, ``1m05s``, ``2h03m``: short enough for a per-step line."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# How the console shows the keys it knows, in this order: (key, label, formatter).
_CONSOLE_FIELDS = (
    ("loss", "loss", lambda v: f"{v:.4f}"),
    ("lr", "lr", lambda v: f"{v:.2e}"),
    ("grad_norm", "grad_norm", lambda v: f"{v:.3f}"),
    ("step_ms", "ms/step", lambda v: f"{v:,.0f}"),
    ("tokens_per_s", "tok/s", lambda v: f"{v:,.0f}"),
    ("tflops_per_device", "TFLOP/s", lambda v: f"{v:.3g}"),  # CPU runs are ~0.1
    ("mfu", "MFU", lambda v: f"{100 * v:.1f}%"),
    ("eta_s", "ETA", format_duration),
)


class ConsoleLogger:
    """One human line per call, e.g.
    ``step 12/100 | loss 5.2311 | lr 3.00e-04 | grad_norm 1.234 | tok/s 12,345 | ...``."""

    def __init__(self, enabled: bool, total_steps: Optional[int] = None, stream: Optional[TextIO] = None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.stream = stream

    def format(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> str:
        head = f"step {step}" if self.total_steps is None else f"step {step}/{self.total_steps}"
        parts = [head if kind == "train" else f"{kind} {head}"]
        known = {key for key, _, _ in _CONSOLE_FIELDS}
        for key, label, fmt in _CONSOLE_FIELDS:
            if key in metrics and metrics[key] is not None:
                parts.append(f"{label} {fmt(metrics[key])}")
        for key, value in metrics.items():
            if key not in known:
                parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        return " | ".join(parts)

    def log(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> None:
        if self.enabled:
            say(self.format(step, metrics, kind), self.stream)

    def close(self) -> None:
        pass


def _json_safe(value: Any) -> Any:
    """NaN/inf become strings: a diverged loss must still be recorded, and strict JSON has no
    NaN literal (Python's json would write one that other readers reject)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf"
    return value


METRICS_FILE = "metrics.jsonl"  # in a run directory: what ``JsonlLogger`` writes there
_NOT_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def read_metrics(run_dir: str | os.PathLike, kind: Optional[str] = None) -> List[Dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl`` in the order they were logged (``kind``: only
    those), with the strings ``_json_safe`` wrote for NaN and infinities turned back into
    floats.  A resumed run appends, so a step repeated after a resume appears twice: the
    last row of a step is the one that counted.  The one reader of the file, for the
    scripts that compare runs and for the tests."""
    path = Path(run_dir) / METRICS_FILE
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    rows = [{k: _NOT_FINITE.get(v, v) if isinstance(v, str) and k != "kind" else v
             for k, v in r.items()} for r in rows]
    return [r for r in rows if kind is None or r["kind"] == kind]


class JsonlLogger:
    """One JSON object per call: ``{"kind", "step", **metrics}``, appended and flushed at once so
    a killed run keeps every line it logged (and a resumed run appends to the same file)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(path)
        self._file: Optional[TextIO] = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> None:
        if self._file is None:
            return
        row = {"kind": kind, "step": step, **{k: _json_safe(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def wandb_api_key_configured() -> bool:
    """Whether ``wandb`` would find credentials without prompting: the environment or a netrc
    entry for the W&B host.  Checked with the standard library, not wandb internals."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger:
    """Weights & Biases run in ``run_dir/wandb``; keys are logged as ``<kind>/<metric>``.

    ``mode``: ``offline`` (no network; sync later with ``wandb sync``), ``online``, or
    ``disabled`` (wandb is not even imported and nothing is written).  ``online`` never
    blocks on a missing login: without an API key it falls back to ``offline`` with a warning,
    and a failed online start (no network) also falls back after at most ``init_timeout`` s.
    """

    def __init__(
        self,
        project: str,
        run_dir: str | os.PathLike,
        config_dict: Optional[Mapping[str, Any]] = None,
        mode: str = "offline",
        enabled: bool = True,
        name: Optional[str] = None,
        init_timeout: float = 30.0,
    ):
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb mode must be offline, online or disabled, not {mode!r}")
        self.run = None
        self.mode = mode
        if not enabled or mode == "disabled":
            return
        import wandb  # imported here: 0.6 s, and only the logging rank needs it

        if mode == "online" and not wandb_api_key_configured():
            warnings.warn("wandb mode 'online' but no API key is configured: logging offline")
            mode = "offline"
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        kwargs = dict(project=project, dir=str(run_dir), config=dict(config_dict or {}), name=name)
        try:
            self.run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=init_timeout), **kwargs)
        except Exception as exc:  # noqa: BLE001 - any online failure must not kill training
            if mode != "online":
                raise
            warnings.warn(f"wandb online init failed ({exc}); logging offline")
            mode = "offline"
            self.run = wandb.init(mode=mode, **kwargs)
        self.mode = mode

    def log(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> None:
        if self.run is not None:
            self.run.log({f"{kind}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MetricLoggers:
    """The sinks behind one ``log(step, metrics, kind)``; values are converted once here."""

    def __init__(self, *sinks: Any):
        self.sinks: List[Any] = list(sinks)

    @classmethod
    def create(
        cls,
        logging_cfg: Any,
        run_dir: str | os.PathLike,
        config_dict: Optional[Mapping[str, Any]],
        total_steps: int,
        enabled: bool,
        name: Optional[str] = None,
    ) -> "MetricLoggers":
        """Console + ``run_dir/metrics.jsonl`` + wandb (if ``logging_cfg.wandb``), from a
        ``LoggingConfig``."""
        sinks: List[Any] = [
            ConsoleLogger(enabled, total_steps),
            JsonlLogger(Path(run_dir) / METRICS_FILE, enabled),
        ]
        if logging_cfg.wandb:
            sinks.append(
                WandbLogger(logging_cfg.wandb_project, run_dir, config_dict,
                            logging_cfg.wandb_mode, enabled, name=name)
            )
        return cls(*sinks)

    def log(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        values = to_python(metrics)
        for sink in self.sinks:
            sink.log(step, values, kind)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> "MetricLoggers":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
