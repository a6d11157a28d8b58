"""Tests of alpnre.physics.irf: IRF lookup, the built-in approximation and npred.

Tests marked ``requires_data`` read the CTA IRF files under ``$GAMMAPY_DATA`` and skip
when it is unset or a file is missing, e.g.
``GAMMAPY_DATA=/path/to/gammapy-data pytest tests/test_irf.py``.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import warnings
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from alpnre.config import (
    IRF_1DC_SOUTH,
    IRF_NORTH,
    IRF_SOUTH,
    AnalysisConfig,
    load_config,
    parse_config,
)
from alpnre.physics.irf import (
    InstrumentResponse,
    IRFNotFoundError,
    clear_cache,
    load_instrument_response,
    resolve_irf_path,
)

IRF_FILES = {"north": IRF_NORTH, "south": IRF_SOUTH, "1dc-south": IRF_1DC_SOUTH}

# NGC 1275-like intrinsic spectrum: dN/dE = PHI0 (E / E0)^-INDEX exp(-E / ECUT).
PHI0_PER_CM2_S_TEV = 1.54e-9
E0_TEV = 0.3
INDEX = 2.11
ECUT_TEV = 0.54

# Per-bin tolerance of npred against gammapy. Measured: at most 2.2e-4, where gammapy
# integrates the cut-off power law with a log-log trapezoidal rule and this test
# integrates it exactly, and where the effective area is averaged over a bin instead
# of taken at its centre.
NPRED_RTOL = 1e-3

# Tolerance on total counts when the reconstructed axis is split into 100, 200 or 400
# bins. Measured: at most 4e-4 (background of the 1DC file with 400 bins), from the
# log-log trapezoidal rule applied between bin edges.
BINNING_RTOL = 1e-3


def _data_file(name: str) -> Path | None:
    gammapy_data = os.environ.get("GAMMAPY_DATA")
    if not gammapy_data:
        return None
    path = Path(gammapy_data) / name
    return path if path.is_file() else None


def _requires(name: str) -> list[pytest.MarkDecorator]:
    return [
        pytest.mark.requires_data,
        pytest.mark.skipif(_data_file(name) is None, reason=f"needs $GAMMAPY_DATA/{name}"),
    ]


REAL_IRFS = [pytest.param(key, marks=_requires(name), id=key) for key, name in IRF_FILES.items()]
PROD5_SITES = [
    pytest.param("north", marks=_requires(IRF_NORTH), id="north"),
    pytest.param("south", marks=_requires(IRF_SOUTH), id="south"),
]

_BASE_CONFIG = load_config("ngc1275_cta_north_50h").model_dump(mode="json")


def make_config(irf: dict, **observation: object) -> AnalysisConfig:
    """The shipped North config with the given ``irf`` section and observation fields."""
    data = copy.deepcopy(_BASE_CONFIG)
    data["irf"] = irf
    data["observation"].update(observation)
    return parse_config(data)


def real_irf_config(key: str, **observation: object) -> AnalysisConfig:
    return make_config({"path": str(_data_file(IRF_FILES[key]))}, **observation)


def builtin_config(site: str, **observation: object) -> AnalysisConfig:
    return make_config(
        {"path": None, "gammapy_data_file": None, "builtin_site": site}, **observation
    )


@functools.cache
def real_response(key: str) -> InstrumentResponse:
    return load_instrument_response(real_irf_config(key))


@functools.cache
def builtin_response(site: str) -> InstrumentResponse:
    return load_instrument_response(builtin_config(site))


def integrated_flux(edges_tev: np.ndarray, index: float = INDEX, ecut_tev: float = ECUT_TEV):
    """Exact photon flux of the test spectrum in each bin, cm^-2 s^-1, shape (n_bins,).

    Uses 8-point Gauss-Legendre quadrature in ln E, exact to about 1e-12 for bins of
    0.01 decade.
    """
    nodes, weights = np.polynomial.legendre.leggauss(8)
    log_low = np.log(edges_tev[:-1])[:, None]
    log_width = np.diff(np.log(edges_tev))[:, None]
    energy = np.exp(log_low + 0.5 * (nodes + 1.0) * log_width)
    dnde = PHI0_PER_CM2_S_TEV * (energy / E0_TEV) ** -index * np.exp(-energy / ecut_tev)
    return np.sum(0.5 * weights * log_width * energy * dnde, axis=1)


def gammapy_dataset(key: str):
    """SpectrumDataset made by gammapy from the same IRF file and observation."""
    from astropy.coordinates import SkyCoord
    from gammapy.data import FixedPointingInfo, Observation
    from gammapy.datasets import SpectrumDataset
    from gammapy.irf import load_irf_dict_from_file
    from gammapy.makers import SpectrumDatasetMaker
    from gammapy.maps import MapAxis, RegionGeom
    from regions import CircleSkyRegion

    observation = real_irf_config(key).observation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", u.UnitsWarning)
        irfs = load_irf_dict_from_file(_data_file(IRF_FILES[key]))

    # The source sits at (0, 0) and the pointing straight south of it, where astropy
    # returns the offset exactly. At other positions it is off by about 1e-15 deg, and
    # gammapy's energy dispersion jumps across its offset nodes (0.5 deg is one) for
    # true energies that the table at the node leaves empty (Prod5 South, < 26 GeV).
    source = SkyCoord(0.0, 0.0, unit="deg", frame="icrs")
    pointing = SkyCoord(0.0, -observation.offset_deg, unit="deg", frame="icrs")
    gammapy_observation = Observation.create(
        pointing=FixedPointingInfo(fixed_icrs=pointing),
        livetime=observation.livetime_h * u.h,
        irfs=irfs,
    )

    energy_axis = MapAxis.from_energy_edges(observation.energy_edges_tev() * u.TeV)
    energy_axis_true = MapAxis.from_energy_edges(
        observation.energy_true_edges_tev() * u.TeV, name="energy_true"
    )
    region = CircleSkyRegion(source, observation.on_region_radius_deg * u.deg)
    geom = RegionGeom.create(region, axes=[energy_axis])
    empty = SpectrumDataset.create(geom=geom, energy_axis_true=energy_axis_true)
    maker = SpectrumDatasetMaker(
        selection=["exposure", "edisp", "background"], containment_correction=True
    )
    return maker.run(empty, gammapy_observation), source


def gammapy_npred(dataset, source, spectral_model) -> np.ndarray:
    """npred of a fresh point-source SkyModel, because gammapy caches npred per model."""
    from gammapy.modeling.models import PointSpatialModel, SkyModel

    dataset.models = [
        SkyModel(
            spectral_model=spectral_model,
            spatial_model=PointSpatialModel.from_position(source),
            name="source",
        )
    ]
    return dataset.npred().data.ravel()


# --- Real IRF files ------------------------------------------------------------------


@pytest.mark.parametrize("key", REAL_IRFS)
def test_real_irf_npred_finite(key):
    response = real_response(key)
    npred = response.npred(integrated_flux(response.energy_true_edges_tev))

    assert npred.shape == (200,)
    assert np.all(np.isfinite(npred))
    assert np.all(npred >= 0)
    assert npred.sum() > response.background_counts.sum()
    assert not response.is_approximation
    assert response.irf_id.startswith(Path(IRF_FILES[key]).name + ":sha256=")


@pytest.mark.parametrize("key", REAL_IRFS)
def test_npred_matches_gammapy_cutoff_power_law(key):
    from gammapy.modeling.models import ExpCutoffPowerLawSpectralModel

    response = real_response(key)
    dataset, source = gammapy_dataset(key)
    model = ExpCutoffPowerLawSpectralModel(
        amplitude=PHI0_PER_CM2_S_TEV * u.Unit("cm-2 s-1 TeV-1"),
        reference=E0_TEV * u.TeV,
        index=INDEX,
        lambda_=1.0 / ECUT_TEV * u.Unit("TeV-1"),
    )
    expected = gammapy_npred(dataset, source, model)

    npred = response.npred(integrated_flux(response.energy_true_edges_tev))
    np.testing.assert_allclose(npred, expected, rtol=NPRED_RTOL)


@pytest.mark.parametrize("key", REAL_IRFS)
def test_npred_matches_gammapy_power_law(key):
    from gammapy.modeling.models import PowerLawSpectralModel

    response = real_response(key)
    dataset, source = gammapy_dataset(key)
    index = 2.5
    model = PowerLawSpectralModel(
        amplitude=PHI0_PER_CM2_S_TEV * u.Unit("cm-2 s-1 TeV-1"),
        reference=E0_TEV * u.TeV,
        index=index,
    )
    expected = gammapy_npred(dataset, source, model)

    flux = integrated_flux(response.energy_true_edges_tev, index=index, ecut_tev=np.inf)
    np.testing.assert_allclose(response.npred(flux), expected, rtol=NPRED_RTOL)


@pytest.mark.parametrize("key", REAL_IRFS)
def test_components_match_gammapy(key):
    response = real_response(key)
    dataset, _ = gammapy_dataset(key)

    np.testing.assert_allclose(
        response.background_counts, dataset.background.data.ravel(), rtol=1e-5
    )
    np.testing.assert_allclose(
        response.edisp_matrix, dataset.edisp.get_edisp_kernel().data, rtol=0, atol=1e-12
    )
    # gammapy takes the effective area at the bin centre. Above 25 GeV the bin average
    # differs from it by < 3e-4. Closer to threshold the area changes too fast to compare.
    gammapy_exposure = dataset.exposure.quantity.to_value("cm2 s").ravel()
    above = response.energy_true_edges_tev[:-1] > 0.025
    above &= response.energy_true_edges_tev[1:] < 190.0
    np.testing.assert_allclose(
        response.exposure_cm2_s[above], gammapy_exposure[above], rtol=NPRED_RTOL
    )


@pytest.mark.parametrize("key", REAL_IRFS)
def test_total_counts_independent_of_binning(key):
    signal_totals = []
    background_totals = []
    for n_bins in (100, 200, 400):
        response = load_instrument_response(real_irf_config(key, n_energy_bins=n_bins))
        flux = integrated_flux(response.energy_true_edges_tev)
        signal_totals.append((response.npred(flux) - response.background_counts).sum())
        background_totals.append(response.background_counts.sum())

    np.testing.assert_allclose(signal_totals, signal_totals[1], rtol=BINNING_RTOL)
    np.testing.assert_allclose(background_totals, background_totals[1], rtol=BINNING_RTOL)


@pytest.mark.parametrize("key", REAL_IRFS)
def test_real_edisp_rows_at_most_one(key):
    response = real_response(key)
    row_sums = response.edisp_matrix.sum(axis=1)

    assert np.all(response.edisp_matrix >= 0)
    assert np.all(row_sums <= 1.0)
    # Photons well inside the reconstructed axis are all reconstructed somewhere.
    inside = (response.energy_true_edges_tev[:-1] > 0.2) & (response.energy_true_edges_tev[1:] < 20)
    np.testing.assert_allclose(row_sums[inside], 1.0, atol=1e-6)


@pytest.mark.parametrize("key", REAL_IRFS)
def test_real_background_nonnegative(key):
    response = real_response(key)

    assert np.all(response.background_counts >= 0)
    assert response.background_counts.sum() > 0


@pytest.mark.requires_data
@pytest.mark.skipif(
    _data_file(IRF_1DC_SOUTH) is None or _data_file(IRF_SOUTH) is None,
    reason=f"needs $GAMMAPY_DATA/{IRF_1DC_SOUTH} and $GAMMAPY_DATA/{IRF_SOUTH}",
)
def test_1dc_background_unit_logged_once(caplog):
    clear_cache()
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = load_instrument_response(real_irf_config("1dc-south"))
        load_instrument_response(real_irf_config("1dc-south", n_energy_bins=100))

    unit_messages = [
        record
        for record in caplog.records
        if "not a valid FITS unit" in record.getMessage() or "Invalid unit" in record.getMessage()
    ]
    assert len(unit_messages) == 1
    assert unit_messages[0].name == "alpnre.physics.irf"
    assert unit_messages[0].levelno == logging.WARNING
    assert not [item for item in caught if issubclass(item.category, u.UnitsWarning)]

    # Read as s^-1 MeV^-1 sr^-1, the 1DC background between 0.1 and 10 TeV is close to
    # Prod5 South. A wrong energy unit would change it by a factor of 1e3 or more.
    south = real_response("south")
    band = (first.energy_edges_tev[:-1] >= 0.1) & (first.energy_edges_tev[1:] <= 10.0)
    ratio = first.background_counts[band].sum() / south.background_counts[band].sum()
    assert 0.5 < ratio < 2.0


# --- Built-in approximation ----------------------------------------------------------


@pytest.mark.parametrize("site", ["north", "south"])
def test_builtin_fallback_labelled(site, monkeypatch, caplog):
    monkeypatch.delenv("GAMMAPY_DATA", raising=False)
    config = make_config({"gammapy_data_file": IRF_NORTH, "builtin_site": site})
    clear_cache()
    caplog.set_level(logging.WARNING, logger="alpnre.physics.irf")

    response = load_instrument_response(config)

    assert response.is_approximation
    assert response.irf_id == f"builtin-approximation-{site}"
    warnings_logged = [record.getMessage() for record in caplog.records]
    assert any("approximate" in message for message in warnings_logged)


@pytest.mark.parametrize("site", ["north", "south"])
def test_builtin_npred_finite(site):
    response = builtin_response(site)
    npred = response.npred(integrated_flux(response.energy_true_edges_tev))

    assert np.all(np.isfinite(npred))
    assert np.all(npred >= 0)
    assert np.all(response.background_counts >= 0)
    assert np.all(response.edisp_matrix.sum(axis=1) <= 1.0)


@pytest.mark.parametrize("site", PROD5_SITES)
def test_builtin_close_to_prod5(site):
    approximation = builtin_response(site)
    real = real_response(site)
    flux = integrated_flux(real.energy_true_edges_tev)

    def totals(response: InstrumentResponse) -> tuple[float, float]:
        npred = response.npred(flux)
        return float((npred - response.background_counts).sum()), float(
            response.background_counts.sum()
        )

    signal, background = totals(approximation)
    real_signal, real_background = totals(real)
    assert signal == pytest.approx(real_signal, rel=0.1)
    assert background == pytest.approx(real_background, rel=0.2)


def test_builtin_warns_when_offset_differs(caplog):
    clear_cache()
    caplog.set_level(logging.WARNING, logger="alpnre.physics.irf")

    load_instrument_response(builtin_config("north", offset_deg=1.0))

    assert any("offset_deg=1" in record.getMessage() for record in caplog.records)


# --- IRF lookup ----------------------------------------------------------------------


def test_missing_explicit_path_raises(tmp_path):
    missing = tmp_path / "missing_irf.fits.gz"
    config = make_config({"path": str(missing), "allow_builtin_fallback": True})

    with pytest.raises(IRFNotFoundError) as error:
        load_instrument_response(config)

    assert str(missing) in str(error.value)
    assert "GAMMAPY_DATA" in str(error.value)
    assert isinstance(error.value, FileNotFoundError)


def test_missing_data_file_without_fallback_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("GAMMAPY_DATA", str(tmp_path))
    config = make_config({"gammapy_data_file": IRF_NORTH, "allow_builtin_fallback": False})

    with pytest.raises(IRFNotFoundError) as error:
        resolve_irf_path(config.irf)

    assert "GAMMAPY_DATA" in str(error.value)
    assert IRF_NORTH in str(error.value)


def test_unset_gammapy_data_without_fallback_raises(monkeypatch):
    monkeypatch.delenv("GAMMAPY_DATA", raising=False)
    config = make_config({"gammapy_data_file": IRF_NORTH, "allow_builtin_fallback": False})

    with pytest.raises(IRFNotFoundError, match="GAMMAPY_DATA is not set"):
        resolve_irf_path(config.irf)


def test_resolve_gammapy_data_file(tmp_path, monkeypatch):
    irf_file = tmp_path / "cta" / "irf.fits"
    irf_file.parent.mkdir()
    irf_file.write_bytes(b"")
    monkeypatch.setenv("GAMMAPY_DATA", str(tmp_path))
    config = make_config({"gammapy_data_file": "cta/irf.fits"})

    assert resolve_irf_path(config.irf) == irf_file


def test_resolve_explicit_path_expands_variables(tmp_path, monkeypatch):
    irf_file = tmp_path / "irf.fits"
    irf_file.write_bytes(b"")
    monkeypatch.setenv("ALPNRE_TEST_IRF_DIR", str(tmp_path))
    config = make_config({"path": "$ALPNRE_TEST_IRF_DIR/irf.fits"})

    assert resolve_irf_path(config.irf) == irf_file


def test_resolve_returns_none_for_fallback(monkeypatch):
    monkeypatch.delenv("GAMMAPY_DATA", raising=False)
    config = make_config({"gammapy_data_file": IRF_NORTH, "allow_builtin_fallback": True})

    assert resolve_irf_path(config.irf) is None


# --- InstrumentResponse --------------------------------------------------------------


def test_npred_batch_matches_single():
    response = builtin_response("north")
    flux = integrated_flux(response.energy_true_edges_tev)
    batch = np.stack([flux, 0.5 * flux, np.zeros_like(flux)])

    npred = response.npred(batch)

    assert npred.shape == (3, 200)
    np.testing.assert_allclose(npred[0], response.npred(flux), rtol=1e-12)
    np.testing.assert_allclose(npred[2], response.background_counts, rtol=1e-12)


def test_npred_rejects_wrong_shape():
    response = builtin_response("north")

    with pytest.raises(ValueError, match="expected \\(460,\\)"):
        response.npred(np.ones(459))


def test_response_arrays_read_only():
    response = builtin_response("north")

    with pytest.raises(ValueError):
        response.exposure_cm2_s[0] = 0.0
    with pytest.raises(ValueError):
        response.edisp_matrix[0, 0] = 0.0


def test_response_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="edisp_matrix"):
        InstrumentResponse(
            energy_true_edges_tev=np.geomspace(0.01, 100, 11),
            energy_edges_tev=np.geomspace(0.1, 10, 6),
            exposure_cm2_s=np.ones(10),
            edisp_matrix=np.ones((10, 4)),
            background_counts=np.zeros(5),
            irf_id="test",
            is_approximation=True,
        )


def test_cache_shared_across_priors():
    config = builtin_config("north")
    data = config.model_dump(mode="json")
    data["name"] = "other_name"
    data["parameters"]["gamma"] = {"kind": "uniform", "low": 2.0, "high": 2.2}
    other = parse_config(data)

    assert load_instrument_response(config) is load_instrument_response(other)
