"""Instrument response of a point-source observation, folded to predicted counts.

The response is reduced once per configuration to four arrays on the analysis energy
axes, so that predicting counts for a batch of spectra is a single matrix product:

.. math::
    N_i = \\sum_j F_j \\, \\mathcal{E}_j \\, D_{ji} + B_i

with :math:`F_j` the photon flux integrated over true-energy bin :math:`j`
(cm^-2 s^-1), :math:`\\mathcal{E}_j` the exposure (effective area x livetime x PSF
containment of the on region, cm^2 s), :math:`D_{ji}` the probability that a photon of
true-energy bin :math:`j` is reconstructed in bin :math:`i`, and :math:`B_i` the
expected cosmic-ray background counts in the on region.

The reduction follows gammapy's point-source spectrum extraction
(``SpectrumDatasetMaker`` with ``containment_correction=True`` and IRFs taken at the
region centre) with two differences: the effective area is averaged over each
true-energy bin instead of taken at its centre, and the background is averaged over
four wobble positions. The PSF enters only through the containment fraction in the
exposure, never a second time as a spatial kernel.

When no IRF file is available and the config allows it, a built-in approximation is
made from tables of the CTAO Prod5 v0.1 instrument response functions (Cherenkov
Telescope Array Observatory and Cherenkov Telescope Array Consortium 2021, Zenodo,
doi:10.5281/zenodo.5499840, licensed CC BY 4.0).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import astropy.units as u
import numpy as np
from scipy.special import ndtr

from alpnre.config import AnalysisConfig, IRFConfig, ObservationConfig

__all__ = [
    "IRFNotFoundError",
    "InstrumentResponse",
    "clear_cache",
    "load_instrument_response",
    "resolve_irf_path",
]

log = logging.getLogger(__name__)

# Instructions for getting the IRF files, appended to IRFNotFoundError messages.
_HOW_TO_GET_IRFS = (
    "get the CTAO Prod5 v0.1 IRFs (doi:10.5281/zenodo.5499840) or the whole gammapy data "
    "set with 'gammapy download datasets --out DIR' and set GAMMAPY_DATA=DIR"
)

# Position angles (deg) of the standard four wobble pointings around the source.
# Averaging the background over them makes a scalar offset sufficient to describe
# the observation when the background table is not radially symmetric.
_WOBBLE_POSITION_ANGLES_DEG = (0.0, 90.0, 180.0, 270.0)

# Gauss-Legendre nodes per bin for integrals over log-spaced energy bins.
_NODES_PER_BIN = 4

# Spectral index of the E^-index weight used to average the effective area over a
# true-energy bin. With 100 bins per decade, changing it by 2 changes the exposure of
# the Prod5 and 1DC files by < 0.2 % above 25 GeV and by < 2 % below.
_AVERAGING_INDEX = 2.0


class IRFNotFoundError(FileNotFoundError):
    """An IRF file that the config requires does not exist."""


@dataclass(frozen=True, eq=False)
class InstrumentResponse:
    """Response of the instrument to a point source, reduced to the analysis energy axes.

    The arrays are read-only because instances are shared through the cache of
    :func:`load_instrument_response`.

    Attributes
    ----------
    energy_true_edges_tev
        True-energy bin edges in TeV, shape (n_true + 1,).
    energy_edges_tev
        Reconstructed-energy bin edges in TeV, shape (n_reco + 1,).
    exposure_cm2_s
        Effective area x livetime x PSF containment fraction of the on region, in
        cm^2 s, shape (n_true,).
    edisp_matrix
        Probability that a photon of true-energy bin j is reconstructed in bin i,
        shape (n_true, n_reco). Rows sum to at most 1, because photons can migrate
        outside the reconstructed axis.
    background_counts
        Expected cosmic-ray background counts in the on region for the livetime,
        shape (n_reco,).
    irf_id
        IRF file name and the first 12 hex digits of its SHA-256, or
        ``"builtin-approximation-<site>"``.
    is_approximation
        True for the built-in approximation.
    """

    energy_true_edges_tev: np.ndarray
    energy_edges_tev: np.ndarray
    exposure_cm2_s: np.ndarray
    edisp_matrix: np.ndarray
    background_counts: np.ndarray
    irf_id: str
    is_approximation: bool

    def __post_init__(self) -> None:
        n_true = len(self.energy_true_edges_tev) - 1
        n_reco = len(self.energy_edges_tev) - 1
        expected_shapes = {
            "exposure_cm2_s": (n_true,),
            "edisp_matrix": (n_true, n_reco),
            "background_counts": (n_reco,),
        }
        for name, shape in expected_shapes.items():
            value = getattr(self, name)
            if np.shape(value) != shape:
                raise ValueError(f"{name} has shape {np.shape(value)}, expected {shape}")

        for name in ("energy_true_edges_tev", "energy_edges_tev", *expected_shapes):
            array = np.array(getattr(self, name), dtype=float)
            array.setflags(write=False)
            object.__setattr__(self, name, array)

    def npred(self, integrated_flux_cm2_s: np.ndarray) -> np.ndarray:
        """Fold photon fluxes through the response to expected counts per reconstructed bin.

        Parameters
        ----------
        integrated_flux_cm2_s
            Photon flux integrated over each true-energy bin in cm^-2 s^-1, shape
            (n_true,) or (n_sims, n_true).

        Returns
        -------
        numpy.ndarray
            Expected counts including background, shape (n_reco,) or (n_sims, n_reco).

        Raises
        ------
        ValueError
            When the last axis of the flux does not have n_true entries.
        """
        flux = np.asarray(integrated_flux_cm2_s, dtype=float)
        n_true = len(self.exposure_cm2_s)
        if flux.ndim not in (1, 2) or flux.shape[-1] != n_true:
            raise ValueError(
                f"integrated flux has shape {flux.shape}, expected ({n_true},) or "
                f"(n_sims, {n_true}) to match the true-energy axis of the response"
            )
        return (flux * self.exposure_cm2_s) @ self.edisp_matrix + self.background_counts


def resolve_irf_path(irf: IRFConfig) -> Path | None:
    """Find the IRF file that a config names.

    Parameters
    ----------
    irf
        The ``irf`` section of an analysis config. Environment variables and ``~`` in
        ``path`` are expanded.

    Returns
    -------
    pathlib.Path or None
        ``irf.path`` when it is set, else ``$GAMMAPY_DATA/irf.gammapy_data_file`` when
        that file exists, else None, meaning the built-in approximation is to be used.

    Raises
    ------
    IRFNotFoundError
        When ``irf.path`` is set but missing (there is no fallback for an explicit
        path), or when no file is found and ``irf.allow_builtin_fallback`` is false.
    """
    if irf.path is not None:
        path = Path(os.path.expandvars(irf.path)).expanduser()
        if not path.is_file():
            raise IRFNotFoundError(
                f"IRF file {path} (irf.path) not found: fix the path, {_HOW_TO_GET_IRFS}, "
                "or remove irf.path to look up irf.gammapy_data_file under GAMMAPY_DATA"
            )
        return path

    gammapy_data = os.environ.get("GAMMAPY_DATA")
    if irf.gammapy_data_file is not None and gammapy_data:
        path = Path(gammapy_data) / irf.gammapy_data_file
        if path.is_file():
            return path

    if irf.allow_builtin_fallback:
        return None

    if not gammapy_data:
        reason = "GAMMAPY_DATA is not set"
    else:
        reason = f"{Path(gammapy_data) / str(irf.gammapy_data_file)} does not exist"
    raise IRFNotFoundError(
        f"IRF file {irf.gammapy_data_file!r} not found under GAMMAPY_DATA ({reason}) and "
        f"irf.allow_builtin_fallback is false: {_HOW_TO_GET_IRFS}, or set irf.path"
    )


def load_instrument_response(config: AnalysisConfig) -> InstrumentResponse:
    """Build the instrument response of a config, from its IRF file or the built-in tables.

    Results are cached. The cache key is the JSON of ``config.observation``, the
    resolved IRF path and the fallback site, which are the only inputs of the response.
    So configs that differ only in priors or physics share one entry, and a change of
    ``$GAMMAPY_DATA`` takes effect.

    Raises
    ------
    IRFNotFoundError
        See :func:`resolve_irf_path`.
    ValueError
        When the IRF file lacks a component that a point-source spectrum needs.
    """
    path = resolve_irf_path(config.irf)
    return _build_response_cached(
        config.observation.model_dump_json(),
        None if path is None else str(path.resolve()),
        config.irf.builtin_site,
    )


def clear_cache() -> None:
    """Drop cached instrument responses and IRF files, e.g. after an IRF file was replaced."""
    _build_response_cached.cache_clear()
    _read_irf_file.cache_clear()


@functools.lru_cache(maxsize=32)
def _build_response_cached(
    observation_json: str, path: str | None, builtin_site: str
) -> InstrumentResponse:
    observation = ObservationConfig.model_validate_json(observation_json)
    start = time.perf_counter()
    if path is None:
        response = _builtin_response(observation, builtin_site)
    else:
        response = _response_from_file(Path(path), observation)
    log.info(
        "instrument response %s: %d true x %d reconstructed energy bins, %.4g background "
        "counts in %.4g h, built in %.2f s",
        response.irf_id,
        len(response.exposure_cm2_s),
        len(response.background_counts),
        float(response.background_counts.sum()),
        observation.livetime_h,
        time.perf_counter() - start,
    )
    return response


# --- IRFs read from a file -----------------------------------------------------------


def _response_from_file(path: Path, observation: ObservationConfig) -> InstrumentResponse:
    irfs, irf_id = _read_irf_file(str(path))
    for name in ("aeff", "psf", "edisp", "bkg"):
        if name not in irfs:
            raise ValueError(
                f"IRF file {path} has no {name!r} component: a point-source spectrum needs "
                "effective area, PSF, energy dispersion and background"
            )
    if irfs["aeff"].is_pointlike:
        raise ValueError(
            f"IRF file {path} is point-like (cut on the direction already applied): use a "
            "full-enclosure IRF, whose PSF gives the containment of the on region"
        )

    energy_true_edges = observation.energy_true_edges_tev()
    energy_edges = observation.energy_edges_tev()
    offset = observation.offset_deg * u.deg
    on_radius = observation.on_region_radius_deg * u.deg
    livetime_s = observation.livetime_h * 3600.0

    exposure = livetime_s * _effective_area_cm2_from_irfs(
        irfs["aeff"], irfs["psf"], energy_true_edges, offset, on_radius
    )
    edisp_matrix = _edisp_matrix_from_irf(irfs["edisp"], energy_true_edges, energy_edges, offset)
    _log_missing_migration(irfs["edisp"], energy_true_edges, exposure, offset, irf_id)
    background_rate = _background_rate_from_irf(irfs["bkg"], energy_edges, offset)
    background = background_rate * _solid_angle_sr(observation.on_region_radius_deg) * livetime_s

    return InstrumentResponse(
        energy_true_edges_tev=energy_true_edges,
        energy_edges_tev=energy_edges,
        exposure_cm2_s=exposure,
        edisp_matrix=edisp_matrix,
        background_counts=background,
        irf_id=irf_id,
        is_approximation=False,
    )


@functools.lru_cache(maxsize=8)
def _read_irf_file(path: str) -> tuple[dict[str, Any], str]:
    """Read the IRFs of a file with gammapy and return them with the id ``name:sha256=...``.

    Cached per path, so the unit warning of a file is logged once per process.
    """
    from gammapy.irf import load_irf_dict_from_file

    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    irf_id = f"{Path(path).name}:sha256={digest[:12]}"

    with _background_unit_check() as unit_check, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        irfs = load_irf_dict_from_file(path)

    # astropy emits a UnitsWarning for each unit string it cannot parse. Those strings go
    # into the log message below, and every other warning is passed on unchanged.
    invalid_units = []
    for item in caught:
        message = str(item.message)
        if issubclass(item.category, u.UnitsWarning) and "did not parse as fits unit" in message:
            invalid_units.append(message.split(" did not parse")[0])
        else:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)

    if unit_check.invalid_background_unit:
        # CTA 1DC files write the background unit as '1/s/MeV/sr', which the FITS
        # standard does not allow. The rate is meant per s, MeV and sr, so the unit
        # that gammapy 2.1 substitutes is right.
        log.warning(
            "%s: the background table unit %s is not a valid FITS unit, so it is read as "
            "s^-1 MeV^-1 sr^-1, the unit that CTA 1DC files mean",
            irf_id,
            ", ".join(invalid_units) or "(missing)",
        )
    elif invalid_units:
        log.warning("%s: units that are not valid FITS units: %s", irf_id, ", ".join(invalid_units))

    log.debug("read IRF file %s (%s): %s", path, irf_id, sorted(irfs))
    return irfs, irf_id


class _BackgroundUnitFilter(logging.Filter):
    """Hold back gammapy's log message about an invalid background unit and record it."""

    invalid_background_unit = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "Invalid unit found in background table" in record.getMessage():
            self.invalid_background_unit = True
            return False
        return True


