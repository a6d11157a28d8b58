"""The training service end to end: API → Redis → Celery training worker → registry.

The tests run against a real redis-server and a real ``celery worker`` process on the
``training`` queue (prefork pool, one process), on a 600-spectrum run of the small
config of conftest (40 reconstructed energy bins) and a tiny network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from alpnre.config import parse_config
from alpnre.dataset import read_manifest
from alpnre.nre import RatioEstimator
from alpnre.registry import load_estimator, save_estimator
from alpnre.runs import simulate_run
from alpnre.streaming import read_spectra
from conftest import small_config_dict
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.settings import ApiSettings
from services.trainer.registry_store import RegistryStore
from services.trainer.settings import TrainerSettings

if TYPE_CHECKING:
    from redis_fixtures import CeleryWorker, CeleryWorkerFactory, RedisServer

pytest_plugins = ["redis_fixtures"]

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(300)]

RUN_ID = "run-small"
OTHER_CONFIG_RUN_ID = "run-other-config"
REDIS_DB = 2

TINY_NETWORK = {
    "batch_size": 64,
    "shuffle_buffer": 256,
    "embedding_width": 32,
    "n_features": 8,
    "head_width": 16,
    "patience": 100,
    "seed": 3,
    "device": "cpu",
}
# Validation is skipped, and reported as skipped, where alpnre.calibration is absent.
CALIBRATION_INSTALLED = importlib.util.find_spec("alpnre.calibration") is not None
# Long enough (a few seconds) for the worker to be killed between two checkpoints.
RESUME_EPOCHS = 5


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with a 600-spectrum run and a small run of another config."""
    data_dir = tmp_path_factory.mktemp("runs")
    simulate_run(
        parse_config(small_config_dict()),
        data_dir / RUN_ID,
        n_simulations=600,
        batch_size=100,
        run_seed=5,
        workers=1,
        progress=False,
    )
    other = small_config_dict()
    other["observation"]["livetime_h"] = 10.0
    simulate_run(
        parse_config(other),
        data_dir / OTHER_CONFIG_RUN_ID,
        n_simulations=4,
        batch_size=2,
        run_seed=1,
        workers=1,
        progress=False,
    )
    return data_dir


@pytest.fixture(scope="module")
def service_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trainer")
    return {"registry": root / "registry", "work": root / "work"}


@pytest.fixture(scope="module")
def trainer_settings(
    redis_server: RedisServer, data_dir: Path, service_dirs: dict[str, Path]
) -> TrainerSettings:
    # The registry as a file:// URL, so the URL handling is exercised end to end.
    return TrainerSettings(
        broker_url=redis_server.url(REDIS_DB),
        data_dir=data_dir,
        registry=service_dirs["registry"].as_uri(),
        training_work_dir=service_dirs["work"],
    )


@pytest.fixture(scope="module")
def worker(
    trainer_settings: TrainerSettings, celery_worker_factory: CeleryWorkerFactory
) -> Iterator[CeleryWorker]:
    env = {
        "ALPNRE_BROKER_URL": trainer_settings.broker_url,
        "ALPNRE_DATA_DIR": str(trainer_settings.data_dir),
        "ALPNRE_REGISTRY": trainer_settings.registry,
        "ALPNRE_TRAINING_WORK_DIR": str(trainer_settings.training_work_dir),
        # One thread: torch's one per core crawls when other processes share the cores.
        "ALPNRE_TRAINING_THREADS": "1",
        # The smallest validation that alpnre.calibration accepts.
        "ALPNRE_VALIDATION_SIMULATIONS": "10",
    }
    worker = celery_worker_factory(
        "services.trainer.celery_app",
        "training",
        env=env,
        concurrency=1,
        name="trainer",
        timeout_s=180,
    )
    yield worker
    worker.stop()


def make_api(broker_url: str, data_dir: Path, registry: str) -> TestClient:
    settings = ApiSettings(
        broker_url=broker_url, data_dir=data_dir, registry=registry, broker_timeout_s=2.0
    )
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def api(trainer_settings: TrainerSettings, data_dir: Path) -> Iterator[TestClient]:
    """The API with the real broker, served in this process."""
    with make_api(trainer_settings.broker_url, data_dir, trainer_settings.registry) as client:
        yield client


