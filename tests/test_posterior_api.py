"""The posterior API: JSON, file and simulation-row observations, errors, figures.

A tiny estimator (2 epochs on the session's small run, 40 energy bins) is published to a
temporary registry. The API runs in a FastAPI TestClient without a broker.
"""

from __future__ import annotations

import base64
import io
import json
import math

import astropy.units as u
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from alpnre.config import parse_config
from alpnre.dataset import read_manifest, run_batch_files
from alpnre.nre import TrainingConfig
from alpnre.posterior import compute_posterior
from alpnre.registry import load_estimator, publish_estimator
from alpnre.training import load_training_data, train_estimator
from alpnre.validation import hpd_mask
from conftest import small_config_dict
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.routes.posteriors import OrjsonResponse, StoredPosterior, posterior_payload
from services.api.schemas_posteriors import PosteriorBatchPublic, PosteriorPublic
from services.api.settings import ApiSettings

N_BINS = 40
MAX_REQUEST_BYTES = 2_000_000
# No Redis listens here: these tests must not need the broker.
UNREACHABLE_BROKER = "redis://127.0.0.1:9/0"


def _reject_constant(name: str) -> float:
    raise AssertionError(f"response contains the non-JSON number {name}")


def parse_strict_json(text: str) -> dict:
    """Parse JSON, failing on NaN and Infinity, which are not valid JSON."""
    return json.loads(text, parse_constant=_reject_constant)


@pytest.fixture(scope="module")
def registry(small_run, tmp_path_factory):
    """A registry holding one tiny estimator trained for 2 epochs on the small run."""
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
    estimator_id = publish_estimator(
        folder,
        result.model,
        result.config,
        metrics=result.metrics,
        extra={"energy_edges_tev": data.energy_edges_tev},
    )
    return folder, estimator_id


@pytest.fixture(scope="module")
def data_dir(small_run, tmp_path_factory):
    """A data folder in which the small run is found under its run id."""
    folder = tmp_path_factory.mktemp("runs")
    (folder / read_manifest(small_run).run_id).symlink_to(small_run)
    return folder


