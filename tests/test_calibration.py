"""Validation of estimators: held-out simulations, coverage, TARP, report, CLI and API.

A tiny estimator (2 epochs on the session's small run, 40 energy bins) is published to a
temporary registry. Calibration is checked with two estimators whose calibration is known:
one that ignores the data (its posterior is the prior, which is calibrated) and one
whose log-ratios are multiplied by 5 (too narrow, so overconfident).
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from alpnre.calibration import (
    REPORT_SCHEMA_VERSION,
    GridMarginal,
    cell_averaged_probabilities,
    default_validation_seed,
    densities_at_truths,
    grid_posteriors,
    simulate_held_out,
    validate_estimator,
)
from alpnre.cli import main
from alpnre.config import parse_config
from alpnre.nre import EstimatorSpec, RatioEstimator, TrainingConfig, default_heads, parameter_axes
from alpnre.registry import LoadedEstimator, load_estimator, publish_estimator, save_estimator
from alpnre.simulate import batch_seed_sequence, simulate_batch
from alpnre.training import load_training_data, train_estimator
from conftest import small_config_dict
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.routes.validation import ValidationReportPublic
from services.api.settings import ApiSettings
from services.trainer.settings import TrainerSettings

# No Redis listens here: these tests must not need the broker.
UNREACHABLE_BROKER = "redis://127.0.0.1:9/0"
COVERAGE_VERDICTS = {"calibrated", "conservative", "overconfident"}
MARGINALS = {"m_neV", "g_per_gev", "m_neV__g_per_gev"}
REPORT_KEYS = {
    "schema_version",
    "estimator_id",
    "estimator_checksum",
    "config_name",
    "config_hash",
    "irf_id",
    "created_at",
    "alpnre_version",
    "held_out",
    "grid_size",
    "grid_size_1d",
    "n_posterior_samples",
    "verdict",
    "coverage",
    "tarp",
    "exact",
    "timing_s",
    "figures",
    "note",
}
N_VALIDATION = 40
N_HELD_OUT = 400


def _reject_constant(name: str) -> float:
    raise AssertionError(f"report contains the non-JSON number {name}")


def read_report(folder) -> dict:
    """Parse validation/report.json strictly: NaN and Infinity are not JSON."""
    text = (folder / "validation" / "report.json").read_text()
    return json.loads(text, parse_constant=_reject_constant)


class Sharpened(RatioEstimator):
    """The same network with every log-ratio multiplied by a factor."""

    def __init__(self, spec: EstimatorSpec, factor: float) -> None:
        super().__init__(spec)
        self.factor = factor

    def log_ratios(self, features, theta):
        return {
            key: self.factor * value for key, value in super().log_ratios(features, theta).items()
        }


def variant(estimator: LoadedEstimator, model: torch.nn.Module, name: str) -> LoadedEstimator:
    metadata = {**estimator.metadata, "estimator_id": name}
    return LoadedEstimator(
        model=model.eval(), config=estimator.config, metadata=metadata, path=estimator.path
    )


@pytest.fixture(scope="module")
def registry(small_run, tmp_path_factory):
    """A registry with two copies of a tiny trained estimator: (folder, validated id, other id)."""
    data = load_training_data([small_run])
    training = TrainingConfig(
        max_epochs=2,
        batch_size=64,
        shuffle_buffer=256,
        embedding_width=32,
        n_features=8,
        head_width=16,
        seed=1,
        device="cpu",
    )
    folder = tmp_path_factory.mktemp("registry")
    result = train_estimator(data, training, folder / "work", progress=False)
    validated = publish_estimator(folder, result.model, result.config, metrics=result.metrics)
    other = publish_estimator(folder, result.model, result.config, metrics=result.metrics)
    return folder, validated, other


@pytest.fixture(scope="module")
def trained(registry):
    folder, estimator_id, _ = registry
    return load_estimator(folder / "estimators" / estimator_id)


@pytest.fixture(scope="module")
def validated(trained):
    """The report of a small validation written into the trained estimator's folder."""
    report = validate_estimator(
        trained.path, n_simulations=N_VALIDATION, grid_size=16, n_posterior_samples=100
    )
    return report, read_report(trained.path)


@pytest.fixture(scope="module")
def held_out(trained):
    return simulate_held_out(trained.config, N_HELD_OUT, seed=11)


# --- the report -------------------------------------------------------------------------


