"""Magnetic fields along the line of sight to NGC 1275: the Perseus ICM and the Milky Way.

The cluster field is a Gaussian turbulent field with the statistics of gammaALPs 0.4.0
``Bgaussian.new_Bn``. Each of the two transverse components is a sum of cosine modes on a
logarithmic grid of wave numbers from 1e-3 kL to kH. The mode amplitudes follow the
transverse correlation spectrum F_q of a power spectrum M(k) ∝ k^q between kL and kH.
The field strength then scales with the electron
density as (n_e(r) / n_e(0))^eta, as ``NelICM.Bscale`` does.

gammaALPs draws a Rayleigh amplitude and a uniform phase per mode and evaluates the
cosines on a (modes x cells) grid. Here each mode is the equivalent complex Gaussian
coefficient, and on the uniform cell grid the exponentials factorise into block and
offset terms, so a realisation costs one small matrix product instead of
n_modes x n_cells cosines. The random draws differ from gammaALPs'; the statistics agree.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from alpnre.physics.propagation import Cells

__all__ = [
    "CellGrid",
    "cell_grid",
    "electron_density",
    "field_scale",
    "galactic_cells",
    "gaussian_field_components",
    "icm_cells",
    "mode_variances",
    "transverse_spectrum",
    "turbulence_wave_numbers",
]

log = logging.getLogger(__name__)

# Electron density in the Milky Way cells, in cm^-3. gammaALPs 0.4.0 uses this constant
# (its MixGMF default, "NE2001 code missing") and the reference path must match it.
# NOTE: free-electron densities in the Milky Way are of order 0.01-0.1 cm^-3, so this value
# overstates the plasma term. Even so, Δ_pl = 1.1e-3 kpc^-1 (1 GeV / E) stays below Δ_ag
# = 1.5e-2 kpc^-1 (g / 1e-11 GeV^-1) (B / µG) above 5 GeV unless g B < 0.015 in these units.
GALACTIC_ELECTRON_DENSITY_CM3 = 10.0
# Integration cells of gammaALPs' MixGMF and the extent of its Galactic field, in kpc.
GALACTIC_INT_STEPS = 100
GALACTIC_RHO_MAX_KPC = 20.0
GALACTIC_Z_MAX_KPC = 50.0


# --- cell grid and electron density -------------------------------------------------------
@dataclass(frozen=True)
class CellGrid:
    """Cells along the line of sight from the cluster centre outwards.

    Attributes
    ----------
    bounds_kpc : numpy.ndarray
        Cell boundaries, shape (n_cell + 1,).
    centres_kpc : numpy.ndarray
        Cell centres (distance from the cluster centre), shape (n_cell,).
    lengths_kpc : numpy.ndarray
        Cell lengths, shape (n_cell,).
    """

    bounds_kpc: np.ndarray
    centres_kpc: np.ndarray
    lengths_kpc: np.ndarray


def cell_grid(r_abell_kpc: float, kh_per_kpc: float) -> CellGrid:
    """Return the ICM cell grid: cells of length 1/kH from 0 towards r_abell.

    The boundaries are ``numpy.arange(0, r_abell, 1 / kH)`` as in gammaALPs'
    ``MixICMGaussTurb``, so the last boundary lies below r_abell and there are
    ceil(r_abell kH) - 1 cells.
    """
    if not (math.isfinite(r_abell_kpc) and r_abell_kpc > 0.0):
        raise ValueError(f"r_abell_kpc={r_abell_kpc} must be positive and finite")
    if not (math.isfinite(kh_per_kpc) and kh_per_kpc > 0.0):
        raise ValueError(f"kh_per_kpc={kh_per_kpc} must be positive and finite")
    bounds = np.arange(0.0, r_abell_kpc, 1.0 / kh_per_kpc)
    if bounds.size < 2:
        raise ValueError(
            f"r_abell_kpc={r_abell_kpc} is shorter than two cells of 1/kh_per_kpc="
            f"{1.0 / kh_per_kpc:g} kpc: increase r_abell_kpc or kh_per_kpc"
        )
    return CellGrid(bounds, 0.5 * (bounds[1:] + bounds[:-1]), np.diff(bounds))


def electron_density(
    r_kpc: np.ndarray,
    *,
    n0_cm3: float,
    r_core_kpc: float,
    beta: float,
    n2_cm3: float,
    r_core2_kpc: float,
    beta2: float,
) -> np.ndarray:
    """Return the ICM electron density in cm^-3 at distance ``r_kpc`` from the centre.

    The profile is gammaALPs' ``NelICM``. With n2, r_core2 and beta2 all positive it is
    the sum of two beta models. With n2 and r_core2 positive but beta2 not, it is the
    square root of the summed squares, with ``beta`` for both components. Otherwise it is
    a single beta model.
    """
    r2 = np.square(np.asarray(r_kpc, dtype=np.float64))
    first = n0_cm3 * (1.0 + r2 / r_core_kpc**2) ** (-1.5 * beta)
    if n2_cm3 > 0.0 and r_core2_kpc > 0.0 and beta2 > 0.0:
        return first + n2_cm3 * (1.0 + r2 / r_core2_kpc**2) ** (-1.5 * beta2)
    if n2_cm3 > 0.0 and r_core2_kpc > 0.0:
        second = n2_cm3 * (1.0 + r2 / r_core2_kpc**2) ** (-1.5 * beta)
        return np.sqrt(first**2 + second**2)
    return first


def field_scale(r_kpc: np.ndarray, *, eta: float, **density: float) -> np.ndarray:
    """Return the field scale (n_e(r) / n_e(0))^eta; ``density`` as for :func:`electron_density`.

    n_e(0) is n0 + n2 for the double beta model, as gammaALPs' ``NelICM.Bscale`` divides
    by it, so the scale is 1 at the centre.
    """
    central = electron_density(np.zeros(1), **density)[0]
    return (electron_density(r_kpc, **density) / central) ** eta


# --- turbulence spectrum ------------------------------------------------------------------
def _power_integral(a: np.ndarray, b: float, p: float) -> np.ndarray:
    """Return ∫_a^b t^p dt, stable for p near -1 (where it tends to log(b / a))."""
    s = p + 1.0
    log_ratio = np.log(b / a)
    if s == 0.0:
        return log_ratio
    return a**s * np.expm1(s * log_ratio) / s


def turbulence_wave_numbers(kl_per_kpc: float, kh_per_kpc: float) -> tuple[np.ndarray, np.ndarray]:
    """Return the mode wave numbers k_n and widths dk_n in kpc^-1, each of shape (n_mode,).

    The grid is gammaALPs' default (``dkType='log'``): ceil(10 (log10 kH - log10 kMin)^2)
    log-spaced points from kMin = 1e-3 kL to kH; each mode sits at the lower edge of its
    interval.
    """
    k_min = 1e-3 * kl_per_kpc
    n_steps = math.ceil(10.0 * (math.log10(kh_per_kpc) - math.log10(k_min)) ** 2)
    edges = np.logspace(math.log10(k_min), math.log10(kh_per_kpc), n_steps)
    return edges[:-1], np.diff(edges)


def transverse_spectrum(
    k: np.ndarray, kl_per_kpc: float, kh_per_kpc: float, q: float
) -> np.ndarray:
    """Return F_q(k) in kpc, the 1-D spectrum of one transverse component per B0^2 / 4.

    F_q(k) = A ∫_{max(k, kL)}^{kH} k'^(q+1) (1 + k^2 / k'^2) dk' with
    A = 1 / ∫_{kL}^{kH} k'^(q+2) dk', the same function as gammaALPs' ``Bgaussian.Fq``.
    Its integral over k is 4/3, so each transverse component has variance B0^2 / 3.
    """
    k = np.asarray(k, dtype=np.float64)
    lower = np.maximum(k, kl_per_kpc)
    norm = 1.0 / _power_integral(np.asarray(kl_per_kpc), kh_per_kpc, q + 2.0)
    return norm * (
        _power_integral(lower, kh_per_kpc, q + 1.0)
        + k**2 * _power_integral(lower, kh_per_kpc, q - 1.0)
    )


def mode_variances(
    b0_microgauss: float, kl_per_kpc: float, kh_per_kpc: float, q: float
) -> tuple[np.ndarray, np.ndarray]:
    """Return the wave numbers k_n (kpc^-1) and the variance of each mode's quadratures (µG^2).

    A component is sum_n (a_n cos k_n z + b_n sin k_n z) with independent a_n, b_n of
    variance (B0^2 / 4) F_q(k_n) dk_n. gammaALPs' Rayleigh amplitude
    sqrt(2 (B0^2 / 4) F_q dk ln(1/U)) with a uniform phase is the same distribution.
    """
    _check_turbulence(b0_microgauss, kl_per_kpc, kh_per_kpc, q)
    k, dk = turbulence_wave_numbers(kl_per_kpc, kh_per_kpc)
    variance = 0.25 * b0_microgauss**2 * transverse_spectrum(k, kl_per_kpc, kh_per_kpc, q) * dk
    return k, variance


def _check_turbulence(b0_microgauss: float, kl_per_kpc: float, kh_per_kpc: float, q: float) -> None:
    if not (math.isfinite(b0_microgauss) and b0_microgauss >= 0.0):
        raise ValueError(f"b0_microgauss={b0_microgauss} must be finite and non-negative")
    if not (0.0 < kl_per_kpc < kh_per_kpc and math.isfinite(kh_per_kpc)):
        raise ValueError(
            f"kl_per_kpc={kl_per_kpc} and kh_per_kpc={kh_per_kpc} must satisfy "
            "0 < kl_per_kpc < kh_per_kpc: kL is the lower wave-number cut-off, kH the upper"
        )
    if not math.isfinite(q):
        raise ValueError(f"q={q} must be finite (M(k) ∝ k^q, e.g. -11/3 for Kolmogorov)")


# --- field realisations ------------------------------------------------------------------
def gaussian_field_components(
    z_kpc: np.ndarray,
    *,
    b0_microgauss: float,
    kl_per_kpc: float,
    kh_per_kpc: float,
    q: float,
    rng: np.random.Generator | int | None,
    n_realisations: int = 1,
) -> np.ndarray:
    """Draw the two transverse components of the turbulent field at positions ``z_kpc``.

    Parameters
    ----------
    z_kpc : numpy.ndarray
        Positions along the line of sight in kpc, shape (n_z,). A uniform grid uses the
        fast factorised evaluation; any other grid evaluates every mode directly.
    b0_microgauss, kl_per_kpc, kh_per_kpc, q : float
        rms field B0 in µG (each transverse component has variance B0^2 / 3), the
        wave-number cut-offs in kpc^-1 and the spectral index of M(k) ∝ k^q.
    rng : numpy.random.Generator or int or None
        Source of randomness; an int is a seed for ``numpy.random.default_rng``.
    n_realisations : int
        Number of independent realisations.

    Returns
    -------
    numpy.ndarray
        Shape (n_realisations, 2, n_z), in µG, without the density scaling.
    """
    rng = np.random.default_rng(rng)
    z = np.asarray(z_kpc, dtype=np.float64)
    if z.ndim != 1 or z.size == 0:
        raise ValueError(f"z_kpc must be a non-empty 1-D array, got shape {z.shape}")
    if n_realisations < 1:
        raise ValueError(f"n_realisations={n_realisations} must be at least 1")
    k, variance = mode_variances(b0_microgauss, kl_per_kpc, kh_per_kpc, q)

    # Complex coefficient c_n = sigma_n (a_n - i b_n): Re(c_n exp(i k_n z)) is one mode.
    normals = rng.standard_normal((n_realisations, 2, 2, k.size))
    coefficients = np.sqrt(variance) * (normals[:, :, 0] - 1j * normals[:, :, 1])

    step = np.diff(z)
    if z.size > 2 and np.allclose(step, step[0], rtol=1e-9, atol=0.0):
        return _modes_on_uniform_grid(coefficients, k, z[0], float(step[0]), z.size)
    phases = np.exp(1j * np.outer(k, z))
    return (coefficients @ phases).real


def _modes_on_uniform_grid(
    coefficients: np.ndarray, k: np.ndarray, z0: float, dz: float, n_z: int
) -> np.ndarray:
    """Sum the modes on z_j = z0 + j dz through one real matrix product.

    Writing j = p Q + r, exp(i k z_j) = exp(i k (z0 + p Q dz)) exp(i k r dz): the first
    factor joins the coefficients (n_block x n_mode), the second is a shared
    (n_mode x Q) table, so only (n_block + Q) n_mode exponentials are evaluated.
    """
    block = max(1, math.isqrt(n_z))
    n_blocks = -(-n_z // block)
    starts = z0 + dz * block * np.arange(n_blocks)
    offsets = dz * np.arange(block)

    outer = coefficients[..., None, :] * np.exp(1j * starts[:, None] * k)  # (R, 2, P, N)
    inner = np.exp(1j * np.outer(k, offsets))  # (N, Q)
    stacked_outer = np.concatenate([outer.real, -outer.imag], axis=-1)
    stacked_inner = np.concatenate([inner.real, inner.imag], axis=0)
    values = stacked_outer @ stacked_inner  # Re(outer @ inner), (R, 2, P, Q)
    return values.reshape(*values.shape[:2], n_blocks * block)[..., :n_z]


CLUSTER_KEYS = (
    "b0_microgauss",
    "eta",
    "r_abell_kpc",
    "n0_cm3",
    "r_core_kpc",
    "beta",
    "n2_cm3",
    "r_core2_kpc",
    "beta2",
    "kl_per_kpc",
    "kh_per_kpc",
    "q",
)


def icm_cells(params: Mapping[str, float], rng: np.random.Generator | int | None) -> Cells:
    """Draw one realisation of the Perseus ICM field and return its cells.

    Parameters
    ----------
    params : mapping
        The cluster parameters of :data:`alpnre.parameters.CLUSTER_PARAMETERS`
        (b0_microgauss, eta, r_abell_kpc, n0_cm3, r_core_kpc, beta, n2_cm3, r_core2_kpc,
        beta2, kl_per_kpc, kh_per_kpc, q); other keys are ignored.
    rng : numpy.random.Generator or int or None
        Source of randomness; the same seed gives the same cells.

    Returns
    -------
    Cells
        Arrays of shape (n_cell,) from the centre outwards: transverse field in µG
        scaled by (n_e / n_e(0))^eta, angle psi = arctan2(B_t, B_u) as in gammaALPs,
        electron density and cell length.
    """
    missing = [key for key in CLUSTER_KEYS if key not in params]
    if missing:
        raise ValueError(
            f"missing cluster parameters {missing}: give every one of {list(CLUSTER_KEYS)}"
        )
    value = {key: float(params[key]) for key in CLUSTER_KEYS}
    density_params = {
        key: value[key]
        for key in ("n0_cm3", "r_core_kpc", "beta", "n2_cm3", "r_core2_kpc", "beta2")
    }
    if value["n0_cm3"] <= 0.0 or value["r_core_kpc"] <= 0.0:
        raise ValueError(
            f"n0_cm3={value['n0_cm3']} and r_core_kpc={value['r_core_kpc']} must be positive"
        )

    grid = cell_grid(value["r_abell_kpc"], value["kh_per_kpc"])
    components = gaussian_field_components(
        grid.centres_kpc,
        b0_microgauss=value["b0_microgauss"],
        kl_per_kpc=value["kl_per_kpc"],
        kh_per_kpc=value["kh_per_kpc"],
        q=value["q"],
        rng=rng,
    )[0]
    scale = field_scale(grid.centres_kpc, eta=value["eta"], **density_params)
    return Cells(
        b_microgauss=np.hypot(components[0], components[1]) * scale,
        psi_rad=np.arctan2(components[0], components[1]),
        nel_cm3=electron_density(grid.centres_kpc, **density_params),
        length_kpc=grid.lengths_kpc,
    )


# --- Galactic field -----------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def galactic_cells(ra_deg: float, dec_deg: float, model: str = "jansson12") -> Cells:
    """Return the Milky Way field cells towards (ra_deg, dec_deg), ordered towards Earth.

    The cells come from gammaALPs' ``MixGMF`` (coherent Jansson & Farrar 2012 field,
    100 integration steps, rho_max 20 kpc, z_max 50 kpc, n_e = 10 cm^-3) and are
    deterministic, so they are cached per position. The arrays are read-only.
    """
    import warnings

    from alpnre.physics._gammaalps import import_gammaalps

    MixGMF = import_gammaalps("gammaALPs.base.environs").MixGMF
    core = import_gammaalps("gammaALPs.core")
    ALP, Source = core.ALP, core.Source

    # gammaALPs' Source only converts coordinates given as Python floats.
    source = Source(z=0.0, ra=float(ra_deg), dec=float(dec_deg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        environment = MixGMF(
            ALP(m=1.0, g=1.0),
            source,
            EGeV=np.array([1.0]),
            model=model,
            int_steps=GALACTIC_INT_STEPS,
            rho_max=GALACTIC_RHO_MAX_KPC,
            zmax=GALACTIC_Z_MAX_KPC,
            n0=GALACTIC_ELECTRON_DENSITY_CM3,
            chi=None,
        )
    arrays = [
        np.array(environment.B, dtype=np.float64),
        np.array(environment.psi, dtype=np.float64),
        np.array(environment.nel, dtype=np.float64),
        np.array(environment.dL, dtype=np.float64),
    ]
    for array in arrays:
        array.flags.writeable = False
    log.debug(
        "computed %d Galactic field cells towards ra=%g dec=%g", arrays[0].size, ra_deg, dec_deg
    )
    return Cells(*arrays)
