"""Exact-likelihood posterior of (log10 m, log10 g) for a fixed cluster and B-field.

When every cluster parameter is fixed (preset ``confident``), ``ebl_norm`` is fixed and
one B-field realisation serves every simulation (``propagation.fixed_bfield_seed``),
the simulator's only randomness is the Poisson draw of the counts, so the likelihood is
explicit:

.. math::
    x_i \\sim \\mathrm{Poisson}\\big(\\phi_0 S_i(\\gamma, E_\\mathrm{cut}; m, g) + B_i\\big),
    \\qquad
    S_i = \\sum_j R_{ji}\\, \\varepsilon_j\\, \\Delta E_j\\, P_{\\gamma\\gamma}(E_j; m, g)
    \\left(\\frac{E_j}{E_0}\\right)^{-\\gamma} e^{-E_j / E_\\mathrm{cut}}

with R the energy dispersion, ε the exposure, ΔE the true-energy bin widths, E_j the
true-energy bin centres, E0 = 300 GeV and B the background counts, exactly as
:func:`alpnre.simulate.expected_counts` computes npred. The posterior of (m, g)
integrates the intrinsic-spectrum parameters ν = (γ, E_cut, φ0) over their priors:

.. math::
    p(m, g \\mid x) \\propto p(m)\\, p(g) \\int p(\\nu)\\, p(x \\mid m, g, \\nu)\\, d\\nu .

Integration over ν
    A 50 h observation of NGC 1275 has about 2.5e5 counts. The likelihood then pins
    φ0 to a fraction of a percent and γ to about 0.01, far below the spacing of any
    fixed grid of 8-16 nodes across the priors, so such a grid would integrate little
    more than its nearest node. The integral is therefore taken adaptively for each
    observation and (m, g) node. A logistic transform maps bounded priors to the real
    line (normal priors are standardised). Damped Fisher scoring finds the mode of the
    transformed integrand, and a product Gauss-Hermite rule is placed on the Laplace
    ellipse around it. φ0 comes last in the Cholesky factor, so S, which does not
    depend on φ0, is folded once per (γ, E_cut) node. Far from the data (short
    livetimes) the transform keeps the nodes inside the prior support, and the rule
    then integrates the prior itself. ``tests/test_exact.py`` checks the rule against
    a dense midpoint rule and across quadrature orders.

P_γγ is computed once per (m, g) node with the kernel of
:func:`alpnre.physics.alp.survival_probability_batch`, the one that the simulator uses
for ``propagation.backend == "kernel"``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import interpolate, ndimage, special

from alpnre.config import AnalysisConfig
from alpnre.nre import ParameterAxis, parameter_axes
from alpnre.parameters import CLUSTER_PARAMETERS
from alpnre.physics.alp import survival_probability_batch
from alpnre.physics.irf import InstrumentResponse, load_instrument_response
from alpnre.physics.spectrum import REFERENCE_ENERGY_TEV, bin_centers_tev
from alpnre.priors import LogUniformPrior, NormalPrior, TruncatedNormalPrior
from alpnre.validation import hpd_threshold, jensen_shannon_divergence

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "ExactComparison",
    "ExactLikelihood",
    "ExactPosterior",
    "check_exact_config",
    "compare_with_exact",
    "exact_posterior",
    "plot_exact_comparison",
    "refine_exact_posterior",
]

log = logging.getLogger(__name__)

POI = ("m_neV", "g_per_gev")
# φ0 comes last because it enters npred linearly, and the quadrature relies on that order.
NUISANCES = ("gamma", "ecut_tev", "phi0_per_cm2_s_tev")

DEFAULT_GRID_SIZE = 40
DEFAULT_QUADRATURE_ORDER = 6
# (m, g) nodes propagated per call of the kernel, which bounds the memory of one call.
_PROPAGATION_CHUNK = 256
# (m, g) nodes integrated together, so that arrays of shape (chunk, n_true) stay small.
_NODE_CHUNK = 512
# Start points of the mode search in z, per free spectral parameter.
_START_POINTS = (-2.0, -1.0, 0.0, 1.0, 2.0)
# The mode search takes at most this many damped Fisher-scoring steps. It has converged
# once every coordinate moves less than the tolerance (in units of z).
_MAX_STEPS = 60
_STEP_TOLERANCE = 1e-7
_MAX_STEP = 3.0
# Floor of npred inside log(npred). A bin with npred = 0 has S = 0 and B = 0. With zero
# counts it contributes 0, and a count there makes the likelihood negligible.
_TINY_NPRED = 1e-300
# Normal priors are unbounded: the start points and the initial φ0 stay within this
# many standard deviations of the mean.
_NORMAL_RANGE = 6.0


# ---------------------------------------------------------------------------------------
# Which configs have an exact likelihood
# ---------------------------------------------------------------------------------------


def check_exact_config(config: AnalysisConfig) -> None:
    """Raise ValueError unless ``config`` has an explicit Poisson likelihood.

    It needs fixed cluster parameters and ``ebl_norm``, a fixed B-field realisation
    and the kernel backend, so that only (m, g) and the intrinsic spectrum vary.
    """
    problems = []
    free_cluster = [name for name in CLUSTER_PARAMETERS if not config.prior(name).is_fixed]
    if free_cluster:
        problems.append(f"cluster parameters {free_cluster} are not fixed")
    if not config.prior("ebl_norm").is_fixed:
        problems.append("ebl_norm is not fixed")
    if config.propagation.fixed_bfield_seed is None:
        problems.append("propagation.fixed_bfield_seed is not set")
    if config.propagation.backend != "kernel":
        problems.append(
            f"propagation.backend is {config.propagation.backend!r}, and the exact "
            "likelihood propagates its (m, g) nodes with the kernel"
        )
    if problems:
        raise ValueError(
            f"config {config.name!r} has no exact likelihood: {'; '.join(problems)}. Use "
            "preset 'confident' (every cluster parameter fixed), keep ebl_norm fixed, set "
            "propagation.fixed_bfield_seed and propagation.backend 'kernel', then simulate "
            "and train again"
        )


# ---------------------------------------------------------------------------------------
# Coordinates of the nuisance integral
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Coordinate:
    """Map between a nuisance parameter ν and an unconstrained coordinate z.

    Bounded priors use ν = low + (high - low) expit(z), normal priors ν = mean + std z.
    """

    name: str
    prior: Any
    bounded: bool
    low: float
    high: float

    @classmethod
    def from_prior(cls, name: str, prior: Any) -> _Coordinate:
        low, high = prior.support()
        if math.isfinite(low) and math.isfinite(high):
            return cls(name, prior, True, float(low), float(high))
        return cls(
            name,
            prior,
            False,
            prior.mean - _NORMAL_RANGE * prior.std,
            prior.mean + _NORMAL_RANGE * prior.std,
        )

    def value(self, z: np.ndarray) -> np.ndarray:
        if self.bounded:
            return self.low + (self.high - self.low) * special.expit(z)
        return self.prior.mean + self.prior.std * z

    def coordinate(self, value: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`value`, for values strictly inside the support."""
        if self.bounded:
            return special.logit((value - self.low) / (self.high - self.low))
        return (value - self.prior.mean) / self.prior.std

    def prior_terms(self, value: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return log p(ν), d log p / dν and the curvature -d² log p / dν², kept >= 0."""
        log_prior = np.asarray(self.prior.log_prob(value), dtype=float)
        if isinstance(self.prior, NormalPrior | TruncatedNormalPrior):
            gradient = -(value - self.prior.mean) / self.prior.std**2
            curvature = np.full_like(value, 1.0 / self.prior.std**2)
        elif isinstance(self.prior, LogUniformPrior):
            # log p = -log ν has a negative curvature, which is left out.
            gradient = -1.0 / value
            curvature = np.zeros_like(value)
        else:
            gradient = np.zeros_like(value)
            curvature = np.zeros_like(value)
        return log_prior, gradient, curvature

    def terms(self, z: np.ndarray) -> tuple[np.ndarray, ...]:
        """Return ν, dν/dz, d²ν/dz², log p(ν) + log|dν/dz| and its z-gradient and curvature.

        The z-gradient of ``log p(ν(z)) + log|dν/dz|`` is ``dν/dz * dlogp/dν`` plus the
        derivative of the log-Jacobian. Its curvature (the negated second derivative)
        is ``dν/dz**2 * prior curvature`` plus that of the log-Jacobian, both >= 0.
        """
        value = self.value(z)
        if self.bounded:
            sigmoid = special.expit(z)
            derivative = (self.high - self.low) * sigmoid * (1.0 - sigmoid)
            second_derivative = derivative * (1.0 - 2.0 * sigmoid)
            log_jacobian = (
                math.log(self.high - self.low) + special.log_expit(z) + special.log_expit(-z)
            )
            jacobian_gradient = 1.0 - 2.0 * sigmoid
            jacobian_curvature = 2.0 * sigmoid * (1.0 - sigmoid)
        else:
            derivative = np.full_like(z, self.prior.std)
            second_derivative = np.zeros_like(z)
            log_jacobian = np.full_like(z, math.log(self.prior.std))
            jacobian_gradient = np.zeros_like(z)
            jacobian_curvature = np.zeros_like(z)
        log_prior, prior_gradient, prior_curvature = self.prior_terms(value)
        return (
            value,
            derivative,
            second_derivative,
            log_prior + log_jacobian,
            derivative * prior_gradient + jacobian_gradient,
            derivative**2 * prior_curvature + jacobian_curvature,
        )


@dataclass
class _State:
    """Integrand and its derivatives at one point per problem, arrays of leading size B."""

    log_integrand: np.ndarray  # (B,)
    gradient: np.ndarray  # (B, d)
    scoring: np.ndarray  # (B, d, d), the negated Hessian approximation in z


# ---------------------------------------------------------------------------------------
# The likelihood
# ---------------------------------------------------------------------------------------


class ExactLikelihood:
    """Poisson likelihood of a count spectrum for a config with a fixed cluster and B-field.

    Parameters
    ----------
    config : AnalysisConfig
        Must pass :func:`check_exact_config`.
    instrument : InstrumentResponse, optional
        Default: :func:`alpnre.physics.irf.load_instrument_response` of ``config``, the
        response the simulator uses.
    """

    def __init__(self, config: AnalysisConfig, instrument: InstrumentResponse | None = None):
        check_exact_config(config)
        self.config = config
        self.instrument = instrument or load_instrument_response(config)
        edges = np.asarray(self.instrument.energy_true_edges_tev, dtype=float)
        self.energy_true_tev = bin_centers_tev(edges)
        self._log_energy_ratio = np.log(self.energy_true_tev / REFERENCE_ENERGY_TEV)
        # ΔE ε per true-energy bin, in cm^2 s TeV.
        self._bin_weights = np.diff(edges) * np.asarray(self.instrument.exposure_cm2_s)
        self._edisp = np.asarray(self.instrument.edisp_matrix, dtype=float)
        self.background = np.asarray(self.instrument.background_counts, dtype=float)
        self.coordinates = [
            _Coordinate.from_prior(name, config.prior(name))
            for name in NUISANCES
            if not config.prior(name).is_fixed
        ]
        self.fixed = {
            name: float(config.prior(name).value)
            for name in NUISANCES
            if config.prior(name).is_fixed
        }
        self._phi0_free = "phi0_per_cm2_s_tev" not in self.fixed
        self._n_spectral = len(self.coordinates) - int(self._phi0_free)

    @property
    def n_bins(self) -> int:
        return len(self.background)

    # --- the forward model --------------------------------------------------------

    def survival_probabilities(
        self, m_nev: np.ndarray, g_per_gev: np.ndarray, *, device: str = "auto"
    ) -> np.ndarray:
        """Compute P_γγ at the true-energy bin centres, shape (n, n_true), for (m, g) pairs.

        Every pair uses the config's fixed B-field realisation and fixed cluster values.
        """
        m_nev = np.atleast_1d(np.asarray(m_nev, dtype=float))
        g_per_gev = np.atleast_1d(np.asarray(g_per_gev, dtype=float))
        params = {
            name: np.full(m_nev.shape, float(self.config.prior(name).value))
            for name in (*CLUSTER_PARAMETERS, "ebl_norm")
        }
        params.update(m_neV=m_nev, g_per_gev=g_per_gev)
        seed = self.config.propagation.fixed_bfield_seed
        assert seed is not None  # checked by check_exact_config
        return np.asarray(
            survival_probability_batch(
                self.energy_true_tev,
                params,
                source=self.config.source,
                ebl_model=self.config.ebl.model,
                propagation=self.config.propagation,
                bfield_seeds=np.full(m_nev.shape, seed, dtype=np.uint64),
                device=device,
            )
        )

    def signal_counts(
        self, p_gamma_gamma: np.ndarray, gamma: np.ndarray, ecut_tev: np.ndarray
    ) -> np.ndarray:
        """Expected source counts per reconstructed bin for φ0 = 1, shape (n, n_reco).

        Parameters
        ----------
        p_gamma_gamma : ndarray, shape (n, n_true)
        gamma, ecut_tev : ndarray, shape (n,)
        """
        shape = self._spectral_shape(np.asarray(gamma, float), np.asarray(ecut_tev, float))
        return (np.asarray(p_gamma_gamma) * self._bin_weights * shape) @ self._edisp

    def npred(self, params: dict[str, np.ndarray], *, device: str = "auto") -> np.ndarray:
        """Predicted counts, shape (n, n_reco), as φ0 S + B for parameter arrays of shape (n,).

        ``params`` needs m_neV and g_per_gev, and the intrinsic-spectrum parameters
        that the config does not fix.
        """
        missing = [
            name for name in (*POI, *NUISANCES) if name not in params and name not in self.fixed
        ]
        if missing:
            raise ValueError(
                f"params lacks {missing}: give every parameter the config does not fix"
            )
        values = {name: np.atleast_1d(np.asarray(params[name], dtype=float)) for name in POI}
        for name in NUISANCES:
            values[name] = np.atleast_1d(
                np.asarray(params[name] if name in params else self.fixed[name], dtype=float)
            )
        p_gamma_gamma = self.survival_probabilities(
            values["m_neV"], values["g_per_gev"], device=device
        )
        signal = self.signal_counts(p_gamma_gamma, values["gamma"], values["ecut_tev"])
        return values["phi0_per_cm2_s_tev"][:, None] * signal + self.background

    def _spectral_shape(self, gamma: np.ndarray, ecut_tev: np.ndarray) -> np.ndarray:
        """(E / E0)^-γ exp(-E / E_cut) at the true-energy bin centres, shape (n, n_true)."""
        return np.exp(
            -gamma[:, None] * self._log_energy_ratio
            - self.energy_true_tev / np.asarray(ecut_tev)[:, None]
        )

    # --- the nuisance integral ----------------------------------------------------

    def log_marginal_likelihood(
        self,
        counts: np.ndarray,
        p_gamma_gamma: np.ndarray,
        *,
        quadrature_order: int = DEFAULT_QUADRATURE_ORDER,
    ) -> np.ndarray:
        """Integrate the likelihood over the intrinsic-spectrum priors at each (m, g) node.

        Parameters
        ----------
        counts : ndarray, shape (n_reco,)
            Observed counts.
        p_gamma_gamma : ndarray, shape (n_nodes, n_true)
            P_γγ of each (m, g) node, from :meth:`survival_probabilities`.
        quadrature_order : int
            Gauss-Hermite nodes per free nuisance parameter.

        Returns
        -------
        ndarray, shape (n_nodes,)
            log ∫ p(ν) p(x | m, g, ν) dν without the term -Σ log(x_i!), which is the
            same for every node.
        """
        counts = np.asarray(counts, dtype=float)
        if counts.shape != (self.n_bins,):
            raise ValueError(
                f"counts has shape {counts.shape}, expected ({self.n_bins},) for the config's "
                "reconstructed-energy bins"
            )
        if quadrature_order < 2:
            raise ValueError(f"quadrature_order must be at least 2, got {quadrature_order}")
        p_gamma_gamma = np.asarray(p_gamma_gamma, dtype=float)
        result = np.empty(len(p_gamma_gamma))
        for start in range(0, len(p_gamma_gamma), _NODE_CHUNK):
            chunk = slice(start, start + _NODE_CHUNK)
            weights = p_gamma_gamma[chunk] * self._bin_weights
            result[chunk] = self._integrate(counts, weights, quadrature_order)
        return result

    def _nuisance_values(self, z: np.ndarray) -> tuple[dict[str, np.ndarray], list[tuple]]:
        """Values of all three nuisances and the terms of the free ones, at z of shape (B, d)."""
        values = {name: np.full(len(z), value) for name, value in self.fixed.items()}
        terms = []
        for k, coordinate in enumerate(self.coordinates):
            term = coordinate.terms(z[:, k])
            values[coordinate.name] = term[0]
            terms.append(term)
        return values, terms

    def _fold(
        self, weights: np.ndarray, values: dict[str, np.ndarray], derivatives: bool
    ) -> np.ndarray:
        """Fold S, and dS/dν of the free spectral parameters, into reconstructed bins.

        Returns shape (B, 1 + n_free_spectral, n_reco): S, then dS/dγ = fold(-ln(E/E0) a)
        and dS/dE_cut = fold(E / E_cut^2 a) for those of γ and E_cut that are free.
        """
        ecut = values["ecut_tev"]
        shaped = weights * self._spectral_shape(values["gamma"], ecut)
        rows = [shaped]
        if derivatives:
            for coordinate in self.coordinates:
                if coordinate.name == "gamma":
                    rows.append(-shaped * self._log_energy_ratio)
                elif coordinate.name == "ecut_tev":
                    rows.append(shaped * self.energy_true_tev / ecut[:, None] ** 2)
        return np.stack(rows, axis=1) @ self._edisp

    def _log_likelihood(
        self, counts: np.ndarray, phi0: np.ndarray, signal: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Poisson log-likelihood without -Σ log(x_i!), shape (B,), and npred (B, n_reco)."""
        npred = phi0[:, None] * signal + self.background
        log_npred = np.log(np.maximum(npred, _TINY_NPRED))
        return log_npred @ counts - npred.sum(axis=1), npred

    def _evaluate(
        self, counts: np.ndarray, weights: np.ndarray, z: np.ndarray, derivatives: bool = True
    ) -> _State:
        """Log integrand (log-likelihood + log prior + log Jacobian) at z, shape (B, d).

        With ``derivatives``, also its z-gradient and the Fisher-scoring matrix.
        """
        values, terms = self._nuisance_values(z)
        phi0 = values["phi0_per_cm2_s_tev"]
        folded = self._fold(weights, values, derivatives)
        signal = folded[:, 0]
        log_likelihood, npred = self._log_likelihood(counts, phi0, signal)
        log_integrand = log_likelihood + sum((term[3] for term in terms), np.zeros(len(z)))

        n_free = len(self.coordinates)
        gradient = np.zeros((len(z), n_free))
        scoring = np.zeros((len(z), n_free, n_free))
        if not derivatives or n_free == 0:
            return _State(log_integrand, gradient, scoring)

        # dnpred/dν of each free parameter: φ0 dS/dν for γ and E_cut, S for φ0.
        d_npred = np.stack(
            [
                signal if c.name == "phi0_per_cm2_s_tev" else phi0[:, None] * folded[:, 1 + k]
                for k, c in enumerate(self.coordinates)
            ],
            axis=1,
        )
        inverse_npred = 1.0 / np.maximum(npred, _TINY_NPRED)
        likelihood_gradient = np.einsum("bi,bki->bk", counts * inverse_npred - 1.0, d_npred)
        fisher = np.einsum("bki,bli,bi->bkl", d_npred, d_npred, inverse_npred)

        # Chain rule to z. At the mode of a bounded coordinate, the term
        # -(dlogp/dν + dlogL/dν) d²ν/dz² equals (1 - 2 expit(z))² >= 0. It dominates the
        # curvature when the likelihood pushes ν against a prior bound. Away from the
        # mode it is clipped at 0.
        derivative = np.stack([term[1] for term in terms], axis=1)
        second_derivative = np.stack([term[2] for term in terms], axis=1)
        prior_gradient = np.stack(
            [c.prior_terms(term[0])[1] for c, term in zip(self.coordinates, terms, strict=True)],
            axis=1,
        )
        gradient = derivative * likelihood_gradient + np.stack([t[4] for t in terms], axis=1)
        curvature = np.stack([term[5] for term in terms], axis=1) + np.maximum(
            -(likelihood_gradient + prior_gradient) * second_derivative, 0.0
        )
        scoring = derivative[:, :, None] * fisher * derivative[:, None, :]
        scoring[:, np.arange(n_free), np.arange(n_free)] += curvature
        return _State(log_integrand, gradient, scoring)

    def _profile_phi0(
        self, counts: np.ndarray, signal: np.ndarray, coordinate: _Coordinate
    ) -> np.ndarray:
        """Maximise the likelihood over φ0 for given S (B, n_reco), inside the support."""
        total_signal = signal.sum(axis=1)
        excess = counts.sum() - self.background.sum()
        margin = 1e-6 * (coordinate.high - coordinate.low)
        low, high = coordinate.low + margin, coordinate.high - margin
        phi0 = np.clip(excess / np.maximum(total_signal, _TINY_NPRED), low, high)
        for _ in range(20):
            npred = np.maximum(phi0[:, None] * signal + self.background, _TINY_NPRED)
            ratio = signal / npred
            first = (counts * ratio).sum(axis=1) - total_signal
            second = -(counts * ratio**2).sum(axis=1)
            # The likelihood is concave in φ0, and second == 0 only without any count.
            step = -first / np.where(second < 0, second, -np.inf)
            phi0 = np.clip(phi0 + step, low, high)
        return phi0

    def _start(self, counts: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Pick the best start point of the mode search from a coarse spectral grid.

        φ0, when free, is set to its conditional maximum-likelihood value at each point.
        """
        n_free = len(self.coordinates)
        n = len(weights)
        best_z = np.zeros((n, n_free))
        best = np.full(n, -np.inf)
        for point in product(_START_POINTS, repeat=self._n_spectral):
            z = np.zeros((n, n_free))
            z[:, : self._n_spectral] = point
            if self._phi0_free:
                values, _ = self._nuisance_values(z)
                signal = self._fold(weights, values, derivatives=False)[:, 0]
                coordinate = self.coordinates[-1]
                z[:, -1] = coordinate.coordinate(self._profile_phi0(counts, signal, coordinate))
            value = self._evaluate(counts, weights, z, derivatives=False).log_integrand
            better = value > best
            best[better] = value[better]
            best_z[better] = z[better]
        return best_z

    def _find_mode(self, counts: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, _State]:
        """Find the mode of the integrand in z by damped Fisher scoring.

        A step that lowers the integrand is rejected and the next one halved; an
        accepted step doubles it again, up to the full scoring step.
        """
        z = self._start(counts, weights)
        state = self._evaluate(counts, weights, z)
        damping = np.ones(len(z))
        active = np.ones(len(z), dtype=bool)
        for _ in range(_MAX_STEPS):
            index = np.flatnonzero(active)
            if index.size == 0:
                break
            step = np.linalg.solve(state.scoring[index], state.gradient[index][..., None])[..., 0]
            largest = np.abs(step).max(axis=1)
            step *= np.minimum(1.0, _MAX_STEP / np.maximum(largest, 1e-300))[:, None]
            step *= damping[index][:, None]
            done = np.abs(step).max(axis=1) < _STEP_TOLERANCE
            active[index[done]] = False
            index, step = index[~done], step[~done]
            if index.size == 0:
                break

            trial = z[index] + step
            new = self._evaluate(counts, weights[index], trial)
            better = new.log_integrand >= state.log_integrand[index]
            accepted = index[better]
            z[accepted] = trial[better]
            state.log_integrand[accepted] = new.log_integrand[better]
            state.gradient[accepted] = new.gradient[better]
            state.scoring[accepted] = new.scoring[better]
            damping[accepted] = np.minimum(1.0, 2.0 * damping[accepted])
            damping[index[~better]] *= 0.5
        if active.any():
            log.debug("mode search: %d of %d nodes did not converge", active.sum(), len(z))
        return z, state

    def _integrate(self, counts: np.ndarray, weights: np.ndarray, order: int) -> np.ndarray:
        """log of the nuisance integral for the nodes whose ΔE ε P_γγ rows are ``weights``.

        ∫ e^f(z) dz = |L| (2π)^(d/2) E[e^(f(ẑ + L t) + |t|²/2)] for t ~ N(0, I), with ẑ the
        mode and L L^T the inverse scoring matrix there. The expectation is taken with
        the probabilists' Gauss-Hermite rule.
        """
        n_free = len(self.coordinates)
        if n_free == 0:
            values, _ = self._nuisance_values(np.zeros((len(weights), 0)))
            signal = self._fold(weights, values, derivatives=False)[:, 0]
            return self._log_likelihood(counts, values["phi0_per_cm2_s_tev"], signal)[0]

        mode, state = self._find_mode(counts, weights)
        covariance = np.linalg.inv(state.scoring)
        cholesky = np.linalg.cholesky(0.5 * (covariance + np.swapaxes(covariance, 1, 2)))
        log_det = np.log(np.diagonal(cholesky, axis1=1, axis2=2)).sum(axis=1)

        nodes, node_weights = special.roots_hermitenorm(order)
        log_node_weights = np.log(node_weights / math.sqrt(2.0 * math.pi))
        n_spectral = self._n_spectral
        phi0_nodes = range(order) if self._phi0_free else [None]
        terms = []
        for spectral_point in product(range(order), repeat=n_spectral):
            t_spectral = nodes[list(spectral_point)]
            # φ0 is last in the Cholesky factor, so γ and E_cut, and with them S, depend
            # on the spectral nodes only. S is therefore folded once for all φ0 nodes.
            z = np.zeros_like(mode)
            z[:, :n_spectral] = mode[:, :n_spectral] + (
                cholesky[:, :n_spectral, :n_spectral] @ t_spectral
            )
            values, _ = self._nuisance_values(z)
            signal = self._fold(weights, values, derivatives=False)[:, 0]
            for phi0_node in phi0_nodes:
                t = t_spectral
                log_weight = log_node_weights[list(spectral_point)].sum()
                if phi0_node is not None:
                    t = np.append(t_spectral, nodes[phi0_node])
                    z[:, -1] = mode[:, -1] + cholesky[:, -1, :] @ t
                    log_weight += log_node_weights[phi0_node]
                values, coordinate_terms = self._nuisance_values(z)
                log_likelihood, _ = self._log_likelihood(
                    counts, values["phi0_per_cm2_s_tev"], signal
                )
                terms.append(
                    log_likelihood
                    + sum(term[3] for term in coordinate_terms)
                    + log_weight
                    + 0.5 * float(t @ t)
                )
        integral = special.logsumexp(np.stack(terms, axis=1), axis=1)
        return integral + log_det + 0.5 * n_free * math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------------------
# Posterior on the (log10 m, log10 g) grid
# ---------------------------------------------------------------------------------------


def _log_prior_on_axis(config: AnalysisConfig, axis: ParameterAxis, u: np.ndarray) -> np.ndarray:
    """Log prior density of the axis variable u, with the Jacobian of log10 axes.

    Values are clipped into the prior support first, so rounding in 10**u at the ends
    of a grid that spans the support does not give zero density.
    """
    prior = config.prior(axis.name)
    low, high = prior.support()
    values = np.clip(axis.from_axis(u), low, high)
    log_density = np.asarray(prior.log_prob(values), dtype=float)
    if axis.log10:
        log_density = log_density + np.log(values * math.log(10.0))
    return log_density


@dataclass
class ExactPosterior:
    """Exact posteriors of several observations on one (log10 m, log10 g) grid.

    Attributes
    ----------
    grid_x, grid_y : ndarray, shapes (n_x,) and (n_y,)
        log10(m / neV) and log10(g GeV) nodes, spanning the prior supports.
    log_density : ndarray, shape (n_obs, n_x, n_y)
        Unnormalised log posterior density with respect to (log10 m, log10 g).
    quadrature_order : int
        Gauss-Hermite nodes per free nuisance parameter.
    seconds : dict
        Time spent on propagation and on the nuisance integrals.
    refined : ndarray of bool, shape (n_obs, n_x, n_y), optional
        Cells whose log density is the mean over sub-nodes of the cell (see
        :func:`refine_exact_posterior`) instead of the value at the node.
    subcells : int
        Sub-nodes per axis in each refined cell (1: none refined).
    """

    grid_x: np.ndarray
    grid_y: np.ndarray
    log_density: np.ndarray
    quadrature_order: int
    labels: tuple[str, str] = ("log10(m_neV)", "log10(g_per_gev)")
    seconds: dict[str, float] = field(default_factory=dict)
    refined: np.ndarray | None = None
    subcells: int = 1

    def probabilities(self) -> np.ndarray:
        """Cell probabilities on the grid, each observation summing to 1."""
        shifted = self.log_density - self.log_density.max(axis=(1, 2), keepdims=True)
        weights = np.exp(shifted)
        return weights / weights.sum(axis=(1, 2), keepdims=True)

    def effective_cells(self) -> np.ndarray:
        """exp(entropy) of each posterior on the grid, in cells, shape (n_obs,).

        A posterior spread evenly over k cells gives k. Values near 1 mean that the
        posterior is narrower than the grid spacing, so the grid does not resolve it.
        """
        probabilities = self.probabilities()
        entropy = -special.xlogy(probabilities, probabilities).sum(axis=(1, 2))
        return np.exp(entropy)

    def has_nodes(self, grid_x: np.ndarray, grid_y: np.ndarray) -> bool:
        """Check whether (grid_x, grid_y) are exactly this posterior's nodes."""
        return np.array_equal(grid_x, self.grid_x) and np.array_equal(grid_y, self.grid_y)

    def log_density_on(self, grid_x: np.ndarray, grid_y: np.ndarray) -> np.ndarray:
        """Interpolate the log density linearly onto another grid inside this one.

        Returns shape (n_obs, len(grid_x), len(grid_y)). On this posterior's own
        nodes the values are returned as they are.
        """
        if self.has_nodes(grid_x, grid_y):
            return self.log_density.copy()
        mesh_x, mesh_y = np.meshgrid(grid_x, grid_y, indexing="ij")
        points = np.stack([mesh_x.ravel(), mesh_y.ravel()], axis=1)
        out = np.empty((len(self.log_density), len(grid_x), len(grid_y)))
        for k, values in enumerate(self.log_density):
            interpolator = interpolate.RegularGridInterpolator(
                (self.grid_x, self.grid_y), values, method="linear"
            )
            out[k] = interpolator(points).reshape(len(grid_x), len(grid_y))
        return out


def exact_posterior(
    config: AnalysisConfig,
    counts: np.ndarray,
    *,
    grid_size: int = DEFAULT_GRID_SIZE,
    grids: tuple[np.ndarray, np.ndarray] | None = None,
    quadrature_order: int = DEFAULT_QUADRATURE_ORDER,
    instrument: InstrumentResponse | None = None,
    progress: bool = False,
) -> ExactPosterior:
    """Compute exact posteriors of (log10 m, log10 g) on a grid for count spectra.

    Parameters
    ----------
    config : AnalysisConfig
        Must pass :func:`check_exact_config`.
    counts : ndarray, shape (n_obs, n_reco) or (n_reco,)
        Observed counts.
    grid_size : int
        Nodes per axis; the grid spans the prior supports of log10 m and log10 g, and
        P_γγ is propagated once per node (grid_size^2 propagations).
    grids : (ndarray, ndarray), optional
        The log10 m and log10 g nodes to use instead, inside the prior supports, e.g.
        the cell centres of an NRE posterior grid. Comparing on the same nodes avoids
        interpolating an exact density that can change by hundreds of nats between
        nodes. ``grid_size`` is then ignored.
    quadrature_order : int
        Gauss-Hermite nodes per free nuisance parameter.
    progress : bool
        Show a progress bar over the observations.

    Returns
    -------
    ExactPosterior
    """
    from tqdm.auto import tqdm

    axis_x, axis_y = parameter_axes(config, POI)
    if grids is None:
        if not 4 <= grid_size <= 400:
            raise ValueError(f"grid_size must lie in [4, 400], got {grid_size}")
        grid_x = np.linspace(axis_x.low, axis_x.high, grid_size)
        grid_y = np.linspace(axis_y.low, axis_y.high, grid_size)
    else:
        grid_x, grid_y = (np.asarray(grid, dtype=float) for grid in grids)
        for name, grid, axis in (("log10 m", grid_x, axis_x), ("log10 g", grid_y, axis_y)):
            if grid.ndim != 1 or not 4 <= grid.size <= 400 or np.any(np.diff(grid) <= 0):
                raise ValueError(
                    f"{name} grid must be increasing with 4 to 400 nodes, got shape {grid.shape}"
                )
            if grid[0] < axis.low - 1e-9 or grid[-1] > axis.high + 1e-9:
                raise ValueError(
                    f"{name} grid [{grid[0]:g}, {grid[-1]:g}] leaves the prior range "
                    f"[{axis.low:g}, {axis.high:g}]"
                )
    likelihood = ExactLikelihood(config, instrument)
    counts = np.atleast_2d(np.asarray(counts, dtype=float))
    mesh_x, mesh_y = np.meshgrid(grid_x, grid_y, indexing="ij")

    # P_γγ of every (m, g) node, clipped into the prior support like the prior below.
    start = time.perf_counter()
    m_nev = np.clip(axis_x.from_axis(mesh_x.ravel()), *config.prior("m_neV").support())
    g_per_gev = np.clip(axis_y.from_axis(mesh_y.ravel()), *config.prior("g_per_gev").support())
    p_gamma_gamma = np.concatenate(
        [
            likelihood.survival_probabilities(
                m_nev[i : i + _PROPAGATION_CHUNK], g_per_gev[i : i + _PROPAGATION_CHUNK]
            )
            for i in range(0, len(m_nev), _PROPAGATION_CHUNK)
        ]
    )
    propagation_seconds = time.perf_counter() - start
    log.info(
        "exact likelihood: propagated %d (m, g) nodes in %.1f s", len(m_nev), propagation_seconds
    )

    start = time.perf_counter()
    log_prior = (
        _log_prior_on_axis(config, axis_x, grid_x)[:, None]
        + _log_prior_on_axis(config, axis_y, grid_y)[None, :]
    )
    shape = (len(grid_x), len(grid_y))
    log_density = np.empty((len(counts), *shape))
    for k, row in enumerate(tqdm(counts, desc="exact posteriors", disable=not progress)):
        log_evidence = likelihood.log_marginal_likelihood(
            row, p_gamma_gamma, quadrature_order=quadrature_order
        )
        log_density[k] = log_evidence.reshape(shape) + log_prior
    integration_seconds = time.perf_counter() - start
    log.info(
        "exact likelihood: %d posteriors on %dx%d nodes in %.1f s",
        len(counts),
        *shape,
        integration_seconds,
    )
    return ExactPosterior(
        grid_x=grid_x,
        grid_y=grid_y,
        log_density=log_density,
        quadrature_order=quadrature_order,
        labels=(axis_x.label, axis_y.label),
        seconds={"propagation": propagation_seconds, "integration": integration_seconds},
    )


# Defaults of refine_exact_posterior: sub-nodes per axis and cell, the posterior mass
# whose cells are refined, and the largest number of such cells per observation.
DEFAULT_SUBCELLS = 6
DEFAULT_REFINED_MASS = 0.999
DEFAULT_MAX_REFINED_CELLS = 25


def _uniform_spacing(grid: np.ndarray, name: str) -> float:
    steps = np.diff(grid)
    if grid.size < 2 or not np.allclose(steps, steps[0], rtol=1e-6, atol=0.0):
        raise ValueError(
            f"{name} nodes must be evenly spaced cell centres to be refined, got {grid.size} "
            "nodes with uneven steps"
        )
    return float(steps[0])


def subcell_nodes(
    grid_x: np.ndarray, grid_y: np.ndarray, cells: np.ndarray, subcells: int
) -> tuple[np.ndarray, np.ndarray]:
    """Midpoint-rule nodes of the given cells of a regular grid of cell centres.

    Both sides of an exact comparison average their densities over these nodes, so
    that the NRE and the exact posterior give the same cells the same quadrature.

    Parameters
    ----------
    grid_x, grid_y : ndarray
        Evenly spaced cell centres (log10 m, log10 g).
    cells : ndarray of int, shape (n_cells, 2)
        (x index, y index) of each cell.
    subcells : int
        Sub-nodes per axis and cell.

    Returns
    -------
    nodes_x, nodes_y : ndarray, shape (n_cells * subcells**2,)
        The sub-nodes, cell by cell: the nodes of cell c are
        ``[c * subcells**2, (c + 1) * subcells**2)``.
    """
    step_x = _uniform_spacing(np.asarray(grid_x, dtype=float), "log10 m")
    step_y = _uniform_spacing(np.asarray(grid_y, dtype=float), "log10 g")
    cells = np.asarray(cells, dtype=int).reshape(-1, 2)
    offsets = (np.arange(subcells) + 0.5) / subcells - 0.5
    sub_x = grid_x[cells[:, 0], None] + step_x * offsets[None, :]
    sub_y = grid_y[cells[:, 1], None] + step_y * offsets[None, :]
    # Every (x, y) sub-node pair of each cell: shape (n_cells, subcells, subcells).
    nodes_x = np.broadcast_to(sub_x[:, :, None], (len(cells), subcells, subcells))
    nodes_y = np.broadcast_to(sub_y[:, None, :], (len(cells), subcells, subcells))
    return nodes_x.ravel(), nodes_y.ravel()


def _cells_to_refine(
    probabilities: np.ndarray, mass: float, max_cells: int, extra: Sequence[tuple[int, int]]
) -> np.ndarray | None:
    """Mask the HPD cells that contain ``mass`` of the posterior, their neighbours and ``extra``.

    Returns None when more than ``max_cells`` cells are needed before adding neighbours:
    such a posterior spreads over many cells and the node values describe it.
    """
    core = probabilities >= hpd_threshold(probabilities, mass)
    if int(core.sum()) > max_cells:
        return None
    for i, j in extra:
        core[i, j] = True
    # Neighbours: the posterior of a strong signal can sit in a cell whose centre fits
    # worse than the centre of the cell next to it.
    return ndimage.binary_dilation(core, structure=np.ones((3, 3), dtype=bool))


def refine_exact_posterior(
    exact: ExactPosterior,
    config: AnalysisConfig,
    counts: np.ndarray,
    *,
    subcells: int = DEFAULT_SUBCELLS,
    mass: float = DEFAULT_REFINED_MASS,
    max_cells: int = DEFAULT_MAX_REFINED_CELLS,
    truths: np.ndarray | None = None,
    instrument: InstrumentResponse | None = None,
    progress: bool = False,
) -> ExactPosterior:
    """Replace node values by cell averages where the posterior is narrower than a cell.

    An exact posterior computed at cell centres treats the density at the centre as
    the density of the whole cell. For a strong ALP signal the likelihood changes by
    hundreds of nats across a cell, so the centre value is a poor estimate of the cell's
    probability: the posterior collapses onto the cell whose centre happens to fit
    best, which need not contain the posterior mass. Here the cells that contain ``mass`` of
    an observation's posterior, their eight neighbours and the cell of the true
    parameters (when ``truths`` are given) get ``subcells`` x ``subcells`` sub-nodes,
    and the cell's log density becomes the log of the mean density over them, a
    midpoint rule for the cell integral.

    Parameters
    ----------
    exact : ExactPosterior
        Posteriors at the cell centres of a regular grid (evenly spaced nodes), for
        example ``exact_posterior(config, counts, grids=nre_grids)``.
    config : AnalysisConfig
        The config ``exact`` was computed with.
    counts : ndarray, shape (n_obs, n_reco)
        The observations of ``exact``.
    subcells : int
        Sub-nodes per axis and cell; P_γγ is propagated once per sub-node.
    mass : float
        Posterior mass (on the node values) whose cells are refined.
    max_cells : int
        Observations that need more cells than this for ``mass`` are left as they are:
        their posterior spreads over many cells.
    truths : ndarray, shape (n_obs, 2), optional
        True (log10 m, log10 g) of simulated observations; their cells are refined too.

    Returns
    -------
    ExactPosterior
        A copy with refined cells, ``refined`` marking them.
    """
    from tqdm.auto import tqdm

    if not 2 <= subcells <= 32:
        raise ValueError(f"subcells must lie in [2, 32], got {subcells}")
    if not 0.0 < mass < 1.0:
        raise ValueError(f"mass must lie in (0, 1), got {mass}")
    counts = np.atleast_2d(np.asarray(counts, dtype=float))
    if len(counts) != len(exact.log_density):
        raise ValueError(
            f"{len(counts)} observations but {len(exact.log_density)} exact posteriors: pass "
            "the counts the posteriors were computed from"
        )
    # Checked before any work: refinement needs evenly spaced cell centres.
    _uniform_spacing(exact.grid_x, "log10 m")
    _uniform_spacing(exact.grid_y, "log10 g")
    axis_x, axis_y = parameter_axes(config, POI)
    likelihood = ExactLikelihood(config, instrument)
    probabilities = exact.probabilities()
    log_density = exact.log_density.copy()
    refined = np.zeros(log_density.shape, dtype=bool)
    seconds = {"refine_propagation": 0.0, "refine_integration": 0.0}
    rows = tqdm(range(len(counts)), desc="refining exact posteriors", disable=not progress)
    for k in rows:
        extra = []
        if truths is not None:
            i = int(np.argmin(np.abs(exact.grid_x - truths[k][0])))
            j = int(np.argmin(np.abs(exact.grid_y - truths[k][1])))
            extra.append((i, j))
        mask = _cells_to_refine(probabilities[k], mass, max_cells, extra)
        if mask is None:
            continue
        cells = np.argwhere(mask)
        nodes_x, nodes_y = subcell_nodes(exact.grid_x, exact.grid_y, cells, subcells)
        start = time.perf_counter()
        m_nev = np.clip(axis_x.from_axis(nodes_x), *config.prior("m_neV").support())
        g_per_gev = np.clip(axis_y.from_axis(nodes_y), *config.prior("g_per_gev").support())
        p_gamma_gamma = np.concatenate(
            [
                likelihood.survival_probabilities(
                    m_nev[i : i + _PROPAGATION_CHUNK], g_per_gev[i : i + _PROPAGATION_CHUNK]
                )
                for i in range(0, len(m_nev), _PROPAGATION_CHUNK)
            ]
        )
        seconds["refine_propagation"] += time.perf_counter() - start
        start = time.perf_counter()
        log_values = (
            likelihood.log_marginal_likelihood(
                counts[k], p_gamma_gamma, quadrature_order=exact.quadrature_order
            )
            + _log_prior_on_axis(config, axis_x, nodes_x)
            + _log_prior_on_axis(config, axis_y, nodes_y)
        )
        seconds["refine_integration"] += time.perf_counter() - start
        per_cell = log_values.reshape(len(cells), subcells * subcells)
        cell_log_density = special.logsumexp(per_cell, axis=1) - math.log(per_cell.shape[1])
        log_density[k, cells[:, 0], cells[:, 1]] = cell_log_density
        refined[k, cells[:, 0], cells[:, 1]] = True
    log.info(
        "exact likelihood: refined %d cells of %d posteriors with %dx%d sub-nodes in %.1f s",
        int(refined.sum()),
        int(refined.any(axis=(1, 2)).sum()),
        subcells,
        subcells,
        sum(seconds.values()),
    )
    return ExactPosterior(
        grid_x=exact.grid_x,
        grid_y=exact.grid_y,
        log_density=log_density,
        quadrature_order=exact.quadrature_order,
        labels=exact.labels,
        seconds={**exact.seconds, **seconds},
        refined=refined,
        subcells=subcells,
    )


# ---------------------------------------------------------------------------------------
# Comparison with the NRE posterior
# ---------------------------------------------------------------------------------------


def _upper_limits(probabilities: np.ndarray, grid_y: np.ndarray, level: float) -> np.ndarray:
    """95 % (``level``) upper limit on y for each x row, shape (n_obs, n_x).

    Same rule as :meth:`alpnre.posterior.Marginal2D.upper_limit_curve`: the conditional
    cumulative distribution along y, interpolated linearly between grid points.
    """
    cumulative = np.cumsum(probabilities, axis=-1)
    totals = cumulative[..., -1]
    # A row without posterior mass (an exact posterior collapsed onto other masses)
    # has no conditional distribution: its limit is NaN.
    limits = np.full(cumulative.shape[:-1], np.nan)
    for index in np.ndindex(*limits.shape):
        if totals[index] > 0:
            limits[index] = np.interp(level, cumulative[index] / totals[index], grid_y)
    return limits


# An exact posterior that spans fewer grid cells than this (see
# ExactPosterior.effective_cells) is narrower than the grid resolves.
MIN_RESOLVED_CELLS = 4.0


@dataclass
class ExactComparison:
    """NRE against exact posteriors of the same observations on the NRE's 2-dim grid.

    With strong ALP signals the exact likelihood changes by hundreds of nats between
    neighbouring (m, g) nodes, because P_γγ oscillates in m and g and a 50 h spectrum
    has ~2.5e5 counts. The exact grid posterior then collapses onto one node, which need
    not be the one nearest the truth. Such observations count as unresolved and are
    summarised separately.

    Attributes
    ----------
    jsd : ndarray, shape (n_obs,)
        Jensen-Shannon divergence of the two (log10 m, log10 g) posteriors, in nats.
    upper_limit_shift : ndarray, shape (n_obs, n_x)
        95 % upper limit on log10 g of the NRE minus that of the exact posterior, in
        decades, at each log10 m of ``grid_x``.
    effective_cells : ndarray, shape (n_obs,)
        :meth:`ExactPosterior.effective_cells` of each exact posterior on its grid.
    grid_x, grid_y : ndarray
        The common grid (the NRE's).
    exact_grid_size, quadrature_order : int
        Settings of the exact posterior.
    on_nre_grid : bool
        Whether the exact posterior was computed on the NRE grid's nodes (no
        interpolation).
    subcells : int
        Sub-nodes per axis in the refined cells of the exact posterior (1: none).
    refined_observations : ndarray of bool, shape (n_obs,)
        Observations whose exact posterior has refined cells.
    jsd_node_values : ndarray, shape (n_obs,), optional
        The JSD against the exact posterior before refinement (node values only).
    jsd_nre_centres : ndarray, shape (n_obs,), optional
        The JSD of the NRE's cell-centre values against the refined exact posterior.
        It mixes two quadrature rules, whereas ``jsd`` averages both sides over the
        same sub-nodes.
    seconds : dict
        Time spent on the exact posteriors.
    examples : list of (ndarray, ndarray)
        (NRE, exact) cell probabilities of the first observations, for figures.
    """

    jsd: np.ndarray
    upper_limit_shift: np.ndarray
    effective_cells: np.ndarray
    grid_x: np.ndarray
    grid_y: np.ndarray
    exact_grid_size: int
    quadrature_order: int
    labels: tuple[str, str]
    on_nre_grid: bool = False
    subcells: int = 1
    refined_observations: np.ndarray | None = None
    jsd_node_values: np.ndarray | None = None
    jsd_nre_centres: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    examples: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)

    @property
    def resolved(self) -> np.ndarray:
        """Whether the exact grid resolves each exact posterior, shape (n_obs,)."""
        return self.effective_cells >= MIN_RESOLVED_CELLS

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as JSON-safe Python types."""
        resolved = self.resolved
        return {
            "n_observations": len(self.jsd),
            "n_resolved": int(resolved.sum()),
            "min_resolved_cells": MIN_RESOLVED_CELLS,
            "exact_grid_size": self.exact_grid_size,
            "exact_on_nre_grid": self.on_nre_grid,
            "exact_subcells": self.subcells,
            "n_refined": (
                0 if self.refined_observations is None else int(self.refined_observations.sum())
            ),
            "quadrature_order": self.quadrature_order,
            "jsd_nats": _summary(self.jsd),
            "jsd_nats_resolved": _summary(self.jsd[resolved]),
            "jsd_nats_node_values": (
                None if self.jsd_node_values is None else _summary(self.jsd_node_values)
            ),
            "jsd_nats_nre_centres": (
                None if self.jsd_nre_centres is None else _summary(self.jsd_nre_centres)
            ),
            "effective_cells": [float(v) for v in self.effective_cells],
            "upper_limit_95_shift_dex": {
                "description": "NRE minus exact 95 % upper limit on log10(g_per_gev)",
                "note": "means skip masses where a posterior has no mass (limit undefined)",
                "mean": _mean_or_none(self.upper_limit_shift),
                "mean_absolute": _mean_or_none(np.abs(self.upper_limit_shift)),
                "mean_resolved": _mean_or_none(self.upper_limit_shift[resolved]),
                "axis": self.labels[0],
                "grid": [float(v) for v in self.grid_x],
                "mean_per_mass": [_mean_or_none(column) for column in self.upper_limit_shift.T],
            },
            "seconds": {key: float(value) for key, value in self.seconds.items()},
        }


def _mean_or_none(values: np.ndarray) -> float | None:
    """Mean of the finite values, or None when there are none (JSON-safe)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _summary(values: np.ndarray) -> dict[str, Any]:
    """Return the mean, median, maximum and all values, with None statistics for none."""
    return {
        "mean": _mean_or_none(values),
        "median": float(np.median(values)) if values.size else None,
        "max": float(values.max()) if values.size else None,
        "values": [float(v) for v in values],
    }


def compare_with_exact(
    nre_probabilities: np.ndarray,
    grid_x: np.ndarray,
    grid_y: np.ndarray,
    exact: ExactPosterior,
    *,
    level: float = 0.95,
    n_examples: int = 3,
) -> ExactComparison:
    """Compare NRE posteriors with exact ones of the same observations.

    The exact log density is interpolated onto the NRE's grid, which must lie inside
    the exact grid (the exact grid spans the prior support, so any grid of cell
    centres inside the support does).

    Parameters
    ----------
    nre_probabilities : ndarray, shape (n_obs, n_x, n_y)
        NRE cell probabilities on the regular grid (grid_x, grid_y).
    exact : ExactPosterior
        Exact posteriors of the same n_obs observations.
    level : float
        Credibility of the upper limits.
    """
    nre_probabilities = np.asarray(nre_probabilities, dtype=float)
    if nre_probabilities.shape[0] != exact.log_density.shape[0]:
        raise ValueError(
            f"{nre_probabilities.shape[0]} NRE posteriors but {exact.log_density.shape[0]} "
            "exact ones: pass the same observations to both"
        )
    exact_log = exact.log_density_on(grid_x, grid_y)
    exact_probabilities = np.exp(exact_log - exact_log.max(axis=(1, 2), keepdims=True))
    exact_probabilities /= exact_probabilities.sum(axis=(1, 2), keepdims=True)

    # NRE cells whose probability underflows to 0 get log 0 = -inf, which the JSD accepts.
    with np.errstate(divide="ignore"):
        nre_log = np.log(nre_probabilities)
    jsd = np.array(
        [jensen_shannon_divergence(p, q) for p, q in zip(nre_log, exact_log, strict=True)]
    )
    shift = _upper_limits(nre_probabilities, grid_y, level) - _upper_limits(
        exact_probabilities, grid_y, level
    )
    examples = [
        (nre_probabilities[k], exact_probabilities[k])
        for k in range(min(n_examples, len(nre_probabilities)))
    ]
    return ExactComparison(
        jsd=jsd,
        upper_limit_shift=shift,
        effective_cells=exact.effective_cells(),
        grid_x=np.asarray(grid_x, dtype=float),
        grid_y=np.asarray(grid_y, dtype=float),
        exact_grid_size=len(exact.grid_x),
        on_nre_grid=exact.has_nodes(grid_x, grid_y),
        subcells=exact.subcells,
        refined_observations=(
            None if exact.refined is None else np.asarray(exact.refined.any(axis=(1, 2)))
        ),
        quadrature_order=exact.quadrature_order,
        labels=exact.labels,
        seconds=dict(exact.seconds),
        examples=examples,
    )


def plot_exact_comparison(
    comparison: ExactComparison, truths: Sequence[Sequence[float]] | None = None
) -> Figure:
    """Plot example posteriors (NRE filled, exact contours) and the upper-limit shift.

    Parameters
    ----------
    comparison : ExactComparison
    truths : sequence of (log10 m, log10 g), optional
        True parameters of the example observations, marked with a star.
    """
    from matplotlib.figure import Figure

    n_examples = len(comparison.examples)
    figure = Figure(figsize=(3.6 * (n_examples + 1), 3.6), layout="constrained")
    axes = figure.subplots(1, n_examples + 1, squeeze=False)[0]
    label_x, label_y = comparison.labels
    for k, (nre, exact) in enumerate(comparison.examples):
        ax = axes[k]
        ax.pcolormesh(comparison.grid_x, comparison.grid_y, nre.T, cmap="Blues", shading="auto")
        for probabilities, color in ((nre, "tab:blue"), (exact, "black")):
            thresholds = sorted({hpd_threshold(probabilities, level) for level in (0.68, 0.95)})
            ax.contour(
                comparison.grid_x,
                comparison.grid_y,
                probabilities.T,
                levels=thresholds,
                colors=color,
                linewidths=1.0,
            )
        if truths is not None and k < len(truths):
            ax.plot(*truths[k], marker="*", color="tab:red", ms=10, ls="none")
        ax.set_title(
            f"JSD {comparison.jsd[k]:.3f} nats, exact spans "
            f"{comparison.effective_cells[k]:.1f} cells",
            fontsize=9,
        )
        ax.set_xlabel(label_x)
        ax.set_ylabel(label_y)

    ax = axes[-1]
    shift = comparison.upper_limit_shift
    ax.fill_between(
        comparison.grid_x,
        np.nanpercentile(shift, 16, axis=0),
        np.nanpercentile(shift, 84, axis=0),
        color="tab:orange",
        alpha=0.3,
        linewidth=0,
        label="16-84 %",
    )
    ax.plot(comparison.grid_x, np.nanmean(shift, axis=0), color="tab:orange", label="mean")
    ax.axhline(0.0, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel(label_x)
    ax.set_ylabel("NRE - exact 95 % limit [dex]")
    ax.set_title(f"upper limit on g, {len(shift)} observations", fontsize=9)
    ax.legend(fontsize=8)
    figure.suptitle("NRE (blue, filled) against the exact posterior (black), 68/95 % HPD")
    return figure