def test_report_has_all_keys(validated):
    _, payload = validated
    assert set(payload) == REPORT_KEYS
    assert payload["schema_version"] == REPORT_SCHEMA_VERSION
    assert set(payload["coverage"]) == MARGINALS
    assert payload["exact"] is None
    assert payload["held_out"]["n_simulations"] == N_VALIDATION
    assert payload["figures"] == {"coverage": "coverage.png", "tarp": "tarp.png"}


def test_report_verdicts_valid(validated):
    _, payload = validated
    assert payload["verdict"] in COVERAGE_VERDICTS
    for key, coverage in payload["coverage"].items():
        assert coverage["verdict"] in COVERAGE_VERDICTS, key
        assert set(coverage["verdicts"]) <= COVERAGE_VERDICTS, key
        assert len(coverage["verdicts"]) == len(coverage["levels"]) == len(coverage["ecp"]), key
        assert len(coverage["credibilities"]) == N_VALIDATION, key
        assert coverage["parameters"] == key.split("__"), key
    assert payload["tarp"]["verdict"] in {"calibrated", "miscalibrated"}
    assert payload["tarp"]["axes"] == ["log10(m_neV)", "log10(g_per_gev)"]
    assert 0.0 <= payload["tarp"]["area"] <= 0.5
    assert 0.0 <= payload["tarp"]["ks_statistic"] <= 1.0


def test_report_matches_returned_object(validated, trained):
    report, payload = validated
    assert payload == json.loads(json.dumps(report.to_dict()))
    assert report.folder == trained.path / "validation"
    assert "verdict" in report.summary()


def test_report_figures_written(trained, validated):
    folder = trained.path / "validation"
    for name in ("coverage.png", "tarp.png"):
        assert (folder / name).stat().st_size > 10_000, name
    assert not (folder / "exact.png").exists()
    assert sorted(path.name for path in folder.iterdir()) == [
        "coverage.png",
        "report.json",
        "tarp.png",
    ]


def test_validation_keeps_checksum_valid(trained, validated):
    _, payload = validated
    reloaded = load_estimator(trained.path)
    assert reloaded.checksum == payload["estimator_checksum"] == trained.checksum


def test_default_seed_recorded(trained, validated):
    _, payload = validated
    assert payload["held_out"]["seed"] == default_validation_seed(trained.checksum)


def test_report_matches_api_schema(validated):
    _, payload = validated
    public = ValidationReportPublic.model_validate(payload)
    assert public.model_dump(mode="json") == payload


# --- held-out simulations ----------------------------------------------------------------


def test_held_out_reproducible_from_seed(trained):
    first = simulate_held_out(trained.config, 4, seed=3)
    again = simulate_held_out(trained.config, 4, seed=3)
    other = simulate_held_out(trained.config, 4, seed=4)
    np.testing.assert_array_equal(first.counts, again.counts)
    np.testing.assert_array_equal(first.theta["m_neV"], again.theta["m_neV"])
    assert not np.array_equal(first.theta["m_neV"], other.theta["m_neV"])


def test_held_out_differs_from_run_with_same_seed(trained):
    held_out = simulate_held_out(trained.config, 4, seed=5)
    run_batch = simulate_batch(trained.config, 4, batch_seed_sequence(5, 0))
    assert not np.array_equal(held_out.theta["m_neV"], run_batch.column("m_neV").to_numpy())


# --- estimators of known calibration ----------------------------------------------------


def data_blind(estimator: LoadedEstimator) -> LoadedEstimator:
    """Zeroed output layers make every log-ratio 0, so the posterior is the prior."""
    model = copy.deepcopy(estimator.model)
    with torch.no_grad():
        for head in (model.head_1d, model.head_2d):
            head.classifier.net.final_layer.weights.zero_()
            head.classifier.net.final_layer.bias.zero_()
    return variant(estimator, model, "data-blind")


def test_data_blind_estimator_calibrated(trained, held_out):
    blind = data_blind(trained)

    report = validate_estimator(
        blind, held_out=held_out, grid_size=24, n_posterior_samples=200, write=False
    )

    for key, coverage in report.coverage.items():
        assert coverage.verdict == "calibrated", key
        assert np.abs(coverage.ecp - coverage.levels).max() < 0.08, key
    assert report.tarp.verdict == "calibrated"
    assert report.tarp.area < 0.05


