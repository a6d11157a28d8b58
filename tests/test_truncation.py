"""Truncated rounds: prior box from the posterior, truncated config, one full round."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from alpnre.cli import main
from alpnre.config import parse_config
from alpnre.nre import TrainingConfig
from alpnre.posterior import compute_posterior
from alpnre.registry import load_estimator, save_estimator
from alpnre.training import load_training_data, train_estimator
from alpnre.truncation import _prior_fraction, truncate, truncated_config, truncation_bounds
from conftest import small_config_dict

TINY = {
    "max_epochs": 3,
    "batch_size": 64,
    "shuffle_buffer": 256,
    "embedding_width": 32,
    "n_features": 8,
    "head_width": 16,
    "bnre_lambda": 0.0,
    "seed": 2,
}


@pytest.fixture(scope="module")
def estimator(small_run, tmp_path_factory):
    data = load_training_data([small_run])
    folder = tmp_path_factory.mktemp("truncation")
    result = train_estimator(data, TrainingConfig(**TINY), folder / "work", progress=False)
    save_estimator(folder / "estimator", result.model, result.config, metrics=result.metrics)
    return load_estimator(folder / "estimator"), data


def _observation(data):
    from alpnre.streaming import read_spectra

    counts, _ = read_spectra(data.files[:1], ["m_neV"])
    return counts[0]


def test_bounds_contain_points_above_threshold(estimator):
    loaded, data = estimator
    x_o = _observation(data)
    posterior = compute_posterior(loaded, x_o, grid_size=400, marginals=["m_neV", "g_per_gev"])

    wide = truncation_bounds(loaded, x_o, threshold=1e-6)
    narrow = truncation_bounds(loaded, x_o, threshold=0.5)

    for name in ("m_neV", "g_per_gev"):
        marginal, axis = posterior.one_dim[name], loaded.spec.axis(name)
        low, high = (math.log10(value) for value in wide[name])
        above = marginal.grid[marginal.density >= 1e-6 * marginal.density.max()]
        assert low <= above.min() + 1e-9
        assert above.max() <= high + 1e-9
        assert axis.low - 1e-9 <= low < high <= axis.high + 1e-9
        assert wide[name][0] <= narrow[name][0] < narrow[name][1] <= wide[name][1]
    with pytest.raises(ValueError, match="threshold must lie in"):
        truncation_bounds(loaded, x_o, threshold=0.0)


def test_truncated_config_keeps_the_rest():
    config = parse_config(small_config_dict())
    bounds = {"m_neV": (1.0, 10.0), "g_per_gev": (1e-12, 1e-11)}

    truncated = truncated_config(config, bounds)

    assert truncated.name == f"{config.name}-truncated"
    assert truncated.prior("m_neV").kind == "log_uniform"
    assert truncated.prior("m_neV").support() == (1.0, 10.0)
    assert truncated.prior("gamma") == config.prior("gamma")
    assert truncated.observation == config.observation
    # One decade of m out of three and one of g out of three.
    assert _prior_fraction(config, bounds) == pytest.approx(1 / 9)
    with pytest.raises(ValueError, match="cannot truncate a fixed prior"):
        truncated_config(config, {"b0_microgauss": (1.0, 2.0)})


def test_truncate_command_writes_a_round(estimator, tmp_path):
    loaded, data = estimator
    observation = tmp_path / "observation.json"
    observation.write_text(json.dumps({"counts": _observation(data).tolist()}))

    code = main(
        [
            "truncate",
            "--estimator",
            str(loaded.path),
            "--observation",
            str(observation),
            "--output",
            str(tmp_path / "round"),
            "--n-simulations",
            "400",
            "--batch-size",
            "200",
            "--threshold",
            "0.1",
            # The test estimator is barely trained, so its box is most of the prior.
            "--max-prior-fraction",
            "1",
            "--max-epochs",
            "2",
            "--workers",
            "1",
            "--no-progress",
        ]
    )

    assert code == 0
    record = json.loads((tmp_path / "round" / "truncation.json").read_text())
    truncated = load_estimator(tmp_path / "round" / "estimator")
    low, high = record["bounds"]["m_neV"]
    assert truncated.config.prior("m_neV").support() == pytest.approx((low, high))
    assert 0.0 < record["prior_fraction"] <= 1.0
    assert record["parent_estimator"] == loaded.estimator_id
    posterior = json.loads((tmp_path / "round" / "posterior.json").read_text())
    grid = np.asarray(posterior["marginals_1d"]["m_neV"]["grid"])
    assert grid.min() == pytest.approx(math.log10(low))
    assert grid.max() == pytest.approx(math.log10(high))
    assert (tmp_path / "round" / "posterior.png").stat().st_size > 10_000


def test_round_rejected_when_box_is_the_prior(estimator, tmp_path):
    """A box that contains the whole prior stops the round before any simulation."""
    loaded, data = estimator

    with pytest.raises(ValueError, match="raise --threshold"):
        truncate(loaded, _observation(data), tmp_path / "round", n_simulations=400, threshold=1e-12)

    assert not (tmp_path / "round" / "simulations").exists()


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5, float("nan")])
def test_round_rejects_bad_prior_fraction(estimator, tmp_path, fraction):
    loaded, data = estimator

    with pytest.raises(ValueError, match="max_prior_fraction must lie in"):
        truncate(
            loaded,
            _observation(data),
            tmp_path / "round",
            n_simulations=400,
            max_prior_fraction=fraction,
        )

    assert not (tmp_path / "round").exists()
