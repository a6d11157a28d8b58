"""The main job end to end: simulate, train, and infer a posterior that has learned."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from alpnre.cli import main
from alpnre.config import parse_config
from alpnre.nre import TrainingConfig
from alpnre.physics.irf import load_instrument_response
from alpnre.posterior import compute_posterior
from alpnre.registry import load_estimator, save_estimator
from alpnre.runs import simulate_run
from alpnre.simulate import expected_counts
from alpnre.training import load_training_data, train_estimator
from conftest import small_config_dict


def test_cli_simulate_train_posterior(tmp_path, monkeypatch):
    config_path = tmp_path / "small.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(small_config_dict()))
    run = tmp_path / "run"
    assert (
        main(
            [
                "simulate",
                "--config",
                str(config_path),
                "--n-simulations",
                "300",
                "--batch-size",
                "100",
                "--seed",
                "2",
                "--output",
                str(run),
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    threads = torch.get_num_threads()
    try:
        code = main(
            [
                "train",
                "--data",
                str(run),
                "--output",
                str(tmp_path / "est"),
                "--max-epochs",
                "1",
                "--batch-size",
                "32",
                "--threads",
                "1",
                "--no-progress",
            ]
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    assert (
        main(
            [
                "posterior",
                "--estimator",
                str(tmp_path / "est" / "estimator"),
                "--observation",
                str(run / "batch-000000.parquet"),
                "--row",
                "3",
                "--grid-size",
                "20",
                "--output",
                str(tmp_path / "post"),
                "--no-progress",
            ]
        )
        == 0
    )
    payload = json.loads((tmp_path / "post" / "posterior.json").read_text())
    assert set(payload["truth"]) >= {"m_neV", "g_per_gev"}
    assert (tmp_path / "post" / "posterior.png").stat().st_size > 10_000


def test_cli_train_rejects_zero_threads(tmp_path, caplog):
    code = main(
        ["train", "--data", str(tmp_path), "--output", str(tmp_path / "est"), "--threads", "0"]
    )
    assert code == 2
    assert "--threads must be at least 1, got 0" in caplog.text
    assert not (tmp_path / "est").exists()


def test_cli_reports_bad_observation(tmp_path, caplog):
    observation = tmp_path / "counts.json"
    observation.write_text(json.dumps([1, 2, 3]))
    code = main(
        [
            "posterior",
            "--estimator",
            str(tmp_path / "missing"),
            "--observation",
            str(observation),
            "--output",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "is not an estimator folder" in caplog.text or "not found" in caplog.text


@pytest.mark.slow
def test_trained_posterior_concentrates_near_truth(tmp_path):
    """After a short training, posteriors put more mass at the truth than the prior does.

    A strongly mixing injected signal (m = 3 neV, g = 8e-11 GeV^-1) must fall inside the
    95 % HPD region of the 2-dim posterior, and that region must be smaller than half
    of the prior's area.
    """
    data = small_config_dict()
    # A known intrinsic spectrum leaves (m, g) and the B-field realisation to learn, so
    # a few thousand spectra suffice; plain NRE (lambda = 0) learns fastest.
    data["parameters"].update(
        {
            "phi0_per_cm2_s_tev": {"kind": "fixed", "value": 1.54e-9},
            "gamma": {"kind": "fixed", "value": 2.11},
            "ecut_tev": {"kind": "fixed", "value": 0.54},
        }
    )
    config = parse_config(data)
    simulate_run(
        config,
        tmp_path / "run",
        n_simulations=4000,
        batch_size=500,
        run_seed=21,
        workers=2,
        progress=False,
    )
    data = load_training_data([tmp_path / "run"])
    training = TrainingConfig(max_epochs=20, batch_size=128, seed=2, patience=4, bnre_lambda=0.0)
    result = train_estimator(data, training, tmp_path / "work", progress=False)
    folder = save_estimator(tmp_path / "estimator", result.model, result.config)
    estimator = load_estimator(folder)

    # Held-out simulations: the mean log-ratio at the truth is positive when the
    # estimator has learned anything (it is the expected information gain).
    instrument = load_instrument_response(config)
    rng = np.random.default_rng(77)
    gains = []
    for _ in range(30):
        truth = {
            name: float(config.prior(name).sample(rng, 1)[0]) for name in config.parameter_names
        }
        params = {name: np.array([value]) for name, value in truth.items()}
        counts = rng.poisson(
            expected_counts(
                config, instrument, params, np.array([rng.integers(2**63)], dtype=np.uint64)
            )[0]
        )
        posterior = compute_posterior(estimator, counts, grid_size=40)
        joint = posterior.two_dim["m_neV__g_per_gev"]
        i = np.argmin(np.abs(joint.grid_x - np.log10(truth["m_neV"])))
        j = np.argmin(np.abs(joint.grid_y - np.log10(truth["g_per_gev"])))
        prior_density = 1.0 / (
            (joint.grid_x[-1] - joint.grid_x[0]) * (joint.grid_y[-1] - joint.grid_y[0])
        )
        gains.append(np.log(joint.density[i, j] / prior_density))
    assert np.mean(gains) > 0.2

    # A strong injected signal.
    truth = {name: float(config.prior(name).sample(rng, 1)[0]) for name in config.parameter_names}
    truth.update({"m_neV": 3.0, "g_per_gev": 8e-11})
    params = {name: np.array([value]) for name, value in truth.items()}
    counts = rng.poisson(
        expected_counts(config, instrument, params, np.array([12345], dtype=np.uint64))[0]
    )
    joint = compute_posterior(estimator, counts, grid_size=60).two_dim["m_neV__g_per_gev"]
    from alpnre.validation import hpd_mask

    mask = hpd_mask(joint.density, 0.95)
    i = np.argmin(np.abs(joint.grid_x - np.log10(3.0)))
    j = np.argmin(np.abs(joint.grid_y - np.log10(8e-11)))
    assert mask[i, j]
    assert mask.mean() < 0.5