def test_sharpened_estimator_overconfident(trained, held_out):
    model = Sharpened(trained.spec, factor=5.0)
    model.load_state_dict(trained.model.state_dict())
    sharpened = variant(trained, model, "sharpened")

    report = validate_estimator(
        sharpened, held_out=held_out, grid_size=24, n_posterior_samples=200, write=False
    )

    assert report.coverage["m_neV__g_per_gev"].verdict == "overconfident"
    assert report.verdict == "overconfident"


def test_report_grid_sizes(validated):
    report, payload = validated
    assert payload["grid_size"] == 16
    # The 1-dim grids default to 1024 cells, the 2-dim grid keeps grid_size.
    assert payload["grid_size_1d"] == 1024
    assert len(payload["coverage"]["m_neV"]["grid_check"]["ecp_density_at_truth"]) > 0
    assert report.cells_per_axis("m_neV") == 1024
    assert report.cells_per_axis("m_neV__g_per_gev") == 16


def test_grid_posteriors_1d_grid_size(trained, held_out):
    marginals = grid_posteriors(trained, held_out.counts[:3], grid_size=8, grid_size_1d=40)

    one_dim = [m for m in marginals if len(m.names) == 1]
    two_dim = [m for m in marginals if len(m.names) == 2]
    assert all(m.probabilities.shape == (3, 40) for m in one_dim)
    assert all(m.probabilities.shape == (3, 8, 8) for m in two_dim)


@pytest.mark.parametrize("grid_size_1d", [7, 16385])
def test_grid_size_1d_out_of_range_rejected(trained, grid_size_1d):
    with pytest.raises(
        ValueError, match=f"grid_size_1d must lie in \\[8, 16384\\], got {grid_size_1d}"
    ):
        validate_estimator(trained, n_simulations=20, grid_size_1d=grid_size_1d, write=False)


def test_report_records_grid_check(validated):
    _, payload = validated
    for key, coverage in payload["coverage"].items():
        check = coverage["grid_check"]
        assert len(check["ecp_density_at_truth"]) == len(coverage["levels"]), key
        assert check["max_ecp_difference"] >= 0.0, key
        assert isinstance(check["resolved"], bool), key


def test_grid_check_flat_posterior_resolved(trained, held_out):
    """A data-blind estimator has a flat posterior: both truth densities agree exactly."""
    blind = data_blind(trained)

    report = validate_estimator(
        blind, held_out=held_out, grid_size=8, n_posterior_samples=100, write=False
    )

    assert report.unresolved_marginals() == []
    for key in report.coverage:
        assert report.grid_check(key)["max_ecp_difference"] < 1e-9, key


def test_grid_check_flags_coarse_grid(trained, held_out):
    """Posteriors sharpened 20 times are narrower than the cells of an 8-cell grid."""
    model = Sharpened(trained.spec, factor=20.0)
    model.load_state_dict(trained.model.state_dict())
    sharpened = variant(trained, model, "sharpened")

    report = validate_estimator(
        sharpened,
        held_out=held_out,
        grid_size=8,
        grid_size_1d=8,
        n_posterior_samples=100,
        write=False,
    )

    unresolved = report.unresolved_marginals()
    assert unresolved
    for key in unresolved:
        labels = " x ".join(report.labels[key])
        assert f"grid check {labels}: not resolved" in report.summary(), key


def test_fast_grid_evaluation_matches_forward(trained, held_out):
    """The batched evaluation equals the network's own forward (a pass-through subclass)."""
    model = Sharpened(trained.spec, factor=1.0)
    model.load_state_dict(trained.model.state_dict())
    counts = held_out.counts[:6]

    fast = grid_posteriors(trained, counts, grid_size=12)
    reference = grid_posteriors(variant(trained, model, "forward"), counts, grid_size=12)

    for marginal, expected in zip(fast, reference, strict=True):
        assert marginal.names == expected.names
        np.testing.assert_allclose(
            marginal.probabilities, expected.probabilities, rtol=1e-3, atol=1e-7
        )


def test_densities_at_truths_match_cell_centres(trained, held_out):
    """At cell centres, the density at the truth equals that cell's grid probability."""
    counts = held_out.counts[:5]
    rng = np.random.default_rng(0)

    for marginal in grid_posteriors(trained, counts, grid_size=12):
        index = rng.integers(0, 12, size=(5, len(marginal.names)))
        truths = np.stack([grid[index[:, d]] for d, grid in enumerate(marginal.grids)], axis=1)
        values = densities_at_truths(trained, counts, marginal, truths)

        expected = marginal.probabilities[(np.arange(5), *index.T)]
        np.testing.assert_allclose(values, expected, rtol=1e-3, err_msg=marginal.key)


