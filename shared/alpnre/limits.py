"""Expected exclusion limits on the ALP coupling under the no-ALP hypothesis.

The expected limit is the distribution of the 95 % upper limit on g, as a function of
m, over mock observations simulated without ALPs. Each mock is a full simulation whose
nuisance parameters (intrinsic spectrum, cluster model, B-field realisation) are drawn
from the config's priors, but whose coupling is fixed at :data:`NULL_COUPLING_PER_GEV`.
For each mock the posterior of (log10 m, log10 g) gives an upper-limit curve (see
:meth:`alpnre.posterior.Marginal2D.upper_limit_curve`). The median of those curves at
each mass is the expected limit, and the 16-84 % and 2.5-97.5 % ranges are its 68 % and
95 % bands.

Choice of the null coupling: g = 1e-16 GeV^-1 is the smallest coupling that the config
validation accepts, so the same no-ALP config runs in the local process pool and in the
simulation workers. It lies three decades below the 1e-13 GeV^-1 lower edge of the
shipped priors. The photon-ALP conversion probability grows as g^2 while it is small,
so at 1e-16 it is 1e-6 of its value at 1e-13 (``tests/test_limits.py`` checks that the
survival probability equals pure EBL absorption).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from alpnre.config import AnalysisConfig, parse_config
from alpnre.dataset import read_manifest, run_batch_files
from alpnre.observations import check_energy_edges, estimator_energy_edges
from alpnre.posterior import compute_posterior
from alpnre.registry import LoadedEstimator
from alpnre.runs import simulate_run
from alpnre.streaming import read_spectra

__all__ = [
    "NULL_COUPLING_PER_GEV",
    "ExpectedLimits",
    "compute_expected_limits",
    "expected_limits_from_run",
    "expected_limits_from_spectra",
    "load_published_limits",
    "null_hypothesis_config",
    "plot_expected_limits",
    "simulate_null_run",
]

log = logging.getLogger(__name__)

NULL_COUPLING_PER_GEV = 1e-16
# The log-uniform prior of the null config needs low < high; this width is far below
# any effect on the spectrum.
_NULL_PRIOR_RELATIVE_WIDTH = 1e-6
# A run whose couplings exceed this is not a no-ALP run.
_MAX_NULL_COUPLING_PER_GEV = 1e-15
JOINT_KEY = "m_neV__g_per_gev"
PUBLISHED_LIMITS_RESOURCE = "data/published_limits.json"


def null_hypothesis_config(config: AnalysisConfig) -> AnalysisConfig:
    """Return ``config`` with the coupling fixed (to a relative width of 1e-6) at 1e-16 GeV^-1.

    Every other prior is kept, so the nuisance parameters of the mocks vary as in the
    training data. The name gets the suffix ``-no-alp``.
    """
    data = config.model_dump(mode="json")
    data["parameters"]["g_per_gev"] = {
        "kind": "log_uniform",
        "low": NULL_COUPLING_PER_GEV,
        "high": NULL_COUPLING_PER_GEV * (1.0 + _NULL_PRIOR_RELATIVE_WIDTH),
    }
    data["name"] = f"{config.name}-no-alp"
    return parse_config(data, source=f"no-ALP variant of {config.name!r}")


def check_estimator_matches(config: AnalysisConfig, estimator: LoadedEstimator) -> None:
    """Raise ValueError unless simulations of ``config`` fit the estimator's input.

    The energy binning must be equal, and the config must have every parameter the
    estimator infers.
    """
    check_energy_edges(
        config.observation.energy_edges_tev(),
        estimator_energy_edges(estimator.metadata, estimator.config),
        f"config {config.name!r}",
    )
    missing = [name for name in estimator.spec.parameter_names if name not in config.parameters]
    if missing:
        raise ValueError(
            f"config {config.name!r} has no priors for {missing}, which estimator "
            f"{estimator.estimator_id} infers"
        )


@dataclass
class ExpectedLimits:
    """Upper-limit curves of mock no-ALP observations and their median and bands.

    Attributes
    ----------
    log10_mass_grid
        log10(m / neV) of the curves, shape (n_mass,).
    curves
        log10(g / GeV^-1) upper limit of each mock at each mass, shape (n_mocks, n_mass).
        NaN where a mock's conditional posterior is zero at that mass.
    level
        Credibility level of the upper limits.
    """

    estimator_id: str
    estimator_checksum: str
    config_name: str
    log10_mass_grid: np.ndarray
    curves: np.ndarray
    level: float
    seed: int | None
    simulation: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n_mocks(self) -> int:
        return int(self.curves.shape[0])

    def quantile(self, q: float) -> np.ndarray:
        """Return the ``q`` quantile (0-1) of the mocks' log10 limits per mass, shape (n_mass,)."""
        with np.errstate(invalid="ignore"):
            return np.nanquantile(self.curves, q, axis=0)

    @property
    def median(self) -> np.ndarray:
        return self.quantile(0.5)

    @property
    def band_68(self) -> tuple[np.ndarray, np.ndarray]:
        return self.quantile(0.16), self.quantile(0.84)

    @property
    def band_95(self) -> tuple[np.ndarray, np.ndarray]:
        return self.quantile(0.025), self.quantile(0.975)

    def to_dict(self, include_curves: bool = False) -> dict[str, Any]:
        """JSON-safe summary; limits as log10(g / GeV^-1) and in GeV^-1, null for NaN."""
        low_68, high_68 = self.band_68
        low_95, high_95 = self.band_95
        result: dict[str, Any] = {
            "estimator_id": self.estimator_id,
            "estimator_checksum": self.estimator_checksum,
            "config_name": self.config_name,
            "n_mocks": self.n_mocks,
            "level": self.level,
            "null_coupling_per_gev": NULL_COUPLING_PER_GEV,
            "seed": self.seed,
            "simulation": self.simulation,
            "timing_s": self.seconds,
            "mass_neV": _json_floats(10.0**self.log10_mass_grid),
            "log10_mass_neV": _json_floats(self.log10_mass_grid),
            "log10_g_per_gev": {
                "median": _json_floats(self.median),
                "band_68": [_json_floats(low_68), _json_floats(high_68)],
                "band_95": [_json_floats(low_95), _json_floats(high_95)],
            },
            "g_per_gev": {
                "median": _json_floats(10.0**self.median),
                "band_68": [_json_floats(10.0**low_68), _json_floats(10.0**high_68)],
                "band_95": [_json_floats(10.0**low_95), _json_floats(10.0**high_95)],
            },
        }
        if include_curves:
            result["log10_g_per_gev"]["curves"] = [_json_floats(row) for row in self.curves]
        return result


