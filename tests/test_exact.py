"""The exact-likelihood reference: forward model, nuisance integral and posteriors.

All configs here are the small test config (40 reconstructed energy bins) with one
fixed B-field realisation, which the preset 'confident' of the shipped config turns
into an explicit Poisson likelihood.
"""

from __future__ import annotations

import numpy as np
import pytest
from alpnre.config import parse_config
from alpnre.exact import (
    ExactLikelihood,
    ExactPosterior,
    check_exact_config,
    compare_with_exact,
    exact_posterior,
    refine_exact_posterior,
)
from alpnre.physics.irf import load_instrument_response
from alpnre.simulate import expected_counts
from alpnre.validation import hpd_mask
from conftest import small_config_dict
from scipy import special

BFIELD_SEED = 7


def fixed_field_config(**observation: float):
    data = small_config_dict()
    data["propagation"] = {"fixed_bfield_seed": BFIELD_SEED}
    data["observation"].update(observation)
    return parse_config(data)


def draw_parameters(config, rng, n, **fixed):
    params = {name: config.prior(name).sample(rng, n) for name in config.parameter_names}
    for name, value in fixed.items():
        params[name][:] = value
    return params


@pytest.fixture(scope="module")
def likelihood():
    return ExactLikelihood(fixed_field_config())


def test_npred_matches_simulator(likelihood):
    config = likelihood.config
    rng = np.random.default_rng(3)
    params = draw_parameters(config, rng, 6)
    params["m_neV"][:2] = [30.0, 0.5]
    params["g_per_gev"][:2] = [5e-11, 8e-11]
    seeds = np.full(6, BFIELD_SEED, dtype=np.uint64)

    reference = expected_counts(config, load_instrument_response(config), params, seeds)

    np.testing.assert_allclose(likelihood.npred(params), reference, rtol=1e-10, atol=0.0)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({}, "propagation.fixed_bfield_seed is not set"),
        ({"preset": "informed"}, "cluster parameters \\['b0_microgauss'"),
        (
            {"propagation": {"fixed_bfield_seed": 1, "backend": "gammaalps"}},
            "propagation.backend is 'gammaalps'",
        ),
    ],
)
def test_config_without_exact_likelihood_rejected(overrides, match):
    config = parse_config(small_config_dict(**overrides))
    with pytest.raises(ValueError, match=match):
        check_exact_config(config)
    with pytest.raises(ValueError, match="preset 'confident'"):
        check_exact_config(config)


def test_marginal_likelihood_matches_brute_force():
    """Adaptive quadrature against a dense midpoint rule over the whole prior box.

    Three minutes of livetime give ~180 counts, a posterior of the intrinsic
    spectrum broad enough for an 80^3 grid to resolve it.
    """
    likelihood = ExactLikelihood(fixed_field_config(livetime_h=0.05))
    config = likelihood.config
    rng = np.random.default_rng(1)
    truth = draw_parameters(config, rng, 1, m_neV=30.0, g_per_gev=5e-11)
    counts = rng.poisson(likelihood.npred(truth)[0]).astype(float)
    p_gamma_gamma = likelihood.survival_probabilities(
        np.array([30.0, 1.0]), np.array([5e-11, 3e-12])
    )

    brute = []
    edges = {
        name: np.linspace(*config.prior(name).support(), 81)
        for name in ("gamma", "ecut_tev", "phi0_per_cm2_s_tev")
    }
    centres = {name: 0.5 * (e[1:] + e[:-1]) for name, e in edges.items()}
    gamma, ecut = np.meshgrid(centres["gamma"], centres["ecut_tev"], indexing="ij")
    # Each cell's prior mass is 1 / 80^3 for the uniform priors of the config.
    log_cell_mass = -3 * np.log(80)
    for node in range(2):
        rows = np.repeat(p_gamma_gamma[node : node + 1], gamma.size, axis=0)
        signal = likelihood.signal_counts(rows, gamma.ravel(), ecut.ravel())
        values = []
        for phi0 in centres["phi0_per_cm2_s_tev"]:
            npred = phi0 * signal + likelihood.background
            values.append(special.xlogy(counts, npred).sum(axis=1) - npred.sum(axis=1))
        brute.append(special.logsumexp(np.array(values)) + log_cell_mass)

    adaptive = likelihood.log_marginal_likelihood(counts, p_gamma_gamma, quadrature_order=8)

    # The 80^3 midpoint reference is itself only good to a few 0.01 nats. With the
    # built-in approximate IRF the two differ by 0.023 in absolute log Z. The difference
    # between the nodes, which is what posteriors use, agrees to 0.005.
    np.testing.assert_allclose(adaptive, brute, atol=0.03)
    assert adaptive[1] - adaptive[0] == pytest.approx(brute[1] - brute[0], abs=0.005)


