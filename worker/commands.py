"""The command tasks: what Celery knows of each command (its name, `.delay()`, its tracer).

A worker node never runs these bodies message by message: it applies commands in batches
(worker/batch.py). The body runs in two cases, with the same engine:

- eagerly (`task_always_eager`, `task.apply()`): it applies its command as a batch of one;
- under Celery's tracer, for a command the batch already settled that carries callbacks,
  errbacks, a chain or a chord: it returns (or raises) the settled outcome, and the tracer
  stores it and runs the canvas exactly as Celery does.
"""

from __future__ import annotations

from typing import Any

import celery

from worker import apply
from worker.celery_app import app
from worker.errors import CommandRejected

#: Outcomes settled by a batch, by task id, for Celery's tracer to report (worker/batch.py).
SETTLED: dict[str, apply.Command] = {}


class CommandTask(celery.Task):
    """Base of every command task."""

    # Rejections are outcomes, not crashes: logged without a traceback.
    throws = (CommandRejected,)
    typing = False
    acks_late = True


def execute(task: CommandTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The command's result, or its rejection raised (already dead-lettered)."""
    command = SETTLED.pop(task.request.id, None) if task.request.id else None
    if command is None:
        from worker.batch import apply_commands

        command = apply.Command(task=task.name, task_id=task.request.id or "", kwargs=kwargs,
                                args=list(args))
        apply_commands([command])
    if command.rejection is not None:
        raise command.rejection
    assert command.result is not None
    return command.result


def command_task(name: str) -> CommandTask:
    """Register the Celery task `name`, which applies that command."""

    def run(self: CommandTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return execute(self, args, kwargs)

    run.__name__ = run.__qualname__ = name.replace(".", "_")
    task: CommandTask = app.task(name=name, base=CommandTask, bind=True, shared=False)(run)
    return task