@pytest.fixture(scope="module")
def client(registry, data_dir):
    settings = ApiSettings(
        broker_url=UNREACHABLE_BROKER,
        data_dir=data_dir,
        registry=str(registry[0]),
        max_request_bytes=MAX_REQUEST_BYTES,
        max_observations=8,
        inference_device="cpu",
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def estimator_id(registry):
    return registry[1]


@pytest.fixture(scope="module")
def simulated(small_run):
    """Counts and parameters of the first rows of the small run."""
    table = pq.read_table(run_batch_files(small_run)[0])
    rows = table.slice(0, 4).to_pylist()
    return rows


def _counts(row) -> list[int]:
    return [int(value) for value in row["counts"]]


def _post(client, estimator_id, observations, **options):
    return client.post(
        "/v1/posteriors",
        json={"estimator_id": estimator_id, "observations": observations, **options},
    )


def _energy_axis(edges_tev):
    from gammapy.maps import MapAxis

    return MapAxis.from_energy_edges(np.asarray(edges_tev) * u.TeV, name="energy")


def _small_config_edges():
    return parse_config(small_config_dict()).observation.energy_edges_tev()


def _spectrum_dataset_bytes(counts, edges_tev) -> bytes:
    """A gammapy SpectrumDatasetOnOff (GADF) with these ON counts, as file content."""
    from gammapy.datasets import SpectrumDatasetOnOff
    from gammapy.maps import RegionGeom

    geom = RegionGeom.create("icrs;circle(49.95, 41.51, 0.1)", axes=[_energy_axis(edges_tev)])
    dataset = SpectrumDatasetOnOff.create(geom=geom)
    dataset.counts.data[:, 0, 0] = counts
    dataset.counts_off.data[:, 0, 0] = 3 * np.asarray(counts)
    buffer = io.BytesIO()
    dataset.to_hdulist().writeto(buffer)
    return buffer.getvalue()


def _ogip_pha_bytes(counts, edges_tev, with_ebounds: bool = True) -> bytes:
    """An OGIP PHA file (SPECTRUM + EBOUNDS) with these counts, written by gammapy."""
    from gammapy.maps import RegionGeom, RegionNDMap

    geom = RegionGeom.create("icrs;circle(49.95, 41.51, 0.1)", axes=[_energy_axis(edges_tev)])
    counts_map = RegionNDMap.from_geom(geom, data=np.asarray(counts, dtype=float).reshape(-1, 1, 1))
    hdulist = counts_map.to_hdulist(format="ogip")
    if not with_ebounds:
        del hdulist["EBOUNDS"]
    buffer = io.BytesIO()
    hdulist.writeto(buffer)
    return buffer.getvalue()


# --- JSON observations -------------------------------------------------------------------


def test_counts_posterior_json_round_trip(client, estimator_id, registry, simulated):
    response = _post(client, estimator_id, [{"counts": _counts(simulated[0]), "name": "obs-a"}])

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = parse_strict_json(response.text)
    PosteriorBatchPublic.model_validate(body)
    assert body["estimator"]["estimator_id"] == estimator_id
    assert body["estimator"]["device"] == "cpu"
    (posterior,) = body["posteriors"]
    checksum = load_estimator(registry[0] / "estimators" / estimator_id).checksum
    assert posterior["estimator_checksum"] == checksum
    assert posterior["observation"] == {
        "source": "counts",
        "name": "obs-a",
        "n_bins": N_BINS,
        "notes": [],
    }
    assert set(posterior["marginals_1d"]) == {"m_neV", "g_per_gev"}
    assert posterior["levels"] == [0.68, 0.95]
    assert set(posterior["prior"]) >= {"m_neV", "g_per_gev"}
    assert posterior["truth"] is None
    assert posterior["validation"] is None
    assert posterior["timing_s"] > 0


def test_posterior_contents(client, estimator_id, simulated):
    body = _post(client, estimator_id, [{"counts": _counts(simulated[1])}]).json()
    posterior = body["posteriors"][0]
    mass = posterior["marginals_1d"]["m_neV"]
    joint = posterior["marginals_2d"]["m_neV__g_per_gev"]

    assert mass["axis"] == "log10(m_neV)"
    assert len(mass["grid"]) == 100
    step = mass["grid"][1] - mass["grid"][0]
    assert sum(mass["density"]) * step == pytest.approx(1.0)
    assert sum(mass["prior_density"]) * step == pytest.approx(1.0)
    assert mass["log_ratio_nonfinite"] == []
    assert mass["grid"][0] <= mass["map"] <= mass["grid"][-1]
    assert mass["grid"][0] <= mass["mean"] <= mass["grid"][-1]
    assert np.shape(joint["density"]) == (100, 100)
    assert np.sum(joint["hpd_masks"]["0.95"]) >= np.sum(joint["hpd_masks"]["0.68"])
    assert joint["hpd_contours"]["0.95"], "no 95 % contour polyline"
    limit = joint["upper_limit_95"]
    assert limit["axis"] == "log10(m_neV)"
    assert limit["limit_axis"] == "log10(g_per_gev)"
    assert len(limit["limit"]) == 100
    assert all(joint["grid_y"][0] <= value <= joint["grid_y"][-1] for value in limit["limit"])


def test_options_grid_levels_marginals(client, estimator_id, simulated):
    response = _post(
        client,
        estimator_id,
        [{"counts": _counts(simulated[0])}],
        grid_size=30,
        levels=[0.9, 0.5],
        marginals=["g_per_gev"],
    )

    assert response.status_code == 200, response.text
    posterior = response.json()["posteriors"][0]
    assert posterior["levels"] == [0.5, 0.9]
    assert list(posterior["marginals_1d"]) == ["g_per_gev"]
    assert set(posterior["marginals_2d"]["m_neV__g_per_gev"]["hpd_masks"]) == {"0.5", "0.9"}
    assert len(posterior["marginals_1d"]["g_per_gev"]["grid"]) == 30


def test_latest_estimator_of_config(client, estimator_id, simulated):
    config_name = parse_config(small_config_dict()).name
    counts = [{"counts": _counts(simulated[0])}]

    by_pointer = _post(client, f"latest:{config_name}", counts)
    by_field = client.post(
        "/v1/posteriors",
        json={"estimator_id": "latest", "config": config_name, "observations": counts},
    )

    assert by_pointer.status_code == 200, by_pointer.text
    assert by_pointer.json()["estimator"]["estimator_id"] == estimator_id
    assert by_field.status_code == 200, by_field.text
    assert by_field.json()["estimator"]["estimator_id"] == estimator_id


def test_run_row_posterior_has_truth(client, estimator_id, small_run, simulated):
    run_id = read_manifest(small_run).run_id
    response = _post(client, estimator_id, [{"run_id": run_id, "row": 2}])

    assert response.status_code == 200, response.text
    posterior = response.json()["posteriors"][0]
    assert posterior["observation"]["source"] == "simulation"
    assert posterior["observation"]["name"] == f"{run_id}[2]"
    assert posterior["truth"]["m_neV"] == pytest.approx(simulated[2]["m_neV"])
    assert posterior["truth"]["g_per_gev"] == pytest.approx(simulated[2]["g_per_gev"])
    direct = _post(client, estimator_id, [{"counts": _counts(simulated[2])}]).json()
    assert posterior["marginals_1d"]["g_per_gev"]["density"] == pytest.approx(
        direct["posteriors"][0]["marginals_1d"]["g_per_gev"]["density"]
    )


def test_batch_answers_each_observation(client, estimator_id, small_run, simulated):
    run_id = read_manifest(small_run).run_id
    observations = [
        {"counts": _counts(simulated[0]), "name": "first"},
        {"run_id": run_id, "row": 3},
        {"counts": _counts(simulated[1]), "name": "third"},
    ]
    response = _post(client, estimator_id, observations)

    assert response.status_code == 200, response.text
    posteriors = response.json()["posteriors"]
    assert [p["observation"]["name"] for p in posteriors] == ["first", f"{run_id}[3]", "third"]
    assert len({p["id"] for p in posteriors}) == 3
    single = _post(client, estimator_id, [observations[2]]).json()["posteriors"][0]
    assert posteriors[2]["marginals_1d"]["m_neV"]["density"] == pytest.approx(
        single["marginals_1d"]["m_neV"]["density"]
    )


def test_stored_posterior_returned_again(client, estimator_id, simulated):
    created = _post(client, estimator_id, [{"counts": _counts(simulated[0])}]).json()
    posterior = created["posteriors"][0]

    response = client.get(f"/v1/posteriors/{posterior['id']}")

    assert response.status_code == 200, response.text
    again = response.json()
    PosteriorPublic.model_validate(again)
    assert again["id"] == posterior["id"]
    assert (
        again["marginals_1d"]["g_per_gev"]["density"]
        == posterior["marginals_1d"]["g_per_gev"]["density"]
    )
    assert again["figure_png"] == posterior["figure_png"]


def test_posterior_served_by_another_process(client, registry, data_dir, estimator_id, simulated):
    """uvicorn --workers: a posterior made by one process is found by another."""
    created = _post(client, estimator_id, [{"counts": _counts(simulated[0])}], grid_size=20)
    posterior = created.json()["posteriors"][0]
    settings = ApiSettings(
        broker_url=UNREACHABLE_BROKER,
        data_dir=data_dir,
        registry=str(registry[0]),
        inference_device="cpu",
    )

    with TestClient(create_app(settings)) as other:
        again = other.get(f"/v1/posteriors/{posterior['id']}")
        png = other.get(posterior["figure_png"])

    assert again.status_code == 200, again.text
    assert again.json()["marginals_2d"] == posterior["marginals_2d"]
    assert png.status_code == 200
    assert png.content.startswith(b"\x89PNG")


def test_validation_report_summarised(client, registry, estimator_id, simulated):
    report_dir = registry[0] / "estimators" / estimator_id / "validation"
    report_dir.mkdir()
    report = {
        "verdict": "conservative",
        "coverage": {"levels": [0.68, 0.95], "0.95": {"empirical": 0.972, "n": 200}},
        "tarp": {"area": 0.011, "bad": float("nan")},
    }
    (report_dir / "report.json").write_text(json.dumps(report))
    try:
        response = _post(client, estimator_id, [{"counts": _counts(simulated[0])}])
    finally:
        (report_dir / "report.json").unlink()
        report_dir.rmdir()

    assert response.status_code == 200, response.text
    validation = parse_strict_json(response.text)["posteriors"][0]["validation"]
    assert validation["verdict"] == "conservative"
    assert validation["numbers"]["coverage.0.95.empirical"] == 0.972
    assert validation["numbers"]["tarp.area"] == 0.011
    assert validation["numbers"]["tarp.bad"] is None
    assert validation["report"] == "validation/report.json"


def test_nonfinite_log_ratio_encoded(registry, estimator_id, simulated):
    from alpnre.observations import Observation

    estimator = load_estimator(registry[0] / "estimators" / estimator_id)
    posterior = compute_posterior(estimator, _counts(simulated[0]), grid_size=20)
    posterior.one_dim["m_neV"].log_ratio[[2, 5]] = [-np.inf, np.nan]
    observation = Observation(np.asarray(_counts(simulated[0]), float), "counts", "x")

    payload = posterior_payload(
        "post-x", StoredPosterior(posterior, observation, None), "/v1/posteriors"
    )
    text = OrjsonResponse(payload).body.decode()

    entry = parse_strict_json(text)["marginals_1d"]["m_neV"]
    assert entry["log_ratio"][2] is None
    assert entry["log_ratio"][5] is None
    assert entry["log_ratio_nonfinite"] == [
        {"index": 2, "value": "-inf"},
        {"index": 5, "value": "nan"},
    ]


# --- file uploads ------------------------------------------------------------------------


def test_spectrum_dataset_upload(client, estimator_id, simulated):
    counts = _counts(simulated[0])
    content = _spectrum_dataset_bytes(counts, _small_config_edges())

    response = client.post(
        "/v1/posteriors",
        data={"estimator_id": estimator_id, "levels": "0.68,0.95"},
        files={"files": ("ngc1275_on_off.fits", content, "application/fits")},
    )

    assert response.status_code == 200, response.text
    posterior = response.json()["posteriors"][0]
    assert posterior["observation"]["source"] == "spectrum_dataset"
    assert posterior["observation"]["name"] == "ngc1275_on_off.fits"
    assert posterior["observation"]["energy_min_tev"] == pytest.approx(0.01)
    direct = _post(client, estimator_id, [{"counts": counts}]).json()["posteriors"][0]
    assert posterior["marginals_1d"]["m_neV"]["density"] == pytest.approx(
        direct["marginals_1d"]["m_neV"]["density"]
    )


def test_ogip_pha_upload_batch(client, estimator_id, simulated):
    edges = _small_config_edges()
    files = [
        ("files", ("a.pha", _ogip_pha_bytes(_counts(simulated[0]), edges), "application/fits")),
        ("files", ("b.pha", _ogip_pha_bytes(_counts(simulated[1]), edges), "application/fits")),
    ]

    response = client.post(
        "/v1/posteriors", data={"estimator_id": estimator_id, "grid_size": "40"}, files=files
    )

    assert response.status_code == 200, response.text
    posteriors = response.json()["posteriors"]
    assert [p["observation"]["name"] for p in posteriors] == ["a.pha", "b.pha"]
    assert [p["observation"]["source"] for p in posteriors] == ["ogip_pha", "ogip_pha"]
    assert len(posteriors[0]["marginals_1d"]["g_per_gev"]["grid"]) == 40


@pytest.mark.parametrize(
    ("edges", "match"),
    [
        (np.geomspace(0.01, 100.0, 31), "energy axis has 30 bins from 0.01 to 100 TeV"),
        (np.geomspace(0.02, 100.0, 41), "energy edge 0 is 0.02 TeV"),
    ],
)
def test_upload_energy_axis_mismatch_rejected(client, estimator_id, edges, match):
    content = _spectrum_dataset_bytes(np.ones(len(edges) - 1), edges)

    response = client.post(
        "/v1/posteriors",
        data={"estimator_id": estimator_id},
        files={"files": ("other_binning.fits", content, "application/fits")},
    )

    assert response.status_code == 422
    message = response.json()["detail"][0]["msg"]
    assert "other_binning.fits" in message
    assert match in message
    assert "the estimator expects 40 bins from 0.01 to 100 TeV" in message


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"energy,counts\n1,2\n", "not a FITS file"),
        (None, "not a spectrum; expected an OGIP PHA file"),
        ("no-ebounds", "has no EBOUNDS extension"),
    ],
)
def test_upload_non_spectrum_rejected(client, estimator_id, content, match):
    from astropy.io import fits

    if content is None:
        buffer = io.BytesIO()
        fits.HDUList([fits.PrimaryHDU(np.zeros((4, 4)))]).writeto(buffer)
        content = buffer.getvalue()
    elif content == "no-ebounds":
        content = _ogip_pha_bytes(np.ones(N_BINS), _small_config_edges(), with_ebounds=False)

    response = client.post(
        "/v1/posteriors",
        data={"estimator_id": estimator_id},
        files={"files": ("upload.bin", content, "application/octet-stream")},
    )

    assert response.status_code == 422
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", "files", 0]
    assert match in detail["msg"]


