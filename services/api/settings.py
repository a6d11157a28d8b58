"""Settings of the HTTP API, read from ``ALPNRE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

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

    def simulator_settings(self) -> SimulatorSettings:
        """Settings for the Celery client that sends batches, sharing broker and queue."""
        return SimulatorSettings(
            broker_url=self.broker_url,
            progress_url=self.progress_url,
            data_dir=self.data_dir,
            queue=self.queue,
            key_prefix=self.key_prefix,
        )
