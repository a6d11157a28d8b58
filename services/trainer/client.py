"""Sending trainings to the ``training`` queue: the producer side, used by the API."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from kombu.utils.url import maybe_sanitize_url

from services.simulator.client import BROKER_ERRORS, BrokerUnavailableError
from services.trainer.celery_app import TRAIN_TASK, create_celery_app
from services.trainer.progress import TrainingProgressStore
from services.trainer.settings import TrainerSettings

__all__ = ["TrainingQueue"]

log = logging.getLogger(__name__)


class TrainingQueue:
    """The ``training`` queue as seen by a producer: check the broker, send trainings."""

    def __init__(
        self,
        settings: TrainerSettings,
        store: TrainingProgressStore,
        app: Celery | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.app = app or create_celery_app(settings)

    @property
    def broker_location(self) -> str:
        """Broker URL without its password, for messages."""
        return str(maybe_sanitize_url(self.settings.broker_url))

    def unavailable(self, error: BaseException) -> BrokerUnavailableError:
        """Wrap a connection error in one that names the broker URL and the fix."""
        return BrokerUnavailableError(
            f"broker unavailable at {self.broker_location}: {error}; start redis-server or "
            "set ALPNRE_BROKER_URL to a reachable Redis"
        )

    def check_broker(self, timeout_s: float = 3.0) -> None:
        """Connect to the broker and the progress store once.

        Raises
        ------
        BrokerUnavailableError
            When either cannot be reached within ``timeout_s``.
        """
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, interval_start=0, timeout=timeout_s)
            self.store.ping()
        except BROKER_ERRORS as error:
            raise self.unavailable(error) from error

    def enqueue(
        self,
        *,
        training_run_id: str,
        runs: list[str],
        hyperparameters: dict[str, Any],
        registry: str,
    ) -> None:
        """Record a training run as queued and send its message.

        The Celery task id is the training run id. When sending fails, the run is
        marked failed and :class:`BrokerUnavailableError` is raised.
        """
        self.store.create(
            training_run_id=training_run_id,
            runs=runs,
            hyperparameters=hyperparameters,
            registry=registry,
            max_epochs=int(hyperparameters["max_epochs"]),
        )
        try:
            self.app.send_task(
                TRAIN_TASK,
                kwargs={
                    "training_run_id": training_run_id,
                    "runs": runs,
                    "hyperparameters": hyperparameters,
                    "registry": registry,
                },
                task_id=training_run_id,
                queue=self.settings.training_queue,
            )
        except BROKER_ERRORS as error:
            message = f"sending the training to the broker failed: {error}"
            log.error("training run %s: %s", training_run_id, message)
            try:
                self.store.mark_failed(training_run_id, message)
            except BROKER_ERRORS as store_error:
                log.error(
                    "training run %s: could not mark the run failed: %s",
                    training_run_id,
                    store_error,
                )
            raise self.unavailable(error) from error
        log.info(
            "training run %s: sent to queue %s (runs %s)",
            training_run_id,
            self.settings.training_queue,
            runs,
        )