def wait_for_training(
    client: TestClient, training_run_id: str, timeout_s: float = 240.0
) -> dict[str, Any]:
    """Poll a training run until it completed or failed; return its last state."""
    deadline = time.monotonic() + timeout_s
    while True:
        body: dict[str, Any] = client.get(f"/v1/training-runs/{training_run_id}").json()
        if body["state"] in ("completed", "failed"):
            return body
        if time.monotonic() > deadline:
            raise TimeoutError(f"training {training_run_id} unfinished after {timeout_s} s: {body}")
        time.sleep(0.1)


def start_training(client: TestClient, **hyperparameters: Any) -> str:
    response = client.post(
        "/v1/training-runs",
        json={"runs": [RUN_ID], "hyperparameters": {**TINY_NETWORK, **hyperparameters}},
    )
    assert response.status_code == 201, response.text
    training_run_id: str = response.json()["training_run_id"]
    return training_run_id


@pytest.fixture(scope="module")
def trained(api: TestClient, worker: CeleryWorker) -> dict[str, Any]:
    """A finished 2-epoch training run."""
    return wait_for_training(api, start_training(api, max_epochs=2))


def estimator_folder(service_dirs: dict[str, Path], estimator_id: str) -> Path:
    return service_dirs["registry"] / "estimators" / estimator_id


def test_training_run_completes(trained: dict[str, Any]) -> None:
    assert trained["state"] == "completed", trained
    assert trained["epoch"] == 1
    assert [record["epoch"] for record in trained["epochs"]] == [0, 1]
    assert all(record["seconds"] > 0 for record in trained["epochs"])
    assert trained["eta_s"] == 0
    assert trained["attempts"] == 1
    assert trained["resumed_from_epoch"] is None
    assert trained["estimator_id"].startswith("ngc1275")
    assert trained["error"] is None
    if CALIBRATION_INSTALLED:
        assert trained["validation"] == "done"
    else:
        assert trained["validation"] == "skipped: alpnre.calibration is not installed"
    assert trained["hyperparameters"]["max_epochs"] == 2
    assert trained["hyperparameters"]["learning_rate"] == 1e-3


def test_estimator_listed(api: TestClient, trained: dict[str, Any]) -> None:
    body = api.get("/v1/estimators").json()

    assert trained["estimator_id"] in [item["estimator_id"] for item in body["items"]]
    assert body["total"] >= 1
    filtered = api.get("/v1/estimators", params={"config_name": "no-such-config"}).json()
    assert filtered["items"] == []


def test_estimator_metadata(
    api: TestClient, trained: dict[str, Any], data_dir: Path, service_dirs: dict[str, Path]
) -> None:
    estimator_id = trained["estimator_id"]
    body = api.get(f"/v1/estimators/{estimator_id}").json()
    manifest = read_manifest(data_dir / RUN_ID)
    metadata = json.loads(
        (estimator_folder(service_dirs, estimator_id) / "estimator.json").read_text()
    )

    assert body["config_hash"] == manifest.config_hash
    assert body["config_name"] == manifest.config_name
    assert body["checksum"] == metadata["checksum"]
    assert body["training_run_id"] == trained["training_run_id"]
    assert body["heads"]["one_dim"] == ["m_neV", "g_per_gev"]
    assert body["heads"]["two_dim"] == [["m_neV", "g_per_gev"]]
    assert [record["epoch"] for record in body["metrics"]] == [0, 1]
    assert body["data_manifest_hashes"] == [manifest.manifest_hash()]
    assert body["data_run_ids"] == [manifest.run_id]
    assert body["n_dropped_rows"] == 0
    assert body["n_training_files"] + body["n_validation_files"] == 6
    assert body["hyperparameters"]["embedding_width"] == 32
    assert "torch" in body["versions"]
    assert len(metadata["training_files"]) == body["n_training_files"]
    if not CALIBRATION_INSTALLED:
        assert body["validation"] is None


@pytest.mark.skipif(not CALIBRATION_INSTALLED, reason="alpnre.calibration is not installed")
def test_validation_report_published(
    api: TestClient, trained: dict[str, Any], service_dirs: dict[str, Path]
) -> None:
    """The report written into the staged folder is published and summarised."""
    estimator_id = trained["estimator_id"]
    folder = estimator_folder(service_dirs, estimator_id)
    report = json.loads((folder / "validation" / "report.json").read_text())
    summary = api.get(f"/v1/estimators/{estimator_id}").json()["validation"]

    assert report["estimator_id"] == estimator_id
    assert report["held_out"]["n_simulations"] == 10
    assert summary["n_simulations"] == 10
    assert summary["verdict"] == report["verdict"]
    assert set(summary["coverage_verdicts"]) >= {"m_neV", "g_per_gev"}
    assert summary["report_url"] == f"/v1/estimators/{estimator_id}/validation"