@contextmanager
def _background_unit_check() -> Iterator[_BackgroundUnitFilter]:
    """Attach :class:`_BackgroundUnitFilter` to gammapy's background logger while reading."""
    gammapy_log = logging.getLogger("gammapy.irf.background")
    unit_filter = _BackgroundUnitFilter()
    gammapy_log.addFilter(unit_filter)
    try:
        yield unit_filter
    finally:
        gammapy_log.removeFilter(unit_filter)


def _effective_area_cm2_from_irfs(
    aeff: Any,
    psf: Any,
    energy_true_edges_tev: np.ndarray,
    offset: u.Quantity,
    on_radius: u.Quantity,
) -> np.ndarray:
    """Average effective area x PSF containment over each true-energy bin, in cm^2.

    The average is weighted with an E^-2 spectrum over Gauss-Legendre nodes in ln E.
    gammapy instead takes both factors at the bin centre. With 100 bins per decade the
    two differ by < 3e-4 above 25 GeV for the Prod5 and 1DC files. They differ by up to
    17 % below, where the area rises steeply, and in bins that reach past the ends of
    the table, where the area is zero.

    Returns
    -------
    numpy.ndarray
        Shape (n_true,).
    """
    energy, weights = _log_gauss_legendre_nodes(energy_true_edges_tev)
    energy_q = energy * u.TeV

    area = aeff.evaluate(energy_true=energy_q, offset=offset).to_value("cm2")
    containment = np.asarray(
        u.Quantity(psf.containment(rad=on_radius, energy_true=energy_q, offset=offset)).to_value("")
    )

    spectrum_weights = weights * energy**-_AVERAGING_INDEX
    averaged = np.sum(spectrum_weights * area * containment, axis=1) / np.sum(
        spectrum_weights, axis=1
    )
    return np.clip(np.nan_to_num(averaged), 0.0, None)


