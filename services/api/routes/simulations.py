"""``/v1/simulations``: start, inspect, list and cancel simulation runs."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from alpnre.config import (
    AnalysisConfig,
    ConfigError,
    config_hash,
    config_to_json,
    list_shipped_configs,
    load_config,
    parse_config,
)
from alpnre.physics.irf import IRFNotFoundError
from alpnre.runs import new_run_id, start_run
from fastapi import APIRouter, HTTPException, Path, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError

from services.api.deps import QueueDep, SettingsDep
from services.api.schemas import ErrorDetail, SimulationCreate, SimulationPage, SimulationPublic
from services.api.settings import ApiSettings
from services.simulator.client import SimulationQueue
from services.simulator.progress import RUN_ID_PATTERN, RunProgress, RunState

__all__ = ["router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/simulations", tags=["simulations"])

RunIdPath = Annotated[str, Path(description="run id returned when the run was created")]

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorDetail, "description": "no run with this id"}
}
_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorDetail, "description": "broker or progress store down"}
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=SimulationPublic,
    responses={**_UNAVAILABLE},
    summary="Start a simulation run",
)
def create_simulation(
    body: SimulationCreate,
    request: Request,
    response: Response,
    settings: SettingsDep,
    queue: QueueDep,
) -> SimulationPublic:
    """Split the request into batches, create the run folder and queue one task per batch.

    Responds 422 when the config is invalid or a limit is exceeded, and 503, without
    queueing anything, when the broker cannot be reached.
    """
    _check_limits(body, settings)
    config = _resolve_config(body.config)
    queue.check_broker(timeout_s=settings.broker_timeout_s)

    run_id = new_run_id()
    run_dir = (settings.data_dir / run_id).resolve()
    try:
        manifest = start_run(
            config,
            run_dir,
            n_simulations=body.n_simulations,
            batch_size=body.batch_size,
            run_seed=body.seed,
            run_id=run_id,
        )
    except (IRFNotFoundError, ValueError) as error:
        # The instrument response is built here first: a missing IRF file or one that
        # lacks a component is a problem of the request's config.
        raise _validation_error("config", str(error), None) from None
    queue.store.create_run(
        run_id=run_id,
        config_name=config.name,
        config_hash=config_hash(config),
        n_simulations=body.n_simulations,
        batch_size=body.batch_size,
        n_batches=manifest.n_batches,
        run_seed=body.seed,
        run_dir=str(run_dir),
    )
    queue.enqueue_run(
        run_id=run_id,
        config_json=config_to_json(config),
        n_simulations=body.n_simulations,
        batch_size=body.batch_size,
        run_seed=body.seed,
        n_batches=manifest.n_batches,
    )

    response.headers["Location"] = request.url_for("get_simulation", run_id=run_id).path
    return SimulationPublic.from_progress(_get_progress(queue, run_id))


@router.get("", response_model=SimulationPage, responses={**_UNAVAILABLE}, summary="List runs")
def list_simulations(
    settings: SettingsDep,
    queue: QueueDep,
    offset: Annotated[int, Query(ge=0, description="runs to skip, newest first")] = 0,
    limit: Annotated[
        int | None,
        Query(ge=1, description="page size; default and maximum are set by the API settings"),
    ] = None,
) -> SimulationPage:
    """List runs, newest first, one page at a time."""
    page_size = min(limit or settings.default_page_size, settings.max_page_size)
    runs, total = queue.store.list_runs(offset, page_size)
    return SimulationPage(
        items=[SimulationPublic.from_progress(run) for run in runs],
        total=total,
        offset=offset,
        limit=page_size,
    )


@router.get(
    "/{run_id}",
    response_model=SimulationPublic,
    responses={**_NOT_FOUND, **_UNAVAILABLE},
    summary="Get a run's state and progress",
)
def get_simulation(run_id: RunIdPath, queue: QueueDep) -> SimulationPublic:
    """Return the state of a run: batch counts, rows written, throughput, ETA, errors."""
    return SimulationPublic.from_progress(_get_progress(queue, run_id))


@router.delete(
    "/{run_id}",
    response_model=SimulationPublic,
    responses={
        **_NOT_FOUND,
        **_UNAVAILABLE,
        409: {"model": ErrorDetail, "description": "the run already completed or failed"},
    },
    summary="Cancel a run",
)
def cancel_simulation(run_id: RunIdPath, queue: QueueDep) -> SimulationPublic:
    """Revoke the run's queued batches; running batches finish and all files are kept.

    Cancelling a cancelled run again changes nothing and responds 200.
    """
    progress = _get_progress(queue, run_id)
    if progress.state in (RunState.COMPLETED, RunState.FAILED):
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"run {run_id} already {progress.state}; nothing to cancel"
        )
    queue.cancel_run(run_id)
    return SimulationPublic.from_progress(_get_progress(queue, run_id))


def _get_progress(queue: SimulationQueue, run_id: str) -> RunProgress:
    progress = queue.store.get(run_id) if RUN_ID_PATTERN.match(run_id) else None
    if progress is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"simulation run {run_id!r} not found")
    return progress


def _validation_error(field: str, message: str, value: Any) -> RequestValidationError:
    # Same shape as FastAPI's own 422 bodies: a list of {loc, msg, type, input}.
    return RequestValidationError(
        [{"loc": ("body", field), "msg": message, "type": "value_error", "input": value}]
    )


def _check_limits(body: SimulationCreate, settings: ApiSettings) -> None:
    if body.n_simulations > settings.max_simulations:
        raise _validation_error(
            "n_simulations",
            f"n_simulations={body.n_simulations} exceeds the limit of "
            f"{settings.max_simulations} per request (ALPNRE_MAX_SIMULATIONS); "
            "split the work into several runs",
            body.n_simulations,
        )
    if body.batch_size > settings.max_batch_size:
        raise _validation_error(
            "batch_size",
            f"batch_size={body.batch_size} exceeds the limit of {settings.max_batch_size} "
            "(ALPNRE_MAX_BATCH_SIZE)",
            body.batch_size,
        )
    n_batches = -(-body.n_simulations // body.batch_size)
    if n_batches > settings.max_batches:
        raise _validation_error(
            "batch_size",
            f"{body.n_simulations} simulations in batches of {body.batch_size} give "
            f"{n_batches} batches, more than the limit of {settings.max_batches} "
            "(ALPNRE_MAX_BATCHES); use larger batches",
            body.batch_size,
        )


def _resolve_config(config: dict[str, Any] | str) -> AnalysisConfig:
    if isinstance(config, str):
        shipped = list_shipped_configs()
        if config not in shipped:
            raise _validation_error(
                "config", f"unknown shipped config {config!r}: choose one of {shipped}", config
            )
    try:
        if isinstance(config, str):
            return load_config(config)
        parsed = parse_config(config, source="in the request body")
    except ConfigError as error:
        raise _validation_error("config", str(error), None) from None
    # An inline config may not name a file on the server: the error for a missing file
    # would tell the caller which paths exist.
    if parsed.irf.path is not None:
        raise _validation_error(
            "config.irf.path",
            "irf.path is not accepted over the API: use irf.gammapy_data_file, resolved "
            "under the server's GAMMAPY_DATA, or a shipped config",
            parsed.irf.path,
        )
    return parsed
