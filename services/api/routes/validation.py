"""``/v1/estimators/{estimator_id}/validation``: the stored calibration report of an estimator.

The report is ``validation/report.json`` in the estimator's registry folder, written
by ``alpnre validate`` (:func:`alpnre.calibration.validate_estimator`). The API only
reads it: validating simulates about a thousand spectra, which is a job for the CLI or
the training worker, not for a request.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, status
from pydantic import BaseModel, ConfigDict, Field

from services.api.routes.estimators import RegistryDep
from services.api.schemas import ErrorDetail

__all__ = ["ValidationReportPublic", "router"]

router = APIRouter(prefix="/estimators", tags=["estimators"])

CoverageVerdict = Literal["calibrated", "conservative", "overconfident"]


class _Report(BaseModel):
    # Fields added to the report later pass through unchanged.
    model_config = ConfigDict(extra="allow")


class HeldOutPublic(_Report):
    """The held-out simulations of a validation."""

    n_simulations: int
    seed: int = Field(description="reproduces the held-out set with the same estimator config")
    seed_sequence: str
    batch_size: int


class CoveragePublic(_Report):
    """Expected coverage of the HPD regions of one marginal."""

    parameters: list[str]
    axes: list[str] = Field(description="axis variables, log10(name) for log-uniform priors")
    levels: list[float | None] = Field(description="credibility levels alpha")
    ecp: list[float | None] = Field(description="expected coverage probability at each level")
    band95_lower: list[float | None]
    band95_upper: list[float | None]
    verdicts: list[CoverageVerdict]
    verdict: CoverageVerdict
    meets_target: bool = Field(description="no level is overconfident")
    n_sims: int


class TarpPublic(_Report):
    """TARP coverage test on the 2-dim marginal."""

    parameters: list[str]
    axes: list[str]
    levels: list[float | None]
    ecp: list[float | None]
    area: float | None
    ks_statistic: float | None
    ks_pvalue: float | None
    verdict: Literal["calibrated", "miscalibrated"]
    n_sims: int
    n_samples: int


class ValidationReportPublic(_Report):
    """Calibration report of an estimator on held-out simulations."""

    schema_version: int
    estimator_id: str
    estimator_checksum: str = Field(description="checksum of the estimator that was validated")
    config_name: str
    config_hash: str
    irf_id: str
    created_at: str
    alpnre_version: str
    held_out: HeldOutPublic
    grid_size: int
    n_posterior_samples: int
    verdict: CoverageVerdict = Field(description="worst coverage verdict over the marginals")
    coverage: dict[str, CoveragePublic] = Field(description="per marginal, e.g. 'm_neV'")
    tarp: TarpPublic
    exact: dict[str, Any] | None = Field(
        description="comparison with the exact posterior, or null when not computed"
    )
    timing_s: dict[str, float]
    figures: dict[str, str] = Field(description="figure files in the validation folder")
    note: str


@router.get(
    "/{estimator_id}/validation",
    response_model=ValidationReportPublic,
    responses={
        404: {
            "model": ErrorDetail,
            "description": "no estimator with this id, or it has not been validated yet",
        }
    },
    summary="Get an estimator's validation report",
)
def get_validation(
    estimator_id: Annotated[str, Path(description="estimator id, as listed")],
    registry: RegistryDep,
) -> ValidationReportPublic:
    """Return the stored coverage, TARP and exact-likelihood results of an estimator."""
    if not registry.exists(estimator_id):
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"estimator {estimator_id!r} not found in the registry at {registry.location}",
        )
    report = registry.read_validation_report(estimator_id)
    if report is None:
        location = registry.local_root or registry.location
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"estimator {estimator_id!r} has no validation report yet: create it with "
            f"'alpnre validate --estimator {estimator_id} --registry {location}'",
        )
    return ValidationReportPublic.model_validate(report)