def test_quadrature_order_converges(likelihood):
    """Node-to-node differences of log Z settle to 0.02 nats for 50 h of data (~2.5e5 counts)."""
    config = likelihood.config
    rng = np.random.default_rng(2)
    truth = draw_parameters(config, rng, 1, m_neV=3.0, g_per_gev=2e-12)
    counts = rng.poisson(likelihood.npred(truth)[0]).astype(float)
    p_gamma_gamma = likelihood.survival_probabilities(
        np.array([3.0, 30.0, 0.3]), np.array([2e-12, 5e-11, 1e-13])
    )

    results = [
        likelihood.log_marginal_likelihood(counts, p_gamma_gamma, quadrature_order=order)
        for order in (6, 10)
    ]

    differences = [values - values[0] for values in results]
    np.testing.assert_allclose(differences[0], differences[1], atol=0.02)


def test_exact_posterior_concentrates_on_truth(likelihood):
    """A strong signal simulated at a grid node puts the exact posterior on that node.

    The node must be a grid node: the likelihood of a strong signal changes by hundreds
    of nats between neighbouring nodes, so only the node itself fits.
    """
    config = likelihood.config
    grid_size = 8
    log10_m = np.linspace(-1.0, 2.0, grid_size)
    log10_g = np.linspace(-13.0, -10.0, grid_size)
    i, j = 5, 6
    rng = np.random.default_rng(4)
    truth = draw_parameters(config, rng, 1, m_neV=10 ** log10_m[i], g_per_gev=10 ** log10_g[j])
    counts = rng.poisson(likelihood.npred(truth)[0])

    posterior = exact_posterior(config, counts, grid_size=grid_size, quadrature_order=4)

    probabilities = posterior.probabilities()[0]
    np.testing.assert_allclose(posterior.grid_x, log10_m)
    np.testing.assert_allclose(posterior.grid_y, log10_g)
    assert np.unravel_index(np.argmax(probabilities), probabilities.shape) == (i, j)
    assert hpd_mask(probabilities, 0.68)[i, j]
    assert probabilities[i, j] > 0.5


def test_exact_posterior_on_given_grids(likelihood):
    """Given nodes reproduce the node grid's values; nodes outside the prior are rejected."""
    config = likelihood.config
    rng = np.random.default_rng(5)
    truth = draw_parameters(config, rng, 1, m_neV=3.0, g_per_gev=3e-11)
    counts = rng.poisson(likelihood.npred(truth)[0])
    log10_m, log10_g = np.linspace(-1.0, 2.0, 5), np.linspace(-13.0, -10.0, 6)

    on_nodes = exact_posterior(config, counts, grid_size=5, quadrature_order=4)
    on_given_nodes = exact_posterior(config, counts, grids=(log10_m, log10_g), quadrature_order=4)

    assert on_given_nodes.log_density.shape == (1, 5, 6)
    np.testing.assert_allclose(on_given_nodes.log_density[0, :, 0], on_nodes.log_density[0, :, 0])
    np.testing.assert_allclose(on_given_nodes.log_density[0, :, -1], on_nodes.log_density[0, :, -1])
    with pytest.raises(ValueError, match=r"log10 g grid \[-14, -10\] leaves the prior range"):
        exact_posterior(config, counts, grids=(log10_m, np.linspace(-14.0, -10.0, 6)))