def test_too_many_uploads_rejected(client, estimator_id):
    content = _ogip_pha_bytes(np.ones(N_BINS), _small_config_edges())
    files = [("files", (f"{i}.pha", content, "application/fits")) for i in range(9)]

    response = client.post("/v1/posteriors", data={"estimator_id": estimator_id}, files=files)

    assert response.status_code == 422
    assert "9 observations exceed the limit of 8" in response.json()["detail"][0]["msg"]


def test_upload_without_files_rejected(client, estimator_id):
    response = client.post(
        "/v1/posteriors", data={"estimator_id": estimator_id}, files={"other": ("x", b"1")}
    )

    assert response.status_code == 422
    assert "unknown form fields ['other']" in response.json()["detail"][0]["msg"]


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts_json", "match"),
    [
        ("[1, 2, 3]", "has 3 energy bins, the estimator expects 40"),
        ("[-1" + ", 0" * 39 + "]", "negative counts in bins [0]"),
        ("[0, 2.5" + ", 0" * 38 + "]", "non-integer counts in bins [1]"),
        ("[NaN" + ", 0" * 39 + "]", "NaN or infinite counts in bins [0]"),
        ("[0, Infinity" + ", 0" * 38 + "]", "NaN or infinite counts in bins [1]"),
        ("[1e400" + ", 0" * 39 + "]", "NaN or infinite counts in bins [0]"),
    ],
)
def test_bad_counts_rejected(client, estimator_id, counts_json, match):
    body = f'{{"estimator_id": "{estimator_id}", "observations": [{{"counts": {counts_json}}}]}}'

    response = client.post(
        "/v1/posteriors", content=body, headers={"content-type": "application/json"}
    )

    assert response.status_code == 422
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", "observations", 0, "counts"]
    assert match in detail["msg"]


