"""The ``train`` task: train an estimator on simulation runs and publish it.

The task runs the same library code as ``alpnre train``
(:func:`alpnre.training.load_training_data` and :func:`alpnre.training.train_estimator`),
with progress in Redis instead of a progress bar. It is safe to deliver twice:

- a delivery that finds a checkpoint in ``<training_work_dir>/<training run id>``
  resumes after the last finished epoch and reaches the same weights as an
  uninterrupted training (the library reseeds every epoch from the seed and the epoch);
- a delivery that finds ``published.json`` there reports the estimator published
  before and trains nothing (the checkpoint stays in the folder after publishing);
- a delivery that arrives while another process still trains the same run (it holds
  an exclusive lock on the work folder) is dropped.

Only transient errors (file system, Redis) are retried, with exponential backoff; a bad
request or a bug fails the training at once.
"""

from __future__ import annotations

import fcntl
import importlib
import importlib.util
import json
import logging
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import torch
from alpnre.nre import TrainingConfig
from alpnre.registry import new_estimator_id, save_estimator
from alpnre.training import TrainingData, TrainingResult, load_training_data, train_estimator
from celery.exceptions import SoftTimeLimitExceeded

from services.trainer.inputs import check_trainable, resolve_run_dirs
from services.trainer.log_context import training_run_context
from services.trainer.progress import TRAINING_RUN_ID_PATTERN, EpochRecord, TrainingProgressStore
from services.trainer.registry_store import RegistryStore
from services.trainer.settings import TrainerSettings

__all__ = ["TRANSIENT_ERRORS", "estimator_metadata", "execute_training", "validate_staged"]

log = logging.getLogger(__name__)

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    redis.ConnectionError,
    redis.TimeoutError,
)

CHECKPOINT_FOLDER = "checkpoint"
STAGING_FOLDER = "estimator"
PUBLISHED_MARKER = "published.json"
LOCK_NAME = ".lock"


def execute_training(
    task: Any,
    settings: TrainerSettings,
    store: TrainingProgressStore,
    *,
    training_run_id: str,
    runs: list[str],
    hyperparameters: dict[str, Any],
    registry: str | None,
) -> dict[str, Any]:
    """Run one training for the Celery task ``task`` and keep its progress current.

    Returns a small summary for the worker log. Raises ``celery.exceptions.Retry`` to
    retry after a transient error, and re-raises every other error after recording it
    as the training's failure.
    """
    if not TRAINING_RUN_ID_PATTERN.match(training_run_id):
        raise ValueError(
            f"invalid training run id {training_run_id!r}: letters, digits, '_', '.', '-' only"
        )
    work_dir = settings.work_dir(training_run_id)
    work_dir.mkdir(parents=True, exist_ok=True)
    registry = registry or settings.registry

    with training_run_context(training_run_id), _exclusive_lock(work_dir) as locked:
        if not locked:
            log.warning("another process is training this run; this delivery is dropped")
            return {"training_run_id": training_run_id, "skipped": True}
        published = _read_published(work_dir)
        if published is not None:
            log.info(
                "estimator %s was published before; nothing to train", published["estimator_id"]
            )
            store.mark_completed(
                training_run_id, published["estimator_id"], published["validation"]
            )
            return {"training_run_id": training_run_id, **published, "skipped": True}
        return _train_with_retries(
            task, settings, store, training_run_id, runs, hyperparameters, registry, work_dir
        )