def _edisp_matrix_from_irf(
    edisp: Any,
    energy_true_edges_tev: np.ndarray,
    energy_edges_tev: np.ndarray,
    offset: u.Quantity,
) -> np.ndarray:
    """Energy dispersion matrix at the source offset, shape (n_true, n_reco).

    gammapy evaluates the migration density at each true-bin centre and integrates it
    over the reconstructed bin edges, so the sum of a row over adjacent bins does not
    depend on how the range is split. Entries below 1e-8 are set to 0 by gammapy.
    """
    from gammapy.maps import MapAxis

    axis_true = MapAxis.from_energy_edges(energy_true_edges_tev * u.TeV, name="energy_true")
    axis_reco = MapAxis.from_energy_edges(energy_edges_tev * u.TeV, name="energy")
    kernel = edisp.to_edisp_kernel(offset=offset, energy_axis_true=axis_true, energy_axis=axis_reco)

    # True energies outside the IRF table have a zero migration density, which gammapy's
    # normalisation turns into NaN. No photon is reconstructed there.
    matrix = np.nan_to_num(np.asarray(kernel.data, dtype=float))
    return _cap_row_sums(np.clip(matrix, 0.0, None))


def _log_missing_migration(
    edisp: Any,
    energy_true_edges_tev: np.ndarray,
    exposure_cm2_s: np.ndarray,
    offset: u.Quantity,
    irf_id: str,
) -> None:
    """Log true-energy bins with exposure whose migration density in the IRF is zero.

    Photons in such bins are not counted. At 0.5 deg offset the Prod5 v0.1 files have
    such bins above 123 TeV (North) and between 16 and 26 GeV (South).
    """
    centers = np.sqrt(energy_true_edges_tev[1:] * energy_true_edges_tev[:-1]) * u.TeV
    migra = edisp.axes["migra"].center
    density = edisp.evaluate(
        energy_true=centers[:, np.newaxis], migra=migra[np.newaxis, :], offset=offset
    )
    has_migration = np.nan_to_num(np.asarray(density.value)).sum(axis=1) > 0
    missing = (exposure_cm2_s > 0) & ~has_migration
    if missing.any():
        log.info(
            "%s: %d true-energy bins between %.3g and %.3g TeV have effective area but no "
            "energy migration in the IRF at %.3g deg offset, so their photons are not counted",
            irf_id,
            int(missing.sum()),
            energy_true_edges_tev[:-1][missing].min(),
            energy_true_edges_tev[1:][missing].max(),
            offset.to_value("deg"),
        )


