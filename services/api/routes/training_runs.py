"""``/v1/training-runs``: start and inspect trainings of ratio estimators."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path as FilePath
from typing import Annotated, Any, cast

from alpnre.dataset import DatasetError
from alpnre.training import TrainingData, load_training_data
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError

from services.api.deps import SettingsDep, get_settings
from services.api.schemas import ErrorDetail
from services.api.schemas_training import TrainingRunCreate, TrainingRunPage, TrainingRunPublic
from services.simulator.progress import RUN_ID_PATTERN
from services.trainer.client import TrainingQueue
from services.trainer.inputs import (
    RunNotFoundError,
    TrainingInputError,
    check_trainable,
    resolve_run_dirs,
)
from services.trainer.progress import (
    TRAINING_RUN_ID_PATTERN,
    TrainingProgress,
    TrainingProgressStore,
)
from services.trainer.settings import TrainerSettings

__all__ = ["TrainerSettingsDep", "TrainingQueueDep", "get_trainer_settings", "router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/training-runs", tags=["training runs"])


def get_trainer_settings(request: Request) -> TrainerSettings:
    """Return the trainer settings of the app, made on first use.

    Broker, progress store, data folder, registry and key prefix come from the API
    settings, the queue name from ``ALPNRE_TRAINING_QUEUE``. Embedders may set
    ``app.state.trainer_settings`` beforehand.
    """
    settings = getattr(request.app.state, "trainer_settings", None)
    if settings is None:
        api = get_settings(request)
        settings = TrainerSettings(
            broker_url=api.broker_url,
            progress_url=api.progress_url,
            data_dir=api.data_dir,
            registry=api.registry,
            key_prefix=api.key_prefix,
        )
        request.app.state.trainer_settings = settings
    return cast(TrainerSettings, settings)


def get_training_queue(request: Request) -> TrainingQueue:
    """Return the app's training queue (broker client and progress store), made on first use."""
    queue = getattr(request.app.state, "training_queue", None)
    if queue is None:
        settings = get_trainer_settings(request)
        store = TrainingProgressStore.from_url(
            settings.progress_redis_url,
            prefix=settings.key_prefix,
            timeout_s=get_settings(request).broker_timeout_s,
        )
        queue = TrainingQueue(settings, store)
        request.app.state.training_queue = queue
    return cast(TrainingQueue, queue)


TrainerSettingsDep = Annotated[TrainerSettings, Depends(get_trainer_settings)]
TrainingQueueDep = Annotated[TrainingQueue, Depends(get_training_queue)]
TrainingRunIdPath = Annotated[
    str, Path(description="training run id returned when the training was created")
]

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorDetail, "description": "no training run (or simulation run) with this id"}
}
_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorDetail, "description": "broker or progress store down"}
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TrainingRunPublic,
    responses={**_NOT_FOUND, **_UNAVAILABLE},
    summary="Start a training run",
)
def create_training_run(
    body: TrainingRunCreate,
    request: Request,
    response: Response,
    settings: SettingsDep,
    trainer_settings: TrainerSettingsDep,
    queue: TrainingQueueDep,
) -> TrainingRunPublic:
    """Check the runs and hyperparameters, then queue a training on the ``training`` queue.

    Responds 404 when a run id is unknown, 422 when a hyperparameter is invalid, the
    runs cannot be mixed (different configs or energy binnings) or hold too little
    data, and 503, without queueing anything, when the broker cannot be reached.
    """
    run_dirs = _resolve_runs(settings.data_dir, body.runs)
    data = _load_data(run_dirs)
    try:
        check_trainable(data, body.hyperparameters)
    except TrainingInputError as error:
        raise _validation_error(error.field, str(error)) from None
    queue.check_broker(timeout_s=settings.broker_timeout_s)

    training_run_id = f"train-{uuid.uuid4().hex[:12]}"
    queue.enqueue(
        training_run_id=training_run_id,
        runs=body.runs,
        hyperparameters=body.hyperparameters.model_dump(mode="json"),
        registry=trainer_settings.registry,
    )
    log.info("training run %s: queued on runs %s", training_run_id, body.runs)
    response.headers["Location"] = request.url_for(
        "get_training_run", training_run_id=training_run_id
    ).path
    return TrainingRunPublic.from_progress(_get_progress(queue, training_run_id))


@router.get(
    "",
    response_model=TrainingRunPage,
    responses={**_UNAVAILABLE},
    summary="List training runs",
)
def list_training_runs(
    settings: SettingsDep,
    queue: TrainingQueueDep,
    offset: Annotated[int, Query(ge=0, description="training runs to skip, newest first")] = 0,
    limit: Annotated[int | None, Query(ge=1, description="page size")] = None,
) -> TrainingRunPage:
    """List training runs, newest first, one page at a time."""
    page_size = min(limit or settings.default_page_size, settings.max_page_size)
    runs, total = queue.store.list_runs(offset, page_size)
    return TrainingRunPage(
        items=[TrainingRunPublic.from_progress(run) for run in runs],
        total=total,
        offset=offset,
        limit=page_size,
    )


@router.get(
    "/{training_run_id}",
    response_model=TrainingRunPublic,
    responses={**_NOT_FOUND, **_UNAVAILABLE},
    summary="Get a training run's state and progress",
)
def get_training_run(
    training_run_id: TrainingRunIdPath, queue: TrainingQueueDep
) -> TrainingRunPublic:
    """Return the state of a training run: epochs and losses, ETA, estimator id, error."""
    return TrainingRunPublic.from_progress(_get_progress(queue, training_run_id))


def _get_progress(queue: TrainingQueue, training_run_id: str) -> TrainingProgress:
    progress = (
        queue.store.get(training_run_id) if TRAINING_RUN_ID_PATTERN.match(training_run_id) else None
    )
    if progress is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"training run {training_run_id!r} not found"
        )
    return progress


def _resolve_runs(data_dir: FilePath, runs: list[str]) -> list[FilePath]:
    seen: set[str] = set()
    for index, run in enumerate(runs):
        if run in seen:
            raise _validation_error(f"runs.{index}", f"run {run!r} is listed twice")
        seen.add(run)
        # Only ids here: a path in a request could point anywhere on the server.
        if not RUN_ID_PATTERN.match(run):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"simulation run {run!r} not found")
    try:
        return resolve_run_dirs(data_dir, runs)
    except RunNotFoundError as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None


def _load_data(run_dirs: list[FilePath]) -> TrainingData:
    try:
        return load_training_data(run_dirs)
    except DatasetError as error:
        raise _validation_error("runs", str(error)) from None


def _validation_error(field: str, message: str) -> RequestValidationError:
    # Same shape as FastAPI's own 422 bodies: a list of {loc, msg, type}.
    location = ("body", *(int(part) if part.isdigit() else part for part in field.split(".")))
    return RequestValidationError([{"loc": location, "msg": message, "type": "value_error"}])
