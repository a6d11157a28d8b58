"""Truncated rounds: sharpen the posterior of one observation with targeted simulations.

An estimator trained on the whole prior spends its simulations everywhere. For a strong
ALP signal the posterior of (m, g) covers a tiny part of the prior, and the amortised
network smooths it over several grid cells. Truncation, the idea behind swyft's
truncated marginal NRE (Miller et al. 2021, NeurIPS, "Truncated Marginal Neural Ratio
Estimation"), fixes that for one observation x_o:

1. take the region where each 1-dim marginal posterior of the current estimator exceeds
   ``threshold`` times its peak (with one grid step of margin);
2. restrict the log-uniform priors of m and g to that box;
3. simulate new spectra from the truncated prior and train a new estimator on them;
4. evaluate the posterior of x_o with it, on a grid that now spans only the box.

The truncated estimator's posterior is the full posterior restricted to the box. The
two agree when the mass outside the box is negligible. The default ``threshold``, 1e-6
of the peak, is the default of ``get_rect_bounds`` in swyft 0.4.5, and it ensures that
for an estimator that is not overconfident. The new estimator is amortised over the box
only, so use it for x_o and not for other observations.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alpnre.config import AnalysisConfig, parse_config
from alpnre.nre import TrainingConfig
from alpnre.posterior import Posterior, compute_posterior, plot_posterior
from alpnre.priors import LogUniformPrior, UniformPrior
from alpnre.registry import LoadedEstimator, load_estimator

__all__ = [
    "BoxTooWideError",
    "TruncationRound",
    "truncate",
    "truncated_config",
    "truncation_bounds",
]

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 1e-6
# A box holding more of the prior mass than this is not worth a round of simulations.
MAX_PRIOR_FRACTION = 0.9
DEFAULT_NAMES = ("m_neV", "g_per_gev")
# Points per axis of the 1-dim marginals that set the bounds.
_BOUNDS_GRID = 400


class BoxTooWideError(ValueError):
    """Error raised when a truncated box holds more prior mass than ``max_prior_fraction``.

    A ValueError, so callers that reject bad input keep working. A study over many
    observations catches this class alone to skip one observation without hiding other
    errors.
    """


def truncation_bounds(
    estimator: LoadedEstimator,
    x_o: Any,
    *,
    names: Sequence[str] = DEFAULT_NAMES,
    threshold: float = DEFAULT_THRESHOLD,
) -> dict[str, tuple[float, float]]:
    """Return the box, in physical units, where the 1-dim posteriors exceed ``threshold``.

    Parameters
    ----------
    estimator : LoadedEstimator
        The current estimator (amortised, or the previous round's).
    x_o : array_like
        Observed counts per energy bin.
    names : sequence of str
        Parameters to truncate; each needs a 1-dim head and a uniform or log-uniform prior.
    threshold : float
        Fraction of the peak density of each 1-dim posterior below which the prior is cut.

    Returns
    -------
    dict
        ``{name: (low, high)}``, inside the estimator's prior support.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}: 1e-6 is the default")
    for name in names:
        prior = estimator.config.prior(name)
        if not isinstance(prior, LogUniformPrior | UniformPrior):
            raise ValueError(
                f"{name} has a {prior.kind} prior, but truncation needs a uniform or "
                "log_uniform prior, whose restriction to a box has the same form"
            )
    posterior = compute_posterior(estimator, x_o, grid_size=_BOUNDS_GRID, marginals=list(names))
    bounds = {}
    for name in names:
        marginal = posterior.one_dim[name]
        axis = estimator.spec.axis(name)
        step = float(marginal.grid[1] - marginal.grid[0])
        above = np.flatnonzero(marginal.density >= threshold * marginal.density.max())
        low_u = max(axis.low, float(marginal.grid[above[0]]) - step)
        high_u = min(axis.high, float(marginal.grid[above[-1]]) + step)
        low, high = (float(value) for value in axis.from_axis(np.array([low_u, high_u])))
        support = estimator.config.prior(name).support()
        bounds[name] = (max(low, support[0]), min(high, support[1]))
    return bounds


def truncated_config(
    config: AnalysisConfig, bounds: dict[str, tuple[float, float]], *, suffix: str = "truncated"
) -> AnalysisConfig:
    """Return ``config`` with the priors of ``bounds`` restricted to them (same prior kind)."""
    data = config.model_dump(mode="json")
    for name, (low, high) in bounds.items():
        kind = config.prior(name).kind
        if kind not in ("log_uniform", "uniform"):
            raise ValueError(
                f"{name}: cannot truncate a {kind} prior, only uniform and log_uniform ones"
            )
        data["parameters"][name] = {"kind": kind, "low": low, "high": high}
    data["name"] = f"{config.name}-{suffix}"
    return parse_config(data, source=f"truncation of {config.name}")


def _prior_fraction(config: AnalysisConfig, bounds: dict[str, tuple[float, float]]) -> float:
    """Fraction of the prior mass of ``config`` inside the box ``bounds``."""
    fraction = 1.0
    for name, (low, high) in bounds.items():
        prior = config.prior(name)
        full_low, full_high = prior.support()
        if isinstance(prior, LogUniformPrior):
            fraction *= math.log(high / low) / math.log(full_high / full_low)
        else:
            fraction *= (high - low) / (full_high - full_low)
    return fraction


@dataclass
class TruncationRound:
    """One truncated round: its prior box, new estimator and the posterior of x_o."""

    bounds: dict[str, tuple[float, float]]
    prior_fraction: float
    estimator_path: Path
    posterior: Posterior
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "bounds": {name: list(values) for name, values in self.bounds.items()},
            "prior_fraction": self.prior_fraction,
            "estimator": str(self.estimator_path),
            "seconds": self.seconds,
        }


