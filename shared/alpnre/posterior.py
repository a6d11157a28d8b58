"""Posteriors of the ALP parameters for an observed spectrum x_o.

The trained estimator gives log r(x_o|θ) = log p(θ|x_o) - log p(θ) for each marginal,
so on a grid of the axis variable u (log10 of log-uniform parameters, the value
otherwise) the posterior density is

.. math::
    p(u | x_o) \\propto r(x_o | u)\\, p(u),

normalised on the grid. From it come the 1-dim marginals, the 2-dim (log10 m, log10 g)
density, highest-posterior-density (HPD) regions, the MAP and the posterior mean. It
also gives the 95 % upper limit on g as a function of m, the exclusion curve. For each
mass, that limit is the coupling below which 95 % of the conditional posterior lies.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from alpnre.nre import ParameterAxis
from alpnre.registry import LoadedEstimator
from alpnre.validation import hpd_mask, hpd_threshold

__all__ = [
    "Marginal1D",
    "Marginal2D",
    "Posterior",
    "check_observation",
    "compute_posterior",
    "plot_posterior",
]

log = logging.getLogger(__name__)

DEFAULT_LEVELS = (0.68, 0.95)


def check_observation(counts: Any, n_bins: int) -> np.ndarray:
    """Validate an observed count spectrum and return it as float64 of shape (n_bins,).

    Raises
    ------
    ValueError
        For a wrong length, or values that are negative, NaN, infinite or not integers.
    """
    values = np.asarray(counts, dtype=object)
    if values.ndim == 1 and not all(
        isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
        for value in values
    ):
        raise ValueError(
            "observation must be a list of numbers (counts per energy bin); strings, null "
            "and booleans are not accepted"
        )
    try:
        x = np.asarray(counts, dtype=float)
    except (TypeError, ValueError):
        raise ValueError("observation must be a list of numbers (counts per energy bin)") from None
    if x.ndim != 1:
        raise ValueError(f"observation must be a 1-dim list of counts, got shape {x.shape}")
    if x.size != n_bins:
        raise ValueError(
            f"observation has {x.size} energy bins, the estimator expects {n_bins}: use the "
            "energy binning of the estimator's config"
        )
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise ValueError(f"observation has NaN or infinite counts in bins {bad[:10].tolist()}")
    negative = np.flatnonzero(x < 0)
    if negative.size:
        raise ValueError(
            f"observation has negative counts in bins {negative[:10].tolist()}: give observed "
            "event counts in the on region, not background-subtracted excess"
        )
    fractional = np.flatnonzero(x != np.round(x))
    if fractional.size:
        raise ValueError(
            f"observation has non-integer counts in bins {fractional[:10].tolist()}: give "
            "observed event counts, not rates or excess"
        )
    return x


def _log_ratios_2d(model: Any, features: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """2-dim log-ratios of shape (B, n_2d), without evaluating the 1-dim heads.

    Same values as ``model.log_ratios(features, theta)["2d"]``. On the grid_size^2 grid
    the 1-dim heads would do two thirds of the work for nothing. ``features`` may have
    one row, shared by every θ, or one row per θ.
    """
    columns = torch.cat([theta[:, [a, b]] for a, b in model.pairs_2d], dim=1)
    fast = _shared_features_log_ratios(model.head_2d, features, columns)
    if fast is not None:
        return fast
    out = model.head_2d(features.expand(len(theta), -1), columns)
    # swyft's LogRatioEstimator_Ndim returns LogRatioSamples, other heads a tensor.
    return getattr(out, "logratios", out)


def _shared_features_log_ratios(
    head: Any, features: torch.Tensor, theta_pairs: torch.Tensor
) -> torch.Tensor | None:
    """Evaluate a :class:`PairRatioHead` for one feature vector and many θ pairs.

    The head's first layer acts on [features, θ pair]. On a posterior grid the feature
    part is the same in every row, so it is computed once. The rest of the network
    runs as plain matrix products with fused bias. Returns None when the head
    is not a ReLU residual network without batch norm or spectral embedding (then the
    caller runs the module itself). On a 100 x 100 grid with the default sizes this
    took 4.4 ms against 7.4 ms for the module's forward on a 2-core x86 CPU, with
    the same values to float32 rounding (tests/test_posterior.py).
    """
    from swyft.networks.channelized import ResidualNetWithChannel

    from alpnre.nre import PairRatioHead

    if not isinstance(head, PairRatioHead) or head.training or features.shape[0] != 1:
        return None
    classifier = head.classifier
    net = getattr(classifier, "net", None)
    if getattr(classifier, "Lmax", 0) != 0 or not isinstance(net, ResidualNetWithChannel):
        return None
    if any(
        block.use_batch_norm or block.activation is not torch.nn.functional.relu
        for block in net.blocks
    ):
        return None
    n_features = features.shape[1]
    # The first layer is linear in the encoded pairs, so encoding them first is exact.
    pairs = head.encode(theta_pairs.reshape(len(theta_pairs), head.n_pairs, 2))
    outputs = []
    for channel in range(head.n_pairs):
        weights = net.initial_layer.weights[channel]
        shared = net.initial_layer.bias[channel] + features[0] @ weights[:, :n_features].T
        hidden = torch.addmm(shared, pairs[:, channel], weights[:, n_features:].T)
        for block in net.blocks:
            first, second = block.linear_layers
            inner = torch.addmm(first.bias[channel], torch.relu(hidden), first.weights[channel].T)
            inner.relu_()
            # Dropout is the identity in evaluation mode; the block adds its input back.
            hidden = torch.addmm(hidden, inner, second.weights[channel].T).add_(
                second.bias[channel]
            )
        final = net.final_layer
        outputs.append(torch.addmm(final.bias[channel], hidden, final.weights[channel].T))
    return torch.cat(outputs, dim=1)


def _axis_grid(axis: ParameterAxis, size: int) -> np.ndarray:
    return np.linspace(axis.low, axis.high, size)


def _log_prior_on_axis(
    estimator: LoadedEstimator, axis: ParameterAxis, u: np.ndarray
) -> np.ndarray:
    """Log prior density of the axis variable u (includes the Jacobian of log10)."""
    prior = estimator.config.prior(axis.name)
    values = axis.from_axis(u)
    log_density = np.asarray(prior.log_prob(values), dtype=float)
    if axis.log10:
        log_density = log_density + np.log(values * math.log(10.0))
    return log_density


def _normalised(log_density: np.ndarray, cell_volume: float) -> np.ndarray:
    finite = np.isfinite(log_density)
    if not finite.any():
        raise ValueError("posterior is zero everywhere on the grid")
    shifted = np.where(finite, log_density - log_density[finite].max(), -np.inf)
    density = np.exp(shifted)
    return density / (density.sum() * cell_volume)


@dataclass
class Marginal1D:
    """1-dim marginal posterior of one parameter on a grid of its axis variable."""

    name: str
    label: str
    grid: np.ndarray
    density: np.ndarray
    log_ratio: np.ndarray
    log_prior: np.ndarray
    levels: Sequence[float]

    @property
    def mean(self) -> float:
        return float(np.sum(self.grid * self.density) / np.sum(self.density))

    @property
    def map(self) -> float:
        return float(self.grid[int(np.argmax(self.density))])

    def interval(self, level: float) -> list[list[float]]:
        """HPD region at ``level`` as a list of [low, high] intervals of the axis variable."""
        mask = hpd_mask(self.density, level)
        intervals, start = [], None
        for i, inside in enumerate(mask):
            if inside and start is None:
                start = i
            if start is not None and (not inside or i == len(mask) - 1):
                stop = i if inside else i - 1
                intervals.append([float(self.grid[start]), float(self.grid[stop])])
                start = None
        return intervals

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "axis": self.label,
            "grid": self.grid.tolist(),
            "density": self.density.tolist(),
            "log_ratio": _finite_or_none(self.log_ratio),
            "map": self.map,
            "mean": self.mean,
            "hpd_intervals": {f"{level:g}": self.interval(level) for level in self.levels},
        }


@dataclass
class Marginal2D:
    """2-dim marginal posterior on a (n_x, n_y) grid: density[i, j] at (grid_x[i], grid_y[j])."""

    names: tuple[str, str]
    labels: tuple[str, str]
    grid_x: np.ndarray
    grid_y: np.ndarray
    density: np.ndarray
    levels: Sequence[float]

    @property
    def map(self) -> tuple[float, float]:
        i, j = np.unravel_index(int(np.argmax(self.density)), self.density.shape)
        return float(self.grid_x[i]), float(self.grid_y[j])

    _thresholds: dict[float, float] = field(default_factory=dict, repr=False, compare=False)

    def threshold(self, level: float) -> float:
        """Density threshold of the ``level`` HPD region (computed once per level)."""
        if level not in self._thresholds:
            self._thresholds[level] = hpd_threshold(self.density, level)
        return self._thresholds[level]

    def upper_limit_curve(self, level: float = 0.95) -> np.ndarray:
        """Upper limit on the second parameter for each value of the first, shape (n_x,).

        For each grid_x value the conditional posterior over grid_y is integrated from
        below; the limit is where it reaches ``level`` (linear interpolation between
        grid points). Rows without posterior mass give NaN.
        """
        cumulative = np.cumsum(self.density, axis=1)
        total = cumulative[:, -1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            cumulative = cumulative / total
        limits = np.full(len(self.grid_x), np.nan)
        rows = np.flatnonzero(total[:, 0] > 0)
        if rows.size == 0:
            return limits
        cumulative = cumulative[rows]
        # First grid point where the conditional CDF reaches the level; the CDF ends at 1.
        upper = np.argmax(cumulative >= level, axis=1)
        lower = np.maximum(upper - 1, 0)
        below = np.take_along_axis(cumulative, lower[:, None], axis=1)[:, 0]
        above = np.take_along_axis(cumulative, upper[:, None], axis=1)[:, 0]
        step = np.where(above > below, above - below, 1.0)
        fraction = np.where(upper > 0, (level - below) / step, 0.0)
        grid = self.grid_y
        limits[rows] = grid[lower] + np.clip(fraction, 0.0, 1.0) * (grid[upper] - grid[lower])
        return limits

    def contours(self, level: float) -> list[list[list[float]]]:
        """Polylines of the HPD region's boundary at ``level``, in axis coordinates."""
        import contourpy

        generator = contourpy.contour_generator(self.grid_y, self.grid_x, self.density)
        lines: list[np.ndarray] = generator.lines(self.threshold(level))  # type: ignore[assignment]
        # contourpy returns (x=grid_y, y=grid_x) points; swap to (grid_x, grid_y).
        return [line[:, ::-1].tolist() for line in lines]

    def to_dict(self, *, compact: bool = False) -> dict[str, Any]:
        """JSON-ready summary.

        With ``compact`` the density is a float32 array and the HPD masks are uint8
        arrays, for orjson's numpy output: about half the bytes of the default plain
        lists, at a relative precision of 6e-8 that no estimator comes close to.
        """
        masks = {
            f"{level:g}": (self.density >= self.threshold(level)).astype(np.uint8)
            for level in self.levels
        }
        return {
            "names": list(self.names),
            "axes": list(self.labels),
            "grid_x": self.grid_x.tolist(),
            "grid_y": self.grid_y.tolist(),
            "density": self.density.astype(np.float32) if compact else self.density.tolist(),
            "map": list(self.map),
            "hpd_masks": masks if compact else {key: m.tolist() for key, m in masks.items()},
            "hpd_contours": {f"{level:g}": self.contours(level) for level in self.levels},
            "upper_limit_95": {
                "axis": self.labels[0],
                "grid": self.grid_x.tolist(),
                "limit": _finite_or_none(self.upper_limit_curve(0.95)),
                "limit_axis": self.labels[1],
            },
        }


