"""Expected limits: the no-ALP mocks, the limit bands, published limits, API and CLI.

The limit machinery does not depend on how well the estimator is trained, so these
tests use an untrained estimator with random weights (seeded) on the small config.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import numpy as np
import pytest
from alpnre.cli import main
from alpnre.config import parse_config
from alpnre.limits import (
    NULL_COUPLING_PER_GEV,
    check_estimator_matches,
    compute_expected_limits,
    expected_limits_from_run,
    expected_limits_from_spectra,
    load_published_limits,
    null_hypothesis_config,
    plot_expected_limits,
)
from alpnre.nre import EstimatorSpec, RatioEstimator, TrainingConfig, default_heads, parameter_axes
from alpnre.physics.alp import ebl_optical_depth, survival_probability_batch
from alpnre.registry import load_estimator, publish_estimator
from conftest import small_config_dict
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.schemas_posteriors import ExpectedLimitsPublic
from services.api.settings import ApiSettings

if TYPE_CHECKING:
    from redis_fixtures import CeleryWorkerFactory, RedisServer

pytest_plugins = ["redis_fixtures"]

UNREACHABLE_BROKER = "redis://127.0.0.1:9/0"


@pytest.fixture(scope="module")
def small_config():
    return parse_config(small_config_dict())


@pytest.fixture(scope="module")
def registry(small_config, tmp_path_factory):
    """A registry with one untrained (seeded random weights) estimator of the small config."""
    import torch

    torch.manual_seed(5)
    names, one_dim, two_dim = default_heads(small_config)
    spec = EstimatorSpec(
        n_bins=small_config.observation.n_energy_bins,
        axes=parameter_axes(small_config, names),
        one_dim=one_dim,
        two_dim=two_dim,
        training=TrainingConfig(embedding_width=16, n_features=8, head_width=16),
    )
    folder = tmp_path_factory.mktemp("registry")
    estimator_id = publish_estimator(folder, RatioEstimator(spec), small_config)
    return folder, estimator_id


@pytest.fixture(scope="module")
def estimator(registry):
    folder, estimator_id = registry
    return load_estimator(folder / "estimators" / estimator_id)


@pytest.fixture(scope="module")
def limits(small_config, estimator):
    return compute_expected_limits(small_config, estimator, n_mocks=6, seed=4, grid_size=25)


# --- the no-ALP hypothesis -----------------------------------------------------------------


def test_null_config_fixes_only_coupling(small_config):
    null = null_hypothesis_config(small_config)

    low, high = null.prior("g_per_gev").support()
    assert low == NULL_COUPLING_PER_GEV
    assert high == pytest.approx(NULL_COUPLING_PER_GEV, rel=1e-5)
    assert null.name == f"{small_config.name}-no-alp"
    for name in small_config.parameter_names:
        if name != "g_per_gev":
            assert null.prior(name) == small_config.prior(name), name
    assert null.observation == small_config.observation


def test_null_coupling_gives_pure_ebl_absorption(small_config):
    energy_tev = np.geomspace(0.02, 50.0, 30)
    params = {
        name: np.full(3, small_config.prior(name).sample(np.random.default_rng(1), 1)[0])
        for name in small_config.parameter_names
    }
    params["m_neV"] = np.array([0.3, 5.0, 60.0])
    params["g_per_gev"] = np.full(3, NULL_COUPLING_PER_GEV)

    probability = survival_probability_batch(
        energy_tev,
        params,
        source=small_config.source,
        ebl_model=small_config.ebl.model,
        propagation=small_config.propagation,
        bfield_seeds=np.array([1, 2, 3]),
        device="cpu",
    )

    absorption = np.exp(-ebl_optical_depth(energy_tev, small_config.source.redshift, "dominguez"))
    np.testing.assert_allclose(
        probability, np.broadcast_to(absorption, probability.shape), rtol=1e-6
    )


# --- limit curves and bands ------------------------------------------------------------------


def test_expected_limits_bands_ordered(limits):
    low_95, high_95 = limits.band_95
    low_68, high_68 = limits.band_68

    assert limits.n_mocks == 6
    assert limits.curves.shape == (6, 25)
    assert np.all(low_95 <= low_68 + 1e-12)
    assert np.all(low_68 <= limits.median + 1e-12)
    assert np.all(limits.median <= high_68 + 1e-12)
    assert np.all(high_68 <= high_95 + 1e-12)
    assert np.all((limits.curves >= -13.0) & (limits.curves <= -10.0))


def test_expected_limits_match_single_posteriors(estimator, small_config, tmp_path):
    from alpnre.dataset import run_batch_files
    from alpnre.limits import simulate_null_run
    from alpnre.posterior import compute_posterior
    from alpnre.streaming import read_spectra

    simulate_null_run(small_config, tmp_path, n_mocks=3, seed=9)
    counts, theta = read_spectra(run_batch_files(tmp_path), ["g_per_gev"])

    grid, curves = expected_limits_from_spectra(estimator, counts, grid_size=20)

    assert np.all(theta[:, 0] < 1.1 * NULL_COUPLING_PER_GEV)
    joint = compute_posterior(estimator, counts[1], grid_size=20).two_dim["m_neV__g_per_gev"]
    np.testing.assert_allclose(grid, joint.grid_x)
    np.testing.assert_allclose(curves[1], joint.upper_limit_curve(0.95))


def test_expected_limits_reproducible(small_config, estimator, limits):
    again = compute_expected_limits(small_config, estimator, n_mocks=6, seed=4, grid_size=25)

    np.testing.assert_array_equal(again.curves, limits.curves)


def test_expected_limits_json_safe(limits):
    payload = limits.to_dict(include_curves=True)
    text = json.dumps(payload, allow_nan=False)
    again = json.loads(text)

    assert again["n_mocks"] == 6
    assert again["null_coupling_per_gev"] == NULL_COUPLING_PER_GEV
    assert again["simulation"]["backend"] == "local"
    assert len(again["log10_g_per_gev"]["median"]) == 25
    assert len(again["log10_g_per_gev"]["curves"]) == 6
    assert again["g_per_gev"]["median"][0] == pytest.approx(
        10 ** again["log10_g_per_gev"]["median"][0]
    )
    assert again["mass_neV"][0] == pytest.approx(0.1)


def test_signal_run_rejected(estimator, small_config, tmp_path):
    from alpnre.runs import simulate_run

    simulate_run(
        small_config, tmp_path, n_simulations=2, batch_size=2, run_seed=1, workers=1, progress=False
    )

    with pytest.raises(ValueError, match="expected limits need mocks without ALPs"):
        expected_limits_from_run(estimator, tmp_path)


def test_config_with_other_binning_rejected(estimator):
    other = parse_config(
        small_config_dict(observation={"n_energy_bins": 30, "n_energy_true_bins": 90})
    )

    with pytest.raises(ValueError, match="energy axis has 30 bins"):
        check_estimator_matches(other, estimator)


# --- published limits and the figure -----------------------------------------------------


def test_published_limits_name_their_sources():
    entries = load_published_limits()

    assert {entry["name"] for entry in entries} == {"Fermi-LAT NGC 1275", "MAGIC Perseus"}
    for entry in entries:
        assert entry["reference"]
        assert entry["arxiv"]
        assert entry["taken_from"].startswith("AxionLimits")
        assert entry["approximation"].startswith("digitised from a figure")
        assert entry["shape"] == "polygons"
        for polygon in entry["polygons"]:
            assert len(polygon) >= 3
            for m_nev, g_per_gev in polygon:
                assert 1e-3 < m_nev < 1e4
                assert 1e-14 < g_per_gev < 1e-8


@pytest.mark.parametrize(
    ("name", "m_range_nev", "g_min_per_gev"),
    [
        # The abstracts: Fermi-LAT excludes g > 5e-12 GeV^-1 for 0.5 <~ m <~ 5 neV, and
        # MAGIC reaches 3e-12 GeV^-1 for masses around 50 neV.
        ("Fermi-LAT NGC 1275", (0.3, 35.0), 4.5e-12),
        ("MAGIC Perseus", (40.0, 460.0), 3.0e-12),
    ],
)
def test_published_regions_agree_with_abstracts(name, m_range_nev, g_min_per_gev):
    entry = next(entry for entry in load_published_limits() if entry["name"] == name)
    points = np.concatenate([np.asarray(polygon) for polygon in entry["polygons"]])

    assert m_range_nev[0] < points[:, 0].min()
    assert points[:, 0].max() < m_range_nev[1]
    assert g_min_per_gev < points[:, 1].min() < 1.6 * g_min_per_gev


def test_figure_overlays_published_limits(limits, tmp_path):
    path = tmp_path / "limits.png"

    figure = plot_expected_limits(limits, load_published_limits(), path)

    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert any(label.startswith("Fermi-LAT NGC 1275") for label in labels)
    assert any(label.startswith("MAGIC Perseus") for label in labels)
    assert "expected, median" in labels
    assert path.stat().st_size > 10_000


# --- API ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(registry, tmp_path_factory):
    settings = ApiSettings(
        broker_url=UNREACHABLE_BROKER,
        broker_timeout_s=0.5,
        data_dir=tmp_path_factory.mktemp("runs"),
        registry=str(registry[0]),
        max_expected_limit_mocks=50,
        local_expected_limit_mocks=10,
        inference_device="cpu",
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _wait_for_job(client, job_id, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        body = client.get(f"/v1/expected-limits/{job_id}").json()
        if body["state"] in ("completed", "failed") or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def test_api_expected_limits_local(client, registry, limits):
    response = client.post(
        "/v1/expected-limits",
        json={"estimator_id": registry[1], "n_mocks": 6, "seed": 4, "grid_size": 25},
    )

    assert response.status_code == 202, response.text
    created = response.json()
    assert created["backend"] == "local"
    assert response.headers["location"] == f"/v1/expected-limits/{created['id']}"
    job = _wait_for_job(client, created["id"])
    ExpectedLimitsPublic.model_validate(job)
    assert job["state"] == "completed", job["error"]
    assert job["simulation_run_id"] is None
    result = job["result"]
    assert result["n_mocks"] == 6
    np.testing.assert_allclose(result["log10_g_per_gev"]["median"], limits.median)


def test_api_expected_limits_figure(client, registry):
    created = client.post(
        "/v1/expected-limits",
        json={"estimator_id": registry[1], "n_mocks": 2, "grid_size": 20, "backend": "local"},
    ).json()
    _wait_for_job(client, created["id"])

    png = client.get(f"/v1/expected-limits/{created['id']}/figure.png")
    svg = client.get(f"/v1/expected-limits/{created['id']}/figure.svg")

    assert png.status_code == 200
    assert png.content.startswith(b"\x89PNG")
    assert svg.status_code == 200
    assert svg.headers["content-type"].startswith("image/svg+xml")


def test_api_expected_limits_job_seen_by_another_process(client, registry):
    """uvicorn --workers: another process follows the job to its end and draws its figure."""
    created = client.post(
        "/v1/expected-limits",
        json={"estimator_id": registry[1], "n_mocks": 2, "grid_size": 20, "backend": "local"},
    ).json()

    with TestClient(create_app(client.app.state.settings.model_copy())) as other:
        job = _wait_for_job(other, created["id"])
        png = other.get(f"/v1/expected-limits/{created['id']}/figure.png")

    assert job["state"] == "completed", job["error"]
    assert job["result"]["n_mocks"] == 2
    assert png.status_code == 200
    assert png.content.startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("body", "status", "match"),
    [
        ({"estimator_id": "missing"}, 404, "estimator 'missing' not found"),
        ({"n_mocks": 51}, 422, "exceeds the limit of 50"),
        ({"n_mocks": 0}, 422, "greater than or equal to 1"),
        ({"config": "ngc1275_cta_north_50h"}, 422, "energy axis has 200 bins"),
        ({"config": "no_such_config"}, 422, "unknown shipped config 'no_such_config'"),
        ({"estimator_id": "latest"}, 422, "needs 'config'"),
        ({"backend": "workers"}, 503, "broker unavailable"),
        ({"n_mocks": 11}, 503, "broker unavailable"),
    ],
)
def test_api_expected_limits_rejected(client, registry, body, status, match):
    request = {"estimator_id": registry[1], "n_mocks": 2, **body}

    response = client.post("/v1/expected-limits", json=request)

    assert response.status_code == status, response.text
    assert match in json.dumps(response.json()["detail"])


def test_api_unknown_job_not_found(client):
    assert client.get("/v1/expected-limits/limits-000").status_code == 404
    assert client.get("/v1/expected-limits/limits-000/figure.png").status_code == 404


@pytest.mark.redis
@pytest.mark.timeout(300)
def test_api_expected_limits_on_workers(
    redis_server: RedisServer,
    celery_worker_factory: CeleryWorkerFactory,
    registry,
    estimator,
    tmp_path,
):
    data_dir = tmp_path / "runs"
    data_dir.mkdir()
    broker_url = redis_server.url(3)
    worker = celery_worker_factory(
        "services.simulator.celery_app",
        "simulations",
        env={"ALPNRE_BROKER_URL": broker_url, "ALPNRE_DATA_DIR": str(data_dir)},
        concurrency=1,
        name="limits-simulator",
    )
    settings = ApiSettings(
        broker_url=broker_url,
        data_dir=data_dir,
        registry=str(registry[0]),
        local_expected_limit_mocks=2,
        inference_device="cpu",
    )
    try:
        with TestClient(create_app(settings)) as api:
            created = api.post(
                "/v1/expected-limits",
                json={"estimator_id": registry[1], "n_mocks": 4, "seed": 8, "grid_size": 20},
            ).json()
            job = _wait_for_job(api, created["id"], timeout_s=240)
            run = api.get(f"/v1/simulations/{job['simulation_run_id']}").json()
    finally:
        worker.stop()

    assert created["backend"] == "workers"
    assert job["state"] == "completed", job["error"]
    assert run["state"] == "completed"
    assert run["config_name"].endswith("-no-alp")
    local = expected_limits_from_run(estimator, data_dir / job["simulation_run_id"], grid_size=20)
    np.testing.assert_allclose(job["result"]["log10_g_per_gev"]["median"], local.median)


# --- CLI ------------------------------------------------------------------------------------


def test_cli_limits_writes_json_and_figure(registry, tmp_path):
    folder, estimator_id = registry

    status = main(
        [
            "limits",
            "--estimator",
            estimator_id,
            "--registry",
            str(folder),
            "--n-mocks",
            "3",
            "--grid-size",
            "20",
            "--seed",
            "2",
            "--output",
            str(tmp_path),
            "--no-progress",
        ]
    )

    assert status == 0
    summary = json.loads((tmp_path / "expected_limits.json").read_text())
    assert summary["estimator_id"] == estimator_id
    assert summary["n_mocks"] == 3
    assert (tmp_path / "expected_limits.png").stat().st_size > 10_000