@pytest.mark.parametrize(
    ("body", "status", "match"),
    [
        ({"estimator_id": "no-such-estimator"}, 404, "estimator 'no-such-estimator' not found"),
        ({"estimator_id": "latest:no_such_config"}, 404, "no latest estimator for config"),
        ({"estimator_id": "latest"}, 422, "needs 'config'"),
        ({"estimator_id": "../../etc"}, 422, "String should match pattern"),
        ({"observations": [{"run_id": "run-000000000000", "row": 0}]}, 404, "not found"),
        ({"observations": [{"run_id": "RUN", "row": 10**6}]}, 422, "outside run"),
        ({"marginals": ["b0_microgauss"]}, 422, "has no 1-dim marginal ['b0_microgauss']"),
        ({"grid_size": 999}, 422, "exceeds the limit of 400"),
        ({"grid_size": 2}, 422, "greater than or equal to 4"),
        ({"levels": [1.0]}, 422, "less than 1"),
        ({"observations": []}, 422, "at least 1 item"),
        ({"observations": [{"counts": [0] * 40}] * 9}, 422, "exceed the limit of 8"),
        ({"observations": [{"counts": [0] * 40, "energy": 1}]}, 422, "Extra inputs"),
    ],
)
def test_bad_request_rejected(client, estimator_id, small_run, body, status, match):
    request = {"estimator_id": estimator_id, "observations": [{"counts": [0] * N_BINS}], **body}
    run_id = read_manifest(small_run).run_id
    for observation in request["observations"]:
        if observation.get("run_id") == "RUN":
            observation["run_id"] = run_id

    response = client.post("/v1/posteriors", json=request)

    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    text = detail if isinstance(detail, str) else json.dumps(detail)
    assert match in text


