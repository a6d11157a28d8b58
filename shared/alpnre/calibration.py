"""Validation of a trained estimator on fresh simulations: HPD coverage, TARP, exact posteriors.

:func:`validate_estimator` simulates held-out pairs (θ*, x) from the estimator's config,
evaluates each posterior on grids of the axis variables (log10 m, log10 g and their
2-dim joint, plus any nuisance marginal the estimator has) and reports

- the expected coverage probability (ECP) of HPD regions of every marginal, with
  Clopper-Pearson bands and a verdict (calibrated, conservative or overconfident), see
  :func:`alpnre.validation.expected_coverage`;
- TARP on the 2-dim (log10 m, log10 g) marginal, from posterior samples drawn from the
  grid posterior and jittered uniformly within their cells, see
  :func:`alpnre.validation.tarp` (samples, truths and references share one min-max
  normalisation);
- optionally, for configs with an explicit likelihood, the Jensen-Shannon divergence
  from the exact posterior and the shift of the 95 % upper limits on g
  (:mod:`alpnre.exact`).

Held-out simulations
    Batch i of the held-out set is simulated from
    ``SeedSequence(seed, spawn_key=(HELD_OUT_STREAM, 0, i))``. Simulation runs use
    spawn keys of length one (``(batch_index,)``, see
    :func:`alpnre.simulate.batch_seed_sequence`), so no seed, not even a training run's,
    reproduces a training batch. The default seed is derived from the estimator's
    checksum, and the report records the seed.

Output
    ``<estimator folder>/validation/`` receives ``report.json``, ``coverage.png``,
    ``tarp.png`` and, with the exact comparison, ``exact.png``. The estimator's checksum
    covers ``weights.pt`` and ``estimator.json`` only, so adding this folder to a
    published (immutable) estimator leaves its checksum valid. The folder is not
    covered by it, and the report names the checksum of the estimator it validates.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import special

import alpnre
from alpnre.config import AnalysisConfig, config_hash
from alpnre.exact import (
    DEFAULT_SUBCELLS,
    ExactComparison,
    check_exact_config,
    compare_with_exact,
    exact_posterior,
    plot_exact_comparison,
    refine_exact_posterior,
    subcell_nodes,
)
from alpnre.nre import ParameterAxis, RatioEstimator
from alpnre.physics.irf import InstrumentResponse, load_instrument_response
from alpnre.posterior import _log_prior_on_axis
from alpnre.registry import LoadedEstimator, load_estimator
from alpnre.simulate import simulate_batch
from alpnre.validation import (
    CoverageResult,
    CoverageVerdict,
    TarpResult,
    expected_coverage,
    hpd_credibilities,
    plot_coverage,
    plot_tarp,
    tarp,
)

__all__ = [
    "HELD_OUT_STREAM",
    "REPORT_SCHEMA_VERSION",
    "VALIDATION_FOLDER",
    "GridMarginal",
    "HeldOutSet",
    "ValidationReport",
    "cell_averaged_probabilities",
    "default_validation_seed",
    "densities_at_truths",
    "grid_posteriors",
    "held_out_seed_sequence",
    "sample_grid_posterior",
    "simulate_held_out",
    "validate_estimator",
]

log = logging.getLogger(__name__)

# Spawn-key namespace of held-out simulations ("val" in ASCII).
HELD_OUT_STREAM = 0x76616C
VALIDATION_FOLDER = "validation"
REPORT_NAME = "report.json"
REPORT_SCHEMA_VERSION = 1
# Largest difference between the two ECP estimates of ValidationReport.grid_check that
# still counts as resolved: about the 68 % binomial half-width at alpha = 0.5 for 1000
# simulations (0.016).
GRID_RESOLUTION_TOLERANCE = 0.02
CHECKSUM_NOTE = (
    "The validation folder was added after the estimator was saved. The estimator "
    "checksum covers weights.pt and estimator.json only, so this report is not part of "
    "it; estimator_checksum names the estimator that the report validates."
)

DEFAULT_GRID_SIZE = 64
# Cells of the 1-dim grids. They cost grid_size_1d evaluations per observation against
# grid_size^2 for the 2-dim grid, so they can be much finer. With 256 cells per axis,
# the 1-dim grid checks of a fixed-field estimator still failed.
DEFAULT_GRID_SIZE_1D = 1024
DEFAULT_POSTERIOR_SAMPLES = 1000
DEFAULT_EXACT_OBSERVATIONS = 50
TARP_BOOTSTRAP = 100
_SIMULATION_BATCH = 250
# Elements of the largest hidden-layer tensor of one chunk of the grid evaluation.
_CHUNK_ELEMENTS = 2**23
# Tolerance of the fast grid evaluation against the network's own forward, in float32.
_FAST_PATH_ATOL = 1e-4


# ---------------------------------------------------------------------------------------
# Held-out simulations
# ---------------------------------------------------------------------------------------


def default_validation_seed(checksum: str) -> int:
    """Derive a validation seed in [0, 2^60) from an estimator checksum."""
    digest = hashlib.sha256(f"alpnre-validation:{checksum}".encode()).hexdigest()
    return int(digest[:15], 16)


def held_out_seed_sequence(seed: int, batch_index: int) -> np.random.SeedSequence:
    """Seed sequence of held-out batch ``batch_index``, disjoint from simulation runs."""
    return np.random.SeedSequence(seed, spawn_key=(HELD_OUT_STREAM, 0, batch_index))


def _statistics_rng(seed: int) -> np.random.Generator:
    """Generator of the ties, posterior samples and TARP references of a validation."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(HELD_OUT_STREAM, 1)))


