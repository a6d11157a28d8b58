"""Analysis configuration: pydantic models of the YAML file that defines a study.

A config fixes everything a simulation depends on except the random seed: the source,
the observation (livetime, energy axes, on region), the instrument response, the EBL
model, the propagation backend and one prior per parameter. Its canonical JSON form is
hashed (:func:`config_hash`) so that Parquet files, run manifests and estimators can be
checked for compatibility before they are mixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alpnre.parameters import (
    PARAMETERS,
    PARAMETERS_OF_INTEREST,
    PRESET_VERSION,
    PRESETS,
    preset_parameters,
)
from alpnre.priors import FixedPrior, Prior, TruncatedNormalPrior

__all__ = [
    "AnalysisConfig",
    "ConfigError",
    "config_hash",
    "list_shipped_configs",
    "load_config",
]

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """An analysis config that cannot be used; the message names the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(_Strict):
    """The gamma-ray source; defaults are NGC 1275 in the Perseus cluster."""

    name: str = "NGC 1275"
    redshift: float = Field(0.017559, ge=0.0, le=6.0)
    ra_deg: float = Field(49.950417, ge=0.0, lt=360.0, description="03h19m48.1s")
    dec_deg: float = Field(41.511667, ge=-90.0, le=90.0, description="+41d30m42s")


class ObservationConfig(_Strict):
    """Livetime, energy axes and on region of the simulated observation."""

    livetime_h: float = Field(50.0, gt=0.0, le=10_000.0)
    energy_min_tev: float = Field(0.01, gt=0.0)
    energy_max_tev: float = Field(100.0, gt=0.0)
    n_energy_bins: int = Field(200, ge=2, le=2000)
    energy_true_min_tev: float = Field(0.005, gt=0.0)
    energy_true_max_tev: float = Field(200.0, gt=0.0)
    n_energy_true_bins: int = Field(460, ge=10, le=5000)
    on_region_radius_deg: float = Field(0.1, gt=0.0, le=1.0)
    offset_deg: float = Field(
        0.5, ge=0.0, le=3.0, description="source offset from the pointing (wobble)"
    )

    @model_validator(mode="after")
    def _check_axes(self) -> ObservationConfig:
        if not self.energy_min_tev < self.energy_max_tev:
            raise ValueError(
                f"energy_min_tev={self.energy_min_tev} must be below "
                f"energy_max_tev={self.energy_max_tev}"
            )
        if not (
            self.energy_true_min_tev <= self.energy_min_tev
            and self.energy_true_max_tev >= self.energy_max_tev
        ):
            raise ValueError(
                "the true-energy axis "
                f"[{self.energy_true_min_tev}, {self.energy_true_max_tev}] TeV must contain the "
                f"reconstructed axis [{self.energy_min_tev}, {self.energy_max_tev}] TeV so that "
                "energy dispersion into the edge bins is modelled"
            )
        return self

    def energy_edges_tev(self) -> np.ndarray:
        """Reconstructed-energy bin edges in TeV, shape (n_energy_bins + 1,)."""
        return np.geomspace(self.energy_min_tev, self.energy_max_tev, self.n_energy_bins + 1)

    def energy_true_edges_tev(self) -> np.ndarray:
        """True-energy bin edges in TeV, shape (n_energy_true_bins + 1,)."""
        return np.geomspace(
            self.energy_true_min_tev, self.energy_true_max_tev, self.n_energy_true_bins + 1
        )


IRF_NORTH = "cta-caldb/Prod5-North-20deg-AverageAz-4LSTs09MSTs.180000s-v0.1.fits.gz"
IRF_SOUTH = "cta-caldb/Prod5-South-20deg-AverageAz-14MSTs37SSTs.180000s-v0.1.fits.gz"
IRF_1DC_SOUTH = "cta-1dc/caldb/data/cta/1dc/bcf/South_z20_50h/irf_file.fits"


class IRFConfig(_Strict):
    """Where the instrument response comes from.

    ``path`` names a file explicitly and never falls back. Otherwise
    ``gammapy_data_file`` is looked up under ``$GAMMAPY_DATA``. When that is unset or
    the file is missing and ``allow_builtin_fallback`` is true, an approximate IRF built
    in code is used and labelled as such in logs and outputs.
    """

    path: str | None = None
    gammapy_data_file: str | None = IRF_NORTH
    allow_builtin_fallback: bool = True
    builtin_site: Literal["north", "south"] = "north"

    @model_validator(mode="after")
    def _check_source(self) -> IRFConfig:
        if self.path is None and self.gammapy_data_file is None and not self.allow_builtin_fallback:
            raise ValueError(
                "irf: set 'path' or 'gammapy_data_file', or allow the built-in approximation "
                "with allow_builtin_fallback: true"
            )
        return self


class EBLConfig(_Strict):
    """EBL model of ebltable used for the optical depth."""

    model: Literal["dominguez", "franceschini", "finke", "gilmore", "kneiske", "saldana-lopez"] = (
        "dominguez"
    )


class PropagationConfig(_Strict):
    """Settings of the photon survival probability computation."""

    backend: Literal["kernel", "gammaalps"] = Field(
        "kernel",
        description="'kernel': the vectorised kernel of alpnre.physics.propagation; "
        "'gammaalps': the reference implementation (about 100x slower)",
    )
    galactic_field: Literal["jansson12", "none"] = "jansson12"
    realisations_per_theta: int = Field(
        1, ge=1, le=100, description="B-field realisations simulated for each sampled theta"
    )
    fixed_bfield_seed: int | None = Field(
        None,
        ge=0,
        description="use this one B-field realisation in every simulation instead of a new "
        "one each time; with fixed cluster parameters the likelihood is then an explicit "
        "Poisson likelihood (the exact-likelihood reference of the validation)",
    )


