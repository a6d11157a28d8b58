"""Request and response bodies of the training-run and estimator routes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from alpnre.nre import TrainingConfig
from pydantic import BaseModel, ConfigDict, Field

from services.trainer.progress import TrainingProgress, TrainingState

__all__ = [
    "EpochMetrics",
    "EstimatorHeads",
    "EstimatorPage",
    "EstimatorPublic",
    "EstimatorSummary",
    "TrainingRunCreate",
    "TrainingRunPage",
    "TrainingRunPublic",
    "ValidationSummary",
]

MAX_RUNS = 1000


class TrainingRunCreate(BaseModel):
    """A request to train an estimator."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "runs": ["run-0123456789ab"],
                    "hyperparameters": {"max_epochs": 30, "batch_size": 256, "seed": 1},
                }
            ]
        },
    )

    runs: list[str] = Field(
        min_length=1,
        max_length=MAX_RUNS,
        description="ids of simulation runs in the data folder (ALPNRE_DATA_DIR), as "
        "returned by POST /v1/simulations; all must use the same config",
    )
    hyperparameters: TrainingConfig = Field(
        default_factory=TrainingConfig,
        description="training settings; fields left out take their defaults",
    )


class EpochMetrics(BaseModel):
    """Losses and duration of one finished epoch."""

    epoch: int
    train_loss: float
    validation_loss: float
    seconds: float


class TrainingRunPublic(BaseModel):
    """State and progress of a training run."""

    training_run_id: str
    state: TrainingState
    runs: list[str]
    hyperparameters: dict[str, Any] = Field(
        description="the full training settings, defaults included"
    )
    epoch: int | None = Field(description="last finished epoch (from 0); null before the first")
    max_epochs: int
    epochs: list[EpochMetrics] = Field(description="losses of every finished epoch")
    eta_s: float | None = Field(
        description="estimated seconds until max_epochs are done, from the median epoch "
        "time; an upper bound, because early stopping can end the training sooner"
    )
    attempts: int = Field(description="deliveries that started training; >1 after a resume")
    resumed_from_epoch: int | None = Field(
        description="first epoch computed again after a lost worker or a retry"
    )
    estimator_id: str | None = Field(description="the published estimator, once completed")
    validation: str | None = Field(
        description="'done', or 'skipped: <reason>' or 'failed: <error>', once completed"
    )
    error: str | None = Field(description="why the training failed, or why it is retried")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_progress(cls, progress: TrainingProgress) -> TrainingRunPublic:
        """Build the response body from a progress snapshot."""
        return cls(
            training_run_id=progress.training_run_id,
            state=progress.state,
            runs=progress.runs,
            hyperparameters=progress.hyperparameters,
            epoch=progress.epoch,
            max_epochs=progress.max_epochs,
            epochs=[
                EpochMetrics(
                    epoch=record.epoch,
                    train_loss=record.train_loss,
                    validation_loss=record.validation_loss,
                    seconds=record.seconds,
                )
                for record in progress.epochs
            ],
            eta_s=progress.eta_seconds(),
            attempts=progress.attempts,
            resumed_from_epoch=progress.resumed_from_epoch,
            estimator_id=progress.estimator_id,
            validation=progress.validation,
            error=progress.error,
            created_at=_datetime(progress.created_at),
            started_at=_optional_datetime(progress.started_at),
            finished_at=_optional_datetime(progress.finished_at),
        )


class TrainingRunPage(BaseModel):
    """One page of training runs, newest first."""

    items: list[TrainingRunPublic]
    total: int = Field(description="number of training runs in the progress store")
    offset: int
    limit: int


class EstimatorSummary(BaseModel):
    """Identity of a published estimator."""

    estimator_id: str
    config_name: str
    config_hash: str
    created_at: datetime
    checksum: str = Field(description="SHA-256 over the weights' hash and the metadata")
    training_run_id: str | None = Field(
        None, description="the training run that published it; null for 'alpnre train'"
    )

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> EstimatorSummary:
        """Build the summary from an ``estimator.json``."""
        return cls(**_summary_fields(metadata))