def _train_with_retries(
    task: Any,
    settings: TrainerSettings,
    store: TrainingProgressStore,
    training_run_id: str,
    runs: list[str],
    hyperparameters: dict[str, Any],
    registry: str,
    work_dir: Path,
) -> dict[str, Any]:
    attempts = task.request.retries + 1
    try:
        delivery = store.mark_running(training_run_id)
        log.info("training started (delivery %d) on runs %s", delivery, runs)
        outcome = _train_and_publish(
            store, settings, training_run_id, runs, hyperparameters, registry, work_dir, delivery
        )
    except SoftTimeLimitExceeded:
        message = (
            f"timed out after the soft limit of {settings.training_soft_time_limit_s:g} s; "
            "raise ALPNRE_TRAINING_SOFT_TIME_LIMIT_S or lower max_epochs"
        )
        _mark_failed(store, training_run_id, message)
        raise
    except TRANSIENT_ERRORS as error:
        if task.request.retries < settings.training_max_retries:
            countdown = _retry_countdown(settings, task.request.retries)
            log.warning(
                "attempt %d of %d failed with %s: %s; retrying in %.1f s from the checkpoint",
                attempts,
                settings.training_max_retries + 1,
                type(error).__name__,
                error,
                countdown,
            )
            _mark_queued(store, training_run_id, f"{type(error).__name__}: {error}")
            raise task.retry(exc=error, countdown=countdown) from error
        _mark_failed(store, training_run_id, f"{type(error).__name__}: {error}")
        raise
    except Exception as error:
        _mark_failed(store, training_run_id, f"{type(error).__name__}: {error}")
        raise
    return {"training_run_id": training_run_id, **outcome}


def _train_and_publish(
    store: TrainingProgressStore,
    settings: TrainerSettings,
    training_run_id: str,
    runs: list[str],
    hyperparameters: dict[str, Any],
    registry: str,
    work_dir: Path,
    delivery: int,
) -> dict[str, Any]:
    # Inputs, checked again: runs can have changed since the API accepted the request.
    training = TrainingConfig.model_validate(hyperparameters)
    run_dirs = resolve_run_dirs(settings.data_dir, runs)
    data = load_training_data(run_dirs)
    check_trainable(data, training)

    # Training, resumed from the checkpoint a lost delivery left behind.
    if settings.training_threads is not None:
        torch.set_num_threads(settings.training_threads)
    reporter = EpochReporter(store, training_run_id, resumed=delivery > 1)
    result = train_estimator(
        data, training, work_dir / CHECKPOINT_FOLDER, progress=False, on_epoch=reporter
    )
    for record in result.metrics:
        # Epochs finished by an earlier delivery after its last progress update.
        reporter.record(record)

    # Publishing: staged and validated locally, then copied or uploaded to the registry.
    estimator_id = new_estimator_id(result.config.name)
    staging = work_dir / STAGING_FOLDER
    shutil.rmtree(staging, ignore_errors=True)
    extra = estimator_metadata(data, result, training_run_id)
    save_estimator(
        staging,
        result.model,
        result.config,
        estimator_id=estimator_id,
        metrics=result.metrics,
        extra=extra,
    )
    validation = validate_staged(staging, settings.validation_simulations)
    RegistryStore(registry).publish_folder(staging, estimator_id, result.config.name)
    published = {"estimator_id": estimator_id, "registry": registry, "validation": validation}
    (work_dir / PUBLISHED_MARKER).write_text(json.dumps(published))
    shutil.rmtree(staging, ignore_errors=True)

    store.mark_completed(training_run_id, estimator_id, validation)
    log.info(
        "published estimator %s to %s after %d epochs (best %d) in %.1f s",
        estimator_id,
        registry,
        len(result.metrics),
        result.best_epoch,
        result.seconds,
    )
    return published


def estimator_metadata(
    data: TrainingData, result: TrainingResult, training_run_id: str
) -> dict[str, Any]:
    """Metadata a published estimator records about its data and training.

    ``save_estimator`` adds the config, heads, hyperparameters, metrics, library and
    dependency versions and the checksum.
    """
    first = data.manifests[0]
    return {
        "training_run_id": training_run_id,
        "best_epoch": result.best_epoch,
        "n_dropped_rows": result.n_dropped_rows,
        "data_run_ids": [manifest.run_id for manifest in data.manifests],
        "data_manifest_hashes": result.data_manifest_hashes,
        "training_seconds": result.seconds,
        "n_training_files": len(result.training_files),
        "n_validation_files": len(result.validation_files),
        "training_files": result.training_files,
        "validation_files": result.validation_files,
        "energy_edges_tev": data.energy_edges_tev,
        "irf_id": first.irf_id,
        "irf_is_approximation": first.irf_is_approximation,
    }