def _background_rate_from_irf(
    bkg: Any, energy_edges_tev: np.ndarray, offset: u.Quantity
) -> np.ndarray:
    """Background rate per solid angle integrated over each reconstructed bin, in s^-1 sr^-1.

    The rate is integrated with gammapy's log-log trapezoidal rule between the bin
    edges. A ``Background3D`` table is averaged over the four wobble positions at
    ``offset``, at position angles 0, 90, 180 and 270 deg with position angle 0 along
    field-of-view latitude. A ``Background2D`` table depends on the offset only.

    Returns
    -------
    numpy.ndarray
        Shape (n_reco,).
    """
    from gammapy.irf import Background2D, Background3D

    energy = energy_edges_tev[:, np.newaxis] * u.TeV
    if isinstance(bkg, Background2D):
        rate = bkg.integrate_log_log(axis_name="energy", energy=energy, offset=offset)
    elif isinstance(bkg, Background3D):
        angles = np.radians(_WOBBLE_POSITION_ANGLES_DEG)
        fov_lon = offset * np.sin(angles)[np.newaxis, :]
        fov_lat = offset * np.cos(angles)[np.newaxis, :]
        rate = bkg.integrate_log_log(
            axis_name="energy", energy=energy, fov_lon=fov_lon, fov_lat=fov_lat
        )
    else:
        raise ValueError(
            f"background IRF of type {type(bkg).__name__} is not supported: expected "
            "Background2D or Background3D"
        )

    rate_per_sr = np.asarray(rate.to_value("s-1 sr-1"), dtype=float).mean(axis=1)
    return np.clip(np.nan_to_num(rate_per_sr), 0.0, None)


