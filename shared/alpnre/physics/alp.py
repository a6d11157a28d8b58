"""Photon survival probability P_γγ(E) of gamma rays from NGC 1275 with photon-ALP mixing.

Photons leave NGC 1275 unpolarised and cross, in this order:

1. the Perseus ICM, a Gaussian turbulent field in cells of length 1/kH out to r_abell,
   at the source-frame energy E (1 + z);
2. the EBL, which absorbs photons with optical depth ``ebl_norm`` τ(E, z) and does not
   touch ALPs;
3. the coherent Galactic field (Jansson & Farrar 2012, as implemented in gammaALPs) at
   the observed energy E, unless ``propagation.galactic_field == "none"``.

P_γγ = P_x + P_y at Earth includes the EBL attenuation, so g -> 0 gives
exp(-ebl_norm τ). Two backends compute it: "kernel" (alpnre's vectorised kernel with an
alpnre field realisation) and "gammaalps" (the reference: gammaALPs' ``ModuleList``).
The same ``bfield_seed`` gives the same field within one backend, but the two backends
draw different realisations from the same seed.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from alpnre.config import PropagationConfig, SourceConfig
from alpnre.physics._gammaalps import import_gammaalps
from alpnre.physics.bfield import CLUSTER_KEYS, galactic_cells, icm_cells
from alpnre.physics.propagation import (
    AbsorptionStep,
    MixingStep,
    Step,
    pad_cells,
    propagate,
    propagate_batch,
    propagate_batch_torch,
)

__all__ = ["ebl_optical_depth", "survival_probability", "survival_probability_batch"]

log = logging.getLogger(__name__)

GEV_PER_TEV = 1e3
# gammaALPs' ALP takes the coupling in units of 1e-11 GeV^-1.
G11_PER_GEV = 1e11
_REQUIRED = ("m_neV", "g_per_gev", *CLUSTER_KEYS)


# --- EBL ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _ebl_table(model: str) -> Any:
    from ebltable.tau_from_model import OptDepth

    log.debug("reading EBL model %s", model)
    return OptDepth.readmodel(model=model)


def ebl_optical_depth(energy_tev: np.ndarray, redshift: float, model: str) -> np.ndarray:
    """Return the EBL optical depth τ(E, z) of ebltable's model ``model``.

    Parameters
    ----------
    energy_tev : numpy.ndarray
        Observed energies in TeV, shape (n_energy,).
    redshift : float
        Source redshift; τ is 0 at z = 0 (ebltable pads its tables with zeros there).
    model : str
        An ebltable model name, e.g. "dominguez".

    Returns
    -------
    numpy.ndarray
        Shape (n_energy,), dimensionless.
    """
    energy = _check_energy(energy_tev)
    if not (math.isfinite(redshift) and redshift >= 0.0):
        raise ValueError(f"redshift={redshift} must be finite and non-negative")
    tau = _ebl_table(model).opt_depth(float(redshift), energy)
    return np.atleast_1d(np.asarray(tau, dtype=np.float64)).reshape(energy.shape)


# --- input checks -------------------------------------------------------------------------
def _check_energy(energy_tev: np.ndarray) -> np.ndarray:
    energy = np.asarray(energy_tev, dtype=np.float64)
    if energy.ndim != 1 or energy.size == 0:
        raise ValueError(f"energy_tev must be a non-empty 1-D array, got shape {energy.shape}")
    if not np.all(np.isfinite(energy)) or np.any(energy <= 0.0):
        raise ValueError("energy_tev must contain positive finite energies in TeV")
    return energy


def _check_params(params: Mapping[str, Any]) -> None:
    missing = [name for name in _REQUIRED if name not in params]
    if missing:
        raise ValueError(
            f"missing parameters {missing}: survival_probability needs {list(_REQUIRED)} "
            "(ebl_norm is optional and defaults to 1)"
        )
    for name in ("m_neV", "g_per_gev", "ebl_norm"):
        values = np.asarray(params.get(name, 1.0), dtype=np.float64)
        if not np.all(np.isfinite(values)) or np.any(values < 0.0):
            raise ValueError(f"{name}={params[name]} must be finite and non-negative")


# --- kernel backend -------------------------------------------------------------------
def _kernel_steps(
    energy_gev: np.ndarray,
    params: Mapping[str, float],
    source: SourceConfig,
    tau: np.ndarray,
    propagation: PropagationConfig,
    rng: np.random.Generator,
) -> list[Step]:
    ebl_norm = float(params.get("ebl_norm", 1.0))
    steps: list[Step] = [
        MixingStep(icm_cells(params, rng), energy_gev * (1.0 + source.redshift)),
        AbsorptionStep(np.exp(-ebl_norm * tau)),
    ]
    if propagation.galactic_field != "none":
        gmf = galactic_cells(source.ra_deg, source.dec_deg, propagation.galactic_field)
        steps.append(MixingStep(gmf, energy_gev))
    return steps


# --- gammaALPs backend ----------------------------------------------------------------
def _survival_probability_gammaalps(
    energy_gev: np.ndarray,
    params: Mapping[str, float],
    source: SourceConfig,
    ebl_model: str,
    propagation: PropagationConfig,
    bfield_seed: int,
) -> np.ndarray:
    """Compute P_γγ with gammaALPs' ModuleList, passing every environment setting explicitly.

    gammaALPs' own defaults are unsafe here: MixICMGaussTurb defaults to kL = 1 and
    kH = 0.01 (swapped) and to q = +11/3, and ModuleList keeps the ``eblnorm`` of the
    last ``add_propagation`` call, so it is passed to every call.
    """
    core = import_gammaalps("gammaALPs.core")
    ALP, ModuleList, Source = core.ALP, core.ModuleList, core.Source

    value = {name: float(params[name]) for name in _REQUIRED}
    # numpy.random.seed, which gammaALPs calls, takes seeds below 2^32; simulators draw
    # 63-bit seeds. A Python int also selects gammaALPs' per-realisation seeding branch.
    seed = int(bfield_seed) % 2**32
    ebl_norm = float(params.get("ebl_norm", 1.0))
    # Source only converts coordinates given as Python floats.
    gamma_source = Source(
        z=float(source.redshift), ra=float(source.ra_deg), dec=float(source.dec_deg)
    )
    alp = ALP(m=value["m_neV"], g=value["g_per_gev"] * G11_PER_GEV)
    # NOTE: ModuleList calls logging.basicConfig and Bgaussian re-seeds numpy's global
    # random state; both are gammaALPs side effects that this reference path keeps.
    modules = ModuleList(
        alp,
        gamma_source,
        pin=np.diag((0.5, 0.5, 0.0)),
        EGeV=energy_gev,
        seed=seed,
        log_level="warning",
    )
    modules.add_propagation(
        "ICMGaussTurb",
        0,
        nsim=1,
        seed=seed,
        B0=value["b0_microgauss"],
        kL=value["kl_per_kpc"],
        kH=value["kh_per_kpc"],
        q=value["q"],
        kMin=-1.0,  # gammaALPs' code for 1e-3 kL
        dkType="log",
        dkSteps=0,  # gammaALPs' code for ceil(10 (log10 kH - log10 kMin)^2)
        eta=value["eta"],
        n0=value["n0_cm3"],
        r_core=value["r_core_kpc"],
        beta=value["beta"],
        n2=value["n2_cm3"],
        r_core2=value["r_core2_kpc"],
        beta2=value["beta2"],
        r_abell=value["r_abell_kpc"],
        thinning=1,
        chi=None,
        eblnorm=ebl_norm,
    )
    modules.add_propagation("EBL", 1, eblmodel=ebl_model, eblnorm=ebl_norm)
    if propagation.galactic_field != "none":
        from alpnre.physics import bfield

        modules.add_propagation(
            "GMF",
            2,
            model=propagation.galactic_field,
            int_steps=bfield.GALACTIC_INT_STEPS,
            rho_max=bfield.GALACTIC_RHO_MAX_KPC,
            zmax=bfield.GALACTIC_Z_MAX_KPC,
            n0=bfield.GALACTIC_ELECTRON_DENSITY_CM3,
            chi=None,
            eblnorm=ebl_norm,
        )
    with warnings.catch_warnings():
        # calc_lin_pol warns about round-off imaginary parts of the polarisation degree.
        warnings.simplefilter("ignore", UserWarning)
        p_x, p_y, _ = modules.run()
    return np.asarray(p_x + p_y, dtype=np.float64).reshape(energy_gev.shape)


# --- public API -----------------------------------------------------------------------
def survival_probability(
    energy_tev: np.ndarray,
    params: Mapping[str, float],
    *,
    source: SourceConfig,
    ebl_model: str,
    propagation: PropagationConfig,
    bfield_seed: int,
) -> np.ndarray:
    """Compute the photon survival probability P_γγ(E) of NGC 1275 for one field realisation.

    Parameters
    ----------
    energy_tev : numpy.ndarray
        Observed (true) energies in TeV, shape (n_energy,).
    params : mapping
        Simulator parameters by name: ``m_neV``, ``g_per_gev``, the cluster parameters
        (b0_microgauss, eta, r_abell_kpc, n0_cm3, r_core_kpc, beta, n2_cm3, r_core2_kpc,
        beta2, kl_per_kpc, kh_per_kpc, q) and optionally ``ebl_norm`` (default 1).
        Other keys, such as the intrinsic spectrum, are ignored.
    source : SourceConfig
        Redshift and position (for the Galactic field).
    ebl_model : str
        ebltable model name.
    propagation : PropagationConfig
        ``backend`` ("kernel" or "gammaalps") and ``galactic_field``.
    bfield_seed : int
        Seed of the ICM field realisation, a non-negative int (the "gammaalps" backend
        uses it modulo 2^32, the range numpy.random.seed accepts).

    Returns
    -------
    numpy.ndarray
        Shape (n_energy,), P_γγ clipped to [0, 1] (round-off can exceed 1 by ~1e-15).
    """
    energy_gev = _check_energy(energy_tev) * GEV_PER_TEV
    _check_params(params)
    if propagation.backend == "gammaalps":
        probability = _survival_probability_gammaalps(
            energy_gev, params, source, ebl_model, propagation, bfield_seed
        )
    else:
        tau = ebl_optical_depth(energy_gev / GEV_PER_TEV, source.redshift, ebl_model)
        rng = np.random.default_rng(bfield_seed)
        steps = _kernel_steps(energy_gev, params, source, tau, propagation, rng)
        probability, _ = propagate(
            steps, float(params["m_neV"]), float(params["g_per_gev"]) * G11_PER_GEV
        )
    return np.clip(probability, 0.0, 1.0)


def _resolve_device(device: str) -> str:
    """Return "cpu" for the numba kernel or a torch device string for the torch path."""
    if device == "auto":
        if importlib.util.find_spec("torch") is None:
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" or device.startswith("cuda"):
        return device
    raise ValueError(f"unknown device {device!r}: choose 'auto', 'cpu', 'cuda' or 'cuda:N'")


def survival_probability_batch(
    energy_tev: np.ndarray,
    params_batch: Mapping[str, np.ndarray],
    *,
    source: SourceConfig,
    ebl_model: str,
    propagation: PropagationConfig,
    bfield_seeds: np.ndarray,
    device: str = "auto",
    dtype: Literal["float32", "float64"] = "float64",
) -> np.ndarray:
    """Compute P_γγ(E) for a batch of simulations with the kernel.

    Simulation i uses ``numpy.random.default_rng(bfield_seeds[i])``, so its field (and,
    in float64, its result) equals that of :func:`survival_probability` with the same
    parameters and seed. ``propagation.backend`` is ignored: batches always use the
    kernel.

    Parameters
    ----------
    energy_tev : numpy.ndarray
        Observed energies in TeV, shape (n_energy,).
    params_batch : mapping
        Parameter arrays of shape (n_sim,) (scalars are broadcast), with the names of
        :func:`survival_probability`.
    source, ebl_model, propagation
        As for :func:`survival_probability`.
    bfield_seeds : numpy.ndarray
        Integer seeds, shape (n_sim,).
    device : str
        "auto" uses torch on a GPU when one is available, else the numba kernel on the
        CPU. "cpu" forces the numba kernel, and "cuda" or "cuda:N" forces torch.
    dtype : {"float32", "float64"}
        Precision of the torch path (the CPU kernel always uses float64).

    Returns
    -------
    numpy.ndarray
        Shape (n_sim, n_energy), clipped to [0, 1].
    """
    energy_gev = _check_energy(energy_tev) * GEV_PER_TEV
    seeds = np.asarray(bfield_seeds)
    if seeds.ndim != 1 or not np.issubdtype(seeds.dtype, np.integer):
        raise ValueError(
            f"bfield_seeds must be a 1-D integer array, got {seeds.dtype} {seeds.shape}"
        )
    n_sim = seeds.shape[0]
    _check_params(params_batch)
    columns: dict[str, np.ndarray] = {}
    for name in (*_REQUIRED, "ebl_norm"):
        column = np.asarray(params_batch.get(name, 1.0), dtype=np.float64)
        if column.ndim > 1 or (column.ndim == 1 and column.shape[0] != n_sim):
            raise ValueError(f"{name} has shape {column.shape}: expected ({n_sim},) or a scalar")
        columns[name] = np.broadcast_to(column, (n_sim,))

    tau = ebl_optical_depth(energy_gev / GEV_PER_TEV, source.redshift, ebl_model)
    icm = pad_cells(
        [
            icm_cells(
                {name: columns[name][i] for name in CLUSTER_KEYS}, np.random.default_rng(seed)
            )
            for i, seed in enumerate(seeds.tolist())
        ]
    )
    steps: list[Step] = [
        MixingStep(icm, energy_gev * (1.0 + source.redshift)),
        AbsorptionStep(np.exp(-columns["ebl_norm"][:, None] * tau)),
    ]
    if propagation.galactic_field != "none":
        gmf = galactic_cells(source.ra_deg, source.dec_deg, propagation.galactic_field)
        steps.append(MixingStep(gmf, energy_gev))

    m_nev = columns["m_neV"]
    g11 = columns["g_per_gev"] * G11_PER_GEV
    resolved = _resolve_device(device)
    log.debug("propagating %d simulations on %s", n_sim, resolved)
    if resolved == "cpu":
        probability, _ = propagate_batch(steps, m_nev, g11)
    else:
        probability, _ = propagate_batch_torch(steps, m_nev, g11, dtype=dtype, device=resolved)
    return np.clip(probability, 0.0, 1.0)
