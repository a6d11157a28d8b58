"""Request and response bodies of the posterior and expected-limits routes.

Axis variables follow :mod:`alpnre.posterior`: parameters with a log-uniform prior are
given as log10 of the value (``log10(m_neV)``, ``log10(g_per_gev)``), others as the value.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictInt, field_validator

__all__ = [
    "ESTIMATOR_REFERENCE_PATTERN",
    "CountsObservation",
    "ExpectedLimitsCreate",
    "ExpectedLimitsPublic",
    "ExpectedLimitsResult",
    "JobState",
    "Marginal1DPublic",
    "Marginal2DPublic",
    "NonFiniteValue",
    "PosteriorBatchPublic",
    "PosteriorCreate",
    "PosteriorOptions",
    "PosteriorPublic",
    "RunRowObservation",
    "UpperLimitPublic",
    "ValidationSummary",
]

# An estimator id, "latest", or "latest:<config name>". No path separators, so a request
# can only name estimators inside the registry.
ESTIMATOR_REFERENCE_PATTERN = r"^(latest(:[A-Za-z0-9_.-]+)?|[A-Za-z0-9][A-Za-z0-9_.-]{0,199})$"
CONFIG_NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"

EstimatorReference = Annotated[
    str,
    Field(
        pattern=ESTIMATOR_REFERENCE_PATTERN,
        description="estimator id in the registry, 'latest' (with 'config'), or "
        "'latest:<config name>'",
        examples=["latest:ngc1275_cta_north_50h"],
    ),
]


class PosteriorOptions(BaseModel):
    """Estimator and output options of a posterior request, JSON or multipart."""

    model_config = ConfigDict(extra="forbid")

    estimator_id: EstimatorReference
    config: str | None = Field(
        None,
        pattern=CONFIG_NAME_PATTERN,
        description="config name whose newest estimator 'latest' means",
    )
    grid_size: StrictInt = Field(
        100, ge=4, le=1000, description="grid points per parameter axis (2-dim: grid_size^2)"
    )
    levels: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(
        default_factory=lambda: [0.68, 0.95],
        min_length=1,
        max_length=5,
        description="credibility levels of the HPD regions",
    )
    marginals: list[str] | None = Field(
        None, description="1-dim marginals to return; default: every one the estimator has"
    )
    include_figures: bool = Field(
        False,
        description="embed the corner plot as base64 PNG (slower; the figure URLs work either way)",
    )

    @field_validator("levels")
    @classmethod
    def _sorted_unique(cls, levels: list[float]) -> list[float]:
        return sorted(set(levels))

    def estimator_reference(self) -> str:
        """Return the reference to resolve in the registry, 'latest' completed by ``config``."""
        if self.estimator_id == "latest":
            if self.config is None:
                raise ValueError("estimator_id 'latest' needs 'config', the config name")
            return f"latest:{self.config}"
        return self.estimator_id


class CountsObservation(BaseModel):
    """An observed spectrum given as counts per reconstructed-energy bin."""

    model_config = ConfigDict(extra="forbid")

    counts: list[Annotated[float, Strict()]] = Field(
        description="non-negative integer counts, one per energy bin of the estimator",
        max_length=100_000,
    )
    name: str | None = Field(None, max_length=200, description="label echoed in the response")


class RunRowObservation(BaseModel):
    """One simulated spectrum of a simulation run; its true parameters are returned too."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    row: StrictInt = Field(ge=0, description="row over the whole run, starting at 0")


