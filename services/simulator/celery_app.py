"""Celery application of the simulation workers.

Start a worker with::

    celery -A services.simulator.celery_app worker -Q simulations --loglevel INFO

It uses the prefork pool with one process per CPU core unless ``--concurrency`` or
``ALPNRE_WORKER_CONCURRENCY`` sets another number. Settings come from ``ALPNRE_*``
environment variables (see :class:`~services.simulator.settings.SimulatorSettings`).
The API imports :func:`create_celery_app` to send tasks with the same configuration.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from services.common import queue_celery_config, register_task
from services.simulator import log_context
from services.simulator.progress import ProgressStore
from services.simulator.settings import SimulatorSettings
from services.simulator.tasks import execute_batch, preload_dependencies

__all__ = ["SIMULATE_BATCH_TASK", "app", "create_celery_app"]

SIMULATE_BATCH_TASK = log_context.SIMULATE_BATCH_TASK


def create_celery_app(settings: SimulatorSettings) -> Celery:
    """Build a Celery app for ``settings`` with the ``simulate_batch`` task registered."""
    app = Celery("alpnre-simulator")
    # A batch whose worker dies is delivered again, and run_batch skips files that
    # already validate.
    app.conf.update(
        queue_celery_config(
            broker_url=settings.broker_url,
            queue=settings.queue,
            task_name=SIMULATE_BATCH_TASK,
            visibility_timeout_s=settings.visibility_timeout_s,
            soft_time_limit_s=settings.task_soft_time_limit_s,
            time_limit_s=settings.task_time_limit_s,
            log_format=log_context.LOG_FORMAT,
        )
    )
    if settings.worker_concurrency is not None:
        app.conf.worker_concurrency = settings.worker_concurrency

    # Redis clients reconnect by themselves after the prefork pool forks.
    store = ProgressStore.from_url(settings.progress_redis_url, prefix=settings.key_prefix)

    def simulate_batch(
        task: Any,
        run_id: str,
        batch_index: int,
        config_ref: str,
        run_seed: int,
        batch_size: int,
        n_simulations: int,
    ) -> dict[str, Any]:
        """Simulate batch ``batch_index`` of run ``run_id`` and write it to Parquet.

        ``config_ref`` is the config as canonical JSON, a shipped config name or a YAML
        path. The batch's seed derives from ``run_seed`` and ``batch_index`` alone.
        """
        return execute_batch(
            task,
            settings,
            store,
            run_id=run_id,
            batch_index=batch_index,
            config_ref=config_ref,
            run_seed=run_seed,
            batch_size=batch_size,
            n_simulations=n_simulations,
        )

    register_task(app, SIMULATE_BATCH_TASK, simulate_batch, settings.max_retries)
    return app


def _preload(**_: Any) -> None:
    # In the worker's main process, before the pool forks: every pool process starts
    # with the imports done, so a task's soft time limit cannot interrupt one.
    preload_dependencies()


signals.worker_init.connect(_preload, dispatch_uid="alpnre-preload", weak=False)


app = create_celery_app(SimulatorSettings())
