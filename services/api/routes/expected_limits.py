"""``/v1/expected-limits``: expected exclusion limits under the no-ALP hypothesis.

A request starts a job that simulates ``n_mocks`` spectra without ALPs (see
:mod:`alpnre.limits`), computes each mock's 95 % upper-limit curve with the estimator
and returns the median and the 68 % and 95 % bands. Where the mocks are simulated:

- ``local``: in a thread of the API process, one process, for small requests;
- ``workers``: as a simulation run (config ``<config>-no-alp``) sent to the simulation
  workers through the queue, for large ones. The run also appears under
  ``/v1/simulations``. This needs the broker; without it the request gets 503.

``auto`` picks ``local`` up to ``ALPNRE_LOCAL_EXPECTED_LIMIT_MOCKS`` mocks. In both cases
the posteriors are computed in the API process. Jobs run after the 202 response in the
process that accepted them, which writes each change to the state folder that every API
process reads (``ALPNRE_STATE_DIR``); poll ``GET /v1/expected-limits/{id}`` until ``state`` is
``completed`` or ``failed``.
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import redis
from alpnre.config import (
    AnalysisConfig,
    ConfigError,
    config_hash,
    config_to_json,
    list_shipped_configs,
    load_config,
)
from alpnre.limits import (
    ExpectedLimits,
    check_estimator_matches,
    expected_limits_from_run,
    load_published_limits,
    null_hypothesis_config,
    plot_expected_limits,
    simulate_null_run,
)
from alpnre.physics.irf import IRFNotFoundError
from alpnre.registry import LoadedEstimator
from alpnre.runs import new_run_id, start_run
from fastapi import APIRouter, BackgroundTasks, HTTPException, Request, Response, status
from starlette.concurrency import run_in_threadpool

from services.api.deps import QueueDep, SettingsDep
from services.api.routes.posteriors import (
    FIGURE_MEDIA_TYPES,
    OrjsonResponse,
    SizeLimitedRoute,
    get_inference_state,
    load_registry_estimator,
    render_figure,
    validation_error,
)
from services.api.schemas import ErrorDetail
from services.api.schemas_posteriors import ExpectedLimitsCreate, ExpectedLimitsPublic, JobState
from services.api.settings import ApiSettings
from services.api.state_store import SharedStore
from services.simulator.client import SimulationQueue
from services.simulator.progress import RunState

__all__ = ["LimitsJob", "LimitsJobStore", "router"]

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0
# Mocks per batch of a worker run: at most 16 batches, so the workers share the run.
MAX_WORKER_BATCHES = 16


@dataclass
class LimitsJob:
    """One expected-limits request and its progress."""

    id: str
    backend: str
    estimator_id: str
    config_name: str
    n_mocks: int
    seed: int
    grid_size: int
    level: float
    created_at: float = field(default_factory=time.time)
    state: JobState = JobState.QUEUED
    simulation_run_id: str | None = None
    finished_at: float | None = None
    error: str | None = None
    result: ExpectedLimits | None = None
    figures: dict[str, bytes] = field(default_factory=dict)
    # Writes the job to the shared store; set by LimitsJobStore.add, not pickled.
    persist: Callable[[LimitsJob], None] | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "persist": None, "figures": {}}

    def update(self, **changes: Any) -> None:
        """Set fields and write the job, so that other API processes see the change."""
        for name, value in changes.items():
            setattr(self, name, value)
        if self.persist is not None:
            self.persist(self)

    def to_dict(self, base_path: str) -> dict[str, Any]:
        """Build the JSON body of the job (schema: ``ExpectedLimitsPublic``)."""
        return {
            "id": self.id,
            "state": self.state.value,
            "backend": self.backend,
            "estimator_id": self.estimator_id,
            "config_name": self.config_name,
            "n_mocks": self.n_mocks,
            "seed": self.seed,
            "simulation_run_id": self.simulation_run_id,
            "created_at": datetime.fromtimestamp(self.created_at, UTC),
            "finished_at": (
                datetime.fromtimestamp(self.finished_at, UTC) if self.finished_at else None
            ),
            "error": self.error,
            "result": self.result.to_dict() if self.result is not None else None,
            "figure_png": f"{base_path}/{self.id}/figure.png",
            "figure_svg": f"{base_path}/{self.id}/figure.svg",
        }


class LimitsJobStore:
    """Jobs by id, in memory and in the state folder that all API processes read.

    The process that runs a job keeps it in memory and writes it on every change. The
    other processes read the latest written state.
    """

    def __init__(self, size: int, folder: Path | None = None) -> None:
        self.size = size
        self._store: SharedStore[LimitsJob] = SharedStore(folder, size)

    def add(self, job: LimitsJob) -> None:
        job.persist = lambda changed: self._store.write(changed.id, changed)
        self._store.put(job.id, job)

    def get(self, job_id: str) -> LimitsJob | None:
        return self._store.get(job_id, cache=False)


def _job_store(request: Request) -> LimitsJobStore:
    state = get_inference_state(request)
    settings = cast(ApiSettings, request.app.state.settings)
    return cast(
        LimitsJobStore,
        state.extras.setdefault(
            "limits_jobs",
            LimitsJobStore(
                settings.expected_limits_store_size, settings.resolved_state_dir / "limits-jobs"
            ),
        ),
    )


# --- running a job ---------------------------------------------------------------------


def _run_local(
    job: LimitsJob, config: AnalysisConfig, estimator: LoadedEstimator
) -> ExpectedLimits:
    with tempfile.TemporaryDirectory(prefix=f"alpnre-{job.id}-") as run_dir:
        job.update(state=JobState.SIMULATING)
        simulate_null_run(config, run_dir, n_mocks=job.n_mocks, seed=job.seed, workers=1)
        job.update(state=JobState.COMPUTING)
        return expected_limits_from_run(
            estimator,
            run_dir,
            grid_size=job.grid_size,
            level=job.level,
            seed=job.seed,
            simulation={"backend": "local", "workers": 1},
        )


def _wait_for_run(queue: SimulationQueue, run_id: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    store_errors = 0
    while time.monotonic() < deadline:
        try:
            progress = queue.store.get(run_id)
        except redis.RedisError as error:
            store_errors += 1
            # Log the first error and then every 60th, so an outage does not flood the log.
            if store_errors % 60 == 1:
                log.warning(
                    "run %s: progress store unreachable (%d times): %s", run_id, store_errors, error
                )
            time.sleep(POLL_INTERVAL_S)
            continue
        if progress is None:
            raise RuntimeError(f"simulation run {run_id} vanished from the progress store")
        if progress.state == RunState.COMPLETED:
            return
        if progress.state in (RunState.FAILED, RunState.CANCELLED):
            reason = progress.error or "; ".join(e.message for e in progress.batch_errors[:3])
            raise RuntimeError(
                f"simulation run {run_id} {progress.state}: {reason or 'no error recorded'}"
            )
        time.sleep(POLL_INTERVAL_S)
    raise TimeoutError(
        f"simulation run {run_id} did not finish within {timeout_s:g} s "
        "(ALPNRE_EXPECTED_LIMITS_TIMEOUT_S); check the simulation workers"
    )


def _run_on_workers(
    job: LimitsJob,
    estimator: LoadedEstimator,
    queue: SimulationQueue,
    run_dir: Path,
    timeout_s: float,
) -> ExpectedLimits:
    assert job.simulation_run_id is not None
    job.update(state=JobState.SIMULATING)
    _wait_for_run(queue, job.simulation_run_id, timeout_s)
    job.update(state=JobState.COMPUTING)
    return expected_limits_from_run(
        estimator,
        run_dir,
        grid_size=job.grid_size,
        level=job.level,
        seed=job.seed,
        simulation={"backend": "workers", "run_dir": str(run_dir)},
    )


def _run_job(job: LimitsJob, compute: Callable[[], ExpectedLimits]) -> None:
    start = time.perf_counter()
    try:
        result = compute()
    except Exception as error:  # a background job has no caller to raise to
        log.exception("expected limits %s failed", job.id)
        job.update(
            error=f"{type(error).__name__}: {error}",
            state=JobState.FAILED,
            finished_at=time.time(),
        )
    else:
        job.update(result=result, state=JobState.COMPLETED, finished_at=time.time())
        log.info(
            "expected limits %s: %d mocks, estimator %s, %.1f s",
            job.id,
            job.n_mocks,
            job.estimator_id,
            time.perf_counter() - start,
        )


def _enqueue_null_run(
    job: LimitsJob, config: AnalysisConfig, settings: ApiSettings, queue: SimulationQueue
) -> Path:
    """Create the no-ALP simulation run and send its batches to the workers.

    Raises BrokerUnavailableError (503 through the app's handler) when the broker is down.
    """
    queue.check_broker(timeout_s=settings.broker_timeout_s)

    # The run folder and its manifest, as POST /v1/simulations creates them.
    null_config = null_hypothesis_config(config)
    run_id = new_run_id()
    run_dir = (settings.data_dir / run_id).resolve()
    batch_size = max(1, -(-job.n_mocks // MAX_WORKER_BATCHES))
    try:
        manifest = start_run(
            null_config,
            run_dir,
            n_simulations=job.n_mocks,
            batch_size=batch_size,
            run_seed=job.seed,
            run_id=run_id,
        )
    except (IRFNotFoundError, ValueError) as error:
        raise validation_error(("config",), str(error)) from None

    # Progress record first, then the batches, so workers find the run they report to.
    queue.store.create_run(
        run_id=run_id,
        config_name=null_config.name,
        config_hash=config_hash(null_config),
        n_simulations=job.n_mocks,
        batch_size=batch_size,
        n_batches=manifest.n_batches,
        run_seed=job.seed,
        run_dir=str(run_dir),
    )
    queue.enqueue_run(
        run_id=run_id,
        config_json=config_to_json(null_config),
        n_simulations=job.n_mocks,
        batch_size=batch_size,
        run_seed=job.seed,
        n_batches=manifest.n_batches,
    )
    job.simulation_run_id = run_id
    log.info(
        "expected limits %s: %d mocks sent to the workers as run %s", job.id, job.n_mocks, run_id
    )
    return run_dir


# --- routes ----------------------------------------------------------------------------

router = APIRouter(
    prefix="/expected-limits", tags=["expected-limits"], route_class=SizeLimitedRoute
)


def _resolve_config(name: str | None, estimator: LoadedEstimator) -> AnalysisConfig:
    if name is None:
        return estimator.config
    shipped = list_shipped_configs()
    if name not in shipped:
        raise validation_error(
            ("config",), f"unknown shipped config {name!r}: choose one of {shipped}"
        )
    try:
        return load_config(name)
    except ConfigError as error:
        raise validation_error(("config",), str(error)) from None


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=None,
    responses={
        202: {"model": ExpectedLimitsPublic},
        404: {"model": ErrorDetail, "description": "unknown estimator"},
        503: {"model": ErrorDetail, "description": "broker down (backend 'workers')"},
    },
    summary="Start an expected-limits job",
)
def create_expected_limits(
    body: ExpectedLimitsCreate,
    request: Request,
    background: BackgroundTasks,
    settings: SettingsDep,
    queue: QueueDep,
) -> OrjsonResponse:
    """Check the request, start the job and respond 202 with its state.

    The config (default: the estimator's own) must have the estimator's energy binning.
    """
    if body.n_mocks > settings.max_expected_limit_mocks:
        raise validation_error(
            ("n_mocks",),
            f"n_mocks={body.n_mocks} exceeds the limit of {settings.max_expected_limit_mocks} "
            "(ALPNRE_MAX_EXPECTED_LIMIT_MOCKS)",
        )
    if body.grid_size > settings.max_grid_size:
        raise validation_error(
            ("grid_size",),
            f"grid_size={body.grid_size} exceeds the limit of {settings.max_grid_size} "
            "(ALPNRE_MAX_GRID_SIZE)",
        )
    if body.estimator_id == "latest" and body.config is None:
        raise validation_error(("config",), "estimator_id 'latest' needs 'config', the config name")
    reference = f"latest:{body.config}" if body.estimator_id == "latest" else body.estimator_id
    estimator = load_registry_estimator(get_inference_state(request), reference)
    config = _resolve_config(body.config, estimator)
    try:
        check_estimator_matches(config, estimator)
    except ValueError as error:
        raise validation_error(("config",), str(error)) from None

    backend = body.backend
    if backend == "auto":
        backend = "local" if body.n_mocks <= settings.local_expected_limit_mocks else "workers"
    job = LimitsJob(
        id=f"limits-{uuid.uuid4().hex[:12]}",
        backend=backend,
        estimator_id=estimator.estimator_id,
        config_name=config.name,
        n_mocks=body.n_mocks,
        seed=body.seed,
        grid_size=body.grid_size,
        level=body.level,
    )
    compute: Callable[[], ExpectedLimits]
    if backend == "workers":
        run_dir = _enqueue_null_run(job, config, settings, queue)
        timeout_s = settings.expected_limits_timeout_s

        def compute() -> ExpectedLimits:
            return _run_on_workers(job, estimator, queue, run_dir, timeout_s)
    else:

        def compute() -> ExpectedLimits:
            return _run_local(job, config, estimator)

    _job_store(request).add(job)
    background.add_task(_run_job, job, compute)
    base_path = request.url.path.rstrip("/")
    return OrjsonResponse(
        job.to_dict(base_path),
        status_code=status.HTTP_202_ACCEPTED,
        headers={"Location": f"{base_path}/{job.id}"},
    )


def _get_job(request: Request, job_id: str) -> LimitsJob:
    job = _job_store(request).get(job_id)
    if job is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"expected-limits job {job_id!r} not found; the latest "
            "ALPNRE_EXPECTED_LIMITS_STORE_SIZE jobs are kept",
        )
    return job


@router.get(
    "/{job_id}",
    response_model=None,
    responses={200: {"model": ExpectedLimitsPublic}, 404: {"model": ErrorDetail}},
    summary="Get an expected-limits job",
)
def get_expected_limits(job_id: str, request: Request) -> OrjsonResponse:
    """Return the job's state, and its result once ``state`` is ``completed``."""
    job = _get_job(request, job_id)
    base_path = request.url.path.rstrip("/").rsplit("/", 1)[0]
    return OrjsonResponse(job.to_dict(base_path))


def _limits_figure(job: LimitsJob, image_format: str) -> bytes:
    result = job.result
    assert result is not None
    if image_format not in job.figures:
        published = load_published_limits()
        job.figures[image_format] = render_figure(
            lambda: plot_expected_limits(result, published), image_format
        )
    return job.figures[image_format]


def _figure_route(image_format: str) -> Callable[[str, Request], Coroutine[Any, Any, Response]]:
    async def get_figure(job_id: str, request: Request) -> Response:
        job = _get_job(request, job_id)
        if job.state != JobState.COMPLETED:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"expected-limits job {job_id} is {job.state.value}; the figure exists once it "
                "is completed",
            )
        content = await run_in_threadpool(_limits_figure, job, image_format)
        return Response(content, media_type=FIGURE_MEDIA_TYPES[image_format])

    get_figure.__doc__ = (
        f"Return the expected limits over published limits as {image_format.upper()}."
    )
    return get_figure


for _format in FIGURE_MEDIA_TYPES:
    router.add_api_route(
        f"/{{job_id}}/figure.{_format}",
        _figure_route(_format),
        methods=["GET"],
        response_class=Response,
        responses={
            200: {"content": {FIGURE_MEDIA_TYPES[_format]: {}}},
            404: {"model": ErrorDetail},
            409: {"model": ErrorDetail, "description": "job not completed"},
        },
        summary=f"Expected-limits figure ({_format.upper()})",
        name=f"get_expected_limits_figure_{_format}",
    )
