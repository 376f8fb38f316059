"""Downstream evaluation through lm-evaluation-harness.

- ``harness.PltLM``: the harness's ``LM`` over any of our models (one process, TP = PP = 1);
  generation runs through ``inference.Generator``, so PLT is scored with its one-pass decode.
- ``tasks``: task names -> the harness's task specs (the shipped tiny tasks, the user's YAML,
  the harness's own).
- ``downstream``: ``evaluate`` (shared by ``plt-eval`` and training) and ``DownstreamHook``,
  the evaluation every ``downstream.interval`` training steps.
- ``plt_train/evaluate.py``: the ``plt-eval RUN_DIR --tasks ...`` command.

lm-eval is imported only here and only when used: training without ``downstream.tasks``
never imports it.
"""
