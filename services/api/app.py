"""The HTTP API of alpnre.

Serve it with::

    uvicorn services.api.app:app --host 127.0.0.1 --port 8000

Settings come from ``ALPNRE_*`` environment variables (see
:class:`~services.api.settings.ApiSettings`). Interactive documentation is at
``/docs``, the OpenAPI schema at ``/openapi.json``.
"""

from __future__ import annotations

import logging

import alpnre
import redis
from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse

from services.api.routes import (
    estimators,
    expected_limits,
    health,
    posteriors,
    simulations,
    training_runs,
    validation,
)
from services.api.settings import ApiSettings
from services.simulator.client import BrokerUnavailableError, SimulationQueue
from services.simulator.progress import ProgressStore

__all__ = ["API_PREFIX", "V1_ROUTERS", "app", "create_app"]

log = logging.getLogger(__name__)

API_PREFIX = "/v1"

# One router per resource, all mounted under /v1.
V1_ROUTERS = [
    simulations.router,
    training_runs.router,
    estimators.router,
    posteriors.router,
    expected_limits.router,
    validation.router,
]


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    """Build the API for ``settings`` (default: read from the environment).

    Nothing connects to Redis here. The first request that needs the broker or the
    progress store connects, so the app starts while they are down and ``/readyz``
    reports it.
    """
    settings = settings or ApiSettings()
    app = FastAPI(
        title="alpnre",
        version=alpnre.__version__,
        description="Simulation runs for neural ratio estimation of axion-like particles "
        "from gamma-ray spectra of NGC 1275.",
    )
    store = ProgressStore.from_url(
        settings.progress_url or settings.broker_url,
        prefix=settings.key_prefix,
        timeout_s=settings.broker_timeout_s,
    )
    app.state.settings = settings
    app.state.simulation_queue = SimulationQueue(settings.simulator_settings(), store)

    app.include_router(health.router)
    for router in V1_ROUTERS:
        app.include_router(router, prefix=API_PREFIX)
    app.add_exception_handler(BrokerUnavailableError, _broker_unavailable)
    app.add_exception_handler(redis.ConnectionError, _progress_store_unavailable)
    app.add_exception_handler(redis.TimeoutError, _progress_store_unavailable)
    return app


async def _broker_unavailable(request: Request, error: Exception) -> JSONResponse:
    log.error("%s %s: %s", request.method, request.url.path, error)
    return JSONResponse({"detail": str(error)}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)


async def _progress_store_unavailable(request: Request, error: Exception) -> JSONResponse:
    queue: SimulationQueue = request.app.state.simulation_queue
    return await _broker_unavailable(request, queue.unavailable(error))


def _configure_logging() -> None:
    # The services.* loggers propagate to the root logger, which uvicorn leaves bare.
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )


_configure_logging()
app = create_app()