def test_cell_averages_match_forward_at_subnodes(trained, held_out):
    """A cell average is the mean of the network's densities at the 3 x 3 midpoint nodes."""
    # Sharpened, so that the density varies across a cell and node positions matter.
    model = Sharpened(trained.spec, factor=50.0)
    model.load_state_dict(trained.model.state_dict())
    sharp = variant(trained, model, "sharp")
    counts = held_out.counts[:3]
    joint = grid_posteriors(sharp, counts, grid_size=12)[-1]
    cells = np.zeros((3, 12, 12), dtype=bool)
    cells[0, 3, 4] = cells[0, 3, 5] = cells[2, 7, 7] = True

    averaged = cell_averaged_probabilities(sharp, counts, joint, cells, subcells=3)

    np.testing.assert_allclose(averaged.sum(axis=(1, 2)), 1.0, rtol=1e-9)
    np.testing.assert_allclose(averaged[1], joint.probabilities[1], rtol=1e-9)
    steps = [grid[1] - grid[0] for grid in joint.grids]
    offsets = np.array([-1.0, 0.0, 1.0]) / 3
    for k, i, j in np.argwhere(cells):
        nodes = np.array(
            [
                (joint.grids[0][i] + steps[0] * a, joint.grids[1][j] + steps[1] * b)
                for a in offsets
                for b in offsets
            ]
        )
        # The network's forward at each sub-node, on the scale of the grid probabilities.
        repeated = GridMarginal(
            joint.names,
            joint.labels,
            joint.grids,
            np.repeat(joint.probabilities[k : k + 1], 9, axis=0),
            np.repeat(joint.log_normaliser[k : k + 1], 9),
        )
        densities = densities_at_truths(
            sharp, np.repeat(counts[k : k + 1], 9, axis=0), repeated, nodes
        )
        assert densities.max() > 1.05 * densities.min(), "too flat to test the node positions"
        mean_density = densities.mean()
        # Untouched cells keep their values, so ratios to cell (0, 0) are unchanged by the
        # renormalisation.
        expected = mean_density / joint.probabilities[k, 0, 0]
        np.testing.assert_allclose(averaged[k, i, j] / averaged[k, 0, 0], expected, rtol=1e-3)


def test_cell_averages_with_one_subcell_keep_centres(trained, held_out):
    counts = held_out.counts[:2]
    joint = grid_posteriors(trained, counts, grid_size=8)[-1]
    cells = np.ones((2, 8, 8), dtype=bool)

    averaged = cell_averaged_probabilities(trained, counts, joint, cells, subcells=1)

    np.testing.assert_allclose(averaged, joint.probabilities, rtol=1e-4, atol=1e-12)


def test_cell_averages_reject_bad_input(trained, held_out):
    counts = held_out.counts[:2]
    marginals = grid_posteriors(trained, counts, grid_size=8)
    cells = np.ones((2, 8, 8), dtype=bool)
    with pytest.raises(ValueError, match="need a 2-dim marginal"):
        cell_averaged_probabilities(trained, counts, marginals[0], cells, subcells=2)
    with pytest.raises(ValueError, match="pass the same observations"):
        cell_averaged_probabilities(trained, counts[:1], marginals[-1], cells, subcells=2)
    with pytest.raises(ValueError, match="subcells must lie in"):
        cell_averaged_probabilities(trained, counts, marginals[-1], cells, subcells=0)


# --- the exact-likelihood comparison ---------------------------------------------------


def test_exact_rejected_for_random_fields(trained):
    before = sorted((trained.path).rglob("*"))
    with pytest.raises(ValueError, match="propagation.fixed_bfield_seed is not set"):
        validate_estimator(trained, n_simulations=10, exact=True)
    assert sorted((trained.path).rglob("*")) == before


def untrained_fixed_field_estimator(folder, **priors):
    """Save an untrained network for the small config with one B-field realisation."""
    data = small_config_dict()
    data["propagation"] = {"fixed_bfield_seed": 7}
    data["parameters"].update(priors)
    config = parse_config(data)
    names, one_dim, two_dim = default_heads(config)
    spec = EstimatorSpec(
        n_bins=config.observation.n_energy_bins,
        axes=parameter_axes(config, names),
        one_dim=one_dim,
        two_dim=two_dim,
        training=TrainingConfig(embedding_width=16, n_features=4, head_width=8),
    )
    return save_estimator(folder, RatioEstimator(spec), config)