@dataclass
class HeldOutSet:
    """Simulations that no training saw.

    Attributes
    ----------
    theta : dict of str to ndarray, each of shape (n_simulations,)
        True parameters in physical units, keyed by parameter name.
    counts : ndarray, shape (n_simulations, n_bins)
        Observed counts.
    seed : int
        Seed of :func:`held_out_seed_sequence`.
    irf_id : str
        Instrument response the spectra were simulated with.
    seconds : float
        Time spent simulating.
    """

    theta: dict[str, np.ndarray]
    counts: np.ndarray
    seed: int
    irf_id: str
    seconds: float = 0.0

    @property
    def n_simulations(self) -> int:
        return len(self.counts)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def simulate_held_out(
    config: AnalysisConfig,
    n_simulations: int,
    seed: int,
    *,
    instrument: InstrumentResponse | None = None,
    progress: bool = False,
) -> HeldOutSet:
    """Simulate ``n_simulations`` held-out spectra with parameters drawn from the priors.

    Batches of 250 simulations use :func:`held_out_seed_sequence`, so the set depends
    only on ``(config, n_simulations, seed)``.
    """
    from tqdm.auto import tqdm

    if n_simulations < 1:
        raise ValueError(f"n_simulations must be >= 1, got {n_simulations}")
    seed = _check_seed(seed)
    instrument = instrument or load_instrument_response(config)
    start = time.perf_counter()
    thetas: dict[str, list[np.ndarray]] = {name: [] for name in config.parameter_names}
    counts = []
    n_batches = -(-n_simulations // _SIMULATION_BATCH)
    for batch_index in tqdm(range(n_batches), desc="held-out simulations", disable=not progress):
        first = batch_index * _SIMULATION_BATCH
        rows = min(_SIMULATION_BATCH, n_simulations - first)
        table = simulate_batch(
            config,
            rows,
            held_out_seed_sequence(seed, batch_index),
            first_sim_index=first,
            instrument=instrument,
        )
        for name in config.parameter_names:
            thetas[name].append(table.column(name).to_numpy())
        flat = table.column("counts").combine_chunks().flatten().to_numpy()
        counts.append(flat.reshape(rows, -1).astype(np.float64))
    seconds = time.perf_counter() - start
    log.info("simulated %d held-out spectra (seed %d) in %.1f s", n_simulations, seed, seconds)
    return HeldOutSet(
        theta={name: np.concatenate(values) for name, values in thetas.items()},
        counts=np.concatenate(counts),
        seed=seed,
        irf_id=instrument.irf_id,
        seconds=seconds,
    )


# ---------------------------------------------------------------------------------------
# Posteriors of many observations on grids
# ---------------------------------------------------------------------------------------


def _cell_centres(axis: ParameterAxis, size: int) -> np.ndarray:
    """Centres of ``size`` equal cells that tile [axis.low, axis.high].

    Cells that tile the prior support keep samples jittered within a cell inside it.
    """
    step = (axis.high - axis.low) / size
    return axis.low + (np.arange(size) + 0.5) * step


@dataclass
class GridMarginal:
    """Posteriors of many observations for one marginal on a regular grid.

    Attributes
    ----------
    names, labels : tuple of str
        Parameter names and axis labels (``log10(name)`` for log-uniform priors).
    grids : tuple of ndarray
        Cell centres along each axis, each of shape (grid_size,).
    probabilities : ndarray, shape (n_obs, grid_size) or (n_obs, grid_size, grid_size)
        Cell probabilities, summing to 1 for each observation.
    log_normaliser : ndarray, shape (n_obs,), optional
        Log of the sum over cells of the unnormalised density at the cell centres:
        the density at any θ divided by exp(log_normaliser) is on the scale of
        ``probabilities``.
    """

    names: tuple[str, ...]
    labels: tuple[str, ...]
    grids: tuple[np.ndarray, ...]
    probabilities: np.ndarray
    log_normaliser: np.ndarray | None = None

    @property
    def key(self) -> str:
        return "__".join(self.names)


def _softmax_cells(log_density: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalise log densities of shape (n_obs, *grid) to cell probabilities per observation.

    Returns the probabilities and the log normaliser of each observation, shape (n_obs,).
    """
    axes = tuple(range(1, log_density.ndim))
    finite = np.where(np.isfinite(log_density), log_density, -np.inf)
    peak = finite.max(axis=axes, keepdims=True)
    if not np.isfinite(peak).all():
        raise ValueError("a posterior is zero on every grid cell: the prior has no support there")
    weights = np.exp(finite - peak)
    total = weights.sum(axis=axes, keepdims=True)
    return weights / total, (peak + np.log(total)).reshape(-1)


class _ProductLogRatios:
    """Log-ratios of every (observation, θ) pair of a batch of features and a grid of θ.

    The standard :class:`~alpnre.nre.RatioEstimator` is evaluated without materialising
    the pairs. The first layer of a head is split into a feature part (one row per
    observation) and a parameter part (one row per grid point). swyft's channelled
    linear layers, which multiply one matrix-vector pair per row, are replaced by
    batched matrix products. The result is checked against the network's own forward
    on a few pairs. Subclasses that override ``log_ratios`` (wrappers), and networks
    that fail the check, use the network's forward on all pairs, which is slower.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        # Typed Any: the heads and swyft layers below are reached by attribute.
        self.model: Any = model
        self.fast = (
            isinstance(model, RatioEstimator)
            and type(model).log_ratios is RatioEstimator.log_ratios
        )
        self._checked: set[str] = set()

    def __call__(self, features: torch.Tensor, theta: torch.Tensor, key: str) -> torch.Tensor:
        """Return log-ratios of shape (n_obs, n_theta, n_heads) of the heads ``key``."""
        if self.fast and key not in self._checked:
            self._check(features, theta, key)
        if self.fast:
            return self._fast(features, theta, key)
        return self._forward(features, theta, key)

    def _forward(self, features: torch.Tensor, theta: torch.Tensor, key: str) -> torch.Tensor:
        n_obs, n_theta = len(features), len(theta)
        chunk = max(1, 2**16 // n_theta)
        out = []
        for start in range(0, n_obs, chunk):
            block = features[start : start + chunk]
            expanded = block[:, None, :].expand(-1, n_theta, -1).reshape(-1, block.shape[1])
            tiled = theta.repeat(len(block), 1)
            ratios = self.model.log_ratios(expanded, tiled)[key]
            out.append(ratios.reshape(len(block), n_theta, -1))
        return torch.cat(out)

    def _check(self, features: torch.Tensor, theta: torch.Tensor, key: str) -> None:
        self._checked.add(key)
        sample_features, sample_theta = features[:2], theta[:: max(1, len(theta) // 32)]
        try:
            fast = self._fast(sample_features, sample_theta, key)
        except (AttributeError, KeyError, TypeError, RuntimeError, ValueError) as error:
            log.warning("fast grid evaluation failed (%s), so the network forward is used", error)
            self.fast = False
            return
        reference = self._forward(sample_features, sample_theta, key)
        difference = float((fast - reference).abs().max())
        if difference > _FAST_PATH_ATOL * max(1.0, float(reference.abs().max())):
            log.warning(
                "fast grid evaluation differs from the network forward by %.3g, so the "
                "network forward is used",
                difference,
            )
            self.fast = False

    def _head_inputs(self, theta: torch.Tensor, key: str) -> tuple[Any, torch.Tensor]:
        """Return the swyft classifier of the heads ``key`` and its parameter blocks for ``theta``.

        The blocks (n_theta, n_channels, n_block_parameters) are what the head passes to
        its ``MarginalClassifier``. A forward hook reads them, so any head that calls
        its classifier with (features, blocks) works.
        """
        model = self.model
        if key == "1d":
            head, columns = model.head_1d, theta[:, model.index_1d]
        else:
            head = model.head_2d
            columns = torch.cat([theta[:, [a, b]] for a, b in model.pairs_2d], dim=1)
        captured: dict[str, torch.Tensor] = {}

        def capture(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            captured["blocks"] = args[1]

        handle = head.classifier.register_forward_pre_hook(capture)
        try:
            dummy = torch.zeros(len(columns), model.spec.training.n_features)
            head(dummy.to(columns), columns)
        finally:
            handle.remove()
        return head.classifier, captured["blocks"]

    def _fast(self, features: torch.Tensor, theta: torch.Tensor, key: str) -> torch.Tensor:
        classifier, blocks = self._head_inputs(theta, key)
        if getattr(classifier, "Lmax", 0) != 0:
            raise ValueError("spectral embeddings (Lmax > 0) are not supported")
        net = classifier.net
        n_features = features.shape[1]
        weights = net.initial_layer.weights  # (channels, hidden, n_features + n_block)
        feature_part = torch.einsum("nf,chf->nch", features, weights[:, :, :n_features])
        block_part = (
            torch.einsum("pcb,chb->pch", blocks, weights[:, :, n_features:])
            + net.initial_layer.bias
        )
        n_theta, channels, hidden = block_part.shape
        chunk = max(1, _CHUNK_ELEMENTS // (n_theta * channels * hidden))
        out = []
        for start in range(0, len(features), chunk):
            hidden_state = feature_part[start : start + chunk, None] + block_part[None]
            for block in net.blocks:
                hidden_state = _residual_block(block, hidden_state)
            out.append(net.final_layer(hidden_state)[..., 0])
        return torch.cat(out)


def _channel_batch_norm(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """swyft's ``BatchNorm1dWithChannel`` in evaluation mode (running statistics)."""
    if layer.running_mean is None:
        raise ValueError("batch normalisation without running statistics")
    shape = x.shape[-2:]
    mean = layer.running_mean.view(shape)
    scale = torch.rsqrt(layer.running_var.view(shape) + layer.eps)
    if layer.affine:
        return (x - mean) * (scale * layer.weight.view(shape)) + layer.bias.view(shape)
    return (x - mean) * scale


def _residual_block(block: Any, x: torch.Tensor) -> torch.Tensor:
    """swyft's ``ResidualBlockWithChannel`` in evaluation mode (dropout off)."""
    y = _channel_batch_norm(block.batch_norm_layers[0], x) if block.use_batch_norm else x
    y = block.linear_layers[0](block.activation(y))
    if block.use_batch_norm:
        y = _channel_batch_norm(block.batch_norm_layers[1], y)
    y = block.linear_layers[1](block.activation(y))
    return x + y


def _as_tensor(values: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32, device=device)


def _require_log_normaliser(marginal: GridMarginal) -> np.ndarray:
    """Return the marginal's log normaliser, or raise if it was built without one."""
    if marginal.log_normaliser is None:
        raise ValueError(
            f"marginal {marginal.key} has no log_normaliser: build it with grid_posteriors"
        )
    return marginal.log_normaliser


def _network_inputs(
    estimator: LoadedEstimator, names: Sequence[str], values: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Build the network's θ rows and the log prior density for points of a marginal.

    ``values`` gives one array of axis values (log10 for log-uniform priors) per name.
    The columns of parameters outside the marginal stay 0, which its heads ignore.
    """
    spec = estimator.spec
    theta = np.zeros((len(values[0]), len(spec.axes)))
    log_prior = np.zeros(len(values[0]))
    for name, column_values in zip(names, values, strict=True):
        axis = spec.axis(name)
        theta[:, spec.parameter_names.index(name)] = axis.standardise(column_values)
        log_prior += _log_prior_on_axis(estimator, axis, column_values)
    return theta, log_prior


@torch.inference_mode()
def grid_posteriors(
    estimator: LoadedEstimator,
    counts: np.ndarray,
    grid_size: int = DEFAULT_GRID_SIZE,
    grid_size_1d: int | None = None,
) -> list[GridMarginal]:
    """Evaluate the posteriors of many observations on grids of cell centres.

    The grids tile each axis range of the estimator (the prior support for bounded
    priors) with ``grid_size`` equal cells. The density of a cell is the prior
    density at its centre times the ratio, as in
    :func:`alpnre.posterior.compute_posterior`.

    Parameters
    ----------
    estimator : LoadedEstimator
    counts : ndarray, shape (n_obs, n_bins)
        Observed counts.
    grid_size : int
        Cells per axis; 2-dim marginals have grid_size^2 cells.
    grid_size_1d : int, optional
        Cells of the 1-dim marginals; default ``grid_size``.

    Returns
    -------
    list of GridMarginal
        The 1-dim marginals of the estimator, then its 2-dim marginals.
    """
    spec = estimator.spec
    model = estimator.model.eval()
    device = next(model.parameters()).device
    counts = np.asarray(counts, dtype=np.float32)
    if counts.ndim != 2 or counts.shape[1] != spec.n_bins:
        raise ValueError(
            f"counts has shape {counts.shape}, expected (n_obs, {spec.n_bins}) for this estimator"
        )
    features = torch.cat(
        [
            model.embedding(torch.as_tensor(counts[i : i + 4096], device=device))
            for i in range(0, len(counts), 4096)
        ]
    )
    evaluate = _ProductLogRatios(model)
    grids_1d = {axis.name: _cell_centres(axis, grid_size_1d or grid_size) for axis in spec.axes}
    grids = {axis.name: _cell_centres(axis, grid_size) for axis in spec.axes}
    log_priors = {
        axis.name: _log_prior_on_axis(estimator, axis, grids[axis.name]) for axis in spec.axes
    }
    marginals = []

    # 1-dim heads share one θ grid: row i contains cell i of every parameter.
    theta = np.stack([axis.standardise(grids_1d[axis.name]) for axis in spec.axes], axis=1)
    log_ratios = evaluate(features, _as_tensor(theta, device), "1d")
    for k, name in enumerate(spec.one_dim):
        axis = spec.axis(name)
        log_prior = _log_prior_on_axis(estimator, axis, grids_1d[name])
        log_density = log_ratios[:, :, k].double().cpu().numpy() + log_prior
        probabilities, log_normaliser = _softmax_cells(log_density)
        marginals.append(
            GridMarginal((name,), (axis.label,), (grids_1d[name],), probabilities, log_normaliser)
        )

    # 2-dim heads on the full grid, x index first.
    for k, (name_x, name_y) in enumerate(spec.two_dim):
        meshes = np.meshgrid(grids[name_x], grids[name_y], indexing="ij")
        theta2 = np.zeros((grid_size * grid_size, len(spec.axes)))
        for name, mesh in zip((name_x, name_y), meshes, strict=True):
            theta2[:, spec.parameter_names.index(name)] = spec.axis(name).standardise(mesh.ravel())
        ratios = evaluate(features, _as_tensor(theta2, device), "2d")
        log_ratio = ratios[:, :, k].double().cpu().numpy().reshape(-1, grid_size, grid_size)
        log_density = log_ratio + log_priors[name_x][:, None] + log_priors[name_y][None, :]
        probabilities, log_normaliser = _softmax_cells(log_density)
        marginals.append(
            GridMarginal(
                (name_x, name_y),
                (spec.axis(name_x).label, spec.axis(name_y).label),
                (grids[name_x], grids[name_y]),
                probabilities,
                log_normaliser,
            )
        )
    return marginals


def densities_at_truths(
    estimator: LoadedEstimator, counts: np.ndarray, marginal: GridMarginal, truths: np.ndarray
) -> np.ndarray:
    """Evaluate a marginal's posterior density at the true parameters, on its cells' scale.

    The HPD credibility of a truth compares the density at the truth with the cell
    densities. Interpolating between cell centres underrates a posterior peak narrower
    than a cell, so the estimator is evaluated at the truth itself.

    Parameters
    ----------
    estimator : LoadedEstimator
    counts : ndarray, shape (n_obs, n_bins)
        The observations of ``marginal``, in the same order.
    marginal : GridMarginal
        Output of :func:`grid_posteriors`, with its ``log_normaliser``.
    truths : ndarray, shape (n_obs, n_names)
        True values in axis variables (log10 for log-uniform priors).

    Returns
    -------
    ndarray, shape (n_obs,)
        Prior times ratio at each truth, divided by exp(log_normaliser), so that it
        compares directly with ``marginal.probabilities``.
    """
    log_normaliser = _require_log_normaliser(marginal)
    spec = estimator.spec
    model = estimator.model.eval()
    device = next(model.parameters()).device
    truths = np.asarray(truths, dtype=float).reshape(len(counts), len(marginal.names))
    theta, log_prior = _network_inputs(estimator, marginal.names, list(truths.T))
    if len(marginal.names) == 1:
        key, head = "1d", spec.one_dim.index(marginal.names[0])
    else:
        key, head = "2d", spec.two_dim.index((marginal.names[0], marginal.names[1]))

    log_ratio = []
    with torch.no_grad():
        for start in range(0, len(counts), 4096):
            rows = slice(start, start + 4096)
            x = torch.as_tensor(np.asarray(counts[rows], dtype=np.float32), device=device)
            out = model(x, _as_tensor(theta[rows], device))[key][:, head]
            log_ratio.append(out.double().cpu().numpy())
    log_density = np.concatenate(log_ratio) + log_prior
    return np.exp(log_density - log_normaliser)


@torch.inference_mode()
def cell_averaged_probabilities(
    estimator: LoadedEstimator,
    counts: np.ndarray,
    marginal: GridMarginal,
    cells: np.ndarray,
    subcells: int,
) -> np.ndarray:
    """Replace a 2-dim marginal's centre values by cell averages in the given cells.

    :func:`alpnre.exact.refine_exact_posterior` gives the exact posterior of a strong
    signal the mean density over ``subcells`` x ``subcells`` sub-nodes of each cell
    that contains its mass. Comparing that with the NRE's density at the cell centres
    would compare two quadratures: a sharp NRE posterior whose peak sits off the
    centre would lose mass to the rule, not to its own error. Here the NRE gets the
    same sub-nodes (:func:`alpnre.exact.subcell_nodes`) in the same cells.

    Parameters
    ----------
    estimator : LoadedEstimator
    counts : ndarray, shape (n_obs, n_bins)
        The observations of ``marginal``, in the same order.
    marginal : GridMarginal
        A 2-dim output of :func:`grid_posteriors` with its ``log_normaliser``.
    cells : ndarray of bool, shape (n_obs, n_x, n_y)
        The cells to average over, for example ``ExactPosterior.refined``.
    subcells : int
        Sub-nodes per axis and cell.

    Returns
    -------
    ndarray, shape (n_obs, n_x, n_y)
        Cell probabilities, each observation summing to 1.
    """
    if len(marginal.names) != 2:
        raise ValueError(f"cell averages need a 2-dim marginal, got {marginal.key}")
    log_normaliser = _require_log_normaliser(marginal)
    if not 1 <= subcells <= 32:
        raise ValueError(f"subcells must lie in [1, 32] (default 6), got {subcells}")
    cells = np.asarray(cells, dtype=bool)
    if cells.shape != marginal.probabilities.shape or len(counts) != len(cells):
        raise ValueError(
            f"cells has shape {cells.shape} and counts {len(counts)} rows, expected the "
            f"marginal's shape {marginal.probabilities.shape}: pass the same observations"
        )
    spec = estimator.spec
    model = estimator.model.eval()
    device = next(model.parameters()).device
    head = spec.two_dim.index((marginal.names[0], marginal.names[1]))
    evaluate = _ProductLogRatios(model)
    grid_x, grid_y = marginal.grids
    with np.errstate(divide="ignore"):
        log_density = np.log(marginal.probabilities) + log_normaliser[:, None, None]

    for k in np.flatnonzero(cells.any(axis=(1, 2))):
        indices = np.argwhere(cells[k])
        nodes = subcell_nodes(grid_x, grid_y, indices, subcells)
        theta, log_prior = _network_inputs(estimator, marginal.names, nodes)
        x = torch.as_tensor(np.asarray(counts[k : k + 1], dtype=np.float32), device=device)
        log_ratio = evaluate(model.embedding(x), _as_tensor(theta, device), "2d")[0, :, head]
        per_cell = (log_ratio.double().cpu().numpy() + log_prior).reshape(len(indices), -1)
        cell_log_density = special.logsumexp(per_cell, axis=1) - np.log(per_cell.shape[1])
        log_density[k, indices[:, 0], indices[:, 1]] = cell_log_density
    return _softmax_cells(log_density)[0]


def sample_grid_posterior(
    marginal: GridMarginal, n_samples: int, rng: np.random.Generator
) -> np.ndarray:
    """Draw posterior samples from gridded posteriors, uniform within each drawn cell.

    Returns
    -------
    ndarray, shape (n_obs, n_samples, n_dims)
        Samples in the axis variables of ``marginal``.
    """
    probabilities = marginal.probabilities
    n_obs = len(probabilities)
    shape = probabilities.shape[1:]
    steps = np.array([grid[1] - grid[0] for grid in marginal.grids])
    samples = np.empty((n_obs, n_samples, len(shape)))
    for i, cells in enumerate(probabilities.reshape(n_obs, -1)):
        cumulative = np.cumsum(cells)
        drawn = np.searchsorted(cumulative, rng.uniform(0.0, cumulative[-1], n_samples), "right")
        index = np.unravel_index(np.minimum(drawn, cells.size - 1), shape)
        for d, grid in enumerate(marginal.grids):
            samples[i, :, d] = grid[index[d]]
    samples += rng.uniform(-0.5, 0.5, samples.shape) * steps
    return samples


def _truths_on_axes(
    estimator: LoadedEstimator, held_out: HeldOutSet, names: Sequence[str]
) -> np.ndarray:
    """True parameters in axis variables, shape (n_obs, len(names)), clipped to the axis range.

    Only unbounded (normal) priors, whose axes end at 5 standard deviations, can give
    truths outside the range.
    """
    columns = []
    for name in names:
        axis = estimator.spec.axis(name)
        columns.append(np.clip(axis.to_axis(held_out.theta[name]), axis.low, axis.high))
    return np.stack(columns, axis=1)


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------


def _first_observations(marginal: GridMarginal, n: int) -> GridMarginal:
    """Restrict the marginal to its first ``n`` observations."""
    return GridMarginal(
        marginal.names,
        marginal.labels,
        marginal.grids,
        marginal.probabilities[:n],
        None if marginal.log_normaliser is None else marginal.log_normaliser[:n],
    )


def _worst_verdict(verdicts: Sequence[CoverageVerdict]) -> CoverageVerdict:
    if "overconfident" in verdicts:
        return "overconfident"
    if "conservative" in verdicts:
        return "conservative"
    return "calibrated"


@dataclass
class ValidationReport:
    """Result of :func:`validate_estimator`; :meth:`to_dict` is the content of report.json.

    Attributes
    ----------
    coverage : dict of str to CoverageResult
        HPD coverage per marginal, keyed by parameter name or ``name_x__name_y``.
    credibilities : dict of str to ndarray
        HPD credibility of each truth, per marginal, shape (n_simulations,).
    tarp : TarpResult
        TARP on the 2-dim marginal ``tarp_key``.
    exact : ExactComparison or None
        Comparison with the exact posterior, when requested.
    ecp_at_truth : dict of str to ndarray
        The grid check: ECP per marginal with the estimator's density at each truth in
        place of the density interpolated between cell centres, see :meth:`grid_check`.
    folder : Path or None
        Folder the report and figures were written to.
    """

    estimator_id: str
    estimator_checksum: str
    config_name: str
    config_hash: str
    irf_id: str
    n_simulations: int
    seed: int
    grid_size: int
    n_posterior_samples: int
    labels: dict[str, list[str]]
    coverage: dict[str, CoverageResult]
    credibilities: dict[str, np.ndarray]
    tarp_key: str
    tarp: TarpResult
    exact: ExactComparison | None = None
    timing_s: dict[str, float] = field(default_factory=dict)
    ecp_at_truth: dict[str, np.ndarray] = field(default_factory=dict)
    grid_size_1d: int | None = None
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    folder: Path | None = None
    figures: dict[str, str] = field(default_factory=dict)

    @property
    def verdict(self) -> CoverageVerdict:
        """Worst coverage verdict over the marginals."""
        return _worst_verdict([result.verdict for result in self.coverage.values()])

    def grid_check(self, key: str) -> dict[str, Any]:
        """Compare the ECP of marginal ``key`` under two estimates of the density at the truth.

        The reported ECP interpolates the density at each truth between cell centres,
        which underrates posterior peaks narrower than a cell and so leans towards
        overconfidence. The estimator evaluated at the truth, ranked against the
        cell-centre densities, leans the other way when the cells miss the peaks. Where
        the two ECP curves differ by more than ``GRID_RESOLUTION_TOLERANCE``, the grid
        is too coarse for a verdict on these posteriors.
        """
        ecp = self.coverage[key].ecp
        cells = self.cells_per_axis(key)
        at_truth = self.ecp_at_truth.get(key)
        if at_truth is None:
            return {"ecp_density_at_truth": None, "max_ecp_difference": None, "resolved": None}
        difference = float(np.max(np.abs(at_truth - ecp)))
        resolved = difference <= GRID_RESOLUTION_TOLERANCE
        return {
            "ecp_density_at_truth": [float(value) for value in at_truth],
            "max_ecp_difference": difference,
            "resolved": resolved,
            "description": (
                f"the ECP moves by up to {difference:.3f} when the density at the truth is "
                f"the estimator's instead of the one interpolated on {cells} cells per axis "
                f"(tolerance {GRID_RESOLUTION_TOLERANCE})"
            ),
        }

    def cells_per_axis(self, key: str) -> int:
        """Grid cells per axis of marginal ``key``."""
        if len(self.labels[key]) == 1 and self.grid_size_1d is not None:
            return self.grid_size_1d
        return self.grid_size

    def unresolved_marginals(self) -> list[str]:
        """Keys of the marginals whose :meth:`grid_check` fails."""
        return [key for key in self.coverage if self.grid_check(key)["resolved"] is False]

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-safe Python types (None for non-finite numbers)."""
        coverage = {}
        for key, result in self.coverage.items():
            coverage[key] = {
                "parameters": key.split("__"),
                "axes": self.labels[key],
                **result.to_dict(),
                "credibilities": [float(v) for v in self.credibilities[key]],
                "grid_check": self.grid_check(key),
            }
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "estimator_id": self.estimator_id,
            "estimator_checksum": self.estimator_checksum,
            "config_name": self.config_name,
            "config_hash": self.config_hash,
            "irf_id": self.irf_id,
            "created_at": self.created_at,
            "alpnre_version": alpnre.__version__,
            "held_out": {
                "n_simulations": self.n_simulations,
                "seed": self.seed,
                "seed_sequence": f"SeedSequence(seed, spawn_key=({HELD_OUT_STREAM}, 0, batch))",
                "batch_size": _SIMULATION_BATCH,
            },
            "grid_size": self.grid_size,
            "grid_size_1d": self.grid_size_1d or self.grid_size,
            "n_posterior_samples": self.n_posterior_samples,
            "verdict": self.verdict,
            "coverage": coverage,
            "tarp": {
                "parameters": self.tarp_key.split("__"),
                "axes": self.labels[self.tarp_key],
                **self.tarp.to_dict(),
            },
            "exact": None if self.exact is None else self.exact.to_dict(),
            "timing_s": {key: float(value) for key, value in self.timing_s.items()},
            "figures": dict(self.figures),
            "note": CHECKSUM_NOTE,
        }

    def summary(self) -> str:
        """Return a few lines for a terminal: verdicts, TARP and the exact comparison."""
        lines = [
            f"estimator {self.estimator_id}: {self.n_simulations} held-out simulations "
            f"(seed {self.seed}), verdict {self.verdict}"
        ]
        for key, result in self.coverage.items():
            worst = int(np.argmax(np.abs(result.ecp - result.levels)))
            lines.append(
                f"  HPD coverage {' x '.join(self.labels[key])}: {result.verdict} "
                f"(largest |ECP - alpha| = {abs(result.ecp[worst] - result.levels[worst]):.3f} "
                f"at alpha = {result.levels[worst]:.2f})"
            )
        for key in self.unresolved_marginals():
            lines.append(
                f"  grid check {' x '.join(self.labels[key])}: not resolved, "
                f"{self.grid_check(key)['description']}; rerun with a larger "
                f"{'--grid-size-1d' if len(self.labels[key]) == 1 else '--grid-size'}"
            )
        lines.append(
            f"  TARP {' x '.join(self.labels[self.tarp_key])}: {self.tarp.verdict} "
            f"(area {self.tarp.area:.3f}, KS {self.tarp.ks_statistic:.3f}, "
            f"p = {self.tarp.ks_pvalue:.2g})"
        )
        if self.exact is not None:
            lines.append(
                f"  exact posterior, {len(self.exact.jsd)} observations: mean JSD "
                f"{self.exact.jsd.mean():.4f} nats, mean 95 % upper-limit shift "
                f"{np.nanmean(self.exact.upper_limit_shift):+.3f} dex"
            )
        if self.folder is not None:
            lines.append(f"  report and figures in {self.folder}")
        return "\n".join(lines)


def _write_atomic(path: Path, write: Any) -> None:
    """Write a file through a temporary name in the same folder, then rename it."""
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def write_report(report: ValidationReport, folder: Path, figures: dict[str, Any]) -> None:
    """Write the figures, then report.json, into ``folder``.

    report.json comes last, so a reader that finds it also finds the figures it names.
    """
    folder.mkdir(parents=True, exist_ok=True)
    report.folder = folder
    report.figures = {}
    for name, figure in figures.items():
        file_name = f"{name}.png"
        _write_atomic(
            folder / file_name, lambda path, f=figure: f.savefig(path, format="png", dpi=120)
        )
        report.figures[name] = file_name
    stale = folder / "exact.png"
    if "exact" not in figures and stale.exists():
        stale.unlink()
    text = json.dumps(report.to_dict(), indent=1, allow_nan=False)
    _write_atomic(folder / REPORT_NAME, lambda path: path.write_text(text))
    log.info("validation report of %s written to %s", report.estimator_id, folder)


def _coverage_figure(report: ValidationReport) -> Any:
    from matplotlib.figure import Figure

    keys = list(report.coverage)
    figure = Figure(figsize=(4.2 * len(keys), 4.9), layout="constrained")
    axes = figure.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=True):
        plot_coverage(report.coverage[key], ax=ax)
        title = f"{' x '.join(report.labels[key])}\n{report.coverage[key].verdict}"
        at_truth = report.ecp_at_truth.get(key)
        if at_truth is not None:
            ax.plot(
                report.coverage[key].levels,
                at_truth,
                color="tab:orange",
                linestyle="--",
                label="grid check: density at the truth",
            )
            ax.legend(loc="upper left", fontsize=8)
            if key in report.unresolved_marginals():
                title += f", grid of {report.cells_per_axis(key)} not resolved"
        ax.set_title(title, fontsize=9)
    figure.suptitle(f"HPD coverage of {report.estimator_id}, {report.n_simulations} simulations")
    return figure


def _tarp_figure(report: ValidationReport) -> Any:
    figure = plot_tarp(report.tarp)
    figure.axes[0].set_title(
        f"TARP {' x '.join(report.labels[report.tarp_key])}: {report.tarp.verdict}", fontsize=9
    )
    return figure


# ---------------------------------------------------------------------------------------
# The validation
# ---------------------------------------------------------------------------------------


def _load(estimator: str | Path | LoadedEstimator) -> LoadedEstimator:
    if isinstance(estimator, LoadedEstimator):
        return estimator
    return load_estimator(estimator)


def _check_irf(estimator: LoadedEstimator, instrument: InstrumentResponse) -> None:
    trained_on = estimator.metadata.get("irf_id")
    if trained_on is not None and trained_on != instrument.irf_id:
        raise ValueError(
            f"estimator {estimator.estimator_id} was trained on simulations with the IRF "
            f"{trained_on!r}, but this machine resolves {instrument.irf_id!r}: set "
            "GAMMAPY_DATA (or irf.path in the config) so that the same IRF is found"
        )


def _check_arguments(
    n_simulations: int,
    grid_size: int,
    grid_size_1d: int,
    n_posterior_samples: int,
    n_exact: int,
    exact_subcells: int = 0,
) -> None:
    if n_simulations < 10:
        raise ValueError(f"n_simulations must be at least 10, got {n_simulations}")
    if not 8 <= grid_size <= 512:
        raise ValueError(f"grid_size must lie in [8, 512], got {grid_size}")
    if not 8 <= grid_size_1d <= 16384:
        raise ValueError(f"grid_size_1d must lie in [8, 16384], got {grid_size_1d}")
    if n_posterior_samples < 10:
        raise ValueError(f"n_posterior_samples must be at least 10, got {n_posterior_samples}")
    if n_exact < 1:
        raise ValueError(f"n_exact must be at least 1, got {n_exact}")
    if exact_subcells != 0 and not 2 <= exact_subcells <= 32:
        raise ValueError(
            f"exact_subcells must be 0 (no refinement) or lie in [2, 32], got {exact_subcells}"
        )


def validate_estimator(
    estimator: str | Path | LoadedEstimator,
    *,
    n_simulations: int = 1000,
    seed: int | None = None,
    grid_size: int = DEFAULT_GRID_SIZE,
    grid_size_1d: int | None = None,
    n_posterior_samples: int = DEFAULT_POSTERIOR_SAMPLES,
    exact: bool = False,
    n_exact: int = DEFAULT_EXACT_OBSERVATIONS,
    exact_grid_size: int | None = None,
    exact_subcells: int = DEFAULT_SUBCELLS,
    levels: Sequence[float] | None = None,
    held_out: HeldOutSet | None = None,
    write: bool = True,
    progress: bool = False,
) -> ValidationReport:
    """Validate an estimator on held-out simulations and write the report and figures.

    Parameters
    ----------
    estimator : str, Path or LoadedEstimator
        Estimator folder (its checksum is verified on loading) or a loaded estimator.
    n_simulations : int
        Number of held-out simulations. For 1000, the 95 % Clopper-Pearson band of the
        ECP at alpha = 0.5 has a half-width of about 0.03.
    seed : int, optional
        Seed of the held-out set; default :func:`default_validation_seed` of the
        estimator's checksum. Any seed gives simulations disjoint from training runs.
    grid_size : int
        Cells per axis of the posterior grids.
    grid_size_1d : int, optional
        Cells of the 1-dim grids; default the larger of ``grid_size`` and
        ``DEFAULT_GRID_SIZE_1D``.
    n_posterior_samples : int
        Samples per posterior for TARP.
    exact : bool
        Also compare with the exact posterior (:mod:`alpnre.exact`). Only for configs
        that pass :func:`alpnre.exact.check_exact_config`; others raise ValueError.
    n_exact : int
        Held-out observations compared with the exact posterior (the first ones).
    exact_grid_size : int, optional
        (m, g) nodes per axis of the exact posterior, which is then interpolated onto
        the NRE grid. Default: the exact posterior is computed at the cell centres of
        the NRE grid itself, with no interpolation.
    exact_subcells : int
        Sub-nodes per axis in the cells where an exact posterior on the NRE grid is
        narrower than a cell (:func:`alpnre.exact.refine_exact_posterior`, which also
        refines the cell of the true parameters); 0 keeps the node values. The NRE
        posterior gets the same sub-nodes (:func:`cell_averaged_probabilities`). The
        report also gives the JSD before refinement.
    levels : sequence of float, optional
        Credibility levels of the ECP; default 0, 0.05, ..., 1.
    held_out : HeldOutSet, optional
        Simulations to use instead of simulating ``n_simulations`` new ones (they must
        come from the estimator's config); ``seed`` is then theirs.
    write : bool
        Write ``validation/report.json`` and the figures into the estimator folder.
    progress : bool
        Show progress bars.

    Returns
    -------
    ValidationReport
    """
    start = time.perf_counter()
    loaded = _load(estimator)
    config = loaded.config
    if held_out is not None:
        n_simulations = held_out.n_simulations
    if grid_size_1d is None:
        grid_size_1d = max(grid_size, DEFAULT_GRID_SIZE_1D)
    _check_arguments(
        n_simulations, grid_size, grid_size_1d, n_posterior_samples, n_exact, exact_subcells
    )
    if exact:
        check_exact_config(config)
    instrument = load_instrument_response(config)
    _check_irf(loaded, instrument)
    seed = _check_seed(default_validation_seed(loaded.checksum) if seed is None else seed)
    timing: dict[str, float] = {}
    log.info(
        "validating estimator %s on %d held-out simulations", loaded.estimator_id, n_simulations
    )

    # Held-out simulations and their posteriors.
    if held_out is None:
        held_out = simulate_held_out(
            config, n_simulations, seed, instrument=instrument, progress=progress
        )
    seed = held_out.seed
    timing["simulation"] = held_out.seconds
    step = time.perf_counter()
    marginals = grid_posteriors(loaded, held_out.counts, grid_size, grid_size_1d)
    timing["posteriors"] = time.perf_counter() - step
    log.info(
        "%d posteriors on %d grids in %.1f s", n_simulations, len(marginals), timing["posteriors"]
    )

    # HPD coverage of every marginal.
    step = time.perf_counter()
    rng = _statistics_rng(seed)
    coverage, credibilities, labels = {}, {}, {}
    ecp_at_truth: dict[str, np.ndarray] = {}
    for marginal in marginals:
        truths = _truths_on_axes(loaded, held_out, marginal.names)
        axes = list(marginal.grids)
        # Both estimates below draw the same random shares of tied mass.
        tie_rng = copy.deepcopy(rng)
        values = hpd_credibilities(marginal.probabilities, axes, truths, ties="random", rng=rng)
        credibilities[marginal.key] = values
        coverage[marginal.key] = expected_coverage(values, levels)
        # The grid check: the same credibilities with the estimator's density at each
        # truth instead of the interpolated one.
        at_truth = densities_at_truths(loaded, held_out.counts, marginal, truths)
        values_at_truth = hpd_credibilities(
            marginal.probabilities,
            axes,
            truths,
            ties="random",
            rng=tie_rng,
            densities_at_truth=at_truth,
        )
        ecp_at_truth[marginal.key] = expected_coverage(values_at_truth, levels).ecp
        labels[marginal.key] = list(marginal.labels)
    timing["coverage"] = time.perf_counter() - step

    # TARP on the first 2-dim marginal, (log10 m, log10 g) for the standard heads.
    step = time.perf_counter()
    joint = next(marginal for marginal in marginals if len(marginal.names) == 2)
    samples = sample_grid_posterior(joint, n_posterior_samples, rng)
    tarp_result = tarp(
        samples,
        _truths_on_axes(loaded, held_out, joint.names),
        rng=rng,
        n_bootstrap=TARP_BOOTSTRAP,
    )
    timing["tarp"] = time.perf_counter() - step

    # Exact posteriors of the first observations.
    comparison = None
    if exact:
        step = time.perf_counter()
        n_compared = min(n_exact, n_simulations)
        grid_x, grid_y = joint.grids
        if exact_grid_size is None:
            exact_result = exact_posterior(
                config,
                held_out.counts[:n_compared],
                grids=(grid_x, grid_y),
                instrument=instrument,
                progress=progress,
            )
        else:
            exact_result = exact_posterior(
                config,
                held_out.counts[:n_compared],
                grid_size=exact_grid_size,
                instrument=instrument,
                progress=progress,
            )
        comparison = compare_with_exact(
            joint.probabilities[:n_compared], grid_x, grid_y, exact_result
        )
        if exact_grid_size is None and exact_subcells:
            node_values = comparison.jsd
            truths = _truths_on_axes(loaded, held_out, joint.names)[:n_compared]
            exact_result = refine_exact_posterior(
                exact_result,
                config,
                held_out.counts[:n_compared],
                subcells=exact_subcells,
                truths=truths,
                instrument=instrument,
                progress=progress,
            )
            nre_centres = compare_with_exact(
                joint.probabilities[:n_compared], grid_x, grid_y, exact_result
            )
            # Both sides get the same sub-node averages in the refined cells.
            assert exact_result.refined is not None
            nre_averaged = cell_averaged_probabilities(
                loaded,
                held_out.counts[:n_compared],
                _first_observations(joint, n_compared),
                exact_result.refined,
                exact_subcells,
            )
            comparison = compare_with_exact(nre_averaged, grid_x, grid_y, exact_result)
            comparison.jsd_node_values = node_values
            comparison.jsd_nre_centres = nre_centres.jsd
        timing["exact"] = time.perf_counter() - step

    timing["total"] = time.perf_counter() - start
    report = ValidationReport(
        estimator_id=loaded.estimator_id,
        estimator_checksum=loaded.checksum,
        config_name=config.name,
        config_hash=config_hash(config),
        irf_id=held_out.irf_id,
        n_simulations=n_simulations,
        seed=seed,
        grid_size=grid_size,
        grid_size_1d=grid_size_1d,
        n_posterior_samples=n_posterior_samples,
        labels=labels,
        coverage=coverage,
        credibilities=credibilities,
        tarp_key=joint.key,
        tarp=tarp_result,
        exact=comparison,
        timing_s=timing,
        ecp_at_truth=ecp_at_truth,
    )
    for key in report.unresolved_marginals():
        log.warning(
            "the grid of %d cells per axis does not resolve the posteriors of %s: %s; rerun "
            "with a larger %s",
            report.cells_per_axis(key),
            key,
            report.grid_check(key)["description"],
            "grid_size_1d" if len(report.labels[key]) == 1 else "grid_size",
        )
    if write:
        figures = {"coverage": _coverage_figure(report), "tarp": _tarp_figure(report)}
        if comparison is not None:
            truths = _truths_on_axes(loaded, held_out, joint.names)[: len(comparison.examples)]
            figures["exact"] = plot_exact_comparison(comparison, truths.tolist())
        write_report(report, loaded.path / VALIDATION_FOLDER, figures)
    log.info("validation of %s: %s", loaded.estimator_id, report.verdict)
    return report
