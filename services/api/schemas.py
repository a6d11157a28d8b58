"""Request and response bodies of the API."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from services.simulator.progress import RunProgress, RunState

__all__ = [
    "BatchCounts",
    "BatchErrorPublic",
    "ErrorDetail",
    "OutputLocation",
    "SimulationCreate",
    "SimulationPage",
    "SimulationPublic",
]

MAX_SEED = 2**63 - 1


class SimulationCreate(BaseModel):
    """A request for a simulation run."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "config": "ngc1275_cta_north_50h",
                    "n_simulations": 10000,
                    "batch_size": 500,
                    "seed": 42,
                }
            ]
        },
    )

    config: dict[str, Any] | str = Field(
        description="the analysis config as a mapping (the content of a config YAML file), "
        "or the name of a shipped config such as 'ngc1275_cta_north_50h'"
    )
    n_simulations: StrictInt = Field(ge=1, description="number of simulations in the run")
    batch_size: StrictInt = Field(
        ge=1, description="simulations per batch; each batch is one task and one Parquet file"
    )
    seed: StrictInt = Field(
        ge=0,
        le=MAX_SEED,
        description="run seed; batch i uses SeedSequence(seed, spawn_key=(i,)), so equal "
        "requests give identical files",
    )


class BatchCounts(BaseModel):
    """Number of batches in each status."""

    queued: int
    running: int
    done: int
    failed: int
    cancelled: int


class BatchErrorPublic(BaseModel):
    """The error that failed one batch."""

    batch_index: int
    error_type: str
    message: str
    attempts: int
    at: datetime


class OutputLocation(BaseModel):
    """Location of the run's files, as paths in the data folder shared with the workers."""

    run_dir: str
    manifest: str


class SimulationPublic(BaseModel):
    """State and progress of a simulation run."""

    run_id: str
    state: RunState
    config_name: str
    config_hash: str
    n_simulations: int
    batch_size: int
    n_batches: int
    seed: int
    batches: BatchCounts
    rows_written: int = Field(description="simulations written to Parquet files so far")
    throughput_sims_per_s: float | None = Field(
        description="simulations written per second since the first batch started"
    )
    eta_s: float | None = Field(
        description="estimated seconds until the remaining batches finish, at the "
        "throughput so far; null before the first batch finishes or after a failure"
    )
    output: OutputLocation
    error: str | None = Field(description="why the whole run failed, e.g. enqueueing failed")
    errors: list[BatchErrorPublic] = Field(description="errors of failed batches")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cancelled_at: datetime | None

    @classmethod
    def from_progress(cls, progress: RunProgress) -> SimulationPublic:
        """Build the response body from a progress snapshot."""
        counts = {status.value: count for status, count in progress.batch_counts.items()}
        return cls(
            run_id=progress.run_id,
            state=progress.state,
            config_name=progress.config_name,
            config_hash=progress.config_hash,
            n_simulations=progress.n_simulations,
            batch_size=progress.batch_size,
            n_batches=progress.n_batches,
            seed=progress.run_seed,
            batches=BatchCounts(**counts),
            rows_written=progress.rows_written,
            throughput_sims_per_s=progress.throughput(),
            eta_s=progress.eta_seconds(),
            output=OutputLocation(
                run_dir=progress.run_dir, manifest=f"{progress.run_dir}/manifest.json"
            ),
            error=progress.error,
            errors=[
                BatchErrorPublic(
                    batch_index=error.batch_index,
                    error_type=error.error_type,
                    message=error.message,
                    attempts=error.attempts,
                    at=_datetime(error.at),
                )
                for error in progress.batch_errors
            ],
            created_at=_datetime(progress.created_at),
            started_at=_optional_datetime(progress.started_at),
            finished_at=_optional_datetime(progress.finished_at),
            cancelled_at=_optional_datetime(progress.cancelled_at),
        )


class SimulationPage(BaseModel):
    """One page of runs, newest first."""

    items: list[SimulationPublic]
    total: int = Field(description="number of runs in the progress store")
    offset: int
    limit: int


class ErrorDetail(BaseModel):
    """Body of 404, 409 and 503 responses."""

    detail: str


def _datetime(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=UTC)


def _optional_datetime(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else _datetime(timestamp)
