"""Settings of the HTTP API, read from ``ALPNRE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.simulator.settings import SimulatorSettings

__all__ = ["ApiSettings"]


class ApiSettings(BaseSettings):
    """Broker, data folder and request limits of the API.

    Every field is read from ``ALPNRE_<FIELD>``, e.g. ``ALPNRE_MAX_SIMULATIONS``. The
    broker URL, data folder and queue must match those of the simulation workers.
    """

    model_config = SettingsConfigDict(env_prefix="ALPNRE_", extra="ignore")

    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL of the broker")
    progress_url: str | None = Field(
        None, description="Redis URL of the run progress store; default: broker_url"
    )
    data_dir: Path = Field(Path("runs"), description="folder of the run folders")
    queue: str = Field("simulations", pattern=r"^[A-Za-z0-9_.-]+$")
    key_prefix: str = Field("alpnre", description="prefix of the progress store's Redis keys")
    max_simulations: int = Field(
        10_000_000, ge=1, description="maximum number of simulations in one request"
    )
    max_batch_size: int = Field(100_000, ge=1, description="maximum simulations per batch")
    max_batches: int = Field(100_000, ge=1, description="maximum batches in one request")
    default_page_size: int = Field(50, ge=1)
    max_page_size: int = Field(500, ge=1)
    broker_timeout_s: float = Field(
        3.0, gt=0, description="connect and read timeout of broker and progress store calls"
    )

    # Posterior queries and expected limits.
    registry: str = Field(
        "registry",
        description="estimator registry folder (or a file:// URL of one) read by posterior queries",
    )
    inference_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="device of loaded estimators; 'auto' uses a GPU when torch finds one"
    )
    inference_threads: int = Field(
        1,
        ge=1,
        description="torch threads of the API process; requests run in parallel threads, so "
        "more threads per request oversubscribe the cores",
    )
    estimator_cache_size: int = Field(4, ge=1, description="estimators kept loaded (LRU)")
    posterior_store_size: int = Field(
        256, ge=1, description="posteriors kept for the GET and figure endpoints"
    )
    state_dir: Path | None = Field(
        None,
        description="folder of stored posteriors and expected-limits jobs, shared by all API "
        "processes (uvicorn --workers) and kept over restarts; default <data_dir>/.api-state",
    )
    max_request_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="larger request bodies are rejected with 413"
    )
    max_observations: int = Field(64, ge=1, description="observations in one posterior request")
    max_grid_size: int = Field(400, ge=4, le=1000, description="maximum grid points per axis")
    max_expected_limit_mocks: int = Field(
        10_000, ge=1, description="maximum mock observations of one expected-limits request"
    )
    local_expected_limit_mocks: int = Field(
        200,
        ge=0,
        description="expected-limits requests with at most this many mocks simulate in the API "
        "process when backend is 'auto'; larger ones go to the simulation workers",
    )
    expected_limits_timeout_s: float = Field(
        3600.0, gt=0, description="maximum wait for the simulation workers of one request"
    )
    expected_limits_store_size: int = Field(
        64, ge=1, description="expected-limits jobs kept (the latest ones)"
    )

    @property
    def resolved_state_dir(self) -> Path:
        """``state_dir``, or ``<data_dir>/.api-state`` when unset."""
        return self.state_dir if self.state_dir is not None else self.data_dir / ".api-state"

    def simulator_settings(self) -> SimulatorSettings:
        """Settings for the Celery client that sends batches, sharing broker and queue."""
        return SimulatorSettings(
            broker_url=self.broker_url,
            progress_url=self.progress_url,
            data_dir=self.data_dir,
            queue=self.queue,
            key_prefix=self.key_prefix,
        )