def test_published_estimator_reloads(
    trained: dict[str, Any], data_dir: Path, service_dirs: dict[str, Path]
) -> None:
    """The published weights give the log-ratios of the best epoch's checkpointed weights."""
    loaded = load_estimator(estimator_folder(service_dirs, trained["estimator_id"]))
    checkpoint = torch.load(
        service_dirs["work"] / trained["training_run_id"] / "checkpoint" / "checkpoint.pt",
        map_location="cpu",
        weights_only=True,
    )
    trained_model = RatioEstimator(loaded.spec)
    trained_model.load_state_dict(checkpoint["best_weights"])
    trained_model.eval()
    files = sorted((data_dir / RUN_ID).glob("batch-*.parquet"))
    x, theta = read_spectra(files[:1], loaded.spec.parameter_names)

    with torch.no_grad():
        x_tensor = torch.as_tensor(x[:32], dtype=torch.float32)
        theta_tensor = torch.as_tensor(loaded.spec.transform_theta(theta[:32]))
        published = loaded.model(x_tensor, theta_tensor)
        expected = trained_model(x_tensor, theta_tensor)

    assert torch.equal(published["1d"], expected["1d"])
    assert torch.equal(published["2d"], expected["2d"])
    assert torch.isfinite(published["1d"]).all()


def test_latest_points_at_estimator(
    trained: dict[str, Any], data_dir: Path, service_dirs: dict[str, Path]
) -> None:
    config_name = read_manifest(data_dir / RUN_ID).config_name
    pointer = service_dirs["registry"] / "latest" / config_name

    assert pointer.read_text().strip() == trained["estimator_id"]


def test_training_run_listed(api: TestClient, trained: dict[str, Any]) -> None:
    body = api.get("/v1/training-runs").json()

    assert trained["training_run_id"] in [item["training_run_id"] for item in body["items"]]


# --- bad requests -------------------------------------------------------------------------


def post_training(client: TestClient, runs: list[str], **hyperparameters: Any) -> Any:
    return client.post(
        "/v1/training-runs",
        json={"runs": runs, "hyperparameters": {**TINY_NETWORK, **hyperparameters}},
    )


@pytest.mark.parametrize(
    ("hyperparameters", "field"),
    [
        ({"batch_size": 4}, "batch_size"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"max_epoch": 3}, "max_epoch"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_invalid_hyperparameter_rejected(
    api: TestClient, hyperparameters: dict[str, Any], field: str
) -> None:
    response = post_training(api, [RUN_ID], **hyperparameters)

    assert response.status_code == 422
    locations = [error["loc"] for error in response.json()["detail"]]
    assert ["body", "hyperparameters", field] in locations


def test_hyperparameters_not_fitting_data_rejected(api: TestClient) -> None:
    too_large = post_training(api, [RUN_ID], batch_size=1024, shuffle_buffer=2048)
    unknown_marginal = post_training(api, [RUN_ID], nuisance_marginals=["no_such_parameter"])

    assert too_large.status_code == 422
    assert too_large.json()["detail"][0]["loc"] == ["body", "hyperparameters", "batch_size"]
    assert "fewer than batch_size=1024" in too_large.json()["detail"][0]["msg"]
    assert unknown_marginal.status_code == 422
    assert unknown_marginal.json()["detail"][0]["loc"] == [
        "body",
        "hyperparameters",
        "nuisance_marginals",
    ]


def test_unknown_run_not_found(api: TestClient) -> None:
    unknown = post_training(api, [RUN_ID, "run-doesnotexist"])
    traversal = post_training(api, ["../etc"])

    assert unknown.status_code == 404
    assert "run-doesnotexist" in unknown.json()["detail"]
    assert traversal.status_code == 404


def test_mixed_configs_rejected(api: TestClient) -> None:
    response = post_training(api, [RUN_ID, OTHER_CONFIG_RUN_ID])

    assert response.status_code == 422
    error = response.json()["detail"][0]
    assert error["loc"] == ["body", "runs"]
    assert "runs with different configs or energy binnings cannot be mixed" in error["msg"]


def test_duplicate_run_rejected(api: TestClient) -> None:
    response = post_training(api, [RUN_ID, RUN_ID])

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "runs", 1]


def test_empty_runs_rejected(api: TestClient) -> None:
    response = post_training(api, [])

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "runs"]