def truncate(
    estimator: LoadedEstimator,
    x_o: Any,
    output: str | Path,
    *,
    n_simulations: int,
    batch_size: int = 1000,
    seed: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
    names: Sequence[str] = DEFAULT_NAMES,
    training: TrainingConfig | None = None,
    grid_size: int = 100,
    max_prior_fraction: float = MAX_PRIOR_FRACTION,
    truth: dict[str, float] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> TruncationRound:
    """Run one truncated round for the observation ``x_o`` and write it to ``output``.

    Writes ``output/simulations`` (the run), ``output/estimator``, ``output/work``,
    ``posterior.json``, ``posterior.png`` and ``truncation.json`` (bounds, prior
    fraction, parent estimator, timings). Rerunning with the same arguments reuses the
    finished simulation batches and the training checkpoint.

    Parameters
    ----------
    estimator : LoadedEstimator
        The estimator whose posterior sets the box.
    n_simulations, batch_size, seed
        Size and seed of the new simulation run.
    training : TrainingConfig, optional
        Settings of the new estimator; default those of ``estimator``.
    grid_size : int
        Points per axis of the posterior of x_o.
    max_prior_fraction : float
        Largest fraction of the prior mass the box may hold; a wider box raises
        ValueError before any simulation, because the round would repeat the prior.
    """
    from alpnre.runs import simulate_run
    from alpnre.training import train_and_save

    if not 0.0 < max_prior_fraction <= 1.0:
        raise ValueError(
            f"max_prior_fraction must lie in (0, 1], got {max_prior_fraction}: it is the "
            "largest share of the prior mass a truncated box may keep, 0.9 by default"
        )
    output = Path(output)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    bounds = truncation_bounds(estimator, x_o, names=names, threshold=threshold)
    fraction = _prior_fraction(estimator.config, bounds)
    if fraction > max_prior_fraction:
        raise BoxTooWideError(
            f"the 1-dim posteriors exceed {threshold:g} of their peak on {fraction:.1%} of the "
            "prior, so a truncated round would simulate almost the same prior again: raise "
            "--threshold (for example to 1e-3) or start from a better-trained estimator"
        )
    config = truncated_config(estimator.config, bounds)
    log.info(
        "truncated prior: %s, %.3g of the prior mass",
        ", ".join(f"{name} in [{low:.4g}, {high:.4g}]" for name, (low, high) in bounds.items()),
        fraction,
    )
    seconds["bounds"] = time.perf_counter() - start

    start = time.perf_counter()
    simulate_run(
        config,
        output / "simulations",
        n_simulations=n_simulations,
        batch_size=batch_size,
        run_seed=seed,
        workers=workers,
        progress=progress,
    )
    seconds["simulation"] = time.perf_counter() - start

    start = time.perf_counter()
    settings = training or estimator.spec.training
    folder = train_and_save([output / "simulations"], output, settings, progress=progress)
    seconds["training"] = time.perf_counter() - start

    start = time.perf_counter()
    truncated = load_estimator(folder)
    posterior = compute_posterior(truncated, x_o, grid_size=grid_size, truth=truth)
    plot_posterior(posterior, str(output / "posterior.png"))
    (output / "posterior.json").write_text(json.dumps(posterior.to_dict(), allow_nan=False))
    seconds["posterior"] = time.perf_counter() - start

    result = TruncationRound(bounds, fraction, folder, posterior, seconds)
    record = {
        **result.to_dict(),
        "parent_estimator": estimator.estimator_id,
        "threshold": threshold,
        "n_simulations": n_simulations,
        "seed": seed,
    }
    (output / "truncation.json").write_text(json.dumps(record, indent=1))
    return result