class EstimatorHeads(BaseModel):
    """The marginals the estimator computes log-ratios for."""

    one_dim: list[str]
    two_dim: list[tuple[str, str]]


class ValidationSummary(BaseModel):
    """Verdicts of an estimator's validation; the full report is at ``report_url``."""

    verdict: str | None = Field(description="worst coverage verdict over the marginals")
    coverage_verdicts: dict[str, str] = Field(description="HPD coverage verdict per marginal")
    tarp_verdict: str | None
    n_simulations: int | None = Field(description="held-out simulations")
    created_at: str | None
    report_url: str

    @classmethod
    def from_report(cls, estimator_id: str, report: dict[str, Any]) -> ValidationSummary:
        """Summarise a ``validation/report.json``, tolerating missing sections."""
        coverage = report.get("coverage") or {}
        return cls(
            verdict=report.get("verdict"),
            coverage_verdicts={
                key: str(entry.get("verdict"))
                for key, entry in coverage.items()
                if isinstance(entry, dict)
            },
            tarp_verdict=(report.get("tarp") or {}).get("verdict"),
            n_simulations=(report.get("held_out") or {}).get("n_simulations"),
            created_at=report.get("created_at"),
            report_url=f"/v1/estimators/{estimator_id}/validation",
        )


class EstimatorPublic(EstimatorSummary):
    """A published estimator: identity, heads, training, data and validation."""

    preset: str | None
    preset_version: str | None
    parameters: list[str] = Field(description="parameters of θ, in network order")
    heads: EstimatorHeads
    hyperparameters: dict[str, Any]
    metrics: list[EpochMetrics]
    best_epoch: int | None
    n_dropped_rows: int | None = Field(description="rows excluded for NaN or infinite values")
    data_manifest_hashes: list[str] = Field(description="identity of the training data")
    data_run_ids: list[str]
    n_training_files: int | None
    n_validation_files: int | None
    weights_sha256: str
    versions: dict[str, str] = Field(description="library and dependency versions")
    validation: ValidationSummary | None = Field(
        description="summary of validation/report.json; null until it is validated"
    )

    @classmethod
    def from_metadata(
        cls, metadata: dict[str, Any], validation: dict[str, Any] | None = None
    ) -> EstimatorPublic:
        """Build the response body from an ``estimator.json`` and its validation report."""
        spec = metadata["spec"]
        return cls(
            **_summary_fields(metadata),
            preset=metadata.get("preset"),
            preset_version=_optional_str(metadata.get("preset_version")),
            parameters=[axis["name"] for axis in spec["axes"]],
            heads=EstimatorHeads(one_dim=spec["one_dim"], two_dim=spec["two_dim"]),
            hyperparameters=spec["training"],
            metrics=[
                EpochMetrics(
                    epoch=int(record["epoch"]),
                    train_loss=record["train_loss"],
                    validation_loss=record["validation_loss"],
                    seconds=record["seconds"],
                )
                for record in metadata.get("metrics", [])
            ],
            best_epoch=metadata.get("best_epoch"),
            n_dropped_rows=metadata.get("n_dropped_rows"),
            data_manifest_hashes=metadata.get("data_manifest_hashes", []),
            data_run_ids=metadata.get("data_run_ids", []),
            n_training_files=metadata.get("n_training_files"),
            n_validation_files=metadata.get("n_validation_files"),
            weights_sha256=metadata["weights_sha256"],
            versions=metadata.get("versions", {}),
            validation=(
                None
                if validation is None
                else ValidationSummary.from_report(metadata["estimator_id"], validation)
            ),
        )


class EstimatorPage(BaseModel):
    """One page of published estimators, newest first."""

    items: list[EstimatorSummary]
    total: int = Field(description="number of estimators that match the query")
    offset: int
    limit: int


def _summary_fields(metadata: dict[str, Any]) -> dict[str, Any]:
    return {
        "estimator_id": metadata["estimator_id"],
        "config_name": metadata["config_name"],
        "config_hash": metadata["config_hash"],
        "created_at": metadata["created_at"],
        "checksum": metadata["checksum"],
        "training_run_id": metadata.get("training_run_id"),
    }


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _datetime(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=UTC)


def _optional_datetime(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else _datetime(timestamp)
