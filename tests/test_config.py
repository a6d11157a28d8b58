"""Config validation: physical ranges, presets, priors and readable errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import yaml
from alpnre.config import ConfigError, config_hash, load_config, parse_config
from alpnre.parameters import CLUSTER_PARAMETERS, PARAMETERS, PRESETS
from alpnre.priors import LogUniformPrior, TruncatedNormalPrior
from conftest import REPO_ROOT, small_config_dict
from scipy import stats


@pytest.mark.parametrize("name", ["ngc1275_cta_north_50h", "ngc1275_cta_south_z20_50h_1dc"])
def test_shipped_configs_load(name):
    config = load_config(name)
    assert config.name == name
    assert config.observation.n_energy_bins == 200
    assert config.source.redshift == pytest.approx(0.017559)


def test_default_config_values():
    config = load_config("ngc1275_cta_north_50h")
    assert config.prior("m_neV") == LogUniformPrior(low=0.1, high=100.0)
    assert config.prior("g_per_gev") == LogUniformPrior(low=1e-13, high=1e-10)
    assert config.prior("n0_cm3").value == pytest.approx(3.9e-2)
    assert config.prior("kl_per_kpc").value == pytest.approx(0.18)
    assert config.prior("kh_per_kpc").value == pytest.approx(9.0)
    assert config.prior("q").value == pytest.approx(-2.80)
    assert config.prior("ebl_norm").value == 1.0
    edges = config.observation.energy_edges_tev()
    assert edges[0] == pytest.approx(0.01)
    assert edges[-1] == pytest.approx(100.0)


def test_density_unit_slip_rejected():
    data = small_config_dict()
    data["parameters"]["n0_cm3"] = {"kind": "fixed", "value": 39.0}
    with pytest.raises(ConfigError) as error:
        parse_config(data)
    message = str(error.value)
    assert "n0_cm3 = 39" in message
    assert "cm^-3" in message
    assert "1e-2" in message


def test_swapped_turbulence_scales_rejected():
    data = small_config_dict()
    data["parameters"]["kl_per_kpc"] = {"kind": "fixed", "value": 9.0}
    data["parameters"]["kh_per_kpc"] = {"kind": "fixed", "value": 0.18}
    with pytest.raises(ConfigError, match="kl_per_kpc .* must be below kh_per_kpc .* look swapped"):
        parse_config(data)


def test_positive_turbulence_index_rejected():
    data = small_config_dict()
    data["parameters"]["q"] = {"kind": "fixed", "value": 11.0 / 3.0}
    with pytest.raises(ConfigError, match="q = 3.66667 is outside"):
        parse_config(data)


@pytest.mark.parametrize(
    ("prior", "match"),
    [
        ({"kind": "uniform", "low": 2.0, "high": 1.0}, "low < high"),
        ({"kind": "log_uniform", "low": 0.0, "high": 1.0}, "low > 0"),
        (
            {"kind": "truncated_normal", "mean": 100.0, "std": 1.0, "low": 1.0, "high": 2.0},
            "empty support",
        ),
        ({"kind": "normal", "mean": 2.0, "std": -1.0}, "greater than 0"),
        ({"kind": "beta", "a": 1}, "does not match any of the expected tags"),
    ],
)
def test_bad_priors_rejected(prior, match):
    data = small_config_dict()
    data["parameters"]["gamma"] = prior
    with pytest.raises(ConfigError, match=match):
        parse_config(data)


def test_unknown_field_rejected():
    data = small_config_dict()
    data["observation"]["livetime"] = 50
    with pytest.raises(ConfigError, match="observation.livetime: Extra inputs are not permitted"):
        parse_config(data)


def test_unknown_parameter_rejected():
    data = small_config_dict()
    data["parameters"]["b0"] = {"kind": "fixed", "value": 10.0}
    with pytest.raises(ConfigError, match="unknown parameters \\['b0'\\]"):
        parse_config(data)


def test_parameter_of_interest_cannot_be_fixed():
    data = small_config_dict()
    data["parameters"]["m_neV"] = {"kind": "fixed", "value": 10.0}
    with pytest.raises(ConfigError, match="parameter of interest"):
        parse_config(data)


def test_missing_config_names_shipped_ones():
    with pytest.raises(ConfigError, match="ngc1275_cta_north_50h"):
        load_config("no_such_config")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_load(preset):
    data = small_config_dict(preset=preset)
    config = parse_config(data)
    assert config.preset == preset
    assert config.preset_version == "1"
    for name in CLUSTER_PARAMETERS:
        assert name in config.parameters


def test_preset_override_single_parameter():
    data = small_config_dict(preset="informed")
    data["parameters"]["b0_microgauss"] = {"kind": "fixed", "value": 20.0}
    config = parse_config(data)
    assert config.prior("b0_microgauss").value == 20.0
    assert isinstance(config.prior("eta"), TruncatedNormalPrior)


def test_config_hash_changes_with_content():
    data = small_config_dict()
    first = config_hash(parse_config(data))
    changed = copy.deepcopy(data)
    changed["observation"]["livetime_h"] = 20.0
    assert config_hash(parse_config(data)) == first
    assert config_hash(parse_config(changed)) != first


def test_parameter_names_carry_units():
    for spec in PARAMETERS.values():
        if spec.unit:
            assert "_" in spec.name, spec.name
        assert spec.low < spec.high
        assert spec.low <= spec.default <= spec.high


@pytest.mark.parametrize("preset", ["informed", "semi-informed", "agnostic"])
def test_preset_samples_follow_priors(preset):
    """Kolmogorov-Smirnov test of 4000 draws against each prior's CDF (fixed seed)."""
    config = parse_config(small_config_dict(preset=preset))
    rng = np.random.default_rng(11)
    for name in CLUSTER_PARAMETERS:
        prior = config.prior(name)
        samples = prior.sample(rng, 4000)
        low, high = prior.support()
        if isinstance(prior, TruncatedNormalPrior):
            cdf = prior._scipy().cdf
        else:
            cdf = stats.uniform(low, high - low).cdf
        assert stats.kstest(samples, cdf).pvalue > 1e-3, name


def test_log_uniform_samples_uniform_in_log():
    prior = LogUniformPrior(low=0.1, high=100.0)
    samples = np.log10(prior.sample(np.random.default_rng(3), 5000))
    assert stats.kstest(samples, stats.uniform(-1, 3).cdf).pvalue > 1e-3


def test_log_uniform_density_normalised():
    prior = LogUniformPrior(low=0.1, high=100.0)
    grid = np.geomspace(0.1, 100.0, 20001)
    integral = np.trapezoid(np.exp(prior.log_prob(grid)), grid)
    assert integral == pytest.approx(1.0, rel=1e-4)


def test_yaml_of_shipped_config_has_no_extra_keys():
    data = yaml.safe_load((REPO_ROOT / "configs" / "ngc1275_cta_north_50h.yaml").read_text())
    assert set(data) <= {
        "name",
        "preset",
        "source",
        "observation",
        "irf",
        "ebl",
        "propagation",
        "parameters",
    }
