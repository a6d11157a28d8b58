"""Posterior queries: input checks, grids, HPD regions, JSON and figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from alpnre.config import parse_config
from alpnre.nre import TrainingConfig
from alpnre.posterior import check_observation, compute_posterior, plot_posterior
from alpnre.registry import load_estimator, save_estimator
from alpnre.streaming import read_spectra
from alpnre.training import load_training_data, train_estimator
from conftest import small_config_dict


@pytest.fixture(scope="module")
def quick_estimator(small_run, tmp_path_factory):
    data = load_training_data([small_run])
    training = TrainingConfig(
        max_epochs=2,
        batch_size=64,
        shuffle_buffer=256,
        embedding_width=32,
        n_features=8,
        head_width=16,
        seed=1,
    )
    folder = tmp_path_factory.mktemp("estimator")
    result = train_estimator(data, training, folder / "work", progress=False)
    save_estimator(folder / "estimator", result.model, result.config, metrics=result.metrics)
    return load_estimator(folder / "estimator"), data


@pytest.mark.parametrize(
    ("counts", "match"),
    [
        ([1, 2, 3], "has 3 energy bins, the estimator expects 40"),
        ([-1] + [0] * 39, "negative counts in bins \\[0\\]"),
        ([0.5] + [0] * 39, "non-integer counts in bins \\[0\\]"),
        ([float("nan")] + [0] * 39, "NaN or infinite counts in bins \\[0\\]"),
        ([float("inf")] + [0] * 39, "NaN or infinite"),
        ([[1, 2]], "1-dim list"),
        (["a"] * 40, "list of numbers"),
        (["1"] * 40, "strings, null and booleans are not accepted"),
        ([None] * 40, "strings, null and booleans are not accepted"),
    ],
)
def test_bad_observation_rejected(counts, match):
    with pytest.raises(ValueError, match=match):
        check_observation(counts, 40)


def test_posterior_normalised_on_grids(quick_estimator):
    estimator, data = quick_estimator
    x, _ = read_spectra(data.files[:1], ["m_neV"])
    posterior = compute_posterior(estimator, x[0], grid_size=50)
    for marginal in posterior.one_dim.values():
        step = marginal.grid[1] - marginal.grid[0]
        assert marginal.density.sum() * step == pytest.approx(1.0)
    joint = posterior.two_dim["m_neV__g_per_gev"]
    cell = (joint.grid_x[1] - joint.grid_x[0]) * (joint.grid_y[1] - joint.grid_y[0])
    assert joint.density.sum() * cell == pytest.approx(1.0)
    assert joint.density.shape == (50, 50)
    assert posterior.one_dim["m_neV"].grid[0] == pytest.approx(-1.0)
    assert posterior.one_dim["g_per_gev"].grid[-1] == pytest.approx(-10.0)


def test_posterior_json_round_trip(quick_estimator, tmp_path):
    estimator, data = quick_estimator
    x, _ = read_spectra(data.files[:1], ["m_neV"])
    payload = compute_posterior(estimator, x[1], grid_size=30).to_dict()
    text = json.dumps(payload, allow_nan=False)
    again = json.loads(text)
    assert again["estimator_checksum"] == estimator.checksum
    assert len(again["marginals_2d"]["m_neV__g_per_gev"]["upper_limit_95"]["limit"]) == 30
    masks = again["marginals_2d"]["m_neV__g_per_gev"]["hpd_masks"]
    assert np.sum(masks["0.95"]) >= np.sum(masks["0.68"])


def test_upper_limit_inside_grid(quick_estimator):
    estimator, data = quick_estimator
    x, _ = read_spectra(data.files[:1], ["m_neV"])
    joint = compute_posterior(estimator, x[2], grid_size=40).two_dim["m_neV__g_per_gev"]
    limits = joint.upper_limit_curve(0.95)
    assert np.all(limits >= joint.grid_y[0])
    assert np.all(limits <= joint.grid_y[-1])


def test_upper_limit_curve_matches_row_by_row_interpolation():
    """The vectorised limit equals np.interp of each row's conditional CDF."""
    from alpnre.posterior import Marginal2D

    rng = np.random.default_rng(11)
    grid_x, grid_y = np.linspace(-1, 2, 30), np.linspace(-13, -10, 50)
    density = rng.gamma(0.5, size=(30, 50))
    density[3] = 0.0  # a mass without posterior mass gives NaN
    density[4, 0] = 1e3  # the level is reached in the first cell
    joint = Marginal2D(("m", "g"), ("m", "g"), grid_x, grid_y, density, (0.95,))

    limits = joint.upper_limit_curve(0.95)

    assert np.isnan(limits[3])
    assert limits[4] == grid_y[0]
    for row in np.flatnonzero(np.arange(30) != 3):
        cdf = np.cumsum(density[row]) / density[row].sum()
        assert limits[row] == pytest.approx(np.interp(0.95, cdf, grid_y), abs=1e-12)


def test_compact_dict_has_the_plain_values(quick_estimator):
    estimator, data = quick_estimator
    x, _ = read_spectra(data.files[:1], ["m_neV"])
    joint = compute_posterior(estimator, x[1], grid_size=30).two_dim["m_neV__g_per_gev"]
    plain, compact = joint.to_dict(), joint.to_dict(compact=True)
    np.testing.assert_allclose(compact["density"], plain["density"], rtol=1e-7)
    for level, mask in plain["hpd_masks"].items():
        np.testing.assert_array_equal(compact["hpd_masks"][level], mask)
        assert set(np.unique(mask)) <= {0, 1}


def test_posterior_figure_written(quick_estimator, tmp_path):
    estimator, data = quick_estimator
    x, theta = read_spectra(data.files[:1], ["m_neV", "g_per_gev"])
    truth = {"m_neV": float(theta[0, 0]), "g_per_gev": float(theta[0, 1])}
    posterior = compute_posterior(estimator, x[0], grid_size=30, truth=truth)
    path = tmp_path / "posterior.png"
    plot_posterior(posterior, str(path))
    assert path.stat().st_size > 10_000


def test_grid_size_limits(quick_estimator):
    estimator, data = quick_estimator
    x, _ = read_spectra(data.files[:1], ["m_neV"])
    with pytest.raises(ValueError, match="grid_size must lie in"):
        compute_posterior(estimator, x[0], grid_size=2)


def test_unknown_marginal_rejected(quick_estimator):
    estimator, data = quick_estimator
    x, _ = read_spectra(data.files[:1], ["m_neV"])
    with pytest.raises(ValueError, match="no 1-dim estimator for \\['b0_microgauss'\\]"):
        compute_posterior(estimator, x[0], marginals=["b0_microgauss"])


def test_small_config_parses():
    assert parse_config(small_config_dict()).observation.n_energy_bins == 40
