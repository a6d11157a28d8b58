"""Tests of HPD coverage, TARP and the Jensen-Shannon divergence.

The calibration tests use a conjugate Gaussian model with a known exact posterior:
theta ~ N(0, 1) per dimension and x ~ N(theta, SIGMA^2), so the posterior is
N(x / (1 + SIGMA^2), SIGMA^2 / (1 + SIGMA^2)). Miscalibrated posteriors are made by
scaling the posterior width or shifting its mean.
"""

import io
import json
import math

import numpy as np
import pytest
from alpnre.validation import (
    CoverageResult,
    TarpResult,
    expected_coverage,
    hpd_credibilities,
    hpd_credibility,
    hpd_mask,
    hpd_threshold,
    jensen_shannon_divergence,
    plot_coverage,
    plot_tarp,
    tarp,
)
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from scipy import stats

SIGMA = 0.5
POSTERIOR_STD = SIGMA / math.sqrt(1.0 + SIGMA**2)

# Grids span +-6 prior standard deviations, so every truth and posterior fits inside.
GRID_1D = np.linspace(-6.0, 6.0, 481)
GRID_2D = np.linspace(-6.0, 6.0, 121)

N_SIMS_1D = 2000
N_SIMS_2D = 1000
N_SAMPLES = 200

# With these sizes and seeds 1000 to 1014, the TARP area of the exact posterior was at
# most 0.031, and that of each miscalibrated case below at least 0.054.
TARP_AREA_THRESHOLD = 0.04

# (width factor, mean shift in posterior standard deviations)
EXACT = (1.0, 0.0)
OVERCONFIDENT = (0.5, 0.0)
BIASED = (1.0, 1.0)
CONSERVATIVE = (2.0, 0.0)


