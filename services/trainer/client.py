"""Sending trainings to the ``training`` queue: the producer side, used by the API."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from services.common import BROKER_ERRORS, BrokerClient
from services.trainer.celery_app import TRAIN_TASK, create_celery_app
from services.trainer.progress import TrainingProgressStore
from services.trainer.settings import TrainerSettings

__all__ = ["TrainingQueue"]

log = logging.getLogger(__name__)


class TrainingQueue(BrokerClient[TrainerSettings, TrainingProgressStore]):
    """The ``training`` queue as seen by a producer: check the broker, send trainings."""

    def __init__(
        self,
        settings: TrainerSettings,
        store: TrainingProgressStore,
        app: Celery | None = None,
    ) -> None:
        super().__init__(settings, store, app or create_celery_app(settings))

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