def _json_floats(values: np.ndarray) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in np.asarray(values, dtype=float)]


def expected_limits_from_spectra(
    estimator: LoadedEstimator,
    counts: np.ndarray,
    *,
    grid_size: int = 100,
    level: float = 0.95,
) -> tuple[np.ndarray, np.ndarray]:
    """Upper-limit curves of mock spectra.

    Parameters
    ----------
    counts
        Mock count spectra, shape (n_mocks, n_bins).

    Returns
    -------
    log10_mass_grid, curves
        Shapes (grid_size,) and (n_mocks, grid_size); limits in log10(g / GeV^-1).
    """
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[0] == 0:
        raise ValueError(f"counts must have shape (n_mocks, n_bins), got {counts.shape}")
    if JOINT_KEY not in {f"{a}__{b}" for a, b in estimator.spec.two_dim}:
        raise ValueError(
            f"estimator {estimator.estimator_id} has no 2-dim (m_neV, g_per_gev) head, "
            "which the upper-limit curves need"
        )
    curves = np.empty((counts.shape[0], grid_size))
    grid = np.empty(grid_size)
    for i, x in enumerate(counts):
        joint = compute_posterior(estimator, x, grid_size=grid_size, marginals=[]).two_dim[
            JOINT_KEY
        ]
        curves[i] = joint.upper_limit_curve(level)
        grid = joint.grid_x
    return grid, curves


def simulate_null_run(
    config: AnalysisConfig,
    run_dir: str | Path,
    *,
    n_mocks: int,
    seed: int,
    batch_size: int | None = None,
    workers: int = 1,
) -> Path:
    """Simulate ``n_mocks`` no-ALP spectra of ``config`` into a run folder on this machine."""
    if n_mocks < 1:
        raise ValueError(f"n_mocks must be >= 1, got {n_mocks}")
    null_config = null_hypothesis_config(config)
    simulate_run(
        null_config,
        run_dir,
        n_simulations=n_mocks,
        batch_size=batch_size or max(1, min(n_mocks, 500)),
        run_seed=seed,
        workers=workers,
        progress=False,
    )
    return Path(run_dir)


def expected_limits_from_run(
    estimator: LoadedEstimator,
    run_dir: str | Path,
    *,
    grid_size: int = 100,
    level: float = 0.95,
    seed: int | None = None,
    simulation: dict[str, Any] | None = None,
) -> ExpectedLimits:
    """Expected limits from the spectra of a finished no-ALP run.

    Raises
    ------
    ValueError
        When the run contains couplings above 1e-15 GeV^-1, i.e. it was not simulated
        with :func:`null_hypothesis_config`, or its binning does not fit the estimator.
    """
    start = time.perf_counter()
    files = run_batch_files(run_dir)
    if not files:
        raise ValueError(f"run {run_dir} has no finished batch")
    counts, theta = read_spectra(files, ["g_per_gev"])
    largest = float(np.max(theta[:, 0]))
    if largest > _MAX_NULL_COUPLING_PER_GEV:
        raise ValueError(
            f"run {run_dir} has couplings up to {largest:.3g} GeV^-1; expected limits need "
            "mocks without ALPs, simulated with null_hypothesis_config()"
        )
    if counts.shape[1] != estimator.spec.n_bins:
        raise ValueError(
            f"run {run_dir} has {counts.shape[1]} energy bins, estimator "
            f"{estimator.estimator_id} expects {estimator.spec.n_bins}"
        )
    grid, curves = expected_limits_from_spectra(estimator, counts, grid_size=grid_size, level=level)
    manifest = read_manifest(run_dir)
    return ExpectedLimits(
        estimator_id=estimator.estimator_id,
        estimator_checksum=estimator.checksum,
        config_name=manifest.config_name.removesuffix("-no-alp"),
        log10_mass_grid=grid,
        curves=curves,
        level=level,
        seed=seed if seed is not None else manifest.run_seed,
        simulation={"run_id": manifest.run_id, **(simulation or {})},
        seconds=time.perf_counter() - start,
    )