def simulate_gaussian(
    rng: np.random.Generator, n_sims: int, dim: int, width: float, shift: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Draw truths and return them with the estimated posterior means and common std.

    Returns theta_true (n_sims, dim), posterior_mean (n_sims, dim) and posterior_std.
    """
    theta_true = rng.standard_normal((n_sims, dim))
    x = theta_true + SIGMA * rng.standard_normal((n_sims, dim))
    posterior_mean = x / (1.0 + SIGMA**2) + shift * POSTERIOR_STD
    return theta_true, posterior_mean, width * POSTERIOR_STD


def gaussian_log_densities(mean: np.ndarray, std: float) -> tuple[np.ndarray, list]:
    """Evaluate one Gaussian log density per simulation on the 1-dim or 2-dim test grid.

    Returns log densities of shape (n_sims, *grid) and the grid axes.
    """
    if mean.shape[1] == 1:
        log_density = stats.norm.logpdf(GRID_1D[None, :], mean[:, 0, None], std)
        return log_density, [GRID_1D]
    first = stats.norm.logpdf(GRID_2D[None, :, None], mean[:, 0, None, None], std)
    second = stats.norm.logpdf(GRID_2D[None, None, :], mean[:, 1, None, None], std)
    return first + second, [GRID_2D, GRID_2D]


def gaussian_coverage(dim: int, case: tuple[float, float], seed: int) -> CoverageResult:
    rng = np.random.default_rng(seed)
    n_sims = N_SIMS_1D if dim == 1 else N_SIMS_2D
    theta_true, mean, std = simulate_gaussian(rng, n_sims, dim, *case)
    log_density, axes = gaussian_log_densities(mean, std)
    credibilities = hpd_credibilities(log_density, axes, theta_true, is_log=True)
    return expected_coverage(credibilities)


def gaussian_samples(
    dim: int, case: tuple[float, float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    """Return exact-model posterior samples (n_sims, N_SAMPLES, dim), truths and the rng."""
    rng = np.random.default_rng(seed)
    n_sims = N_SIMS_1D if dim == 1 else N_SIMS_2D
    theta_true, mean, std = simulate_gaussian(rng, n_sims, dim, *case)
    samples = mean[:, None, :] + std * rng.standard_normal((n_sims, N_SAMPLES, dim))
    return samples, theta_true, rng


def gaussian_tarp(dim: int, case: tuple[float, float], seed: int) -> TarpResult:
    samples, theta_true, rng = gaussian_samples(dim, case, seed)
    return tarp(samples, theta_true, rng=rng)


# ---------------------------------------------------------------------------------------
# HPD thresholds and masks
# ---------------------------------------------------------------------------------------


def test_hpd_mask_gaussian_one_sigma_interval():
    density = stats.norm.pdf(GRID_1D)
    mask = hpd_mask(density, stats.chi2.cdf(1.0, 1))
    spacing = GRID_1D[1] - GRID_1D[0]

    assert GRID_1D[mask].min() == pytest.approx(-1.0, abs=spacing)
    assert GRID_1D[mask].max() == pytest.approx(1.0, abs=spacing)


def test_hpd_mask_smallest_region():
    x, y = np.meshgrid(GRID_2D, GRID_2D, indexing="ij")
    density = stats.multivariate_normal.pdf(np.stack([x, y], -1), [0.3, -0.2], [[1, 0.5], [0.5, 2]])
    probabilities = density / density.sum()
    mask = hpd_mask(density, 0.9)
    weakest_inside = probabilities[mask].min()

    assert probabilities[mask].sum() >= 0.9
    assert probabilities[mask].sum() - weakest_inside < 0.9
    assert probabilities[~mask].max() <= weakest_inside


def test_hpd_mask_log_matches_linear():
    density = stats.norm.pdf(GRID_1D, 0.5, 0.7) + 0.5 * stats.norm.pdf(GRID_1D, -2.0, 0.3)
    for level in (0.1, 0.5, 0.95):
        linear = hpd_mask(density, level)
        logarithmic = hpd_mask(np.log(density) + 17.0, level, is_log=True)
        assert np.array_equal(linear, logarithmic)


def test_hpd_threshold_returns_input_scale():
    log_density = stats.norm.logpdf(GRID_1D) + 100.0
    threshold = hpd_threshold(log_density, 0.5, is_log=True)

    # The central 50% interval of N(0, 1) ends at the 75% quantile.
    expected = stats.norm.logpdf(stats.norm.ppf(0.75)) + 100.0

    assert threshold in log_density
    assert threshold == pytest.approx(expected, abs=0.02)


def test_hpd_mask_level_one_excludes_zero_cells():
    log_density = stats.norm.logpdf(GRID_1D)
    log_density[GRID_1D < 0] = -np.inf
    mask = hpd_mask(log_density, 1.0, is_log=True)

    assert mask.sum() == (GRID_1D >= 0).sum()
    assert not mask[GRID_1D < 0].any()


def test_hpd_mask_level_zero_is_empty():
    assert not hpd_mask(stats.norm.pdf(GRID_1D), 0.0).any()


def test_hpd_mask_ties_included_together():
    density = np.array([1.0, 2.0, 2.0, 1.0])

    assert hpd_mask(density, 0.4).tolist() == [False, True, True, False]


@pytest.mark.parametrize(
    ("density", "level", "is_log", "message"),
    [
        (np.array([0.2, -0.1, 0.5]), 0.5, False, "is_log=True"),
        (np.array([0.2, np.nan, 0.5]), 0.5, False, "NaN"),
        (np.array([0.0, 0.0]), 0.5, False, "no mass"),
        (np.array([-np.inf, -np.inf]), 0.5, True, "no mass"),
        (np.array([0.0, np.inf]), 0.5, True, r"\+inf"),
        (np.array([0.2, 0.5]), 1.5, False, "in \\[0, 1\\]"),
    ],
)
def test_hpd_threshold_rejects_invalid_input(density, level, is_log, message):
    with pytest.raises(ValueError, match=message):
        hpd_threshold(density, level, is_log=is_log)


# ---------------------------------------------------------------------------------------
# HPD credibility of the truth
# ---------------------------------------------------------------------------------------


def test_hpd_credibility_truth_at_mode():
    density = stats.norm.pdf(GRID_1D, 0.0, 0.5)

    assert hpd_credibility(density, GRID_1D, 0.0) < 0.01


def test_hpd_credibility_truth_in_far_tail():
    density = stats.norm.pdf(GRID_1D, 0.0, 0.5)

    assert hpd_credibility(density, GRID_1D, 2.5) > 0.999


def test_hpd_credibility_matches_gaussian_2d():
    x, y = np.meshgrid(GRID_2D, GRID_2D, indexing="ij")
    log_density = -0.5 * (x**2 + y**2)
    truth = np.array([1.0, -0.5])
    exact = stats.chi2.cdf(1.25, 2)

    assert hpd_credibility(log_density, [GRID_2D, GRID_2D], truth, is_log=True) == pytest.approx(
        exact, abs=0.01
    )
    assert hpd_credibility(log_density, [GRID_2D, GRID_2D], [0.0, 0.0], is_log=True) < 0.01
    assert hpd_credibility(log_density, [GRID_2D, GRID_2D], [4.0, 4.0], is_log=True) > 0.999


def test_hpd_credibility_interpolates_between_nodes():
    # A linear ramp p_i = i + 1 gives density 3.5 at coordinate 2.5, so exactly the
    # cells with p >= 4 lie above the truth and none are tied.
    density = np.arange(1.0, 11.0)
    axis = np.arange(10.0)
    expected = density[density >= 4].sum() / density.sum()

    assert hpd_credibility(density, axis, 2.5) == pytest.approx(expected)


def test_hpd_credibility_uses_density_at_truth():
    # A peak 0.2 cells wide, centred between nodes 9 and 10: interpolation gives the
    # nodes' own density at the peak, so both central cells tie with the truth.
    axis = np.arange(20.0)
    log_density = stats.norm.logpdf(axis, 9.5, 0.2)
    log_peak = float(stats.norm.logpdf(9.5, 9.5, 0.2))

    interpolated = hpd_credibility(log_density, axis, 9.5, is_log=True)
    at_peak = hpd_credibility(log_density, axis, 9.5, is_log=True, density_at_truth=log_peak)
    linear = hpd_credibility(np.exp(log_density), axis, 9.5, density_at_truth=np.exp(log_peak))

    assert interpolated == pytest.approx(0.5, abs=1e-6)
    assert at_peak == 0.0
    assert linear == 0.0


def test_hpd_credibility_given_truth_density():
    density = np.arange(1.0, 11.0)
    axis = np.arange(10.0)
    # 3.5 on the scale of the density: the cells with p >= 4 lie above it.
    expected = density[density >= 4].sum() / density.sum()

    assert hpd_credibility(density, axis, 0.0, density_at_truth=3.5) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("value", "is_log"), [(float("nan"), False), (-1.0, False), (float("inf"), True)]
)
def test_hpd_credibility_invalid_density_at_truth(value, is_log):
    with pytest.raises(ValueError, match="density_at_truth must be a finite density"):
        hpd_credibility(np.ones(5), np.arange(5.0), 2.0, is_log=is_log, density_at_truth=value)


def test_hpd_credibilities_density_count_mismatch():
    with pytest.raises(ValueError, match="densities_at_truth has 2 values for 3 simulations"):
        hpd_credibilities(
            np.ones((3, 5)), np.arange(5.0), np.full(3, 2.0), densities_at_truth=np.ones(2)
        )


def test_hpd_credibility_splits_tied_mass():
    density = np.array([1.0, 1.0, 2.0])
    axis = np.arange(3.0)

    # Cell 2 contains half the mass above the truth, and cells 0 and 1 tie with it.
    assert hpd_credibility(density, axis, 0.0) == pytest.approx(0.75)


def test_hpd_credibility_flat_density_midpoint():
    flat = np.zeros(GRID_1D.size)

    assert hpd_credibility(flat, GRID_1D, 1.3, is_log=True) == pytest.approx(0.5)


def test_hpd_credibility_random_ties_uniform():
    rng = np.random.default_rng(11)
    flat = np.ones((500, GRID_1D.size))
    truths = rng.uniform(-6.0, 6.0, 500)
    credibilities = hpd_credibilities(flat, GRID_1D, truths, ties="random", rng=rng)

    assert stats.kstest(credibilities, "uniform").pvalue > 0.01


def test_hpd_credibility_random_ties_needs_rng():
    with pytest.raises(ValueError, match="rng="):
        hpd_credibility(np.ones(5), np.arange(5.0), 2.0, ties="random")


def test_hpd_credibility_truth_in_zero_density_cells():
    log_density = stats.norm.logpdf(GRID_1D)
    log_density[GRID_1D < -1.0] = -np.inf

    assert hpd_credibility(log_density, GRID_1D, -3.0, is_log=True) == pytest.approx(1.0)


def test_hpd_credibility_minus_inf_matches_zero_density():
    log_density = stats.norm.logpdf(GRID_1D, 0.4, 0.8)
    log_density[GRID_1D > 1.5] = -np.inf
    density = np.exp(log_density)

    from_log = hpd_credibility(log_density, GRID_1D, -0.7, is_log=True)
    from_linear = hpd_credibility(density, GRID_1D, -0.7)
    assert from_log == pytest.approx(from_linear, rel=1e-12)


def test_hpd_credibility_clamps_half_cell():
    density = stats.norm.pdf(GRID_1D)
    half_step = 0.5 * (GRID_1D[1] - GRID_1D[0])

    at_edge = hpd_credibility(density, GRID_1D, GRID_1D[-1])
    assert hpd_credibility(density, GRID_1D, GRID_1D[-1] + 0.9 * half_step) == at_edge


def test_hpd_credibility_truth_off_grid_rejected():
    with pytest.raises(ValueError, match="widen the grid"):
        hpd_credibility(stats.norm.pdf(GRID_1D), GRID_1D, 7.0)


def test_hpd_credibility_uneven_grid_rejected():
    axis = np.geomspace(1.0, 10.0, 20)
    with pytest.raises(ValueError, match="not evenly spaced"):
        hpd_credibility(np.ones(20), axis, 2.0)


def test_hpd_credibility_wrong_axis_count_rejected():
    with pytest.raises(ValueError, match="one coordinate array per density dimension"):
        hpd_credibility(np.ones((4, 5)), [np.arange(4.0)], [1.0, 1.0])


def test_hpd_credibilities_match_single_calls():
    rng = np.random.default_rng(3)
    theta_true, mean, std = simulate_gaussian(rng, 20, 2, *EXACT)
    log_density, axes = gaussian_log_densities(mean, std)
    batch = hpd_credibilities(log_density, axes, theta_true, is_log=True)
    single = [
        hpd_credibility(d, axes, t, is_log=True)
        for d, t in zip(log_density, theta_true, strict=True)
    ]

    assert np.array_equal(batch, single)


# ---------------------------------------------------------------------------------------
# Expected coverage
# ---------------------------------------------------------------------------------------


def test_clopper_pearson_bands_known_values():
    # 5 of 10 credibilities lie below 0.5, and the exact 95% interval of 5/10 is [0.187, 0.813].
    credibilities = np.linspace(0.05, 0.95, 10)
    result = expected_coverage(credibilities, [0.0, 0.5, 1.0])

    assert result.ecp.tolist() == [0.0, 0.5, 1.0]
    assert result.band95_lower[1] == pytest.approx(0.1871, abs=1e-4)
    assert result.band95_upper[1] == pytest.approx(0.8129, abs=1e-4)
    assert result.band95_lower[0] == 0.0
    assert result.band95_upper[2] == 1.0
    assert result.band68_lower[1] > result.band95_lower[1]
    assert result.band68_upper[1] < result.band95_upper[1]


def test_expected_coverage_uniform_calibrated():
    rng = np.random.default_rng(5)
    result = expected_coverage(rng.uniform(size=1000))

    assert result.verdict == "calibrated"
    assert result.meets_target


def test_expected_coverage_to_dict_is_json():
    result = expected_coverage(np.random.default_rng(6).uniform(size=50))
    payload = json.loads(json.dumps(result.to_dict(), allow_nan=False))

    assert payload["n_sims"] == 50
    assert len(payload["ecp"]) == len(payload["levels"])
    assert payload["verdict"] == result.verdict


def test_expected_coverage_result_read_only():
    result = expected_coverage(np.random.default_rng(6).uniform(size=50))

    with pytest.raises(ValueError, match="read-only"):
        result.ecp[0] = 1.0


@pytest.mark.parametrize(
    ("credibilities", "message"),
    [
        (np.array([0.2, 1.4]), "in \\[0, 1\\]"),
        (np.array([0.2, np.nan]), "NaN"),
        (np.zeros((3, 2)), "1-dim"),
    ],
)
def test_expected_coverage_rejects_invalid_credibilities(credibilities, message):
    with pytest.raises(ValueError, match=message):
        expected_coverage(credibilities)


@pytest.mark.parametrize("dim", [1, 2])
def test_expected_coverage_exact_posterior_calibrated(dim):
    result = gaussian_coverage(dim, EXACT, seed=100 + dim)
    # Simultaneous 99% band of an empirical CDF (Dvoretzky-Kiefer-Wolfowitz), which
    # unlike the per-level binomial bands holds for all levels at once.
    simultaneous_band = math.sqrt(math.log(2.0 / 0.01) / (2.0 * result.n_sims))

    assert result.verdict == "calibrated"
    assert np.abs(result.ecp - result.levels).max() <= simultaneous_band


@pytest.mark.parametrize("dim", [1, 2])
def test_expected_coverage_narrow_posterior_overconfident(dim):
    result = gaussian_coverage(dim, OVERCONFIDENT, seed=200 + dim)

    assert result.verdict == "overconfident"
    assert not result.meets_target


@pytest.mark.parametrize("dim", [1, 2])
def test_expected_coverage_biased_posterior_overconfident(dim):
    result = gaussian_coverage(dim, BIASED, seed=300 + dim)

    assert result.verdict == "overconfident"


@pytest.mark.parametrize("dim", [1, 2])
def test_expected_coverage_wide_posterior_conservative(dim):
    result = gaussian_coverage(dim, CONSERVATIVE, seed=400 + dim)

    assert result.verdict == "conservative"
    assert result.meets_target


# ---------------------------------------------------------------------------------------
# TARP
# ---------------------------------------------------------------------------------------


def test_tarp_constant_credibility_area_and_ks():
    # The reference is at 0 and the truth at 1. Half of the samples (at 0.5) are closer
    # to the reference and half (at 2) farther, so f = 0.5 in every simulation. The ECP is then
    # a unit step at 0.5, whose area to the diagonal is 1/4 and KS distance 1/2.
    n_sims = 40
    samples = np.tile(np.array([0.5, 2.0] * 10)[None, :, None], (n_sims, 1, 1))
    theta_true = np.ones((n_sims, 1))
    references = np.zeros((n_sims, 1))
    result = tarp(
        samples,
        theta_true,
        rng=np.random.default_rng(0),
        references=references,
        normalize=False,
    )

    assert np.all(result.ball_credibility == 0.5)
    assert result.area == pytest.approx(0.25)
    assert result.ks_statistic == pytest.approx(0.5)
    assert result.verdict == "miscalibrated"


@pytest.mark.parametrize("dim", [1, 2])
def test_tarp_exact_posterior_calibrated(dim):
    result = gaussian_tarp(dim, EXACT, seed=500 + dim)

    assert result.verdict == "calibrated"
    assert result.area < TARP_AREA_THRESHOLD


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("case", [OVERCONFIDENT, BIASED, CONSERVATIVE], ids=str)
def test_tarp_miscalibrated_posterior_flagged(dim, case):
    result = gaussian_tarp(dim, case, seed=600 + dim)

    assert result.verdict == "miscalibrated"
    assert result.area > TARP_AREA_THRESHOLD


def test_tarp_joint_normalization_detects_bias():
    # The second parameter is in units 1000 times larger with an offset, so without
    # normalisation it would dominate the distances. The shift of one posterior std
    # applies to both parameters.
    samples, theta_true, rng = gaussian_samples(2, BIASED, seed=700)
    units = np.array([1.0, 1000.0])
    offset = np.array([0.0, 5000.0])
    result = tarp(samples * units + offset, theta_true * units + offset, rng=rng)

    assert result.verdict == "miscalibrated"
    assert result.area > TARP_AREA_THRESHOLD


def test_tarp_samples_only_normalization_hides_bias():
    # The pitfall that tarp() avoids: standardising the samples by their own mean and
    # std removes the shift that every posterior shares, so the biased posterior passes.
    samples, theta_true, rng = gaussian_samples(2, BIASED, seed=700)
    standardized = (samples - samples.mean(axis=(0, 1))) / samples.std(axis=(0, 1))
    result = tarp(standardized, theta_true, rng=rng, normalize=False)

    assert result.verdict == "calibrated"
    assert result.area < TARP_AREA_THRESHOLD


def test_tarp_bootstrap_bands():
    samples, theta_true, rng = gaussian_samples(1, EXACT, seed=800)
    result = tarp(samples[:300], theta_true[:300], rng=rng, n_bootstrap=50, n_levels=21)
    inside = (result.band95_lower <= result.ecp) & (result.ecp <= result.band95_upper)

    assert result.band95_lower.shape == (21,)
    assert np.all(result.band95_lower <= result.band68_lower)
    assert np.all(result.band68_upper <= result.band95_upper)
    assert inside.mean() >= 0.9
    assert result.n_bootstrap == 50


def test_tarp_without_bootstrap_has_no_bands():
    samples, theta_true, rng = gaussian_samples(1, EXACT, seed=801)
    result = tarp(samples[:50], theta_true[:50], rng=rng)

    assert result.band68_lower is None
    assert result.band95_upper is None


def test_tarp_to_dict_is_json():
    samples, theta_true, rng = gaussian_samples(1, EXACT, seed=802)
    result = tarp(samples[:50], theta_true[:50], rng=rng, n_bootstrap=5)
    payload = json.loads(json.dumps(result.to_dict(), allow_nan=False))

    assert payload["n_sims"] == 50
    assert len(payload["band95_lower"]) == len(payload["levels"])
    assert payload["verdict"] == result.verdict


def test_tarp_rejects_legacy_random_state():
    samples, theta_true, _ = gaussian_samples(1, EXACT, seed=803)
    with pytest.raises(TypeError, match="default_rng"):
        tarp(samples, theta_true, rng=np.random.RandomState(0))


def test_tarp_rejects_samples_without_parameter_axis():
    samples, theta_true, rng = gaussian_samples(1, EXACT, seed=804)
    with pytest.raises(ValueError, match="trailing axis"):
        tarp(samples[..., 0], theta_true, rng=rng)


def test_tarp_rejects_constant_parameter():
    samples, theta_true, rng = gaussian_samples(2, EXACT, seed=805)
    samples[..., 1] = 3.0
    theta_true[:, 1] = 3.0
    with pytest.raises(ValueError, match="constant"):
        tarp(samples, theta_true, rng=rng)


# ---------------------------------------------------------------------------------------
# Jensen-Shannon divergence
# ---------------------------------------------------------------------------------------


def test_jsd_identical_densities_zero():
    log_density = stats.norm.logpdf(GRID_1D, 0.3, 0.8)

    assert jensen_shannon_divergence(log_density, log_density + 4.0) == pytest.approx(
        0.0, abs=1e-12
    )


def test_jsd_disjoint_densities_ln2():
    p_log = np.where(GRID_1D < 0, 0.0, -np.inf)
    q_log = np.where(GRID_1D < 0, -np.inf, 0.0)

    assert jensen_shannon_divergence(p_log, q_log) == pytest.approx(math.log(2.0))


def test_jsd_symmetric_2d():
    x, y = np.meshgrid(GRID_2D, GRID_2D, indexing="ij")
    p_log = -0.5 * (x**2 + y**2)
    q_log = -0.5 * ((x - 1.0) ** 2 / 2.0 + y**2)
    forward = jensen_shannon_divergence(p_log, q_log)

    assert forward == pytest.approx(jensen_shannon_divergence(q_log, p_log), rel=1e-12)
    assert 0.0 < forward < math.log(2.0)


def test_jsd_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="same grid"):
        jensen_shannon_divergence(np.zeros(5), np.zeros(6))


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------


def test_plot_coverage_renders_png():
    result = expected_coverage(np.random.default_rng(9).uniform(size=200))
    figure = plot_coverage(result)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")

    assert isinstance(figure, Figure)
    assert buffer.getvalue().startswith(b"\x89PNG")


def test_plot_tarp_into_given_axes():
    samples, theta_true, rng = gaussian_samples(1, EXACT, seed=900)
    result = tarp(samples[:100], theta_true[:100], rng=rng, n_bootstrap=10)
    figure = Figure()
    ax: Axes = figure.add_subplot()

    assert plot_tarp(result, ax=ax) is figure
    assert len(ax.lines) == 2