# --- Built-in approximation ------------------------------------------------------------


@dataclass(frozen=True)
class _PerformanceTable:
    """Coarse instrument performance of one site at 0.5 deg offset, versus true energy.

    Attributes
    ----------
    energy_tev
        Energies of the rows, TeV, shape (n,).
    effective_area_m2
        Effective area, m^2.
    psf_r68_deg
        Radius containing 68 % of the PSF, deg.
    edisp_median
        Median of E_reco / E_true.
    edisp_sigma_ln
        Half the 16-84 % range of ln(E_reco / E_true).
    background_rate
        Background rate per reconstructed energy and solid angle, s^-1 TeV^-1 sr^-1.
    """

    energy_tev: np.ndarray
    effective_area_m2: np.ndarray
    psf_r68_deg: np.ndarray
    edisp_median: np.ndarray
    edisp_sigma_ln: np.ndarray
    background_rate: np.ndarray

    @classmethod
    def from_rows(
        cls, rows: list[tuple[float, float, float, float, float, float]]
    ) -> _PerformanceTable:
        columns = np.array(rows, dtype=float).T
        return cls(*columns)


# Evaluated with gammapy 2.1 from the CTAO Prod5 v0.1 files
# Prod5-{North,South}-20deg-AverageAz-*.180000s-v0.1.fits.gz (50 h, 20 deg zenith,
# average azimuth; North 4 LSTs + 9 MSTs, South 14 MSTs + 37 SSTs) at 0.5 deg offset.
# Median and width of the migration come from the 16, 50 and 84 % quantiles of the
# migration density, and the background from field-of-view position (0, 0.5) deg.
# The South table starts at 30 GeV: below, the South file has < 1000 m^2 of effective
# area, and below 26 GeV no energy migration at all.
# Columns: E [TeV], A_eff [m^2], PSF r68 [deg], median E_reco/E_true,
# sigma of ln(E_reco/E_true), background [s^-1 TeV^-1 sr^-1].
_PERFORMANCE_TABLES = {
    "north": _PerformanceTable.from_rows(
        [
            (0.015, 452.5, 0.294, 1.54, 0.131, 684),
            (0.02, 2648, 0.282, 1.32, 0.17, 1.64e04),
            (0.03, 1.328e04, 0.251, 1.07, 0.184, 1.98e05),
            (0.05, 4.229e04, 0.192, 1.01, 0.22, 1.36e05),
            (0.1, 1.145e05, 0.133, 0.97, 0.15, 3.96e04),
            (0.2, 1.75e05, 0.0968, 0.979, 0.123, 5.61e03),
            (0.5, 2.972e05, 0.0683, 0.997, 0.0914, 494),
            (1.0, 4.222e05, 0.0583, 0.981, 0.0848, 68.2),
            (2.0, 6.035e05, 0.0528, 0.981, 0.0928, 10.4),
            (5.0, 8.283e05, 0.0478, 0.975, 0.101, 1.18),
            (10.0, 9.058e05, 0.0407, 0.974, 0.0932, 0.273),
            (20.0, 9.053e05, 0.0338, 0.956, 0.1, 0.0787),
            (50.0, 7.863e05, 0.0263, 0.949, 0.138, 0.0265),
            (100.0, 8.656e05, 0.0217, 0.953, 0.106, 0.0115),
            (150.0, 5.027e05, 0.0203, 0.885, 0.069, 0.00423),
        ]
    ),
    "south": _PerformanceTable.from_rows(
        [
            (0.03, 984, 0.247, 1.47, 0.208, 8.83e03),
            (0.04, 7477, 0.204, 1.36, 0.165, 5.26e04),
            (0.05, 2.594e04, 0.193, 1.23, 0.157, 8.51e04),
            (0.07, 8.955e04, 0.174, 1.08, 0.146, 1.21e05),
            (0.1, 1.647e05, 0.151, 0.974, 0.151, 7.36e04),
            (0.2, 2.336e05, 0.105, 0.974, 0.13, 7.8e03),
            (0.5, 4.155e05, 0.0693, 0.994, 0.0853, 674),
            (1.0, 7.359e05, 0.0563, 0.984, 0.0688, 116),
            (2.0, 1.181e06, 0.0467, 0.983, 0.0678, 21.4),
            (5.0, 1.693e06, 0.0383, 0.987, 0.0674, 2.25),
            (10.0, 2.216e06, 0.0338, 0.987, 0.0664, 0.257),
            (20.0, 2.711e06, 0.0293, 0.992, 0.0766, 0.141),
            (50.0, 2.725e06, 0.0253, 0.981, 0.081, 0.0449),
            (100.0, 2.933e06, 0.0212, 0.993, 0.115, 0.0167),
            (150.0, 3.604e06, 0.0203, 0.981, 0.0751, 0.0175),
        ]
    ),
}

