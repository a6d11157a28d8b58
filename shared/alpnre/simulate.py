"""The simulator: from parameters θ to a predicted and an observed count spectrum.

.. math::
    x \\sim \\mathrm{Poisson}\\Big(\\mathrm{IRF} \\otimes \\big[\\phi(E)\\, P_{\\gamma\\gamma}(E;
    m, g, \\mathrm{cluster}, \\mathrm{EBL}, \\mathrm{GMF})\\big] + \\mathrm{background}\\Big)

where :math:`P_{\\gamma\\gamma}` already contains the EBL attenuation (photons cross the
Perseus cluster, then the EBL, then the Milky Way). A batch is reproducible from
``(run_seed, batch_index)`` alone: its generator is seeded with
``numpy.random.SeedSequence(run_seed, spawn_key=(batch_index,))``, the same stream as
``SeedSequence(run_seed).spawn(n)[batch_index]``, so the result does not depend on how
many workers ran the run or in which order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

import alpnre
from alpnre.config import AnalysisConfig, config_hash, config_to_json
from alpnre.dataset import (
    SCHEMA_VERSION,
    DatasetError,
    batch_path,
    encode_metadata,
    file_sha256,
    spectra_schema,
    validate_batch_file,
    write_table_atomic,
)
from alpnre.physics.alp import survival_probability, survival_probability_batch
from alpnre.physics.irf import InstrumentResponse, load_instrument_response
from alpnre.physics.spectrum import bin_centers_tev, cutoff_power_law_dnde, integrate_over_bins

__all__ = [
    "BatchResult",
    "batch_rows",
    "batch_seed_sequence",
    "expected_counts",
    "run_batch",
    "sample_parameters",
    "simulate_batch",
]

log = logging.getLogger(__name__)


def batch_seed_sequence(run_seed: int, batch_index: int) -> np.random.SeedSequence:
    """Seed sequence of one batch, equal to ``SeedSequence(run_seed).spawn(...)[batch_index]``."""
    if not isinstance(run_seed, int | np.integer) or run_seed < 0:
        raise ValueError(f"run_seed must be a non-negative integer, got {run_seed!r}")
    return np.random.SeedSequence(int(run_seed), spawn_key=(int(batch_index),))


def batch_rows(n_simulations: int, batch_size: int, batch_index: int) -> int:
    """Number of rows of batch ``batch_index`` when ``n_simulations`` are split in batches."""
    n_batches = -(-n_simulations // batch_size)
    if not 0 <= batch_index < n_batches:
        raise ValueError(f"batch_index {batch_index} outside [0, {n_batches})")
    return min(batch_size, n_simulations - batch_index * batch_size)


def sample_parameters(
    config: AnalysisConfig, rng: np.random.Generator, n_theta: int
) -> dict[str, np.ndarray]:
    """Draw ``n_theta`` parameter vectors from the config's priors.

    Returns a mapping from parameter name to an array of shape (n_theta,). Parameters
    are drawn in the fixed order of ``config.parameter_names`` so a seed always gives
    the same values.
    """
    return {name: config.prior(name).sample(rng, n_theta) for name in config.parameter_names}


def expected_counts(
    config: AnalysisConfig,
    instrument: InstrumentResponse,
    params: Mapping[str, np.ndarray],
    bfield_seeds: np.ndarray,
) -> np.ndarray:
    """Predicted counts (npred) per reconstructed-energy bin, shape (n_sims, n_energy_bins).

    Parameters
    ----------
    params
        Parameter arrays of shape (n_sims,), keyed by the names of
        :data:`alpnre.parameters.PARAMETERS`.
    bfield_seeds
        Shape (n_sims,): the seed of each simulation's turbulent-field realisation.
    """
    energy_true_tev = bin_centers_tev(instrument.energy_true_edges_tev)
    p_gamma_gamma = _survival_probabilities(config, energy_true_tev, params, bfield_seeds)
    dnde = cutoff_power_law_dnde(
        energy_true_tev[None, :],
        np.asarray(params["phi0_per_cm2_s_tev"])[:, None],
        np.asarray(params["gamma"])[:, None],
        np.asarray(params["ecut_tev"])[:, None],
    )
    flux = integrate_over_bins(dnde * p_gamma_gamma, instrument.energy_true_edges_tev)
    return np.asarray(instrument.npred(flux))


def _survival_probabilities(
    config: AnalysisConfig,
    energy_true_tev: np.ndarray,
    params: Mapping[str, np.ndarray],
    bfield_seeds: np.ndarray,
) -> np.ndarray:
    common: dict[str, Any] = {
        "source": config.source,
        "ebl_model": config.ebl.model,
        "propagation": config.propagation,
    }
    if config.propagation.backend == "gammaalps":
        rows = [
            survival_probability(
                energy_true_tev,
                {name: float(values[i]) for name, values in params.items()},
                bfield_seed=int(bfield_seeds[i]),
                **common,
            )
            for i in range(len(bfield_seeds))
        ]
        return np.stack(rows)
    return np.asarray(
        survival_probability_batch(
            energy_true_tev, params, bfield_seeds=np.asarray(bfield_seeds), **common
        )
    )


def simulate_batch(
    config: AnalysisConfig,
    n_simulations: int,
    seed: int | np.random.SeedSequence,
    *,
    first_sim_index: int = 0,
    instrument: InstrumentResponse | None = None,
) -> pa.Table:
    """Simulate ``n_simulations`` spectra and return them as an Arrow table.

    Each θ is drawn from the priors and simulated ``config.propagation.
    realisations_per_theta`` times with different B-field realisations, so the table
    contains ``n_simulations`` rows in all. Columns are described in
    :mod:`alpnre.dataset`; the table carries no file metadata (see :func:`run_batch`).
    """
    if n_simulations < 1:
        raise ValueError(f"n_simulations must be >= 1, got {n_simulations}")
    rng = np.random.default_rng(seed)
    instrument = instrument or load_instrument_response(config)

    # Parameters: one θ per group of realisations, one B-field seed per row.
    realisations = config.propagation.realisations_per_theta
    n_theta = -(-n_simulations // realisations)
    theta_params = sample_parameters(config, rng, n_theta)
    theta_index = np.repeat(np.arange(n_theta), realisations)[:n_simulations]
    params = {name: values[theta_index] for name, values in theta_params.items()}
    bfield_seeds = rng.integers(0, 2**63, size=n_simulations, dtype=np.uint64)
    if config.propagation.fixed_bfield_seed is not None:
        bfield_seeds[:] = config.propagation.fixed_bfield_seed

    # Expected and observed counts.
    npred = expected_counts(config, instrument, params, bfield_seeds)
    counts = rng.poisson(npred)

    n_bins = npred.shape[1]
    schema = spectra_schema(config.parameter_names, n_bins)
    columns = {
        "sim_index": pa.array(first_sim_index + np.arange(n_simulations), pa.int64()),
        "theta_index": pa.array(first_sim_index + theta_index, pa.int64()),
        **{name: pa.array(params[name], pa.float64()) for name in config.parameter_names},
        "bfield_seed": pa.array(bfield_seeds, pa.uint64()),
        "npred": _fixed_size_lists(npred.astype(np.float32), pa.float32()),
        "counts": _fixed_size_lists(counts.astype(np.int32), pa.int32()),
    }
    return pa.table(columns, schema=schema)


def _fixed_size_lists(values: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    width = values.shape[1]
    flat = pa.array(values.reshape(-1), value_type)
    return pa.FixedSizeListArray.from_arrays(flat, width)


@dataclass(frozen=True)
class BatchResult:
    """Outcome of :func:`run_batch`."""

    batch_index: int
    path: Path
    n_rows: int
    sha256: str
    seconds: float
    skipped: bool


def batch_metadata(
    config: AnalysisConfig, instrument: InstrumentResponse, run_seed: int, batch_index: int
) -> dict[str, object]:
    """File metadata of one batch (see :mod:`alpnre.dataset`)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "config": config_to_json(config),
        "config_hash": config_hash(config),
        "config_name": config.name,
        "preset": config.preset,
        "preset_version": config.preset_version,
        "energy_edges_tev": [float(edge) for edge in instrument.energy_edges_tev],
        "irf_id": instrument.irf_id,
        "irf_is_approximation": instrument.is_approximation,
        "library_version": alpnre.__version__,
        "run_seed": int(run_seed),
        "batch_index": int(batch_index),
    }