def test_comparison_on_the_exact_nodes_skips_interpolation():
    grid_x = -1.0 + (np.arange(16) + 0.5) * 3.0 / 16
    grid_y = -13.0 + (np.arange(16) + 0.5) * 3.0 / 16
    log_density = gaussian_log_density(grid_x, grid_y, (0.5, -11.5), width=0.05)
    exact = ExactPosterior(grid_x, grid_y, log_density[None], 6)

    comparison = compare_with_exact(cell_probabilities(log_density)[None], grid_x, grid_y, exact)

    assert comparison.on_nre_grid
    assert comparison.to_dict()["exact_on_nre_grid"] is True
    assert comparison.jsd[0] < 1e-12


def test_exact_posterior_is_prior_without_information():
    """With 3.6 µs of livetime (~5e-6 expected counts) the posterior is the prior.

    Both priors are log-uniform, so the prior is flat on the (log10 m, log10 g) grid.
    """
    config = fixed_field_config(livetime_h=1e-9)
    counts = np.zeros(config.observation.n_energy_bins)

    posterior = exact_posterior(config, counts, grid_size=6, quadrature_order=4)

    probabilities = posterior.probabilities()[0]
    np.testing.assert_allclose(probabilities, 1.0 / probabilities.size, rtol=1e-5)
    assert posterior.effective_cells()[0] == pytest.approx(36.0, rel=1e-6)


def gaussian_log_density(grid_x, grid_y, centre, width=0.3):
    mesh_x, mesh_y = np.meshgrid(grid_x, grid_y, indexing="ij")
    return -((mesh_x - centre[0]) ** 2 + (mesh_y - centre[1]) ** 2) / (2 * width**2)


def cell_probabilities(log_density):
    weights = np.exp(log_density - log_density.max())
    return weights / weights.sum()


def test_comparison_of_identical_posteriors():
    exact_x, exact_y = np.linspace(-1.0, 2.0, 61), np.linspace(-13.0, -10.0, 61)
    grid_x = -1.0 + (np.arange(32) + 0.5) * 3.0 / 32
    grid_y = -13.0 + (np.arange(32) + 0.5) * 3.0 / 32
    centre = (0.5, -11.5)
    exact = ExactPosterior(
        exact_x, exact_y, gaussian_log_density(exact_x, exact_y, centre)[None], 6
    )
    same = cell_probabilities(gaussian_log_density(grid_x, grid_y, centre))[None]
    higher = cell_probabilities(gaussian_log_density(grid_x, grid_y, (0.5, -11.2)))[None]

    identical = compare_with_exact(same, grid_x, grid_y, exact)
    shifted = compare_with_exact(higher, grid_x, grid_y, exact)

    assert identical.jsd[0] < 1e-3
    assert np.abs(identical.upper_limit_shift).max() < 0.01
    assert shifted.jsd[0] > 0.05
    assert shifted.upper_limit_shift.mean() == pytest.approx(0.3, abs=0.02)
    assert identical.resolved[0]
    summary = identical.to_dict()
    assert summary["n_observations"] == 1
    assert summary["n_resolved"] == 1
    assert len(summary["upper_limit_95_shift_dex"]["mean_per_mass"]) == 32


def test_comparison_needs_same_observations():
    grid = np.linspace(0.0, 1.0, 5)
    exact = ExactPosterior(grid, grid, np.zeros((2, 5, 5)), 6)
    with pytest.raises(ValueError, match="3 NRE posteriors but 2 exact ones"):
        compare_with_exact(np.full((3, 4, 4), 1 / 16), grid[:4], grid[:4], exact)


def test_upper_limit_undefined_for_empty_row():
    """A mass row without posterior mass gets a NaN limit, and the summary stays JSON-safe."""
    from alpnre.exact import _mean_or_none, _upper_limits

    probabilities = np.zeros((1, 2, 4))
    probabilities[0, 0] = [0.1, 0.2, 0.3, 0.4]
    limits = _upper_limits(probabilities, np.linspace(-13.0, -10.0, 4), 0.95)
    assert np.isfinite(limits[0, 0])
    assert np.isnan(limits[0, 1])
    assert _mean_or_none(limits) == pytest.approx(limits[0, 0])
    assert _mean_or_none(np.full(3, np.nan)) is None


# --- cell averages where the posterior is narrower than a cell --------------------------


