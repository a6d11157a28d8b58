"""Settings of the training worker, read from ``ALPNRE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from services.common import BrokerSettings

__all__ = ["TrainerSettings"]


class TrainerSettings(BrokerSettings):
    """Broker, folders, time limits and retry policy of the ``training`` queue.

    Every field is read from ``ALPNRE_<FIELD>``, e.g. ``ALPNRE_REGISTRY`` or
    ``ALPNRE_TRAINING_WORK_DIR``. Broker, data folder and registry must match those of
    the API that sends the trainings.
    """

    data_dir: Path = Field(
        Path("runs"),
        description="folder of the simulation run folders, shared with the simulation "
        "workers and the API; a run id names the folder <data_dir>/<run id>",
    )
    registry: str = Field(
        "registry",
        description="estimator registry: a local folder, or an fsspec URL such as "
        "file:///srv/registry or s3://bucket/registry",
    )
    training_work_dir: Path = Field(
        Path("training-work"),
        description="local folder for checkpoints: <training_work_dir>/<training run id>",
    )
    training_queue: str = Field("training", pattern=r"^[A-Za-z0-9_.-]+$")
    training_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads of a training; default: torch's choice, one per "
        "core, which slows training down when other processes keep the cores busy",
    )
    validation_simulations: int = Field(
        1000,
        ge=0,
        description="held-out simulations of the validation after each training (at least "
        "10); 0 skips the validation",
    )
    training_soft_time_limit_s: float = Field(
        82_800.0, gt=0, description="a training running longer is stopped and marked failed"
    )
    training_time_limit_s: float = Field(
        86_400.0, gt=0, description="a training running longer is killed with its process"
    )
    training_visibility_timeout_s: float = Field(
        90_000.0,
        gt=0,
        description="seconds before Redis hands an unacknowledged training to another worker",
    )
    training_max_retries: int = Field(
        3, ge=0, description="retries of a training after transient errors (file system, Redis)"
    )

    @model_validator(mode="after")
    def _check_time_limits(self) -> TrainerSettings:
        if not self.training_soft_time_limit_s < self.training_time_limit_s:
            raise ValueError(
                f"training_soft_time_limit_s ({self.training_soft_time_limit_s:g}) must be "
                f"below training_time_limit_s ({self.training_time_limit_s:g}) so a training "
                "can record its failure before it is killed"
            )
        # With acks_late, a message still unacknowledged after the visibility timeout is
        # delivered again, and a second worker would train the same run at the same time.
        if not self.training_visibility_timeout_s > self.training_time_limit_s:
            raise ValueError(
                f"training_visibility_timeout_s ({self.training_visibility_timeout_s:g}) must "
                f"exceed training_time_limit_s ({self.training_time_limit_s:g}), otherwise "
                "Redis hands running trainings to a second worker"
            )
        return self

    @model_validator(mode="after")
    def _check_validation_simulations(self) -> TrainerSettings:
        if 0 < self.validation_simulations < 10:
            raise ValueError(
                f"validation_simulations must be 0 (no validation) or at least 10, got "
                f"{self.validation_simulations}"
            )
        return self

    def work_dir(self, training_run_id: str) -> Path:
        """Checkpoint folder of one training run."""
        return self.training_work_dir / training_run_id
