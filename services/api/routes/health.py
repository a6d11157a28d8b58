"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter

from services.api.deps import QueueDep, SettingsDep
from services.api.schemas import ErrorDetail

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness probe")
def healthz() -> dict[str, str]:
    """Respond 200 while the process serves requests; checks no dependency."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness probe",
    responses={503: {"model": ErrorDetail, "description": "broker or progress store down"}},
)
def readyz(settings: SettingsDep, queue: QueueDep) -> dict[str, str]:
    """Respond 200 when the broker and the progress store accept a connection, else 503."""
    queue.check_broker(timeout_s=settings.broker_timeout_s)
    return {"status": "ready", "broker": queue.broker_location}