def test_exact_comparison_reported(tmp_path):
    """An untrained network on a fixed-field config: the comparison runs and is written."""
    folder = untrained_fixed_field_estimator(tmp_path / "fixed-field")

    report = validate_estimator(
        folder,
        n_simulations=20,
        grid_size=16,
        n_posterior_samples=50,
        exact=True,
        n_exact=2,
        exact_grid_size=8,
    )

    payload = read_report(folder)
    exact = payload["exact"]
    assert exact["n_observations"] == 2
    assert exact["exact_grid_size"] == 8
    assert all(0.0 <= value <= np.log(2.0) for value in exact["jsd_nats"]["values"])
    assert len(exact["upper_limit_95_shift_dex"]["mean_per_mass"]) == 16
    assert report.exact is not None
    assert report.exact.upper_limit_shift.shape == (2, 16)
    assert payload["figures"]["exact"] == "exact.png"
    assert (folder / "validation" / "exact.png").stat().st_size > 10_000


def test_exact_on_nre_grid_refines_cells(tmp_path):
    """On the NRE grid the exact posteriors of strong signals get cell averages."""
    # Strong signals only, so that every exact posterior is narrower than a cell.
    folder = untrained_fixed_field_estimator(
        tmp_path / "strong",
        m_neV={"kind": "log_uniform", "low": 10.0, "high": 100.0},
        g_per_gev={"kind": "log_uniform", "low": 3e-11, "high": 1e-10},
    )

    report = validate_estimator(
        folder,
        n_simulations=20,
        grid_size=8,
        n_posterior_samples=50,
        exact=True,
        n_exact=2,
        exact_subcells=2,
        write=False,
    )

    exact = report.exact.to_dict()
    assert exact["exact_on_nre_grid"] is True
    assert exact["exact_subcells"] == 2
    assert exact["n_refined"] == 2
    assert len(exact["jsd_nats_node_values"]["values"]) == 2
    assert len(exact["jsd_nats_nre_centres"]["values"]) == 2
    with pytest.raises(ValueError, match="exact_subcells must be 0"):
        validate_estimator(folder, n_simulations=20, exact=True, exact_subcells=1)


# --- command line ----------------------------------------------------------------------


def test_cli_validate_prints_summary(trained, tmp_path, capsys):
    folder = shutil.copytree(
        trained.path, tmp_path / "estimator", ignore=shutil.ignore_patterns("validation")
    )

    code = main(
        [
            "validate",
            "--estimator",
            str(folder),
            "--n",
            "20",
            "--grid-size",
            "12",
            "--n-samples",
            "50",
            "--seed",
            "5",
            "--no-progress",
        ]
    )

    assert code == 0
    assert "20 held-out simulations (seed 5)" in capsys.readouterr().out
    assert read_report(folder)["held_out"]["seed"] == 5


def test_cli_validate_reports_missing_exact_likelihood(trained, caplog):
    code = main(["validate", "--estimator", str(trained.path), "--exact", "--no-progress"])
    assert code == 2
    assert "fixed_bfield_seed" in caplog.text


# --- HTTP API --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(registry, validated):
    app = create_app(ApiSettings(broker_url=UNREACHABLE_BROKER))
    app.state.trainer_settings = TrainerSettings(
        broker_url=UNREACHABLE_BROKER, registry=str(registry[0])
    )
    with TestClient(app) as test_client:
        yield test_client


def test_api_returns_stored_report(client, registry, validated):
    _, estimator_id, _ = registry
    response = client.get(f"/v1/estimators/{estimator_id}/validation")
    assert response.status_code == 200
    assert response.json() == validated[1]


def test_api_404_before_validation(client, registry):
    _, _, unvalidated = registry
    response = client.get(f"/v1/estimators/{unvalidated}/validation")
    assert response.status_code == 404
    assert "no validation report yet" in response.json()["detail"]
    assert f"alpnre validate --estimator {unvalidated}" in response.json()["detail"]


def test_api_404_for_unknown_estimator(client):
    response = client.get("/v1/estimators/no-such-estimator/validation")
    assert response.status_code == 404
    assert "not found" in response.json()["detail"]
