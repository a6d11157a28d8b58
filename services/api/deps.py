"""FastAPI dependencies: the settings and the simulation queue stored on the app."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Request

from services.api.settings import ApiSettings
from services.simulator.client import SimulationQueue

__all__ = ["QueueDep", "SettingsDep", "get_queue", "get_settings"]


def get_settings(request: Request) -> ApiSettings:
    """Return the settings the app was created with."""
    return cast(ApiSettings, request.app.state.settings)


def get_queue(request: Request) -> SimulationQueue:
    """Return the app's simulation queue (broker client and progress store)."""
    return cast(SimulationQueue, request.app.state.simulation_queue)


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
QueueDep = Annotated[SimulationQueue, Depends(get_queue)]
