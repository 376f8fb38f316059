"""A quiet start: the known start-up noise of megatron-core and torch is filtered by module and
message, and one line says instead which optional accelerators are absent.

Without Transformer Engine and apex (every CPU machine, and GPUs without them), importing
megatron-core prints about ten warnings per rank ("Transformer Engine and Apex are not
installed. Falling back to ..."), Megatron-FSDP logs INFO lines when imported under Hydra's
INFO root logger, every ``TransformerConfig`` warns about a deprecated CUDA-graph scope default
it sets itself, and megatron's gradient all-gather calls a torch collective torch has
deprecated.  None of it asks the user to do anything.  Each filter below names the module that
warns and the message, so a new warning (from our code or theirs) still shows.
"""
from __future__ import annotations

import importlib.util
import logging
import warnings

# (category, message regex, regex of the module that calls warnings.warn)
_KNOWN_WARNINGS = (
    (UserWarning, r"Transformer Engine and Apex are not installed", r"megatron\.core\."),
    (UserWarning, r"Apex is not installed", r"megatron\.core\."),
    # TransformerConfig.__post_init__ warns about megatron's own default cuda_graph_scope.
    (UserWarning, r"full scope is deprecated", r"megatron\.core\.transformer\.transformer_config"),
    # megatron-core 0.16.1's all-gathers (tensor_parallel, DDP buffers) in torch 2.13.
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
     r"torch\.distributed\."),
    # Loading a distributed checkpoint (plt-generate, plt-eval, plt-export, resume): megatron
    # 0.16.1 calls torch.distributed.checkpoint's old entry point on ShardedTensors.
    (FutureWarning, r"`load_state_dict` is deprecated", r"megatron\.core\.dist_checkpointing\."),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor",
     r"torch\.distributed\.checkpoint\."),
)
# Loggers that speak at INFO on import; Hydra sets the root logger to INFO.
_CHATTY_LOGGERS = ("megatron",)


def quiet_start() -> None:
    """Install the filters; call before megatron-core is imported (idempotent)."""
    for category, message, module in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def missing_accelerators() -> list[str]:
    """The optional accelerator packages megatron-core would use that this install lacks."""
    from plt_train.runtime.device import have_transformer_engine

    missing = [] if have_transformer_engine() else ["Transformer Engine"]
    if importlib.util.find_spec("apex") is None:
        missing.append("apex")
    return missing


def accelerators_line() -> str:
    """The one line that replaces the warnings, e.g. for the start of a run's log."""
    missing = missing_accelerators()
    if not missing:
        return "Transformer Engine and apex are installed"
    return (f"{' and '.join(missing)} not installed: running megatron-core's PyTorch paths "
            "instead (torch SDPA attention, RMSNorm, AdamW and gradient clipping)")
