"""plt_train: distributed pretraining on megatron-core for Parallel Loop Transformers and
BigMac MoE.

Packages, in the order data flows: ``config`` (typed configs, validation) -> ``runtime``
(devices, process groups, the megatron-core CPU shim) -> ``data`` (corpus, tokenizer,
datasets) -> ``models`` (registry, specs, builders) -> ``training`` (optimizer, step,
checkpoints, metrics, loggers).  Entry points: ``train``, ``preprocess``, ``dryrun``.
"""
__version__ = "0.1.0"
