"""Tasks, chosen once by name: `task_for(cfg.task.name)` (a run),
`saved_task(config)` (a saved model's). Nothing else in train/ asks which
task runs. To add one, see docs/architecture.md ("How to add a task")."""

from __future__ import annotations

from train.tasks.base import Prediction, Setup, Task
from train.tasks.classify import ClassifyTask
from train.tasks.pretrain import PretrainTask

TASKS: dict[str, type[Task]] = {t.name: t for t in (PretrainTask, ClassifyTask)}

__all__ = ["TASKS", "Prediction", "Setup", "Task", "saved_task", "task_for"]


def task_for(name) -> Task:
    """A fresh Task for task.name (an enum member or its string)."""
    key = str(getattr(name, "value", name))
    try:
        return TASKS[key]()
    except KeyError:
        raise ValueError(f"task.name={key!r}: choose one of {', '.join(TASKS)}") from None


def saved_task(config: dict) -> Task:
    """The task a saved config (an export's model.json, a checkpoint's meta.json) was trained for."""
    task = config.get("task")
    return task_for(task.get("name", "pretrain") if isinstance(task, dict) else "pretrain")