class EpochReporter:
    """``on_epoch`` callback that stores each epoch's metrics in the progress store.

    A Redis failure here is logged and training goes on: losing a progress update is
    better than losing the epochs trained so far.
    """

    def __init__(self, store: TrainingProgressStore, training_run_id: str, resumed: bool) -> None:
        self.store = store
        self.training_run_id = training_run_id
        self.resumed = resumed
        self.first_epoch: int | None = None
        self.n_store_errors = 0

    def __call__(self, metrics: dict[str, float]) -> None:
        epoch = int(metrics["epoch"])
        if self.first_epoch is None:
            self.first_epoch = epoch
            if self.resumed:
                self._call_store(self.store.record_resume, self.training_run_id, epoch)
        self.record(metrics)
        log.info(
            "epoch %d done: train loss %.4f, validation loss %.4f, %.2f s",
            epoch,
            metrics["train_loss"],
            metrics["validation_loss"],
            metrics["seconds"],
        )

    def record(self, metrics: dict[str, float]) -> None:
        """Store one epoch's metrics."""
        record = EpochRecord(
            epoch=int(metrics["epoch"]),
            train_loss=float(metrics["train_loss"]),
            validation_loss=float(metrics["validation_loss"]),
            seconds=float(metrics["seconds"]),
        )
        self._call_store(self.store.record_epoch, self.training_run_id, record)

    def _call_store(self, method: Callable[..., None], *args: Any) -> None:
        try:
            method(*args)
        except redis.RedisError as error:
            self.n_store_errors += 1
            # The first failure and every 10th: an outage during a long training
            # would otherwise fill the log.
            if self.n_store_errors % 10 == 1:
                log.error(
                    "could not update the progress store (%d failures so far): %s",
                    self.n_store_errors,
                    error,
                )


def validate_staged(folder: Path, n_simulations: int) -> str:
    """Validate a staged estimator with ``alpnre.calibration`` when that module exists.

    :func:`alpnre.calibration.validate_estimator` simulates ``n_simulations`` held-out
    spectra and writes ``validation/report.json`` and its figures into ``folder``.
    Returns ``"done"``, or ``"skipped: <reason>"`` or ``"failed: <error>"``. A failed
    validation is logged and does not stop the estimator from being published.
    """
    if n_simulations == 0:
        log.info("validation skipped: ALPNRE_VALIDATION_SIMULATIONS is 0")
        return "skipped: ALPNRE_VALIDATION_SIMULATIONS is 0"
    if importlib.util.find_spec("alpnre.calibration") is None:
        log.info("validation skipped: alpnre.calibration is not installed")
        return "skipped: alpnre.calibration is not installed"
    calibration = importlib.import_module("alpnre.calibration")
    try:
        report = calibration.validate_estimator(folder, n_simulations=n_simulations, progress=False)
    except Exception as error:
        # Validation is a report on a trained estimator; its failure must not lose it.
        log.exception("validation of %s failed", folder)
        return f"failed: {type(error).__name__}: {error}"
    log.info("validation done, verdict %s: %s", report.verdict, folder / "validation")
    return "done"


@contextmanager
def _exclusive_lock(work_dir: Path) -> Iterator[bool]:
    # flock is released by the kernel when the process dies, so a killed worker never
    # leaves a stale lock behind for the delivery that resumes its training.
    with open(work_dir / LOCK_NAME, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            locked = False
        else:
            locked = True
        try:
            yield locked
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _read_published(work_dir: Path) -> dict[str, str] | None:
    path = work_dir / PUBLISHED_MARKER
    if not path.exists():
        return None
    published: dict[str, str] = json.loads(path.read_text())
    return published


def _retry_countdown(settings: TrainerSettings, retries: int) -> float:
    ceiling = min(settings.retry_backoff_max_s, settings.retry_backoff_s * 2**retries)
    return random.uniform(ceiling / 2, ceiling)


def _mark_failed(store: TrainingProgressStore, training_run_id: str, message: str) -> None:
    log.error("training failed: %s", message)
    try:
        store.mark_failed(training_run_id, message)
    except redis.RedisError as error:
        log.error("could not record the failure in the progress store: %s", error)


def _mark_queued(store: TrainingProgressStore, training_run_id: str, message: str) -> None:
    try:
        store.mark_queued(training_run_id, message)
    except redis.RedisError as error:
        log.error("could not record the retry in the progress store: %s", error)