_TABLE_OFFSET_DEG = 0.5


def _builtin_response(observation: ObservationConfig, site: str) -> InstrumentResponse:
    """Build an approximate response from the Prod5 performance table of ``site``.

    Effective area and background rate are interpolated log-log and are zero outside
    the table. The PSF is a 2D Gaussian with the tabulated 68 % radius, and the energy
    dispersion is log-normal with the tabulated median and width.
    """
    table = _PERFORMANCE_TABLES[site]
    irf_id = f"builtin-approximation-{site}"
    log.warning(
        "%s: no IRF file available, using an approximate CTAO %s response built from a "
        "coarse table of the Prod5 v0.1 IRFs; use it for tests and demonstrations, not "
        "for results (set GAMMAPY_DATA or irf.path to use the real IRFs)",
        irf_id,
        site,
    )
    if not np.isclose(observation.offset_deg, _TABLE_OFFSET_DEG):
        # NOTE: the table has no offset dependence. From 0.5 to 1 deg offset the Prod5
        # effective area falls by up to 11 % (North at 50 GeV).
        log.warning(
            "%s: the table is for %.1f deg offset, offset_deg=%.3g is ignored",
            irf_id,
            _TABLE_OFFSET_DEG,
            observation.offset_deg,
        )

    energy_true_edges = observation.energy_true_edges_tev()
    energy_edges = observation.energy_edges_tev()
    livetime_s = observation.livetime_h * 3600.0
    solid_angle = _solid_angle_sr(observation.on_region_radius_deg)

    area = _builtin_effective_area_cm2(table, energy_true_edges, observation.on_region_radius_deg)
    energy_true_centers = np.sqrt(energy_true_edges[1:] * energy_true_edges[:-1])
    edisp_matrix = _lognormal_edisp_matrix(table, energy_true_centers, energy_edges)
    background_rate = _builtin_background_rate(table, energy_edges)

    return InstrumentResponse(
        energy_true_edges_tev=energy_true_edges,
        energy_edges_tev=energy_edges,
        exposure_cm2_s=area * livetime_s,
        edisp_matrix=edisp_matrix,
        background_counts=background_rate * solid_angle * livetime_s,
        irf_id=irf_id,
        is_approximation=True,
    )