def _finite_or_none(values: np.ndarray) -> list[float | None]:
    """JSON-safe list: finite floats, None for NaN or infinities."""
    return [float(v) if math.isfinite(v) else None for v in np.asarray(values, dtype=float)]


@dataclass
class Posterior:
    """Posterior of one observation: marginals plus provenance."""

    one_dim: dict[str, Marginal1D]
    two_dim: dict[str, Marginal2D]
    estimator_id: str
    checksum: str
    levels: Sequence[float]
    prior: dict[str, Any]
    seconds: float
    truth: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, *, compact: bool = False) -> dict[str, Any]:
        """JSON-ready summary; ``compact`` as in :meth:`Marginal2D.to_dict`."""
        return {
            "estimator_id": self.estimator_id,
            "estimator_checksum": self.checksum,
            "levels": list(self.levels),
            "prior": self.prior,
            "marginals_1d": {name: m.to_dict() for name, m in self.one_dim.items()},
            "marginals_2d": {name: m.to_dict(compact=compact) for name, m in self.two_dim.items()},
            "truth": self.truth,
            "timing_s": self.seconds,
            **self.extra,
        }


@torch.no_grad()
def compute_posterior(
    estimator: LoadedEstimator,
    x_o: Any,
    *,
    grid_size: int = 100,
    levels: Sequence[float] = DEFAULT_LEVELS,
    marginals: Sequence[str] | None = None,
    truth: dict[str, float] | None = None,
) -> Posterior:
    """Evaluate the posterior of an observed count spectrum on grids.

    Parameters
    ----------
    x_o
        Observed counts, shape (n_bins,), non-negative integers.
    grid_size
        Points per parameter axis; the 2-dim grid has grid_size^2 points.
    marginals
        Names of the 1-dim marginals to return; default all the estimator has.
    truth
        Known true parameter values (physical units) to record, e.g. for a simulation.
    """
    start = time.perf_counter()
    if not 4 <= grid_size <= 1000:
        raise ValueError(f"grid_size must lie in [4, 1000], got {grid_size}")
    for level in levels:
        if not 0 < level < 1:
            raise ValueError(f"credibility levels must lie in (0, 1), got {level}")
    spec = estimator.spec
    x = check_observation(x_o, spec.n_bins)
    wanted = list(marginals) if marginals is not None else list(spec.one_dim)
    unknown = [name for name in wanted if name not in spec.one_dim]
    if unknown:
        raise ValueError(f"no 1-dim estimator for {unknown}; available: {spec.one_dim}")

    model = estimator.model
    device = next(model.parameters()).device
    features = model.embedding(torch.as_tensor(x[None, :], dtype=torch.float32, device=device))
    n_params = len(spec.axes)

    # 1-dim marginals: all heads evaluated on one shared grid index.
    theta = np.zeros((grid_size, n_params), dtype=np.float32)
    grids = {}
    for column, axis in enumerate(spec.axes):
        grids[axis.name] = _axis_grid(axis, grid_size)
        theta[:, column] = axis.standardise(grids[axis.name])
    log_ratios = model.log_ratios(
        features.expand(grid_size, -1), torch.as_tensor(theta, device=device)
    )
    one_dim = {}
    for k, name in enumerate(spec.one_dim):
        if name not in wanted:
            continue
        axis = spec.axis(name)
        grid = grids[name]
        log_ratio = log_ratios["1d"][:, k].double().cpu().numpy()
        log_prior = _log_prior_on_axis(estimator, axis, grid)
        density = _normalised(log_ratio + log_prior, float(grid[1] - grid[0]))
        one_dim[name] = Marginal1D(name, axis.label, grid, density, log_ratio, log_prior, levels)

    # 2-dim marginals on the full grid_size x grid_size grid.
    two_dim = {}
    for k, (name_x, name_y) in enumerate(spec.two_dim):
        axis_x, axis_y = spec.axis(name_x), spec.axis(name_y)
        grid_x, grid_y = grids[name_x], grids[name_y]
        mesh_x, mesh_y = np.meshgrid(grid_x, grid_y, indexing="ij")
        theta2 = np.zeros((grid_size * grid_size, n_params), dtype=np.float32)
        theta2[:, spec.parameter_names.index(name_x)] = axis_x.standardise(mesh_x.ravel())
        theta2[:, spec.parameter_names.index(name_y)] = axis_y.standardise(mesh_y.ravel())
        out = _log_ratios_2d(model, features, torch.as_tensor(theta2, device=device))
        log_ratio = out[:, k].double().cpu().numpy().reshape(grid_size, grid_size)
        log_prior = (
            _log_prior_on_axis(estimator, axis_x, grid_x)[:, None]
            + _log_prior_on_axis(estimator, axis_y, grid_y)[None, :]
        )
        cell = float((grid_x[1] - grid_x[0]) * (grid_y[1] - grid_y[0]))
        density = _normalised(log_ratio + log_prior, cell)
        key = f"{name_x}__{name_y}"
        two_dim[key] = Marginal2D(
            (name_x, name_y), (axis_x.label, axis_y.label), grid_x, grid_y, density, levels
        )

    prior = {
        axis.name: estimator.config.prior(axis.name).model_dump(mode="json") for axis in spec.axes
    }
    return Posterior(
        one_dim=one_dim,
        two_dim=two_dim,
        estimator_id=estimator.estimator_id,
        checksum=estimator.checksum,
        levels=list(levels),
        prior=prior,
        seconds=time.perf_counter() - start,
        truth=truth,
        extra={
            "irf_id": estimator.metadata.get("irf_id"),
            "irf_is_approximation": estimator.metadata.get("irf_is_approximation"),
        },
    )