class AnalysisConfig(_Strict):
    """A complete analysis: source, observation, instrument, physics and priors."""

    name: str = Field("ngc1275_cta_north_50h", pattern=r"^[A-Za-z0-9_.-]+$")
    preset: str | None = Field(
        None, description="named prior preset for the cluster parameters (see PRESETS)"
    )
    preset_version: str | None = None
    source: SourceConfig = SourceConfig()
    observation: ObservationConfig = ObservationConfig()
    irf: IRFConfig = IRFConfig()
    ebl: EBLConfig = EBLConfig()
    propagation: PropagationConfig = PropagationConfig()
    parameters: dict[str, Prior]

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        preset = data["preset"]
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
        merged: dict[str, Any] = preset_parameters(preset)
        merged.update(data.get("parameters") or {})
        return {**data, "parameters": merged, "preset_version": PRESET_VERSION}

    @field_validator("parameters")
    @classmethod
    def _check_parameters(cls, parameters: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(parameters) - set(PARAMETERS))
        if unknown:
            raise ValueError(
                f"unknown parameters {unknown}: allowed names are {sorted(PARAMETERS)} "
                "(the unit is part of the name)"
            )
        missing = sorted(set(PARAMETERS) - set(parameters) - {"ebl_norm"})
        if missing:
            raise ValueError(f"missing priors for {missing}: give each a prior, e.g. kind 'fixed'")
        for name in PARAMETERS_OF_INTEREST:
            if parameters[name].is_fixed:
                raise ValueError(f"{name} is a parameter of interest and cannot be fixed")
        for name, prior in parameters.items():
            _check_physical_range(name, prior)
        _check_turbulence_scales(parameters)
        return parameters

    def prior(self, name: str) -> Any:
        """Return the prior of ``name``; ``ebl_norm`` defaults to fixed at 1."""
        if name == "ebl_norm" and name not in self.parameters:
            return FixedPrior(value=1.0)
        return self.parameters[name]

    @property
    def parameter_names(self) -> list[str]:
        """Names of all simulator parameters in a fixed order (the Parquet column order)."""
        return [name for name in PARAMETERS if name in self.parameters or name == "ebl_norm"]

    @property
    def free_parameter_names(self) -> list[str]:
        """Names of parameters whose prior is not fixed."""
        return [name for name in self.parameter_names if not self.prior(name).is_fixed]


def _check_physical_range(name: str, prior: Any) -> None:
    spec = PARAMETERS[name]
    low, high = prior.support()
    values = [value for value in (low, high) if math.isfinite(value)]
    if isinstance(prior, TruncatedNormalPrior) or hasattr(prior, "mean"):
        values.append(prior.mean)
    for value in values:
        if not spec.low <= value <= spec.high:
            unit = f" {spec.unit}" if spec.unit else ""
            raise ValueError(
                f"{name} = {value:g} is outside the physical range "
                f"[{spec.low:g}, {spec.high:g}]{unit}: the unit is {spec.unit or 'dimensionless'}"
                f" and typical values are {spec.typical}"
            )


def _check_turbulence_scales(parameters: dict[str, Any]) -> None:
    kl_high = parameters["kl_per_kpc"].support()[1]
    kh_low = parameters["kh_per_kpc"].support()[0]
    if not kl_high < kh_low:
        raise ValueError(
            f"kl_per_kpc (largest value {kl_high:g}) must be below kh_per_kpc (smallest value "
            f"{kh_low:g}): kL is the lower wave-number cut-off (largest turbulence scale) and "
            "kH the upper one, so the two values look swapped (gammaALPs' own defaults are)"
        )


def config_hash(config: AnalysisConfig) -> str:
    """Return the SHA-256 hex digest of the config's canonical JSON form."""
    payload = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def config_to_json(config: AnalysisConfig) -> str:
    """Serialise a config to canonical JSON (sorted keys), the form stored in files."""
    return json.dumps(config.model_dump(mode="json"), sort_keys=True)


def config_from_json(text: str) -> AnalysisConfig:
    """Rebuild a config from :func:`config_to_json` output."""
    return AnalysisConfig.model_validate(json.loads(text))


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid analysis config {source}:"]
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {location or '(top level)'}: {message}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "(inline)") -> AnalysisConfig:
    """Validate a config mapping, raising :class:`ConfigError` with readable messages."""
    try:
        return AnalysisConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def shipped_config_dir() -> Path:
    """Folder of the shipped configs: ``$ALPNRE_CONFIG_DIR``, else the repository's ``configs/``.

    The package is installed in editable mode from the repository (README and
    Dockerfiles), so the folder sits two levels above the package.
    """
    override = os.environ.get("ALPNRE_CONFIG_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "configs"


def list_shipped_configs() -> list[str]:
    """Names of the configs shipped with the package (without the .yaml suffix)."""
    return sorted(path.stem for path in shipped_config_dir().glob("*.yaml"))


def load_config(path_or_name: str | Path) -> AnalysisConfig:
    """Load an analysis config from a YAML file or the name of a shipped config.

    Raises
    ------
    ConfigError
        When the file does not exist, is not YAML, or fails validation.
    """
    path = Path(path_or_name)
    if not path.exists():
        shipped = shipped_config_dir() / f"{path_or_name}.yaml"
        if shipped.exists():
            path = shipped
        else:
            raise ConfigError(
                f"config {str(path_or_name)!r} not found: give a YAML file path or one of the "
                f"shipped configs {list_shipped_configs()}"
            )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a YAML mapping, got {type(data).__name__}")
    config = parse_config(data, source=str(path))
    log.debug("loaded config %s (%s)", config.name, path)
    return config