def test_unsupported_content_type_rejected(client, estimator_id):
    response = client.post(
        "/v1/posteriors", content=b"counts=1", headers={"content-type": "text/plain"}
    )

    assert response.status_code == 415
    assert "unsupported content type 'text/plain'" in response.json()["detail"]


def test_invalid_json_rejected(client):
    response = client.post(
        "/v1/posteriors", content=b'{"estimator_id": ', headers={"content-type": "application/json"}
    )

    assert response.status_code == 422
    assert "json" in json.dumps(response.json()["detail"]).lower()


def test_large_body_rejected_by_length(client, estimator_id):
    counts = [0] * (MAX_REQUEST_BYTES // 2)

    response = _post(client, estimator_id, [{"counts": counts}])

    assert response.status_code == 413
    assert f"exceeds the limit of {MAX_REQUEST_BYTES} bytes" in response.json()["detail"]


def test_large_chunked_body_rejected(client, estimator_id):
    def chunks():
        yield f'{{"estimator_id": "{estimator_id}", "observations": [{{"counts": ['.encode()
        for _ in range(MAX_REQUEST_BYTES // 1000):
            yield b"0, " * 500
        yield b"0]}]}"

    response = client.post(
        "/v1/posteriors", content=chunks(), headers={"content-type": "application/json"}
    )

    assert response.status_code == 413


# --- figures ---------------------------------------------------------------------------------


def test_figure_endpoints(client, estimator_id, small_run):
    run_id = read_manifest(small_run).run_id
    posterior = _post(client, estimator_id, [{"run_id": run_id, "row": 0}], grid_size=30).json()
    posterior_id = posterior["posteriors"][0]["id"]

    png = client.get(f"/v1/posteriors/{posterior_id}/figure.png")
    svg = client.get(f"/v1/posteriors/{posterior_id}/figure.svg")

    assert png.status_code == 200
    assert png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert svg.status_code == 200
    assert svg.headers["content-type"].startswith("image/svg+xml")
    assert b"<svg" in svg.content[:2000]
    assert posterior["posteriors"][0]["figure_png"] == f"/v1/posteriors/{posterior_id}/figure.png"


def test_figure_of_unknown_posterior_not_found(client):
    response = client.get("/v1/posteriors/post-0000/figure.png")

    assert response.status_code == 404
    assert "posterior 'post-0000' not found" in response.json()["detail"]


def test_figures_embedded_on_request(client, estimator_id, simulated):
    response = _post(
        client,
        estimator_id,
        [{"counts": _counts(simulated[0])}],
        grid_size=30,
        include_figures=True,
    )

    assert response.status_code == 200, response.text
    figure = base64.b64decode(response.json()["posteriors"][0]["figure_png_base64"])
    assert figure.startswith(b"\x89PNG")


# --- inference ---------------------------------------------------------------------------


def test_2d_head_alone_matches_full_forward(registry, estimator_id):
    from alpnre.posterior import _log_ratios_2d

    estimator = load_estimator(registry[0] / "estimators" / estimator_id)
    generator = torch.Generator().manual_seed(4)
    x = torch.poisson(torch.full((32, N_BINS), 20.0), generator=generator)
    theta = torch.rand((32, len(estimator.spec.axes)), generator=generator) * 2 - 1

    with torch.no_grad():
        features = estimator.model.embedding(x)
        alone = _log_ratios_2d(estimator.model, features, theta)
        full = estimator.model.log_ratios(features, theta)["2d"]

    torch.testing.assert_close(alone, full)


def test_shared_features_path_matches_module_forward(registry, estimator_id):
    """The grid path (one feature row, fused matrix products) gives the module's values."""
    from alpnre.posterior import _log_ratios_2d, _shared_features_log_ratios

    estimator = load_estimator(registry[0] / "estimators" / estimator_id)
    generator = torch.Generator().manual_seed(5)
    x = torch.poisson(torch.full((1, N_BINS), 20.0), generator=generator)
    theta = torch.rand((500, len(estimator.spec.axes)), generator=generator) * 2 - 1

    with torch.no_grad():
        # swyft starts the residual blocks' last layers near zero; move every weight
        # away from its initial value so that each layer changes the output.
        for parameter in estimator.model.head_2d.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
        features = estimator.model.embedding(x)
        pairs = torch.cat([theta[:, [a, b]] for a, b in estimator.model.pairs_2d], dim=1)
        assert _shared_features_log_ratios(estimator.model.head_2d, features, pairs) is not None
        grid = _log_ratios_2d(estimator.model, features, theta)
        full = estimator.model.log_ratios(features.expand(len(theta), -1), theta)["2d"]

    assert grid.shape == (500, len(estimator.model.pairs_2d))
    torch.testing.assert_close(grid, full, rtol=1e-5, atol=1e-5)


STRONG_SIGNAL = {"m_neV": 30.0, "g_per_gev": 8e-11}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_strong_signal_truth_inside_95_region(tmp_path):
    """A trained estimator puts an injected strong ALP signal inside its 95 % region.

    Nuisance parameters are fixed and every simulation uses one B-field realisation, so
    the signal is a deterministic function of (m, g) that a small network learns from
    a few thousand simulations. Plain NRE (no BNRE penalty) learns it in 15 epochs; on
    2 busy cores the test took about 4 minutes.
    """
    from alpnre.physics.irf import load_instrument_response
    from alpnre.runs import simulate_run
    from alpnre.simulate import expected_counts

    data = small_config_dict(name="strong_signal_test")
    data["parameters"] = {
        **data.get("parameters", {}),
        "phi0_per_cm2_s_tev": {"kind": "fixed", "value": 1.54e-9},
        "gamma": {"kind": "fixed", "value": 2.11},
        "ecut_tev": {"kind": "fixed", "value": 0.54},
    }
    data["propagation"] = {"backend": "kernel", "fixed_bfield_seed": 7}
    config = parse_config(data)
    simulate_run(
        config,
        tmp_path / "run",
        n_simulations=4000,
        batch_size=500,
        run_seed=3,
        workers=2,
        progress=False,
    )
    training = TrainingConfig(
        max_epochs=15,
        batch_size=128,
        shuffle_buffer=4096,
        embedding_width=64,
        n_features=16,
        head_width=32,
        seed=1,
        patience=15,
        device="cpu",
        bnre_lambda=0.0,
    )
    result = train_estimator(
        load_training_data([tmp_path / "run"]), training, tmp_path / "work", progress=False
    )
    registry_dir = tmp_path / "registry"
    estimator_id = publish_estimator(registry_dir, result.model, result.config)

    rng = np.random.default_rng(11)
    truth = {name: float(config.prior(name).sample(rng, 1)[0]) for name in config.parameter_names}
    truth.update(STRONG_SIGNAL)
    npred = expected_counts(
        config,
        load_instrument_response(config),
        {k: np.array([v]) for k, v in truth.items()},
        np.array([7]),
    )
    counts = rng.poisson(npred[0]).tolist()
    settings = ApiSettings(
        broker_url=UNREACHABLE_BROKER, registry=str(registry_dir), inference_device="cpu"
    )
    with TestClient(create_app(settings)) as api:
        response = _post(api, estimator_id, [{"counts": counts}])

    assert response.status_code == 200, response.text
    joint = response.json()["posteriors"][0]["marginals_2d"]["m_neV__g_per_gev"]
    i = int(np.argmin(np.abs(np.asarray(joint["grid_x"]) - math.log10(truth["m_neV"]))))
    j = int(np.argmin(np.abs(np.asarray(joint["grid_y"]) - math.log10(truth["g_per_gev"]))))
    mask = np.asarray(joint["hpd_masks"]["0.95"], dtype=bool)
    assert mask[i, j], "the true (m, g) lies outside the 95 % HPD region"
    assert mask.mean() < 0.6, f"the 95 % region covers {mask.mean():.0%} of the prior grid"
    assert hpd_mask(np.asarray(joint["density"]), 0.95)[i, j]
    coupling = response.json()["posteriors"][0]["marginals_1d"]["g_per_gev"]
    log10_g = math.log10(truth["g_per_gev"])
    intervals = coupling["hpd_intervals"]["0.95"]
    assert any(low <= log10_g <= high for low, high in intervals), intervals


def test_figure_of_concentrated_posterior(tmp_path):
    from alpnre.posterior import Marginal2D, Posterior, plot_posterior

    grid = np.linspace(0.0, 1.0, 20)
    density = np.full((20, 20), 1e-300)
    density[5, 5] = 1.0
    joint = Marginal2D(
        ("m_neV", "g_per_gev"),
        ("log10(m_neV)", "log10(g_per_gev)"),
        grid,
        grid,
        density,
        [0.68, 0.95],
    )
    posterior = Posterior({}, {"m_neV__g_per_gev": joint}, "id", "checksum", [0.68, 0.95], {}, 0.0)

    plot_posterior(posterior, str(tmp_path / "concentrated.png"))

    assert (tmp_path / "concentrated.png").stat().st_size > 1000
