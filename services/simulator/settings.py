"""Settings of the simulation workers, read from ``ALPNRE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from services.common import BrokerSettings

__all__ = ["SimulatorSettings"]


class SimulatorSettings(BrokerSettings):
    """Broker, data folder, time limits and retry policy of the ``simulations`` queue.

    Every field is read from the environment variable ``ALPNRE_<FIELD>``, e.g.
    ``ALPNRE_BROKER_URL`` or ``ALPNRE_TASK_TIME_LIMIT_S``.
    """

    data_dir: Path = Field(
        Path("runs"),
        description="folder of the run folders, shared by the workers and the API",
    )
    queue: str = Field("simulations", pattern=r"^[A-Za-z0-9_.-]+$")
    worker_concurrency: int | None = Field(
        None, ge=1, description="processes per worker; default: the number of CPU cores"
    )
    task_soft_time_limit_s: float = Field(
        600.0, gt=0, description="a batch running longer is stopped and marked failed"
    )
    task_time_limit_s: float = Field(
        660.0, gt=0, description="a batch running longer is killed with its process"
    )
    visibility_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="seconds before Redis hands an unacknowledged batch to another worker",
    )
    max_retries: int = Field(5, ge=0, description="retries of a batch after transient errors")
    manifest_lock_timeout_s: float = Field(
        60.0, gt=0, description="maximum wait for the lock that serialises manifest updates"
    )

    @model_validator(mode="after")
    def _check_time_limits(self) -> SimulatorSettings:
        if not self.task_soft_time_limit_s < self.task_time_limit_s:
            raise ValueError(
                f"task_soft_time_limit_s ({self.task_soft_time_limit_s:g}) must be below "
                f"task_time_limit_s ({self.task_time_limit_s:g}) so a batch can record its "
                "failure before it is killed"
            )
        # A message that stays unacknowledged longer than the visibility timeout is
        # delivered again, so the timeout must cover the longest batch and the longest
        # retry countdown (a retried message waits unacknowledged in the worker).
        longest_hold_s = max(self.task_time_limit_s, self.retry_backoff_max_s)
        if not self.visibility_timeout_s > longest_hold_s:
            raise ValueError(
                f"visibility_timeout_s ({self.visibility_timeout_s:g}) must exceed "
                f"task_time_limit_s and retry_backoff_max_s ({longest_hold_s:g}), otherwise "
                "Redis hands running batches to a second worker"
            )
        return self

    def run_dir(self, run_id: str) -> Path:
        """Folder of run ``run_id``."""
        return self.data_dir / run_id
