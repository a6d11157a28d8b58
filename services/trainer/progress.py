"""Progress of training runs in Redis, shared by the API and the training worker.

Each training run has two keys under ``<prefix>:training:<training_run_id>``:

- the hash itself: the request (run ids, hyperparameters as JSON, registry), the state,
  timestamps (Unix seconds), ``attempts`` (deliveries that started training),
  ``resumed_from_epoch``, and when finished ``estimator_id``, ``validation`` or ``error``;
- ``…:epochs``: epoch index → JSON of that epoch's metrics (``train_loss``,
  ``validation_loss``, ``seconds``). Keyed by epoch, so a resumed training that records
  an epoch again overwrites it instead of appending a duplicate.

The sorted set ``<prefix>:trainings`` lists training run ids by creation time.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from redis.typing import EncodableT, FieldT

from services.common import ID_PATTERN, RedisStore, optional_float

__all__ = [
    "TRAINING_RUN_ID_PATTERN",
    "EpochRecord",
    "TrainingProgress",
    "TrainingProgressStore",
    "TrainingState",
]

# Training run ids name checkpoint folders, so they must not contain a path separator.
TRAINING_RUN_ID_PATTERN = ID_PATTERN


class TrainingState(StrEnum):
    """State of a training run."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class EpochRecord:
    """Losses and duration of one finished epoch."""

    epoch: int
    train_loss: float
    validation_loss: float
    seconds: float


@dataclass(frozen=True)
class TrainingProgress:
    """A snapshot of one training run."""

    training_run_id: str
    state: TrainingState
    runs: list[str]
    hyperparameters: dict[str, Any]
    registry: str
    max_epochs: int
    created_at: float
    epochs: list[EpochRecord] = field(default_factory=list)
    attempts: int = 0
    resumed_from_epoch: int | None = None
    started_at: float | None = None
    updated_at: float | None = None
    finished_at: float | None = None
    estimator_id: str | None = None
    validation: str | None = None
    error: str | None = None

    @property
    def epoch(self) -> int | None:
        """Index of the last finished epoch, or None before the first one finishes."""
        return self.epochs[-1].epoch if self.epochs else None

    def eta_seconds(self) -> float | None:
        """Estimated seconds until ``max_epochs`` are done, from the median epoch time.

        An upper bound: early stopping (``patience``) can end the training sooner. None
        while no epoch has finished, 0 once the training completed.
        """
        if self.state == TrainingState.COMPLETED:
            return 0.0
        if self.state == TrainingState.FAILED or not self.epochs:
            return None
        remaining = self.max_epochs - (self.epochs[-1].epoch + 1)
        return max(remaining, 0) * statistics.median(record.seconds for record in self.epochs)


