"""Which lm-evaluation-harness tasks a name means: ours (shipped), the user's, or the harness's.

- Shipped (``plt_train/evaluation/tasks/*.yaml``): ``plt_tiny_mc`` (multiple choice) and
  ``plt_tiny_gen`` (generation), Python-code tasks small enough for tests on machines that
  cannot download data.  Their YAML is the harness's task format; only ``data_files`` are
  resolved here, against the YAML's folder (the harness resolves them against the working
  directory).
- ``include_path``: folders of the user's own YAML tasks (the harness's ``--include_path``).
- Anything else is a task, group or tag of the harness's own index (``hellaswag``,
  ``arc_easy``, ``piqa``, ...), whose data the harness downloads from the Hugging Face Hub.

Names are checked before a model is loaded or a process group started.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import yaml

SHIPPED_DIR = Path(__file__).parent / "tasks"


class TaskError(ValueError):
    """An unknown task name; the message is one line for the user."""


class ResolvedTasks(NamedTuple):
    specs: list  # what lm_eval.simple_evaluate takes: names, or configs of shipped tasks
    manager: Any  # the lm_eval TaskManager that knows them


def shipped_tasks() -> dict[str, Path]:
    """{task name: its YAML} of the tasks that ship with plt_train."""
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.yaml"))}


def shipped_config(name: str) -> dict:
    """A shipped task's harness config, its ``data_files`` made absolute."""
    path = shipped_tasks()[name]
    config = yaml.safe_load(path.read_text())
    files = config.get("dataset_kwargs", {}).get("data_files", {})
    config["dataset_kwargs"]["data_files"] = {
        split: str(path.parent / f) for split, f in files.items()}
    return config


def resolve(names: Sequence[str], include_path: Optional[Sequence[str]] = None) -> ResolvedTasks:
    """The task specs for ``lm_eval.simple_evaluate`` and its ``TaskManager``; TaskError for a name
    that neither we, ``include_path`` nor the harness know.  The harness's own index (some
    seconds to build) is read only when a name is not shipped."""
    from lm_eval.tasks import TaskManager

    if not names:
        raise TaskError("no tasks: name at least one (shipped: "
                        f"{', '.join(shipped_tasks())})")
    ours = shipped_tasks()
    others = [n for n in names if n not in ours]
    for folder in include_path or ():
        if not Path(folder).is_dir():
            raise TaskError(f"include path {folder} is not a folder of task YAML files")
    manager = TaskManager(include_path=list(include_path) if include_path else None,
                          include_defaults=bool(others))
    if others:
        known = set(manager.all_tasks)  # tasks, groups and tags
        unknown = [n for n in others if n not in known]
        if unknown:
            raise TaskError(f"unknown task {', '.join(map(repr, unknown))}: give a shipped "
                            f"task ({', '.join(ours)}), one of lm-evaluation-harness's "
                            "(lm-eval ls tasks) or a YAML task under --include-path")
    return ResolvedTasks([shipped_config(n) if n in ours else n for n in names], manager)
