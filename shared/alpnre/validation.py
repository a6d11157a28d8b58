"""Statistics for validating posterior estimators: HPD coverage, TARP and divergences.

All functions work on plain arrays, so they apply to any estimator whose posterior is
available either as a density on a regular grid or as samples.

Highest-posterior-density (HPD) coverage
    For one simulation with true parameter :math:`\\theta^*`, the HPD credibility of the
    truth is the posterior mass of all grid cells whose density is at least the density
    at :math:`\\theta^*`, i.e. the level of the smallest HPD region that contains the
    truth. Over many simulations drawn from the prior, the expected coverage probability
    :math:`\\mathrm{ECP}(\\alpha)` is the fraction of truths with credibility
    :math:`\\le \\alpha`. A calibrated posterior gives :math:`\\mathrm{ECP}(\\alpha) = \\alpha`,
    an overconfident one (too narrow or biased) falls below the diagonal and a
    conservative one (too wide) lies above it.

Tests of Accuracy with Random Points (TARP)
    Lemos, Coogan, Hezaveh and Perreault-Levasseur, "Sampling-Based Accuracy Testing of
    Posterior Estimators for General Inference", ICML 2023. For each simulation a random
    reference point :math:`\\theta_r` is drawn, and
    :math:`f = P(\\lVert\\theta - \\theta_r\\rVert < \\lVert\\theta^* - \\theta_r\\rVert)`
    is estimated from posterior samples. The posterior is calibrated if and only if
    :math:`f` is uniform on [0, 1] for every reference distribution, so the empirical
    CDF of :math:`f` must follow the diagonal. TARP needs only samples, no density.

Grid conventions
    Densities on grids may be linear (``is_log=False``, non-negative) or unnormalised
    natural-log densities (``is_log=True``, ``-inf`` marks zero density). Grids must be
    regular, so every cell has the same volume and a cell's mass is proportional to its
    density. A grid that is regular in a transformed parameter (e.g. ``log10(g)``) is
    fine when the density is with respect to that parameter.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import interpolate, special, stats

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "CoverageResult",
    "CoverageVerdict",
    "TarpResult",
    "TarpVerdict",
    "expected_coverage",
    "hpd_credibilities",
    "hpd_credibility",
    "hpd_mask",
    "hpd_threshold",
    "jensen_shannon_divergence",
    "plot_coverage",
    "plot_tarp",
    "tarp",
]

log = logging.getLogger(__name__)

CoverageVerdict = Literal["calibrated", "conservative", "overconfident"]
TarpVerdict = Literal["calibrated", "miscalibrated"]

# Two densities count as tied when they agree to this relative tolerance, which absorbs
# the rounding of linear interpolation between equal grid values.
_TIE_RTOL = 1e-9
# Credibilities computed as sums of cell masses may exceed 1 or fall below 0 by rounding.
_CREDIBILITY_ATOL = 1e-9
# Relative tolerance on the spacing of a grid axis for it to count as regular.
_SPACING_RTOL = 1e-6


# ---------------------------------------------------------------------------------------
# Densities on grids
# ---------------------------------------------------------------------------------------


def _cell_probabilities(density: np.ndarray, is_log: bool) -> np.ndarray:
    """Validate a gridded density and return its cell probabilities, which sum to 1."""
    values = np.asarray(density, dtype=float)
    if values.ndim == 0 or values.size == 0:
        raise ValueError(
            f"density must be an array with at least one cell, got shape {values.shape}"
        )
    if np.isnan(values).any():
        raise ValueError(
            f"density contains {int(np.isnan(values).sum())} NaN cells: "
            "replace them with 0 (or -inf for log densities) where the density vanishes"
        )

    if is_log:
        if np.isposinf(values).any():
            raise ValueError(
                "log density contains +inf cells: subtract the finite maximum or clip "
                "the values before computing HPD regions"
            )
        peak = values.max()
        if peak == -np.inf:
            raise ValueError("log density is -inf in every cell, so it has no mass")
        weights = np.exp(values - peak)
    else:
        if np.isinf(values).any():
            raise ValueError(
                "density contains infinite cells: pass finite values, or pass log "
                "densities with is_log=True"
            )
        if (values < 0).any():
            raise ValueError(
                f"density has negative cells (minimum {values.min():.6g}): pass "
                "is_log=True if these are log densities"
            )
        weights = values

    total = weights.sum()
    if not total > 0:
        raise ValueError("density is zero in every cell, so it has no mass")
    return np.asarray(weights / total)


def _on_probability_scale(density: np.ndarray, value: float, is_log: bool) -> float:
    """Map a density value onto the scale of :func:`_cell_probabilities` of ``density``."""
    values = np.asarray(density, dtype=float)
    value = float(value)
    if np.isnan(value) or (not is_log and value < 0) or value == np.inf:
        raise ValueError(
            f"density_at_truth must be a finite density (or -inf as a log density), got {value}"
        )
    if is_log:
        finite = values[np.isfinite(values)]
        peak = finite.max()
        return float(np.exp(value - peak) / np.exp(finite - peak).sum())
    return value / float(values.sum())


def _check_level(level: float) -> float:
    level = float(level)
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"credibility level must lie in [0, 1], got {level}")
    return level


def hpd_threshold(density: np.ndarray, level: float, *, is_log: bool = False) -> float:
    """Find the density threshold of the ``level`` highest-posterior-density region.

    The region is the set of cells with density at or above the threshold. It is the
    smallest set of cells whose mass is at least ``level``. Cells tied with the
    threshold are all included, so the region's mass can exceed ``level``.

    Parameters
    ----------
    density : ndarray, shape (n,) or (n1, n2) or any grid shape
        Density on a regular grid, unnormalised. Linear and non-negative unless
        ``is_log``.
    level : float
        Credibility level in [0, 1].
    is_log : bool
        Whether ``density`` contains natural-log densities, where ``-inf`` marks zero.

    Returns
    -------
    float
        Threshold in the scale and normalisation of ``density``: one of its cell
        values, or ``+inf`` for ``level == 0`` (the empty region). At ``level == 1``
        it is the lowest density with non-zero mass, so zero-density cells stay out.
    """
    level = _check_level(level)
    probabilities = _cell_probabilities(density, is_log).ravel()
    values = np.asarray(density, dtype=float).ravel()
    if level == 0.0:
        return float("inf")

    # Sort only cells with mass, so level 1 never pulls in zero-density cells.
    positive = np.flatnonzero(probabilities > 0)
    order = positive[np.argsort(probabilities[positive], kind="stable")[::-1]]
    cumulative = np.cumsum(probabilities[order])
    index = int(np.searchsorted(cumulative, level, side="left"))
    # Rounding can leave the total mass a few ulp below 1, hence the clip.
    index = min(index, order.size - 1)
    return float(values[order[index]])


def hpd_mask(density: np.ndarray, level: float, *, is_log: bool = False) -> np.ndarray:
    """Select the cells of the ``level`` highest-posterior-density region.

    Parameters
    ----------
    density : ndarray, shape (n,) or (n1, n2) or any grid shape
        Density on a regular grid, unnormalised. Linear and non-negative unless
        ``is_log``.
    level : float
        Credibility level in [0, 1].
    is_log : bool
        Whether ``density`` contains natural-log densities, where ``-inf`` marks zero.

    Returns
    -------
    ndarray of bool, same shape as ``density``
        True for cells in the region. See :func:`hpd_threshold` for ties and the
        levels 0 and 1.
    """
    threshold = hpd_threshold(density, level, is_log=is_log)
    return np.asarray(density, dtype=float) >= threshold


def _as_axes(axes: np.ndarray | Sequence[np.ndarray], shape: tuple[int, ...]) -> list:
    """Validate grid axes against the density shape and return them as float arrays."""
    if isinstance(axes, np.ndarray) and axes.ndim == 1:
        axes = [axes]
    axes_list = [np.asarray(axis, dtype=float) for axis in axes]
    if len(axes_list) != len(shape):
        raise ValueError(
            f"got {len(axes_list)} grid axes for a density of shape {shape}: "
            "pass one coordinate array per density dimension"
        )

    for k, (axis, size) in enumerate(zip(axes_list, shape, strict=True)):
        if axis.ndim != 1 or axis.size != size:
            raise ValueError(
                f"grid axis {k} has shape {axis.shape}, but density dimension {k} has "
                f"{size} cells: pass the cell-centre coordinates along that dimension"
            )
        if size < 2:
            raise ValueError(f"grid axis {k} has {size} point, but at least 2 are needed")
        steps = np.diff(axis)
        if not (steps > 0).all():
            raise ValueError(f"grid axis {k} must be strictly increasing")
        if not np.allclose(steps, steps[0], rtol=_SPACING_RTOL, atol=0.0):
            raise ValueError(
                f"grid axis {k} is not evenly spaced (steps from {steps.min():.6g} to "
                f"{steps.max():.6g}): evaluate the density on a regular grid, e.g. in "
                "log10 of a log-uniform parameter"
            )
    return axes_list


def _clamp_to_grid(axes: list, theta_true: np.ndarray) -> np.ndarray:
    """Move a truth within half a cell outside the outermost centres onto the grid edge.

    Cell centres cover the parameter range only up to half a cell from its bounds, so a
    truth drawn from the prior can fall just outside them. Beyond half a cell the truth
    is off the grid, and the result would be meaningless.
    """
    clamped = theta_true.copy()
    for k, axis in enumerate(axes):
        half_step = 0.5 * (axis[1] - axis[0])
        if not axis[0] - half_step <= theta_true[k] <= axis[-1] + half_step:
            raise ValueError(
                f"true parameter {k} = {theta_true[k]:.6g} lies outside the grid "
                f"[{axis[0]:.6g}, {axis[-1]:.6g}] by more than half a cell: widen the "
                "grid to cover the prior support"
            )
        clamped[k] = np.clip(theta_true[k], axis[0], axis[-1])
    return clamped


def hpd_credibility(
    density: np.ndarray,
    axes: np.ndarray | Sequence[np.ndarray],
    theta_true: float | np.ndarray,
    *,
    is_log: bool = False,
    ties: Literal["midpoint", "random"] = "midpoint",
    rng: np.random.Generator | None = None,
    density_at_truth: float | None = None,
) -> float:
    """Compute the credibility level of the smallest HPD region that contains the truth.

    The density at ``theta_true`` is ``density_at_truth`` when given, else it is
    interpolated linearly between grid points (of the linear density, also when
    ``is_log``). The credibility is the mass of all cells with a higher density, plus a
    share of the mass of cells tied with it.

    Parameters
    ----------
    density : ndarray, shape (n,) or (n1, n2) or any grid shape
        Posterior density on a regular grid, unnormalised. Linear and non-negative
        unless ``is_log``.
    axes : ndarray, shape (n,), or sequence of ndarray with shapes (n1,), (n2,), ...
        Cell-centre coordinates along each dimension, evenly spaced and increasing.
    theta_true : float or ndarray, shape (ndim,)
        True parameter. Values up to half a cell beyond the outermost centres are
        moved onto the grid edge.
    is_log : bool
        Whether ``density`` contains natural-log densities, where ``-inf`` marks zero.
    ties : {"midpoint", "random"}
        Share of the tied mass added to the credibility: one half, or a uniform random
        fraction. The random share makes credibilities exactly uniform for a calibrated
        posterior with plateaus (e.g. a flat density), while the midpoint keeps the
        result deterministic.
    rng : numpy.random.Generator, optional
        Random generator, required for ``ties="random"``.
    density_at_truth : float, optional
        Density at ``theta_true`` on the scale of ``density`` (a log density when
        ``is_log``), for example an estimator evaluated at the truth. Interpolation
        underrates a peak narrower than a cell, because the peak falls between the
        grid points. The truth then sits lower in the ranking of the cells than it
        should, which biases the coverage towards overconfidence.

    Returns
    -------
    float
        Credibility in [0, 1]: near 0 for a truth at the mode and near 1 for a truth in
        the far tail or in a zero-density cell.

    Notes
    -----
    The grid resolves the credibility only to about the mass of the cells that the
    region's boundary cuts. A check used 500 Gaussian posteriors of standard deviation
    0.45 on a 1-dim grid of step 0.05, i.e. 9 cells per standard deviation. There the
    error against the exact credibility was at most 0.044 and 0.0016 on average, so it
    mostly averages out in the ECP. Use finer grids where single credibilities matter.
    """
    probabilities = _cell_probabilities(density, is_log)
    axes_list = _as_axes(axes, probabilities.shape)
    theta = np.atleast_1d(np.asarray(theta_true, dtype=float))
    if theta.shape != (probabilities.ndim,):
        raise ValueError(
            f"theta_true has shape {theta.shape}, expected ({probabilities.ndim},) for "
            f"a density of shape {probabilities.shape}"
        )
    if ties == "random" and rng is None:
        raise ValueError("ties='random' needs a generator: pass rng=numpy.random.default_rng(seed)")
    if ties not in ("midpoint", "random"):
        raise ValueError(f"ties must be 'midpoint' or 'random', got {ties!r}")

    if density_at_truth is None:
        point = _clamp_to_grid(axes_list, theta)
        truth_probability = float(
            interpolate.interpn(axes_list, probabilities, point[None, :], method="linear")[0]
        )
    else:
        truth_probability = _on_probability_scale(density, density_at_truth, is_log)

    tied = np.isclose(probabilities, truth_probability, rtol=_TIE_RTOL, atol=0.0)
    above = (probabilities > truth_probability) & ~tied
    tied_mass = float(probabilities[tied].sum())
    if ties == "midpoint":
        tie_share = 0.5
    else:
        assert rng is not None  # checked with the arguments above
        tie_share = float(rng.uniform())
    credibility = float(probabilities[above].sum()) + tie_share * tied_mass

    log.debug(
        "HPD credibility %.6g at theta_true=%s (tied mass %.3g)", credibility, theta, tied_mass
    )
    return float(np.clip(credibility, 0.0, 1.0))


def hpd_credibilities(
    densities: np.ndarray,
    axes: np.ndarray | Sequence[np.ndarray],
    theta_true: np.ndarray,
    *,
    is_log: bool = False,
    ties: Literal["midpoint", "random"] = "midpoint",
    rng: np.random.Generator | None = None,
    densities_at_truth: np.ndarray | None = None,
) -> np.ndarray:
    """Compute :func:`hpd_credibility` for a batch of simulations on a shared grid.

    Parameters
    ----------
    densities : ndarray, shape (n_sims, n) or (n_sims, n1, n2) or (n_sims, *grid)
        One posterior density per simulation.
    axes : ndarray or sequence of ndarray
        Cell-centre coordinates, as for :func:`hpd_credibility`.
    theta_true : ndarray, shape (n_sims, ndim), or (n_sims,) for a 1-dim grid
        True parameter of each simulation.
    is_log, ties, rng
        As for :func:`hpd_credibility`.
    densities_at_truth : ndarray, shape (n_sims,), optional
        ``density_at_truth`` of each simulation, see :func:`hpd_credibility`.

    Returns
    -------
    ndarray, shape (n_sims,)
        Credibility of each truth.
    """
    densities = np.asarray(densities, dtype=float)
    theta = np.asarray(theta_true, dtype=float)
    if densities.ndim < 2:
        raise ValueError(
            f"densities has shape {densities.shape}: stack one grid per simulation "
            "along axis 0, or call hpd_credibility for a single grid"
        )
    if theta.ndim == 1 and densities.ndim == 2:
        theta = theta[:, None]
    if theta.ndim != 2 or theta.shape[0] != densities.shape[0]:
        raise ValueError(
            f"theta_true has shape {np.shape(theta_true)}, expected "
            f"({densities.shape[0]}, {densities.ndim - 1}) to match densities of shape "
            f"{densities.shape}"
        )

    if densities_at_truth is None:
        at_truth: list[float | None] = [None] * len(densities)
    else:
        at_truth = [float(value) for value in np.ravel(densities_at_truth)]
        if len(at_truth) != len(densities):
            raise ValueError(
                f"densities_at_truth has {len(at_truth)} values for {len(densities)} "
                "simulations: pass one per simulation"
            )

    return np.array(
        [
            hpd_credibility(
                density,
                axes,
                truth,
                is_log=is_log,
                ties=ties,
                rng=rng,
                density_at_truth=value,
            )
            for density, truth, value in zip(densities, theta, at_truth, strict=True)
        ]
    )


def jensen_shannon_divergence(p_log: np.ndarray, q_log: np.ndarray) -> float:
    """Compute the Jensen-Shannon divergence between two densities on the same grid.

    .. math:: \\mathrm{JSD}(p, q) = \\tfrac12 \\mathrm{KL}(p \\Vert m)
        + \\tfrac12 \\mathrm{KL}(q \\Vert m), \\quad m = \\tfrac12 (p + q)

    Both densities are normalised over the grid first. Cells where a density is zero
    contribute nothing to its KL term.

    Parameters
    ----------
    p_log, q_log : ndarray, same shape, e.g. (n,) or (n1, n2)
        Unnormalised natural-log densities on the same regular grid; ``-inf`` marks
        zero density.

    Returns
    -------
    float
        Divergence in nats, between 0 (identical) and ln 2 (disjoint supports).
    """
    p_values = np.asarray(p_log, dtype=float)
    q_values = np.asarray(q_log, dtype=float)
    if p_values.shape != q_values.shape:
        raise ValueError(
            f"p_log has shape {p_values.shape} but q_log has shape {q_values.shape}: "
            "evaluate both densities on the same grid"
        )

    p = _cell_probabilities(p_values, is_log=True)
    q = _cell_probabilities(q_values, is_log=True)
    mixture = 0.5 * (p + q)
    # rel_entr(x, y) is x * log(x / y), with 0 where x == 0.
    divergence = 0.5 * special.rel_entr(p, mixture).sum() + 0.5 * special.rel_entr(q, mixture).sum()
    return float(np.clip(divergence, 0.0, np.log(2.0)))


# ---------------------------------------------------------------------------------------
# Result containers
# ---------------------------------------------------------------------------------------


def _json_float(value: float) -> float | None:
    """Convert to a float that JSON can encode, with None for NaN and infinities."""
    value = float(value)
    return value if np.isfinite(value) else None


def _json_floats(values: np.ndarray | None) -> list[float | None] | None:
    if values is None:
        return None
    return [_json_float(v) for v in np.asarray(values).ravel()]


def _read_only(values: np.ndarray) -> np.ndarray:
    values = np.array(values, dtype=float)
    values.setflags(write=False)
    return values


@dataclass(frozen=True, eq=False)
class CoverageResult:
    """Expected coverage of HPD regions with binomial uncertainty, from :func:`expected_coverage`.

    Attributes
    ----------
    levels : ndarray, shape (n_levels,)
        Credibility levels alpha.
    ecp : ndarray, shape (n_levels,)
        Expected coverage probability: the fraction of truths with credibility <= alpha.
    band68_lower, band68_upper, band95_lower, band95_upper : ndarray, shape (n_levels,)
        Clopper-Pearson 68% and 95% intervals of the ECP, from the binomial count of
        ``n_sims`` simulations.
    verdicts : tuple of str, length n_levels
        Verdict per level, see :func:`expected_coverage`.
    verdict : str
        "overconfident" if any level is overconfident, else "conservative" if any is
        conservative, else "calibrated".
    n_sims : int
        Number of simulations.
    tolerance : float
        Deviation |ECP - alpha| accepted as calibrated regardless of the band.
    """

    levels: np.ndarray
    ecp: np.ndarray
    band68_lower: np.ndarray
    band68_upper: np.ndarray
    band95_lower: np.ndarray
    band95_upper: np.ndarray
    verdicts: tuple[CoverageVerdict, ...]
    verdict: CoverageVerdict
    n_sims: int
    tolerance: float

    @property
    def meets_target(self) -> bool:
        """Whether no level is overconfident, which is the validation target.

        Each level then has ECP >= alpha, |ECP - alpha| <= tolerance, or alpha inside
        the 95% band.
        """
        return self.verdict != "overconfident"

    def to_dict(self) -> dict[str, Any]:
        """Return the result as JSON-safe Python types, with None for non-finite floats."""
        return {
            "levels": _json_floats(self.levels),
            "ecp": _json_floats(self.ecp),
            "band68_lower": _json_floats(self.band68_lower),
            "band68_upper": _json_floats(self.band68_upper),
            "band95_lower": _json_floats(self.band95_lower),
            "band95_upper": _json_floats(self.band95_upper),
            "verdicts": list(self.verdicts),
            "verdict": self.verdict,
            "meets_target": self.meets_target,
            "n_sims": int(self.n_sims),
            "tolerance": _json_float(self.tolerance),
        }


@dataclass(frozen=True, eq=False)
class TarpResult:
    """TARP coverage curve and its summary statistics, from :func:`tarp`.

    Attributes
    ----------
    levels : ndarray, shape (n_levels,)
        Credibility levels alpha, evenly spaced on [0, 1].
    ecp : ndarray, shape (n_levels,)
        Empirical CDF of ``ball_credibility`` at each level.
    ball_credibility : ndarray, shape (n_sims,)
        Fraction f of posterior samples closer to the reference point than the truth.
    area : float
        Area between the ECP curve and the diagonal, the integral of |ECP - alpha| over
        alpha in [0, 1], computed exactly from the step function.
    ks_statistic : float
        Maximum of |ECP - alpha| over [0, 1], the Kolmogorov-Smirnov distance of f from
        the uniform distribution.
    ks_pvalue : float
        Kolmogorov-Smirnov p-value of f against the uniform distribution. It is
        approximate because f takes only the values k / n_samples.
    verdict : str
        "calibrated" if ``ks_pvalue >= significance`` or ``ks_statistic <= tolerance``,
        else "miscalibrated". A calibrated posterior is judged miscalibrated with
        probability at most about ``significance``.
    tolerance, significance : float
        Thresholds of the verdict.
    n_sims, n_samples : int
        Number of simulations and of posterior samples per simulation.
    normalized : bool
        Whether samples, truths and references were jointly min-max normalised.
    n_bootstrap : int
        Number of bootstrap replicates; 0 when no bands were computed.
    band68_lower, band68_upper, band95_lower, band95_upper : ndarray or None
        Central 68% and 95% bootstrap intervals of the ECP, shape (n_levels,), or None
        when ``n_bootstrap == 0``.
    """

    levels: np.ndarray
    ecp: np.ndarray
    ball_credibility: np.ndarray
    area: float
    ks_statistic: float
    ks_pvalue: float
    verdict: TarpVerdict
    tolerance: float
    significance: float
    n_sims: int
    n_samples: int
    normalized: bool
    n_bootstrap: int = 0
    band68_lower: np.ndarray | None = None
    band68_upper: np.ndarray | None = None
    band95_lower: np.ndarray | None = None
    band95_upper: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the result as JSON-safe Python types, with None for non-finite floats."""
        return {
            "levels": _json_floats(self.levels),
            "ecp": _json_floats(self.ecp),
            "ball_credibility": _json_floats(self.ball_credibility),
            "area": _json_float(self.area),
            "ks_statistic": _json_float(self.ks_statistic),
            "ks_pvalue": _json_float(self.ks_pvalue),
            "verdict": self.verdict,
            "tolerance": _json_float(self.tolerance),
            "significance": _json_float(self.significance),
            "n_sims": int(self.n_sims),
            "n_samples": int(self.n_samples),
            "normalized": bool(self.normalized),
            "n_bootstrap": int(self.n_bootstrap),
            "band68_lower": _json_floats(self.band68_lower),
            "band68_upper": _json_floats(self.band68_upper),
            "band95_lower": _json_floats(self.band95_lower),
            "band95_upper": _json_floats(self.band95_upper),
        }