def test_unknown_ids_not_found(api: TestClient) -> None:
    assert api.get("/v1/training-runs/train-000000000000").status_code == 404
    assert api.get("/v1/estimators/no-such-estimator").status_code == 404
    assert api.get("/v1/estimators/..").status_code == 404


def test_broker_down_gives_503(
    data_dir: Path, trainer_settings: TrainerSettings, free_port_factory: Any
) -> None:
    down = f"redis://127.0.0.1:{free_port_factory()}/0"
    with make_api(down, data_dir, trainer_settings.registry) as client:
        response = post_training(client, [RUN_ID], max_epochs=1)

    assert response.status_code == 503
    assert "broker unavailable" in response.json()["detail"]


# --- fsspec registry ------------------------------------------------------------------------


def test_registry_upload_to_fsspec_url(
    trained: dict[str, Any], service_dirs: dict[str, Path], data_dir: Path, tmp_path: Path
) -> None:
    """Publishing to a non-local fsspec URL uploads the folder; the API reads it back."""
    source = load_estimator(estimator_folder(service_dirs, trained["estimator_id"]))
    staged = save_estimator(
        tmp_path / "staged", source.model, source.config, estimator_id="uploaded-estimator"
    )
    url = f"memory://registry-{uuid.uuid4().hex[:8]}"
    store = RegistryStore(url)

    store.publish_folder(staged, "uploaded-estimator", source.config.name)

    assert store.local_root is None
    assert store.estimator_ids() == ["uploaded-estimator"]
    assert store.fs.cat_file(f"{store.root}/latest/{source.config.name}") == b"uploaded-estimator\n"
    assert (
        store.fs.cat_file(f"{store.root}/estimators/uploaded-estimator/weights.pt")
        == (staged / "weights.pt").read_bytes()
    )
    with pytest.raises(FileExistsError):
        store.publish_folder(staged, "uploaded-estimator", source.config.name)
    with make_api("redis://127.0.0.1:1/0", data_dir, url) as client:
        listed = client.get("/v1/estimators").json()
        described = client.get("/v1/estimators/uploaded-estimator").json()
    assert [item["estimator_id"] for item in listed["items"]] == ["uploaded-estimator"]
    assert described["estimator_id"] == "uploaded-estimator"
    assert described["checksum"] == json.loads((staged / "estimator.json").read_text())["checksum"]


# --- a worker killed mid-training -------------------------------------------------------------


def child_pids(pid: int) -> list[int]:
    """Process ids whose parent is ``pid``, from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in brackets can contain spaces; the parent pid follows it.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid:
            children.append(int(entry.name))
    return children


def test_killed_training_resumes_to_same_weights(
    api: TestClient, worker: CeleryWorker, trained: dict[str, Any], service_dirs: dict[str, Path]
) -> None:
    """SIGKILL of the pool process mid-training: the task is delivered again, resumes from
    its checkpoint and publishes the weights of an uninterrupted training."""
    killed_id = start_training(api, max_epochs=RESUME_EPOCHS)
    deadline = time.monotonic() + 180
    while True:
        body = api.get(f"/v1/training-runs/{killed_id}").json()
        if body["epoch"] is not None:
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.02)
    assert body["state"] == "running"
    assert body["epoch"] < RESUME_EPOCHS - 1, "training ended before the worker could be killed"
    assert body["eta_s"] > 0
    pool = child_pids(worker.process.pid)
    assert len(pool) == 1, pool
    os.kill(pool[0], signal.SIGKILL)

    resumed = wait_for_training(api, killed_id)
    reference = wait_for_training(api, start_training(api, max_epochs=RESUME_EPOCHS))

    assert resumed["state"] == "completed", resumed
    assert reference["state"] == "completed", reference
    assert resumed["attempts"] == 2
    assert resumed["resumed_from_epoch"] >= 1
    assert "resuming from" in worker.log_text()
    assert [r["train_loss"] for r in resumed["epochs"]] == [
        r["train_loss"] for r in reference["epochs"]
    ]
    resumed_model = load_estimator(estimator_folder(service_dirs, resumed["estimator_id"])).model
    reference_model = load_estimator(
        estimator_folder(service_dirs, reference["estimator_id"])
    ).model
    reference_state = reference_model.state_dict()
    for key, value in resumed_model.state_dict().items():
        assert torch.equal(value, reference_state[key]), key
