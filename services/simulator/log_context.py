"""Run id and batch index on every worker log line written while a batch runs.

The Celery signals below store the ids of the running batch in a context variable;
:class:`BatchContextFilter`, installed on the worker's log handlers, copies them into
each record as ``run_id`` and ``batch_index``, so the library's log lines (which only
know the batch index) carry the run id too. Lines outside a batch show ``-``.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

from celery import signals

__all__ = ["LOG_FORMAT", "BatchContextFilter", "install_batch_context_filter"]

LOG_FORMAT = (
    "[%(asctime)s: %(levelname)s/%(processName)s] "
    "run=%(run_id)s batch=%(batch_index)s %(name)s: %(message)s"
)

SIMULATE_BATCH_TASK = "alpnre.simulate_batch"

_batch_ids: ContextVar[tuple[str, int] | None] = ContextVar("alpnre_batch_ids", default=None)


def set_batch_ids(run_id: str, batch_index: int) -> None:
    """Tag the following log lines of this thread or task with a run id and batch index."""
    _batch_ids.set((run_id, batch_index))


def clear_batch_ids() -> None:
    """Stop tagging log lines with batch ids."""
    _batch_ids.set(None)


class BatchContextFilter(logging.Filter):
    """Add ``run_id`` and ``batch_index`` to records that do not carry them already."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = _batch_ids.get()
        if not hasattr(record, "run_id"):
            record.run_id = ids[0] if ids else "-"
        if not hasattr(record, "batch_index"):
            record.batch_index = ids[1] if ids else "-"
        return True


def install_batch_context_filter(logger: logging.Logger) -> None:
    """Add the filter and the format with batch ids to every handler of ``logger``."""
    for handler in logger.handlers:
        if not any(isinstance(item, BatchContextFilter) for item in handler.filters):
            handler.addFilter(BatchContextFilter())
        handler.setFormatter(logging.Formatter(LOG_FORMAT))


def _on_setup_logger(logger: logging.Logger, **_: Any) -> None:
    install_batch_context_filter(logger)


def _on_setup_task_logger(logger: logging.Logger, **_: Any) -> None:
    install_batch_context_filter(logger)


def _on_task_prerun(task: Any = None, kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    if task is not None and task.name == SIMULATE_BATCH_TASK and kwargs:
        set_batch_ids(str(kwargs.get("run_id")), int(kwargs.get("batch_index", -1)))


def _on_task_postrun(task: Any = None, **_: Any) -> None:
    if task is not None and task.name == SIMULATE_BATCH_TASK:
        clear_batch_ids()


signals.after_setup_logger.connect(_on_setup_logger, dispatch_uid="alpnre-log-root", weak=False)
signals.after_setup_task_logger.connect(
    _on_setup_task_logger, dispatch_uid="alpnre-log-task", weak=False
)
signals.task_prerun.connect(_on_task_prerun, dispatch_uid="alpnre-log-prerun", weak=False)
signals.task_postrun.connect(_on_task_postrun, dispatch_uid="alpnre-log-postrun", weak=False)
