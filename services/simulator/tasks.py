"""The ``simulate_batch`` task: one batch of a run, written to Parquet by a worker.

The task is idempotent: :func:`alpnre.simulate.run_batch` keeps a batch file that
already exists and validates, so a message delivered twice (``acks_late`` after a
lost worker, a retry, a duplicate send) never writes a batch twice. Only transient
errors (file system, broker, lock) are retried, with exponential backoff; a bad config
or value fails the batch at once.
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any

import kombu.exceptions
import redis
from alpnre.config import AnalysisConfig, config_hash, load_config, parse_config
from alpnre.dataset import DatasetError, read_manifest
from alpnre.physics.irf import IRFNotFoundError
from alpnre.runs import record_batches
from alpnre.simulate import BatchResult, run_batch
from celery.exceptions import SoftTimeLimitExceeded

from services.simulator.progress import RUN_ID_PATTERN, BatchStatus, ProgressStore
from services.simulator.settings import SimulatorSettings

__all__ = [
    "TRANSIENT_ERRORS",
    "batch_task_id",
    "execute_batch",
    "preload_dependencies",
    "resolve_config",
]

log = logging.getLogger(__name__)

# Errors worth a retry: the file system, the broker or the progress store may recover.
# Everything else fails the batch at once: ConfigError, DatasetError and other
# ValueErrors, a missing IRF file (IRFNotFoundError, an OSError) and bugs.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.LockError,
    kombu.exceptions.OperationalError,
)


def preload_dependencies() -> None:
    """Import the simulator's lazily imported dependencies before any task runs.

    A Celery soft time limit raises in whatever the task is doing, an import
    included. A module interrupted half-way stays in ``sys.modules`` half-initialised,
    and every later batch on that worker then fails with AttributeError. The worker
    calls this once at start-up (``worker_init``), so no task imports these.
    """
    import ebltable.tau_from_model  # noqa: F401
    import gammapy.irf
    import gammapy.maps  # noqa: F401
    import numba  # noqa: F401
    import torch  # noqa: F401
    from alpnre.physics._gammaalps import import_gammaalps

    import_gammaalps("gammaALPs.core")
    import_gammaalps("gammaALPs.base.environs")
    log.info("simulation dependencies imported")


def batch_task_id(run_id: str, batch_index: int) -> str:
    """Celery task id of one batch; fixed, so cancelling can revoke it without a lookup."""
    return f"{run_id}.batch-{batch_index:06d}"


def resolve_config(config_ref: str) -> AnalysisConfig:
    """Build the config a task refers to: canonical JSON, a shipped name or a YAML path."""
    if config_ref.lstrip().startswith("{"):
        try:
            data = json.loads(config_ref)
        except json.JSONDecodeError as error:
            raise ValueError(f"config_ref is not valid JSON: {error}") from None
        return parse_config(data, source="(task argument)")
    return load_config(config_ref)


def retry_countdown(settings: SimulatorSettings, retries: int) -> float:
    """Seconds before retry number ``retries + 1``.

    The delay doubles with each retry up to ``retry_backoff_max_s``, and is drawn at
    random from the upper half of that value so that failed batches do not retry at once.
    """
    ceiling = min(settings.retry_backoff_max_s, settings.retry_backoff_s * 2**retries)
    return random.uniform(ceiling / 2, ceiling)


def execute_batch(
    task: Any,
    settings: SimulatorSettings,
    store: ProgressStore,
    *,
    run_id: str,
    batch_index: int,
    config_ref: str,
    run_seed: int,
    batch_size: int,
    n_simulations: int,
) -> dict[str, Any]:
    """Run one batch for the Celery task ``task`` and keep progress and manifest current.

    Returns a small summary for the worker log. Raises ``celery.exceptions.Retry`` to
    retry after a transient error, and re-raises every other error after recording it
    as the batch's failure.
    """
    if not RUN_ID_PATTERN.match(run_id):
        raise ValueError(f"invalid run id {run_id!r}: letters, digits, '_', '.', '-' only")
    attempts = task.request.retries + 1
    try:
        previous = store.set_status(run_id, batch_index, BatchStatus.RUNNING)
        if previous is None:
            log.warning("batch is not in the progress store; simulating it anyway")
        elif previous == BatchStatus.CANCELLED:
            log.info("run was cancelled before this batch started, skipped")
            return {"run_id": run_id, "batch_index": batch_index, "cancelled": True}
        result = _simulate_and_record(
            settings, store, run_id, batch_index, config_ref, run_seed, batch_size, n_simulations
        )
    except SoftTimeLimitExceeded as error:
        # NOTE: a batch killed at the hard limit (task_time_limit_s) records nothing and
        # stays 'running' in the progress store. The soft limit comes first to avoid that.
        _record_failure(store, run_id, batch_index, error, attempts)
        log.error(
            "timed out after the soft limit of %g s, not retried: raise "
            "ALPNRE_TASK_SOFT_TIME_LIMIT_S or lower the batch size",
            settings.task_soft_time_limit_s,
        )
        raise
    except IRFNotFoundError as error:
        _record_failure(store, run_id, batch_index, error, attempts)
        log.error("failed, not retried: %s", error)
        raise
    except TRANSIENT_ERRORS as error:
        if task.request.retries < settings.max_retries:
            countdown = retry_countdown(settings, task.request.retries)
            log.warning(
                "attempt %d of %d failed with %s: %s; retrying in %.1f s",
                attempts,
                settings.max_retries + 1,
                type(error).__name__,
                error,
                countdown,
            )
            _set_status_if_reachable(store, run_id, batch_index, BatchStatus.QUEUED)
            raise task.retry(exc=error, countdown=countdown) from error
        _record_failure(store, run_id, batch_index, error, attempts)
        log.error("failed after %d attempts: %s: %s", attempts, type(error).__name__, error)
        raise
    except Exception as error:
        _record_failure(store, run_id, batch_index, error, attempts)
        log.error("failed, not retried: %s: %s", type(error).__name__, error)
        raise

    store.set_status(run_id, batch_index, BatchStatus.DONE, rows=result.n_rows)
    if result.skipped:
        log.info("file already written by an earlier delivery, skipped: %s", result.path)
    else:
        log.info("done: %d rows in %.2f s", result.n_rows, result.seconds)
    return {
        "run_id": run_id,
        "batch_index": batch_index,
        "rows": result.n_rows,
        "skipped": result.skipped,
        "seconds": round(result.seconds, 3),
    }


def _simulate_and_record(
    settings: SimulatorSettings,
    store: ProgressStore,
    run_id: str,
    batch_index: int,
    config_ref: str,
    run_seed: int,
    batch_size: int,
    n_simulations: int,
) -> BatchResult:
    run_dir = settings.run_dir(run_id)
    config = resolve_config(config_ref)
    try:
        manifest = read_manifest(run_dir)
    except DatasetError as error:
        raise DatasetError(
            f"{error}; the API and the workers must share one data folder "
            f"(ALPNRE_DATA_DIR is {settings.data_dir} on this worker)"
        ) from None
    if manifest.config_hash != config_hash(config):
        raise ValueError(
            f"the task's config (hash {config_hash(config)[:12]}) is not the config of run "
            f"{run_id} (hash {manifest.config_hash[:12]})"
        )

    result = run_batch(config, run_dir, batch_index, run_seed, batch_size, n_simulations)

    # Workers finish batches of one run concurrently; the lock keeps each
    # read-modify-write of manifest.json from overwriting another worker's record.
    lock = store.client.lock(
        store.lock_name(run_id),
        timeout=settings.manifest_lock_timeout_s,
        blocking_timeout=settings.manifest_lock_timeout_s,
    )
    with lock:
        record_batches(run_dir, [result])
    return result


def _set_status_if_reachable(
    store: ProgressStore, run_id: str, batch_index: int, status: BatchStatus
) -> None:
    try:
        store.set_status(run_id, batch_index, status)
    except redis.RedisError as error:
        log.error("could not set the batch status to %s in the progress store: %s", status, error)


def _record_failure(
    store: ProgressStore, run_id: str, batch_index: int, error: BaseException, attempts: int
) -> None:
    try:
        store.record_error(run_id, batch_index, error, attempts)
        store.set_status(run_id, batch_index, BatchStatus.FAILED)
    except redis.RedisError as store_error:
        log.error("could not record the batch failure in the progress store: %s", store_error)