def run_batch(
    config: AnalysisConfig,
    run_dir: str | Path,
    batch_index: int,
    run_seed: int,
    batch_size: int,
    n_simulations: int,
) -> BatchResult:
    """Simulate one batch of a run and write it atomically, unless it already exists.

    Idempotent: the output path depends only on ``(run_dir, batch_index)``, and a file
    that is already there and validates (row count and config hash) is kept as it is.
    A file that does not validate is logged and recomputed. Batch ``i`` contains the
    simulations ``i * batch_size`` to ``min((i + 1) * batch_size, n_simulations) - 1``.
    """
    n_rows = batch_rows(n_simulations, batch_size, batch_index)
    path = batch_path(run_dir, batch_index)
    expected_hash = config_hash(config)
    if path.exists():
        try:
            validate_batch_file(path, expected_rows=n_rows, config_hash=expected_hash)
        except DatasetError as error:
            log.warning(
                "batch %d: existing file is invalid and is rewritten: %s", batch_index, error
            )
        else:
            log.info("batch %d: %s already exists and validates, skipped", batch_index, path)
            return BatchResult(batch_index, path, n_rows, file_sha256(path), 0.0, skipped=True)

    start = time.perf_counter()
    instrument = load_instrument_response(config)
    table = simulate_batch(
        config,
        n_rows,
        batch_seed_sequence(run_seed, batch_index),
        first_sim_index=batch_index * batch_size,
        instrument=instrument,
    )
    metadata = encode_metadata(batch_metadata(config, instrument, run_seed, batch_index))
    table = table.replace_schema_metadata(metadata)
    sha256 = write_table_atomic(table, path)
    seconds = time.perf_counter() - start
    log.info("batch %d: wrote %d rows to %s in %.2f s", batch_index, n_rows, path, seconds)
    return BatchResult(batch_index, path, n_rows, sha256, seconds, skipped=False)
