"""The training run id on every worker log line written while a training runs.

:func:`training_run_context` stores the id in a context variable for the duration of a
task. Once Celery has set up the worker's logging, a log record factory copies it into
every record as ``training_run_id``, so the library's log lines (epochs, checkpoints)
carry it too. Lines outside a training show ``-``.

A record factory, unlike a filter on the handlers, also covers the handlers that
Celery and billiard add later, which would otherwise fail on the missing field.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from celery import signals

__all__ = ["LOG_FORMAT", "install_record_factory", "training_run_context"]

LOG_FORMAT = (
    "[%(asctime)s: %(levelname)s/%(processName)s] "
    "training=%(training_run_id)s %(name)s: %(message)s"
)

_training_run_id: ContextVar[str | None] = ContextVar("alpnre_training_run_id", default=None)
_installed = False


@contextmanager
def training_run_context(training_run_id: str) -> Iterator[None]:
    """Tag the log lines written inside the block with ``training_run_id``."""
    token = _training_run_id.set(training_run_id)
    try:
        yield
    finally:
        _training_run_id.reset(token)


def install_record_factory() -> None:
    """Give every log record of this process a ``training_run_id`` attribute (once)."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.training_run_id = _training_run_id.get() or "-"
        return record

    logging.setLogRecordFactory(make_record)
    _installed = True


def _on_setup_logging(**_: Any) -> None:
    install_record_factory()


# Connected here but sent only in a worker: the API imports this module without
# changing its logging.
signals.after_setup_logger.connect(
    _on_setup_logging, dispatch_uid="alpnre-training-log-root", weak=False
)
signals.after_setup_task_logger.connect(
    _on_setup_logging, dispatch_uid="alpnre-training-log-task", weak=False
)