# ---------------------------------------------------------------------------------------
# Expected coverage of HPD regions
# ---------------------------------------------------------------------------------------


def _clopper_pearson(
    successes: np.ndarray, trials: int, confidence: float
) -> tuple[np.ndarray, np.ndarray]:
    """Return the exact binomial (Clopper-Pearson) interval of successes / trials."""
    tail = 0.5 * (1.0 - confidence)
    with np.errstate(invalid="ignore"):
        lower = stats.beta.ppf(tail, successes, trials - successes + 1)
        upper = stats.beta.ppf(1.0 - tail, successes + 1, trials - successes)
    lower = np.where(successes == 0, 0.0, lower)
    upper = np.where(successes == trials, 1.0, upper)
    return lower, upper


def _check_levels(levels: np.ndarray | Sequence[float]) -> np.ndarray:
    values = np.asarray(levels, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"levels must be a non-empty 1-dim array, got shape {values.shape}")
    if not ((values >= 0.0) & (values <= 1.0)).all():
        raise ValueError(
            f"levels must lie in [0, 1], got values from {values.min():.6g} to {values.max():.6g}"
        )
    return values


def expected_coverage(
    credibilities: np.ndarray,
    levels: np.ndarray | Sequence[float] | None = None,
    *,
    tolerance: float = 0.05,
) -> CoverageResult:
    """Estimate the expected coverage of HPD regions and judge calibration per level.

    For each level alpha, ECP(alpha) is the fraction of simulations whose truth has an
    HPD credibility at most alpha, so the count is binomial with ``n_sims`` trials. A
    level is

    - "calibrated" if alpha lies inside the 95% Clopper-Pearson interval of the ECP or
      |ECP - alpha| <= ``tolerance``,
    - "conservative" otherwise if ECP > alpha,
    - "overconfident" otherwise (ECP < alpha).

    Each level alone misjudges a calibrated posterior with probability about 5% when
    the band is wider than ``tolerance``. Over many levels the overall verdict does so
    more often. With ``tolerance`` 0.05 and a few hundred simulations or more, the band
    is narrower than the tolerance and these false alarms vanish.

    Parameters
    ----------
    credibilities : ndarray, shape (n_sims,)
        HPD credibility of the truth in each simulation, e.g. from
        :func:`hpd_credibilities`.
    levels : ndarray, shape (n_levels,), optional
        Credibility levels in [0, 1]; default 21 levels from 0 to 1 in steps of 0.05.
    tolerance : float
        Deviation |ECP - alpha| accepted without regard to the band. The default 0.05 is
        the validation target |ECP - alpha| <= 0.05 or ECP >= alpha.

    Returns
    -------
    CoverageResult
    """
    values = np.asarray(credibilities, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"credibilities must be a non-empty 1-dim array, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("credibilities contain NaN or infinite values")
    if (values < -_CREDIBILITY_ATOL).any() or (values > 1.0 + _CREDIBILITY_ATOL).any():
        raise ValueError(
            f"credibilities must lie in [0, 1], got values from {values.min():.6g} to "
            f"{values.max():.6g}: pass HPD credibility levels, not densities"
        )
    if not tolerance >= 0.0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    values = np.clip(values, 0.0, 1.0)
    alphas = _check_levels(np.linspace(0.0, 1.0, 21) if levels is None else levels)

    n_sims = values.size
    covered = (values[None, :] <= alphas[:, None]).sum(axis=1)
    ecp = covered / n_sims
    band68_lower, band68_upper = _clopper_pearson(covered, n_sims, 0.68)
    band95_lower, band95_upper = _clopper_pearson(covered, n_sims, 0.95)

    inside_band = (band95_lower <= alphas) & (alphas <= band95_upper)
    within_tolerance = np.abs(ecp - alphas) <= tolerance
    level_verdicts: list[CoverageVerdict] = []
    for acceptable, coverage, alpha in zip(
        inside_band | within_tolerance, ecp, alphas, strict=True
    ):
        if acceptable:
            level_verdicts.append("calibrated")
        elif coverage > alpha:
            level_verdicts.append("conservative")
        else:
            level_verdicts.append("overconfident")
    verdicts = tuple(level_verdicts)
    verdict: CoverageVerdict = "calibrated"
    if "overconfident" in verdicts:
        verdict = "overconfident"
    elif "conservative" in verdicts:
        verdict = "conservative"

    log.debug("expected coverage of %d simulations: %s", n_sims, verdict)
    return CoverageResult(
        levels=_read_only(alphas),
        ecp=_read_only(ecp),
        band68_lower=_read_only(band68_lower),
        band68_upper=_read_only(band68_upper),
        band95_lower=_read_only(band95_lower),
        band95_upper=_read_only(band95_upper),
        verdicts=verdicts,
        verdict=verdict,
        n_sims=n_sims,
        tolerance=float(tolerance),
    )


# ---------------------------------------------------------------------------------------
# TARP
# ---------------------------------------------------------------------------------------


def _check_tarp_inputs(
    samples: np.ndarray, theta_true: np.ndarray, references: np.ndarray | None
) -> None:
    if samples.ndim != 3:
        raise ValueError(
            f"samples must have shape (n_sims, n_samples, dim), got {samples.shape}: "
            "for one parameter add a trailing axis, samples[..., None]"
        )
    n_sims, _, dim = samples.shape
    if theta_true.shape != (n_sims, dim):
        raise ValueError(
            f"theta_true has shape {theta_true.shape}, expected ({n_sims}, {dim}) to match "
            f"samples of shape {samples.shape}"
        )
    if references is not None and references.shape != (n_sims, dim):
        raise ValueError(
            f"references has shape {references.shape}, expected ({n_sims}, {dim}): pass one "
            "reference point per simulation"
        )
    for name, values in (
        ("samples", samples),
        ("theta_true", theta_true),
        ("references", references),
    ):
        if values is not None and not np.isfinite(values).all():
            raise ValueError(f"{name} contains NaN or infinite values")


def _joint_minmax(samples: np.ndarray, theta_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return per-dimension offset and scale from samples and truths pooled together."""
    pooled_min = np.minimum(samples.min(axis=(0, 1)), theta_true.min(axis=0))
    pooled_max = np.maximum(samples.max(axis=(0, 1)), theta_true.max(axis=0))
    span = pooled_max - pooled_min
    if (span <= 0).any():
        constant = np.flatnonzero(span <= 0).tolist()
        raise ValueError(
            f"parameter dimensions {constant} are constant across samples and truths, so "
            "they cannot be normalised: drop fixed parameters before calling tarp"
        )
    return pooled_min, span


def _ball_credibility(
    samples: np.ndarray, theta_true: np.ndarray, references: np.ndarray
) -> np.ndarray:
    """Return, per simulation, the fraction of samples closer to the reference than the truth."""
    sample_distance = np.linalg.norm(samples - references[:, None, :], axis=-1)
    truth_distance = np.linalg.norm(theta_true - references, axis=-1)
    return np.asarray((sample_distance < truth_distance[:, None]).mean(axis=1))


def _ecdf(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Return the empirical CDF of ``values`` at ``levels``."""
    return np.searchsorted(np.sort(values), levels, side="right") / values.size


def _ecdf_area(values: np.ndarray) -> float:
    """Integrate |F(alpha) - alpha| over [0, 1] exactly, F being the ECDF of ``values``.

    F is constant on each interval between consecutive sorted values, and on [a, b]
    with F = c the integral of |alpha - c| is (s(b - c) (b - c)^2 - s(a - c) (a - c)^2) / 2
    with s the sign function.
    """
    edges = np.concatenate(([0.0], np.sort(np.clip(values, 0.0, 1.0)), [1.0]))
    heights = _ecdf(values, edges[:-1])
    start = edges[:-1] - heights
    end = edges[1:] - heights
    return float(0.5 * np.sum(np.sign(end) * end**2 - np.sign(start) * start**2))


def _draw_references(
    rng: np.random.Generator, low: np.ndarray, high: np.ndarray, n_sims: int
) -> np.ndarray:
    return rng.uniform(low, high, size=(n_sims, low.size))


def _bootstrap_bands(
    samples: np.ndarray,
    theta_true: np.ndarray,
    references: np.ndarray | None,
    box: tuple[np.ndarray, np.ndarray],
    levels: np.ndarray,
    n_bootstrap: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Resample simulations, redraw random references and return 68% and 95% ECP bands."""
    n_sims = theta_true.shape[0]
    curves = np.empty((n_bootstrap, levels.size))
    for b in range(n_bootstrap):
        index = rng.integers(0, n_sims, size=n_sims)
        if references is None:
            replicate_references = _draw_references(rng, box[0], box[1], n_sims)
        else:
            replicate_references = references[index]
        f = _ball_credibility(samples[index], theta_true[index], replicate_references)
        curves[b] = _ecdf(f, levels)
    lower95, lower68, upper68, upper95 = np.percentile(curves, [2.5, 16.0, 84.0, 97.5], axis=0)
    return lower68, upper68, lower95, upper95


def tarp(
    samples: np.ndarray,
    theta_true: np.ndarray,
    *,
    rng: np.random.Generator,
    references: np.ndarray | None = None,
    normalize: bool = True,
    n_levels: int = 101,
    n_bootstrap: int = 0,
    tolerance: float = 0.05,
    significance: float = 0.05,
) -> TarpResult:
    """Run the TARP coverage test on posterior samples.

    For simulation i with reference point r_i, f_i is the fraction of posterior samples
    closer to r_i than the truth (Euclidean distance). The ECP curve is the empirical
    CDF of f, which follows the diagonal for a calibrated posterior.

    Normalisation pitfall: the min-max scaling is computed from truths and samples
    pooled together and applied to samples, truths and references alike. Scaling the
    samples (or the samples and the truths separately) by their own statistics
    subtracts any offset shared by all posteriors, which hides a bias: a posterior
    shifted by one sigma in every simulation then passes.

    Parameters
    ----------
    samples : ndarray, shape (n_sims, n_samples, dim)
        Posterior samples for each simulation.
    theta_true : ndarray, shape (n_sims, dim)
        True parameter of each simulation.
    rng : numpy.random.Generator
        Source of the random reference points and bootstrap resamples.
    references : ndarray, shape (n_sims, dim), optional
        Reference points in the units of ``samples``. By default they are drawn
        uniformly in the bounding box of samples and truths.
    normalize : bool
        Whether to rescale every dimension to [0, 1] with the joint minimum and maximum
        of samples and truths before computing distances, so that dimensions with
        large units do not dominate them.
    n_levels : int
        Number of evenly spaced levels in [0, 1] at which the curve is returned. The
        area and KS statistic are exact and do not depend on it.
    n_bootstrap : int
        Number of bootstrap replicates for the bands of the curve; 0 skips them. Each
        replicate resamples simulations with replacement and redraws the default
        references.
    tolerance : float
        Maximum |ECP - alpha| accepted as calibrated however significant it is.
    significance : float
        KS p-value below which a deviation larger than ``tolerance`` is miscalibrated.

    Returns
    -------
    TarpResult
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator, got {type(rng).__name__}: "
            "pass numpy.random.default_rng(seed)"
        )
    samples = np.asarray(samples, dtype=float)
    theta_true = np.asarray(theta_true, dtype=float)
    references = None if references is None else np.asarray(references, dtype=float)
    _check_tarp_inputs(samples, theta_true, references)
    if n_levels < 2:
        raise ValueError(f"n_levels must be at least 2, got {n_levels}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    if not 0.0 < significance < 1.0:
        raise ValueError(f"significance must lie in (0, 1), got {significance}")
    if not tolerance >= 0.0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")

    # Normalise: one transform for samples, truths and references, see the docstring.
    if normalize:
        offset, scale = _joint_minmax(samples, theta_true)
        samples = (samples - offset) / scale
        theta_true = (theta_true - offset) / scale
        if references is not None:
            references = (references - offset) / scale
    box_low = np.minimum(samples.min(axis=(0, 1)), theta_true.min(axis=0))
    box_high = np.maximum(samples.max(axis=(0, 1)), theta_true.max(axis=0))

    # Coverage curve
    n_sims, n_samples, _ = samples.shape
    if references is None:
        used_references = _draw_references(rng, box_low, box_high, n_sims)
    else:
        used_references = references
    ball_credibility = _ball_credibility(samples, theta_true, used_references)
    levels = np.linspace(0.0, 1.0, n_levels)
    ecp = _ecdf(ball_credibility, levels)

    # Summary statistics and verdict
    area = _ecdf_area(ball_credibility)
    ks = stats.kstest(ball_credibility, "uniform")
    calibrated = ks.pvalue >= significance or ks.statistic <= tolerance
    verdict: TarpVerdict = "calibrated" if calibrated else "miscalibrated"

    bands: tuple[np.ndarray | None, ...] = (None, None, None, None)
    if n_bootstrap > 0:
        bands = tuple(
            _read_only(band)
            for band in _bootstrap_bands(
                samples, theta_true, references, (box_low, box_high), levels, n_bootstrap, rng
            )
        )

    log.debug(
        "TARP on %d simulations: area %.4g, KS %.4g (p=%.3g), %s",
        n_sims,
        area,
        ks.statistic,
        ks.pvalue,
        verdict,
    )
    return TarpResult(
        levels=_read_only(levels),
        ecp=_read_only(ecp),
        ball_credibility=_read_only(ball_credibility),
        area=area,
        ks_statistic=float(ks.statistic),
        ks_pvalue=float(ks.pvalue),
        verdict=verdict,
        tolerance=float(tolerance),
        significance=float(significance),
        n_sims=n_sims,
        n_samples=n_samples,
        normalized=normalize,
        n_bootstrap=n_bootstrap,
        band68_lower=bands[0],
        band68_upper=bands[1],
        band95_lower=bands[2],
        band95_upper=bands[3],
    )


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------


def _figure_and_axes(ax: Axes | None) -> tuple[Figure, Axes]:
    """Return the figure of ``ax``, or a new pyplot-free figure, which any backend can save."""
    # Imported here so that workers using only the statistics do not load matplotlib.
    from matplotlib.figure import Figure

    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    figure = Figure(figsize=(4.5, 4.5), layout="constrained")
    return figure, figure.add_subplot()


def _draw_diagonal(ax: Axes) -> None:
    ax.plot([0.0, 1.0], [0.0, 1.0], color="black", linestyle="--", linewidth=1, label="ideal")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_aspect("equal")
    ax.set_xlabel(r"credibility level $\alpha$")
    ax.set_ylabel("expected coverage")


def plot_coverage(result: CoverageResult, ax: Axes | None = None) -> Figure:
    """Plot the ECP of HPD regions against alpha with its binomial bands and the diagonal.

    Parameters
    ----------
    result : CoverageResult
        Output of :func:`expected_coverage`.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; by default a new figure is created without pyplot.

    Returns
    -------
    matplotlib.figure.Figure
    """
    figure, ax = _figure_and_axes(ax)
    _draw_diagonal(ax)
    color = "tab:blue"
    ax.fill_between(
        result.levels,
        result.band95_lower,
        result.band95_upper,
        color=color,
        alpha=0.2,
        linewidth=0,
        label="95% binomial",
    )
    ax.fill_between(
        result.levels,
        result.band68_lower,
        result.band68_upper,
        color=color,
        alpha=0.35,
        linewidth=0,
        label="68% binomial",
    )
    ax.plot(result.levels, result.ecp, color=color, marker=".", label="ECP")
    ax.set_title(f"HPD coverage, {result.n_sims} simulations: {result.verdict}")
    ax.legend(loc="upper left")
    return figure


def plot_tarp(result: TarpResult, ax: Axes | None = None) -> Figure:
    """Plot the TARP ECP curve against alpha with bootstrap bands and the diagonal.

    Parameters
    ----------
    result : TarpResult
        Output of :func:`tarp`; bands are drawn only if it was run with bootstrap.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; by default a new figure is created without pyplot.

    Returns
    -------
    matplotlib.figure.Figure
    """
    figure, ax = _figure_and_axes(ax)
    _draw_diagonal(ax)
    color = "tab:orange"
    if result.band95_lower is not None and result.band95_upper is not None:
        ax.fill_between(
            result.levels,
            result.band95_lower,
            result.band95_upper,
            color=color,
            alpha=0.2,
            linewidth=0,
            label="95% bootstrap",
        )
    if result.band68_lower is not None and result.band68_upper is not None:
        ax.fill_between(
            result.levels,
            result.band68_lower,
            result.band68_upper,
            color=color,
            alpha=0.35,
            linewidth=0,
            label="68% bootstrap",
        )
    ax.plot(result.levels, result.ecp, color=color, label="TARP ECP")
    ax.text(
        0.97,
        0.03,
        f"area {result.area:.3f}\nKS {result.ks_statistic:.3f} (p = {result.ks_pvalue:.2g})",
        transform=ax.transAxes,
        ha="right",
        va="bottom",
    )
    ax.set_title(f"TARP, {result.n_sims} simulations: {result.verdict}")
    ax.legend(loc="upper left")
    return figure
