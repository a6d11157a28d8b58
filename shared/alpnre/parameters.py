"""The simulator's parameters: names with units, physical ranges and prior presets.

Every parameter name carries its unit (``n0_cm3`` is an electron density in cm^-3), and
that name is used unchanged as the Parquet column, the YAML key and the JSON field.
Physical ranges are deliberately generous: they exist to catch unit slips (a density of
39 cm^-3 instead of 3.9e-2), not to encode astrophysical priors.

Sign convention of the turbulence index ``q``: the power spectrum of the Gaussian
turbulent field is M(k) ∝ k^q for kL ≤ k ≤ kH, as in gammaALPs' ``Bgaussian``, so a
Kolmogorov spectrum has q = -11/3 and the Perseus model of Ajello et al. (2016) has
q = -2.80. A positive q is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "PARAMETERS",
    "PARAMETERS_OF_INTEREST",
    "PRESETS",
    "PRESET_VERSION",
    "ParameterSpec",
    "preset_parameters",
]


@dataclass(frozen=True)
class ParameterSpec:
    """Name, unit and physically allowed range of one simulator parameter."""

    name: str
    unit: str
    low: float
    high: float
    typical: str
    description: str
    default: float


_SPECS = [
    ParameterSpec("m_neV", "neV", 1e-4, 1e4, "0.1-100 neV", "ALP mass", 10.0),
    ParameterSpec(
        "g_per_gev", "GeV^-1", 1e-16, 1e-8, "1e-13-1e-10 GeV^-1", "photon-ALP coupling", 1e-11
    ),
    ParameterSpec(
        "phi0_per_cm2_s_tev",
        "cm^-2 s^-1 TeV^-1",
        1e-14,
        1e-6,
        "~1e-9 cm^-2 s^-1 TeV^-1 for NGC 1275 at 300 GeV",
        "intrinsic flux amplitude at E0 = 300 GeV",
        1.54e-9,
    ),
    ParameterSpec("gamma", "", 0.5, 5.0, "~2", "intrinsic photon index", 2.11),
    ParameterSpec("ecut_tev", "TeV", 0.01, 1000.0, "0.1-10 TeV", "intrinsic cut-off energy", 0.54),
    ParameterSpec(
        "b0_microgauss", "µG", 1e-3, 100.0, "1-30 µG", "ICM field strength at the centre", 10.0
    ),
    ParameterSpec("eta", "", 0.0, 2.0, "0.5-1", "scaling B ∝ n_e^eta", 0.5),
    ParameterSpec("r_abell_kpc", "kpc", 10.0, 5000.0, "~500 kpc", "cluster extent", 500.0),
    ParameterSpec(
        "n0_cm3",
        "cm^-3",
        1e-5,
        1.0,
        "~1e-2 cm^-3 at cluster centres",
        "central electron density, first beta component",
        3.9e-2,
    ),
    ParameterSpec("r_core_kpc", "kpc", 1.0, 2000.0, "10-300 kpc", "first core radius", 80.0),
    ParameterSpec("beta", "", 0.1, 3.0, "0.5-1.5", "first beta-model exponent", 1.2),
    ParameterSpec(
        "n2_cm3",
        "cm^-3",
        0.0,
        1.0,
        "~1e-3 cm^-3",
        "central electron density, second beta component (0 disables it)",
        4.05e-3,
    ),
    ParameterSpec("r_core2_kpc", "kpc", 0.0, 3000.0, "100-500 kpc", "second core radius", 280.0),
    ParameterSpec("beta2", "", 0.0, 3.0, "0.5-1.5", "second beta-model exponent", 0.58),
    ParameterSpec(
        "kl_per_kpc",
        "kpc^-1",
        1e-4,
        10.0,
        "~0.1 kpc^-1 (largest turbulence scale ~ tens of kpc)",
        "lower wave-number cut-off of the turbulence",
        0.18,
    ),
    ParameterSpec(
        "kh_per_kpc",
        "kpc^-1",
        1e-2,
        50.0,
        "~1-10 kpc^-1 (smallest turbulence scale ~ 0.1-1 kpc)",
        "upper wave-number cut-off of the turbulence; the cell length is 1/kH",
        9.0,
    ),
    ParameterSpec(
        "q",
        "",
        -6.0,
        -0.1,
        "-11/3 (Kolmogorov) to -2",
        "turbulence power-spectrum index, M(k) ∝ k^q",
        -2.80,
    ),
    ParameterSpec("ebl_norm", "", 0.0, 5.0, "1", "scale factor of the EBL optical depth", 1.0),
]

PARAMETERS: dict[str, ParameterSpec] = {spec.name: spec for spec in _SPECS}
PARAMETERS_OF_INTEREST = ("m_neV", "g_per_gev")
CLUSTER_PARAMETERS = (
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

PRESET_VERSION = "1"


def _fixed_cluster() -> dict[str, dict[str, Any]]:
    return {
        name: {"kind": "fixed", "value": PARAMETERS[name].default} for name in CLUSTER_PARAMETERS
    }


def _truncated(mean: float, std: float, low: float, high: float) -> dict[str, Any]:
    return {"kind": "truncated_normal", "mean": mean, "std": std, "low": low, "high": high}


def _uniform(low: float, high: float) -> dict[str, Any]:
    return {"kind": "uniform", "low": low, "high": high}


# Sources of the central values: Ajello et al. 2016, PRL 116, 161101 (Fermi-LAT NGC 1275
# analysis: B0 = 10 µG, eta = 0.5, kL = 0.18 kpc^-1, kH = 9 kpc^-1, q = -2.80,
# r_abell = 500 kpc) and Churazov et al. 2003, ApJ 590, 225 (double beta-model of the
# Perseus electron density). Neither paper publishes a covariance of these numbers, so
# the widths below are this project's reading of the spread quoted in those papers and
# in Taylor et al. 2006, MNRAS 368, 1500 (Faraday rotation: central fields of ~10-25 µG).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Every cluster value fixed at the Fermi-LAT 2016 Perseus model; only the B-field
    # realisation and the intrinsic spectrum vary.
    "confident": _fixed_cluster(),
    # Truncated normals around the literature values.
    "informed": {
        "b0_microgauss": _truncated(10.0, 5.0, 1.0, 30.0),
        "eta": _truncated(0.5, 0.2, 0.1, 1.2),
        "r_abell_kpc": _truncated(500.0, 100.0, 300.0, 800.0),
        "n0_cm3": _truncated(3.9e-2, 0.4e-2, 2.5e-2, 5.5e-2),
        "r_core_kpc": _truncated(80.0, 10.0, 50.0, 110.0),
        "beta": _truncated(1.2, 0.1, 0.9, 1.5),
        "n2_cm3": _truncated(4.05e-3, 0.4e-3, 2.8e-3, 5.3e-3),
        "r_core2_kpc": _truncated(280.0, 30.0, 190.0, 370.0),
        "beta2": _truncated(0.58, 0.06, 0.4, 0.76),
        "kl_per_kpc": _truncated(0.18, 0.05, 0.05, 0.5),
        "kh_per_kpc": _truncated(9.0, 2.0, 4.0, 14.0),
        "q": _truncated(-2.80, 0.3, -11.0 / 3.0, -2.0),
    },
    # Narrower uniform ranges around the same values.
    "semi-informed": {
        "b0_microgauss": _uniform(5.0, 15.0),
        "eta": _uniform(0.4, 0.7),
        "r_abell_kpc": _uniform(400.0, 600.0),
        "n0_cm3": _uniform(3.5e-2, 4.3e-2),
        "r_core_kpc": _uniform(70.0, 90.0),
        "beta": _uniform(1.1, 1.3),
        "n2_cm3": _uniform(3.6e-3, 4.5e-3),
        "r_core2_kpc": _uniform(250.0, 310.0),
        "beta2": _uniform(0.52, 0.64),
        "kl_per_kpc": _uniform(0.1, 0.3),
        "kh_per_kpc": _uniform(6.0, 12.0),
        "q": _uniform(-3.2, -2.4),
    },
    # Wide physical ranges for a cluster about which little is assumed.
    "agnostic": {
        "b0_microgauss": _uniform(1.0, 50.0),
        "eta": _uniform(0.1, 1.5),
        "r_abell_kpc": _uniform(200.0, 1000.0),
        "n0_cm3": _uniform(1e-2, 1e-1),
        "r_core_kpc": _uniform(20.0, 200.0),
        "beta": _uniform(0.5, 2.0),
        "n2_cm3": _uniform(1e-3, 1e-2),
        "r_core2_kpc": _uniform(100.0, 500.0),
        "beta2": _uniform(0.3, 1.2),
        "kl_per_kpc": _uniform(0.02, 1.0),
        "kh_per_kpc": _uniform(2.0, 20.0),
        "q": _uniform(-11.0 / 3.0, -1.5),
    },
}


def preset_parameters(name: str) -> dict[str, dict[str, Any]]:
    """Return a copy of the cluster priors of a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown prior preset {name!r}: choose one of {sorted(PRESETS)}")
    return {key: dict(value) for key, value in PRESETS[name].items()}
