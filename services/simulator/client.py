"""Sending, and cancelling, the batches of a run: the producer side of the queue.

Used by the API. Every batch is a ``simulate_batch`` message with a fixed task id
(:func:`~services.simulator.tasks.batch_task_id`), so a run's batches can be revoked
from the run id and batch indices alone.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Celery

from services.common import BROKER_ERRORS, BrokerClient, BrokerUnavailableError
from services.simulator.celery_app import SIMULATE_BATCH_TASK, create_celery_app
from services.simulator.progress import ProgressStore
from services.simulator.settings import SimulatorSettings
from services.simulator.tasks import batch_task_id

__all__ = ["BROKER_ERRORS", "BrokerUnavailableError", "SimulationQueue"]

log = logging.getLogger(__name__)


class SimulationQueue(BrokerClient[SimulatorSettings, ProgressStore]):
    """The ``simulations`` queue as seen by a producer: check, enqueue, cancel."""

    def __init__(
        self, settings: SimulatorSettings, store: ProgressStore, app: Celery | None = None
    ) -> None:
        super().__init__(settings, store, app or create_celery_app(settings))

    def enqueue_run(
        self,
        *,
        run_id: str,
        config_json: str,
        n_simulations: int,
        batch_size: int,
        run_seed: int,
        n_batches: int,
    ) -> None:
        """Send one message per batch of a run recorded in the progress store.

        When sending fails part-way, the batches already sent are revoked, the run is
        marked failed, and :class:`BrokerUnavailableError` is raised.
        """
        sent: list[int] = []
        try:
            with self.app.producer_or_acquire() as producer:
                for batch_index in range(n_batches):
                    self.send_batch(
                        run_id=run_id,
                        batch_index=batch_index,
                        config_json=config_json,
                        n_simulations=n_simulations,
                        batch_size=batch_size,
                        run_seed=run_seed,
                        producer=producer,
                    )
                    sent.append(batch_index)
        except BROKER_ERRORS as error:
            self._abort_run(run_id, sent, n_batches, error)
            raise self.unavailable(error) from error
        log.info("run %s: sent %d batches to queue %s", run_id, n_batches, self.settings.queue)

    def send_batch(
        self,
        *,
        run_id: str,
        batch_index: int,
        config_json: str,
        n_simulations: int,
        batch_size: int,
        run_seed: int,
        producer: Any = None,
    ) -> None:
        """Send the message of one batch."""
        self.app.send_task(
            SIMULATE_BATCH_TASK,
            kwargs={
                "run_id": run_id,
                "batch_index": batch_index,
                "config_ref": config_json,
                "run_seed": run_seed,
                "batch_size": batch_size,
                "n_simulations": n_simulations,
            },
            task_id=batch_task_id(run_id, batch_index),
            queue=self.settings.queue,
            producer=producer,
        )

    def cancel_run(self, run_id: str) -> list[int] | None:
        """Cancel the queued batches of a run and return their indices (None: unknown run).

        Running batches finish and their files are kept, as are finished files.
        """
        cancelled = self.store.cancel(run_id)
        if cancelled:
            self.revoke(run_id, cancelled)
        log.info("run %s: cancelled, %d queued batches revoked", run_id, len(cancelled or []))
        return cancelled

    def revoke(self, run_id: str, batch_indices: list[int]) -> None:
        """Tell the workers to drop the messages of these batches without running them."""
        task_ids = [batch_task_id(run_id, index) for index in batch_indices]
        self.app.control.revoke(task_ids)

    def _abort_run(
        self, run_id: str, sent: list[int], n_batches: int, error: BaseException
    ) -> None:
        message = (
            f"enqueueing failed after {len(sent)} of {n_batches} batches: {error}; "
            "the batches already sent were revoked"
        )
        log.error("run %s: %s", run_id, message)
        # Workers skip batches marked cancelled, so this also covers a worker that misses
        # the revoke broadcast below. Both steps fail while the broker is down.
        try:
            self.store.cancel(run_id, error=message)
        except redis.RedisError as store_error:
            log.error("run %s: could not mark the run failed: %s", run_id, store_error)
        try:
            if sent:
                self.revoke(run_id, sent)
        except BROKER_ERRORS as revoke_error:
            log.error("run %s: could not revoke %d batches: %s", run_id, len(sent), revoke_error)