class TrainingProgressStore(RedisStore):
    """Training progress in Redis; see the module docstring for the key layout."""

    def _key(self, training_run_id: str) -> str:
        return f"{self.prefix}:training:{training_run_id}"

    def create(
        self,
        *,
        training_run_id: str,
        runs: list[str],
        hyperparameters: dict[str, Any],
        registry: str,
        max_epochs: int,
    ) -> None:
        """Record a new training run as queued."""
        now = time.time()
        key = self._key(training_run_id)
        fields: dict[FieldT, EncodableT] = {
            "training_run_id": training_run_id,
            "state": TrainingState.QUEUED.value,
            "runs": json.dumps(runs),
            "hyperparameters": json.dumps(hyperparameters, sort_keys=True),
            "registry": registry,
            "max_epochs": max_epochs,
            "created_at": now,
            "updated_at": now,
            "attempts": 0,
        }
        pipeline = self.client.pipeline(transaction=True)
        pipeline.delete(key, f"{key}:epochs")
        pipeline.hset(key, mapping=fields)
        pipeline.zadd(f"{self.prefix}:trainings", {training_run_id: now})
        pipeline.execute()

    def mark_running(self, training_run_id: str) -> int:
        """Record that a delivery started training and return the attempt number (from 1)."""
        key = self._key(training_run_id)
        now = time.time()
        pipeline = self.client.pipeline(transaction=True)
        pipeline.hincrby(key, "attempts", 1)
        pipeline.hset(key, mapping={"state": TrainingState.RUNNING.value, "updated_at": now})
        pipeline.hsetnx(key, "started_at", now)
        pipeline.hdel(key, "error", "finished_at")
        attempts = pipeline.execute()[0]
        return int(attempts)

    def record_resume(self, training_run_id: str, epoch: int) -> None:
        """Record the first epoch that a resumed training computes again."""
        self.client.hset(self._key(training_run_id), "resumed_from_epoch", epoch)

    def record_epoch(self, training_run_id: str, record: EpochRecord) -> None:
        """Store one finished epoch's metrics (a repeated epoch overwrites the earlier one)."""
        key = self._key(training_run_id)
        payload = {
            "train_loss": record.train_loss,
            "validation_loss": record.validation_loss,
            "seconds": record.seconds,
        }
        pipeline = self.client.pipeline(transaction=True)
        pipeline.hset(f"{key}:epochs", str(record.epoch), json.dumps(payload))
        pipeline.hset(key, "updated_at", time.time())
        pipeline.execute()

    def mark_completed(self, training_run_id: str, estimator_id: str, validation: str) -> None:
        """Record the published estimator and what happened to its validation."""
        now = time.time()
        self.client.hset(
            self._key(training_run_id),
            mapping={
                "state": TrainingState.COMPLETED.value,
                "estimator_id": estimator_id,
                "validation": validation,
                "finished_at": now,
                "updated_at": now,
            },
        )

    def mark_failed(self, training_run_id: str, error: str) -> None:
        """Record that the training failed for good, with the reason."""
        now = time.time()
        self.client.hset(
            self._key(training_run_id),
            mapping={
                "state": TrainingState.FAILED.value,
                "error": error,
                "finished_at": now,
                "updated_at": now,
            },
        )

    def mark_queued(self, training_run_id: str, error: str) -> None:
        """Record that a failed attempt waits for a retry, keeping its error for display."""
        self.client.hset(
            self._key(training_run_id),
            mapping={
                "state": TrainingState.QUEUED.value,
                "error": error,
                "updated_at": time.time(),
            },
        )

    def get(self, training_run_id: str) -> TrainingProgress | None:
        """Progress of one training run, or None when the id is unknown."""
        return self._get_many([training_run_id])[0]

    def _get_many(self, training_run_ids: list[str]) -> list[TrainingProgress | None]:
        pipeline = self.client.pipeline(transaction=True)
        for training_run_id in training_run_ids:
            key = self._key(training_run_id)
            pipeline.hgetall(key)
            pipeline.hgetall(f"{key}:epochs")
        replies = pipeline.execute()
        return [
            _progress_from_fields(fields, epochs) if fields else None
            for fields, epochs in zip(replies[::2], replies[1::2], strict=True)
        ]

    def list_runs(self, offset: int, limit: int) -> tuple[list[TrainingProgress], int]:
        """Return a page of training runs, newest first, and the total number of them."""
        ids, total = self._page_ids(f"{self.prefix}:trainings", offset, limit)
        runs = [progress for progress in self._get_many(ids) if progress is not None]
        return runs, total


def _progress_from_fields(fields: dict[str, str], epochs: dict[str, str]) -> TrainingProgress:
    records = []
    for epoch, raw in epochs.items():
        payload = json.loads(raw)
        records.append(
            EpochRecord(
                epoch=int(epoch),
                train_loss=float(payload["train_loss"]),
                validation_loss=float(payload["validation_loss"]),
                seconds=float(payload["seconds"]),
            )
        )
    resumed = fields.get("resumed_from_epoch")
    return TrainingProgress(
        training_run_id=fields["training_run_id"],
        state=TrainingState(fields["state"]),
        runs=json.loads(fields["runs"]),
        hyperparameters=json.loads(fields["hyperparameters"]),
        registry=fields["registry"],
        max_epochs=int(fields["max_epochs"]),
        created_at=float(fields["created_at"]),
        epochs=sorted(records, key=lambda record: record.epoch),
        attempts=int(fields.get("attempts", 0)),
        resumed_from_epoch=int(resumed) if resumed is not None else None,
        started_at=optional_float(fields, "started_at"),
        updated_at=optional_float(fields, "updated_at"),
        finished_at=optional_float(fields, "finished_at"),
        estimator_id=fields.get("estimator_id"),
        validation=fields.get("validation"),
        error=fields.get("error"),
    )