def _cell_centres(low, width, n):
    return low + (np.arange(n) + 0.5) * width


def test_refined_cells_are_means_over_their_sub_nodes(likelihood):
    """Refined cells equal the mean density of sub-nodes computed directly on a fine grid.

    The fine grid's nodes are the sub-node positions that a 3 x 3 refinement of 0.06-dex
    cells must use, so a misplaced sub-node or a wrong cell index shows up as a mismatch.
    """
    config = likelihood.config
    rng = np.random.default_rng(11)
    truth = draw_parameters(config, rng, 1, m_neV=30.0, g_per_gev=6e-11)
    counts = rng.poisson(likelihood.npred(truth)[0])
    width, n_cells, subcells = 0.06, 5, 3
    grid_x = _cell_centres(np.log10(30.0) - 2.5 * width, width, n_cells)
    grid_y = _cell_centres(np.log10(6e-11) - 2.5 * width, width, n_cells)
    fine_x = _cell_centres(grid_x[0] - width / 2, width / subcells, n_cells * subcells)
    fine_y = _cell_centres(grid_y[0] - width / 2, width / subcells, n_cells * subcells)

    nodes = exact_posterior(config, counts, grids=(grid_x, grid_y), quadrature_order=4)
    refined = refine_exact_posterior(
        nodes, config, counts, subcells=subcells, mass=0.5, max_cells=n_cells**2
    )
    fine = exact_posterior(config, counts, grids=(fine_x, fine_y), quadrature_order=4)

    blocks = fine.log_density[0].reshape(n_cells, subcells, n_cells, subcells)
    expected = special.logsumexp(blocks, axis=(1, 3)) - np.log(subcells**2)
    mask = refined.refined[0]
    assert mask.sum() >= 9, "the cells of half the mass and their neighbours are refined"
    np.testing.assert_allclose(refined.log_density[0][mask], expected[mask], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(refined.log_density[0][~mask], nodes.log_density[0][~mask])
    assert refined.subcells == subcells


def test_truth_cell_refined_and_broad_posteriors_left_alone():
    config = fixed_field_config(livetime_h=1e-9)
    counts = np.zeros((1, config.observation.n_energy_bins))
    width = 3.0 / 8
    grid_x, grid_y = _cell_centres(-1.0, width, 8), _cell_centres(-13.0, width, 8)
    flat = exact_posterior(config, counts, grids=(grid_x, grid_y), quadrature_order=4)

    untouched = refine_exact_posterior(flat, config, counts, subcells=2, max_cells=25)
    assert not untouched.refined.any()
    np.testing.assert_array_equal(untouched.log_density, flat.log_density)
    # One cell raised by 1 nat contains 4 % of the mass, more than `mass`, so it alone
    # is refined. The truth's cell and the neighbours of both are refined too.
    flat.log_density[0, 0, 0] += 1.0
    with_truth = refine_exact_posterior(
        flat, config, counts, subcells=2, mass=0.01, truths=np.array([[grid_x[6], grid_y[1]]])
    )

    assert with_truth.refined[0, 6, 1]
    assert with_truth.refined[0, 7, 2]
    assert with_truth.refined[0, 0, 0]
    assert with_truth.refined[0, 1, 1]
    assert with_truth.refined[0].sum() == 4 + 9


def test_refinement_rejects_uneven_grids_and_bad_settings():
    config = fixed_field_config()
    counts = np.zeros((1, config.observation.n_energy_bins))
    grid_y = np.array([-12.0, -11.9, -11.8])
    uneven = ExactPosterior(np.array([0.0, 0.1, 0.3]), grid_y, np.zeros((1, 3, 3)), 4)
    with pytest.raises(ValueError, match="log10 m nodes must be evenly spaced"):
        refine_exact_posterior(uneven, config, counts)
    even = ExactPosterior(np.array([0.0, 0.1, 0.2]), grid_y, np.zeros((1, 3, 3)), 4)
    with pytest.raises(ValueError, match="subcells must lie in"):
        refine_exact_posterior(even, config, counts, subcells=1)
    with pytest.raises(ValueError, match="2 observations but 1 exact posteriors"):
        refine_exact_posterior(even, config, np.zeros((2, counts.shape[1])))