def plot_posterior(posterior: Posterior, path: str | None = None) -> Any:
    """Corner plot: 1-dim marginals on the diagonal, the (log10 m, log10 g) density below.

    HPD regions are drawn as filled contours at each credibility level; a known truth
    is marked. Returns the matplotlib figure and saves it when ``path`` is given.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = next(iter(posterior.two_dim))
    joint = posterior.two_dim[key]
    name_x, name_y = joint.names
    figure, axes = plt.subplots(2, 2, figsize=(7.5, 7), layout="constrained")
    truth = posterior.truth or {}

    def truth_on_axis(name: str, label: str) -> float | None:
        if name not in truth:
            return None
        return math.log10(truth[name]) if label.startswith("log10") else truth[name]

    for position, name in ((0, name_x), (1, name_y)):
        axis = axes[position, position]
        marginal = posterior.one_dim.get(name)
        if marginal is None:
            axis.set_visible(False)
            continue
        axis.plot(marginal.grid, marginal.density, color="C0")
        for level, alpha in zip(sorted(posterior.levels, reverse=True), (0.2, 0.4), strict=False):
            mask = hpd_mask(marginal.density, level)
            axis.fill_between(
                marginal.grid, 0, marginal.density, where=mask, alpha=alpha, color="C0"
            )
        true_value = truth_on_axis(name, marginal.label)
        if true_value is not None:
            axis.axvline(true_value, color="C3", ls="--", label="truth")
        axis.set_xlabel(marginal.label)
        axis.set_ylabel("posterior density")
        axis.set_yticks([])

    axis = axes[1, 0]
    axis.pcolormesh(joint.grid_x, joint.grid_y, joint.density.T, cmap="Blues", shading="auto")
    # Higher levels have lower density thresholds. Levels whose regions are the same
    # cells (a posterior concentrated on a few cells) share one contour, because
    # matplotlib needs strictly increasing contour levels.
    thresholds: list[float] = []
    labels: list[float] = []
    for threshold, level in sorted(
        (hpd_threshold(joint.density, level), level) for level in posterior.levels
    ):
        if not thresholds or threshold > thresholds[-1]:
            thresholds.append(threshold)
            labels.append(level)
    contour = axis.contour(
        joint.grid_x,
        joint.grid_y,
        joint.density.T,
        levels=thresholds,
        colors=["k", "k"],
        linestyles=["--", "-"][: len(thresholds)],
    )
    axis.clabel(contour, fmt={t: f"{lv:.0%}" for t, lv in zip(thresholds, labels, strict=False)})
    axis.plot(
        joint.grid_x,
        joint.upper_limit_curve(0.95),
        color="C1",
        lw=1.5,
        label="95 % upper limit on g",
    )
    true_x, true_y = truth_on_axis(name_x, joint.labels[0]), truth_on_axis(name_y, joint.labels[1])
    if true_x is not None and true_y is not None:
        axis.plot(true_x, true_y, marker="*", color="C3", ms=14, ls="none", label="truth")
    axis.set_xlabel(f"{joint.labels[0]}  [m in neV]")
    axis.set_ylabel(f"{joint.labels[1]}  [g in GeV$^{{-1}}$]")
    axis.legend(loc="lower left", fontsize=8)
    axes[0, 1].set_visible(False)
    figure.suptitle(f"Posterior, estimator {posterior.estimator_id}", fontsize=9)
    if path is not None:
        figure.savefig(path, dpi=130)
    return figure