def _builtin_effective_area_cm2(
    table: _PerformanceTable, energy_true_edges_tev: np.ndarray, on_radius_deg: float
) -> np.ndarray:
    """Effective area x Gaussian PSF containment averaged over each true bin, cm^2."""
    energy, weights = _log_gauss_legendre_nodes(energy_true_edges_tev)
    area_cm2 = 1e4 * _interp_log_log(energy, table.energy_tev, table.effective_area_m2)

    # For a 2D Gaussian, containment(r) = 1 - exp(-r^2 / (2 sigma^2)), so
    # r68 = sigma * sqrt(-2 ln 0.32).
    r68 = np.exp(np.interp(np.log(energy), np.log(table.energy_tev), np.log(table.psf_r68_deg)))
    sigma = r68 / np.sqrt(-2.0 * np.log(1.0 - 0.68))
    containment = -np.expm1(-(on_radius_deg**2) / (2.0 * sigma**2))

    spectrum_weights = weights * energy**-_AVERAGING_INDEX
    return np.sum(spectrum_weights * area_cm2 * containment, axis=1) / np.sum(
        spectrum_weights, axis=1
    )


def _lognormal_edisp_matrix(
    table: _PerformanceTable, energy_true_tev: np.ndarray, energy_edges_tev: np.ndarray
) -> np.ndarray:
    """Probability of reconstruction in each bin for a log-normal migration, (n_true, n_reco).

    ln(E_reco) is normal with mean ln(E_true x median) and the tabulated width, both
    interpolated in ln E and held constant beyond the ends of the table.
    """
    log_energy = np.log(energy_true_tev)
    log_table_energy = np.log(table.energy_tev)
    median = np.interp(log_energy, log_table_energy, table.edisp_median)
    sigma = np.interp(log_energy, log_table_energy, table.edisp_sigma_ln)

    z = (np.log(energy_edges_tev)[np.newaxis, :] - np.log(energy_true_tev * median)[:, None]) / (
        sigma[:, np.newaxis]
    )
    return _cap_row_sums(np.diff(ndtr(z), axis=1))


def _builtin_background_rate(table: _PerformanceTable, energy_edges_tev: np.ndarray) -> np.ndarray:
    """Tabulated background rate integrated over each reconstructed bin, s^-1 sr^-1."""
    energy, weights = _log_gauss_legendre_nodes(energy_edges_tev)
    rate = _interp_log_log(energy, table.energy_tev, table.background_rate)
    return np.sum(weights * rate, axis=1)


# --- Numerical helpers -----------------------------------------------------------------


def _log_gauss_legendre_nodes(edges_tev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights for integrals over energy bins, Gauss-Legendre in ln E.

    Returns energies (TeV) and weights (TeV) of shape (n_bins, _NODES_PER_BIN) such
    that ``sum(weights * f(energies), axis=1)`` approximates the integral of f(E) dE
    over each bin.
    """
    nodes, node_weights = np.polynomial.legendre.leggauss(_NODES_PER_BIN)
    log_low = np.log(edges_tev[:-1])[:, np.newaxis]
    log_width = np.diff(np.log(edges_tev))[:, np.newaxis]
    energy = np.exp(log_low + 0.5 * (nodes + 1.0) * log_width)
    # dE = E d(ln E), and the Legendre weights are for an interval of length 2.
    weights = 0.5 * node_weights * log_width * energy
    return energy, weights


def _cap_row_sums(matrix: np.ndarray) -> np.ndarray:
    """Scale rows that sum to more than 1 - 1e-14 to a sum of 1 - 1e-14.

    Normalised migration densities sum to 1 + a few 1e-16 by rounding. The margin
    keeps the sums at or below 1 after the division, which also rounds.
    """
    row_sums = matrix.sum(axis=1, keepdims=True)
    return matrix / np.maximum(row_sums * (1.0 + 1e-14), 1.0)


def _interp_log_log(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Interpolate linearly in log x and log f, returning 0 outside [xp[0], xp[-1]]."""
    log_x = np.log(x)
    values = np.exp(np.interp(log_x, np.log(xp), np.log(fp)))
    inside = (x >= xp[0]) & (x <= xp[-1])
    return np.where(inside, values, 0.0)


def _solid_angle_sr(radius_deg: float) -> float:
    """Solid angle of a cone of half-opening angle ``radius_deg``, in sr."""
    return float(2.0 * np.pi * (1.0 - np.cos(np.radians(radius_deg))))