class PosteriorCreate(PosteriorOptions):
    """A posterior request with observations in the JSON body."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "estimator_id": "latest:ngc1275_cta_north_50h",
                    "observations": [
                        {"counts": [12, 30, 41]},
                        {"run_id": "run-0123456789ab", "row": 3},
                    ],
                    "grid_size": 100,
                    "levels": [0.68, 0.95],
                }
            ]
        },
    )

    observations: list[CountsObservation | RunRowObservation] = Field(
        min_length=1, description="each gets its own posterior, returned in this order"
    )


class NonFiniteValue(BaseModel):
    """A grid point whose value is not a finite number and is null in its list."""

    index: int
    value: Literal["-inf", "inf", "nan"]


class Marginal1DPublic(BaseModel):
    """1-dim marginal posterior of one parameter on a grid of its axis variable."""

    name: str
    axis: str = Field(description="axis variable, e.g. 'log10(m_neV)'")
    grid: list[float]
    density: list[float] = Field(description="posterior density of the axis variable")
    prior_density: list[float] = Field(description="prior density of the axis variable")
    log_ratio: list[float | None] = Field(
        description="log r(x_o|θ); null where it is not finite, listed in log_ratio_nonfinite"
    )
    log_ratio_nonfinite: list[NonFiniteValue]
    map: float
    mean: float
    hpd_intervals: dict[str, list[list[float]]] = Field(
        description="per level, the [low, high] intervals of the HPD region"
    )


class UpperLimitPublic(BaseModel):
    """Upper limit on the second parameter for each grid value of the first."""

    axis: str
    grid: list[float]
    limit: list[float | None] = Field(description="null where the conditional posterior is zero")
    limit_axis: str


class Marginal2DPublic(BaseModel):
    """2-dim marginal posterior: density[i][j] at (grid_x[i], grid_y[j])."""

    names: list[str]
    axes: list[str]
    grid_x: list[float]
    grid_y: list[float]
    density: list[list[float]]
    map: list[float]
    hpd_masks: dict[str, list[list[int]]] = Field(description="per level, 1 inside the region")
    hpd_contours: dict[str, list[list[list[float]]]] = Field(
        description="per level, boundary polylines as [x, y] points in axis coordinates"
    )
    upper_limit_95: UpperLimitPublic


class ValidationSummary(BaseModel):
    """Calibration of the estimator from its ``validation/report.json``."""

    verdict: str | None = Field(
        description="'calibrated', 'conservative' or 'overconfident' as the report states it"
    )
    numbers: dict[str, float | int | str | bool | None] = Field(
        description="scalar fields of the report, keyed by their dotted path"
    )
    report: str = Field(description="path of the report inside the estimator folder")


class ObservationPublic(BaseModel):
    """Source, name and energy range of an observation."""

    source: Literal["counts", "ogip_pha", "spectrum_dataset", "simulation"]
    name: str
    n_bins: int
    notes: list[str]
    energy_min_tev: float | None = None
    energy_max_tev: float | None = None


class PosteriorPublic(BaseModel):
    """The posterior of one observation."""

    id: str
    figure_png: str
    figure_svg: str
    observation: ObservationPublic
    estimator_id: str
    estimator_checksum: str
    levels: list[float]
    prior: dict[str, dict[str, Any]]
    marginals_1d: dict[str, Marginal1DPublic]
    marginals_2d: dict[str, Marginal2DPublic]
    truth: dict[str, float] | None
    timing_s: float
    validation: ValidationSummary | None
    figure_png_base64: str | None = None


class EstimatorInfo(BaseModel):
    """The estimator that computed the posteriors."""

    estimator_id: str
    estimator_checksum: str
    config_name: str
    device: str


class PosteriorBatchPublic(BaseModel):
    """Posteriors of all observations of a request, in request order."""

    estimator: EstimatorInfo
    posteriors: list[PosteriorPublic]
    timing_s: float = Field(description="server time of the whole request")


class ExpectedLimitsCreate(BaseModel):
    """A request for expected limits under the no-ALP hypothesis."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"estimator_id": "latest:ngc1275_cta_north_50h", "n_mocks": 100, "seed": 1}
            ]
        },
    )

    estimator_id: EstimatorReference
    config: str | None = Field(
        None,
        pattern=CONFIG_NAME_PATTERN,
        description="shipped config to simulate the mocks with; default: the estimator's "
        "own config. With estimator_id 'latest' it also selects the estimator.",
    )
    n_mocks: StrictInt = Field(ge=1, description="mock observations without ALPs")
    seed: StrictInt = Field(0, ge=0, le=2**63 - 1, description="run seed of the mocks")
    grid_size: StrictInt = Field(100, ge=4, le=1000, description="grid points per axis")
    level: float = Field(0.95, gt=0.0, lt=1.0, description="credibility level of the limits")
    backend: Literal["auto", "local", "workers"] = Field(
        "auto",
        description="'local' simulates in the API process, 'workers' through the simulation "
        "queue, 'auto' picks local up to ALPNRE_LOCAL_EXPECTED_LIMIT_MOCKS mocks",
    )


class JobState(StrEnum):
    """State of an expected-limits job."""

    QUEUED = "queued"
    SIMULATING = "simulating"
    COMPUTING = "computing"
    COMPLETED = "completed"
    FAILED = "failed"


class ExpectedLimitsResult(BaseModel):
    """Median expected limit and its bands, as returned by ``ExpectedLimits.to_dict``."""

    estimator_id: str
    estimator_checksum: str
    config_name: str
    n_mocks: int
    level: float
    null_coupling_per_gev: float
    seed: int | None
    simulation: dict[str, Any]
    timing_s: float
    mass_neV: list[float | None]
    log10_mass_neV: list[float | None]
    log10_g_per_gev: dict[str, Any] = Field(
        description="'median', 'band_68' and 'band_95' ([low, high]) of log10(g / GeV^-1)"
    )
    g_per_gev: dict[str, Any] = Field(description="the same in GeV^-1")


class ExpectedLimitsPublic(BaseModel):
    """State of an expected-limits job, with its result once completed."""

    id: str
    state: JobState
    backend: Literal["local", "workers"]
    estimator_id: str
    config_name: str
    n_mocks: int
    seed: int
    simulation_run_id: str | None = Field(
        description="simulation run of the mocks when the workers simulate them"
    )
    created_at: datetime
    finished_at: datetime | None
    error: str | None
    result: ExpectedLimitsResult | None
    figure_png: str
    figure_svg: str