def compute_expected_limits(
    config: AnalysisConfig,
    estimator: LoadedEstimator,
    *,
    n_mocks: int,
    seed: int = 0,
    grid_size: int = 100,
    level: float = 0.95,
    workers: int = 1,
    run_dir: str | Path | None = None,
) -> ExpectedLimits:
    """Simulate no-ALP mocks on this machine and return their expected limits.

    Parameters
    ----------
    workers
        Processes of the simulation pool; 1 simulates in this process.
    run_dir
        Folder for the mock run; default: a temporary folder, deleted afterwards.
    """
    start = time.perf_counter()
    check_estimator_matches(config, estimator)
    with tempfile.TemporaryDirectory(prefix="alpnre-null-") as temporary:
        folder = Path(run_dir) if run_dir is not None else Path(temporary)
        simulate_null_run(config, folder, n_mocks=n_mocks, seed=seed, workers=workers)
        result = expected_limits_from_run(
            estimator,
            folder,
            grid_size=grid_size,
            level=level,
            seed=seed,
            simulation={"backend": "local", "workers": workers},
        )
    result.seconds = time.perf_counter() - start
    log.info(
        "expected limits of estimator %s: %d mocks in %.1f s",
        estimator.estimator_id,
        n_mocks,
        result.seconds,
    )
    return result


def load_published_limits() -> list[dict[str, Any]]:
    """Published exclusion limits shipped with the package (see the data file for sources)."""
    text = resources.files("alpnre").joinpath(PUBLISHED_LIMITS_RESOURCE).read_text()
    return list(json.loads(text)["limits"])


def plot_expected_limits(
    result: ExpectedLimits,
    published: Sequence[dict[str, Any]] | None = None,
    path: str | Path | None = None,
) -> Any:
    """Plot the expected limit with its 68 % and 95 % bands over published limits.

    Axes are m in neV and g in GeV^-1, both logarithmic. Published limits are drawn
    as their excluded regions (hatched polygons). Returns the matplotlib figure and
    saves it when ``path`` is given.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mass = 10.0**result.log10_mass_grid
    low_95, high_95 = (10.0**edge for edge in result.band_95)
    low_68, high_68 = (10.0**edge for edge in result.band_68)
    figure, axis = plt.subplots(figsize=(6.5, 4.8), layout="constrained")
    axis.fill_between(mass, low_95, high_95, color="#ffdd55", label="expected, 95 % band")
    axis.fill_between(mass, low_68, high_68, color="#55bb55", label="expected, 68 % band")
    axis.plot(mass, 10.0**result.median, "k--", lw=1.5, label="expected, median")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlim(mass[0], mass[-1])
    g_top = float(np.nanmax(high_95)) * 3.0
    bottom = float(np.nanmin(low_95)) / 3.0
    # Lower the plot to show the published regions inside the mass range as well.
    for entry in published or []:
        for polygon in entry.get("polygons", []):
            points = np.asarray(polygon, dtype=float)
            inside = (points[:, 0] >= mass[0]) & (points[:, 0] <= mass[-1])
            if inside.any():
                bottom = min(bottom, float(points[inside, 1].min()) / 1.5)
    for index, entry in enumerate(published or []):
        _draw_published(axis, entry, f"C{index + 3}", g_top)
    axis.set_ylim(bottom, g_top)
    axis.set_xlabel("ALP mass m [neV]")
    axis.set_ylabel("coupling g [GeV$^{-1}$]")
    axis.set_title(
        f"Expected {result.level:.0%} upper limits, {result.n_mocks} no-ALP mocks\n"
        f"estimator {result.estimator_id}",
        fontsize=9,
    )
    axis.legend(loc="best", fontsize=7)
    if path is not None:
        figure.savefig(path, dpi=130)
    return figure


def _draw_published(axis: Any, entry: dict[str, Any], color: str, g_top: float) -> None:
    if entry["shape"] != "polygons":
        raise ValueError(
            f"published limit {entry['name']!r} has unknown shape {entry['shape']!r}; "
            "expected 'polygons'"
        )
    label = f"{entry['name']} ({entry['label_note']})"
    for index, polygon in enumerate(entry["polygons"]):
        mass, coupling = np.asarray(polygon, dtype=float).T
        axis.fill(
            mass,
            # Regions reaching above the plot are clipped at its top edge.
            np.minimum(coupling, g_top),
            facecolor=color,
            alpha=0.25,
            edgecolor=color,
            hatch="//",
            # No outline: the polygons of one region share edges that are not boundaries.
            lw=0.0,
            label=label if index == 0 else None,
        )
