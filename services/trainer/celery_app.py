"""Celery application of the training worker.

Start one worker per machine with::

    celery -A services.trainer.celery_app worker -Q training --concurrency 1 --loglevel INFO

One training at a time (``--concurrency 1``): a training uses every CPU core, or the
GPU, by itself. Settings come from ``ALPNRE_*`` environment variables (see
:class:`~services.trainer.settings.TrainerSettings`). The API imports
:func:`create_celery_app` to send trainings with the same configuration.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from services.common import queue_celery_config, register_task
from services.trainer import log_context
from services.trainer.progress import TrainingProgressStore
from services.trainer.settings import TrainerSettings
from services.trainer.tasks import execute_training

__all__ = ["TRAIN_TASK", "app", "create_celery_app"]

TRAIN_TASK = "alpnre.train"


def create_celery_app(settings: TrainerSettings) -> Celery:
    """Build a Celery app for ``settings`` with the ``train`` task registered."""
    app = Celery("alpnre-trainer")
    # A training whose process dies is delivered again and resumes from its checkpoint.
    app.conf.update(
        queue_celery_config(
            broker_url=settings.broker_url,
            queue=settings.training_queue,
            task_name=TRAIN_TASK,
            visibility_timeout_s=settings.training_visibility_timeout_s,
            soft_time_limit_s=settings.training_soft_time_limit_s,
            time_limit_s=settings.training_time_limit_s,
            log_format=log_context.LOG_FORMAT,
        ),
        worker_concurrency=1,
        # A fresh pool process per training returns the memory (and GPU memory) of the
        # previous one.
        worker_max_tasks_per_child=1,
    )

    # Redis clients reconnect by themselves after the prefork pool forks.
    store = TrainingProgressStore.from_url(settings.progress_redis_url, prefix=settings.key_prefix)

    def train(
        task: Any,
        training_run_id: str,
        runs: list[str],
        hyperparameters: dict[str, Any],
        registry: str | None = None,
    ) -> dict[str, Any]:
        """Train an estimator on ``runs`` and publish it to ``registry``.

        ``runs`` are run ids (folders under ``ALPNRE_DATA_DIR``) or run folders;
        ``hyperparameters`` are :class:`alpnre.nre.TrainingConfig` values; ``registry``
        is a folder or fsspec URL, by default ``ALPNRE_REGISTRY`` of the worker.
        """
        return execute_training(
            task,
            settings,
            store,
            training_run_id=training_run_id,
            runs=runs,
            hyperparameters=hyperparameters,
            registry=registry,
        )

    register_task(app, TRAIN_TASK, train, settings.training_max_retries)
    return app


app = create_celery_app(TrainerSettings())
