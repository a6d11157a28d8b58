"""``/v1/estimators``: the published estimators of the registry."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, status

from services.api.deps import SettingsDep
from services.api.routes.training_runs import TrainerSettingsDep
from services.api.schemas import ErrorDetail
from services.api.schemas_training import EstimatorPage, EstimatorPublic, EstimatorSummary
from services.trainer.registry_store import RegistryStore

__all__ = ["RegistryDep", "get_registry", "router"]

router = APIRouter(prefix="/estimators", tags=["estimators"])


def get_registry(trainer_settings: TrainerSettingsDep) -> RegistryStore:
    """Return the registry of ``ALPNRE_REGISTRY`` (a folder or an fsspec URL)."""
    return RegistryStore(trainer_settings.registry)


RegistryDep = Annotated[RegistryStore, Depends(get_registry)]

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorDetail, "description": "no estimator with this id in the registry"}
}


@router.get("", response_model=EstimatorPage, summary="List published estimators")
def list_estimators(
    settings: SettingsDep,
    registry: RegistryDep,
    config_name: Annotated[
        str | None, Query(description="only estimators trained for this config")
    ] = None,
    offset: Annotated[int, Query(ge=0, description="estimators to skip, newest first")] = 0,
    limit: Annotated[int | None, Query(ge=1, description="page size")] = None,
) -> EstimatorPage:
    """List the registry's estimators, newest first, one page at a time."""
    page_size = min(limit or settings.default_page_size, settings.max_page_size)
    summaries = []
    for estimator_id in registry.estimator_ids():
        metadata = registry.read_metadata(estimator_id)
        if metadata is None or (config_name and metadata["config_name"] != config_name):
            continue
        summaries.append(EstimatorSummary.from_metadata(metadata))
    summaries.sort(key=lambda summary: (summary.created_at, summary.estimator_id), reverse=True)
    return EstimatorPage(
        items=summaries[offset : offset + page_size],
        total=len(summaries),
        offset=offset,
        limit=page_size,
    )


@router.get(
    "/{estimator_id}",
    response_model=EstimatorPublic,
    responses={**_NOT_FOUND},
    summary="Get a published estimator's metadata",
)
def get_estimator(
    estimator_id: Annotated[str, Path(description="estimator id, as listed")],
    registry: RegistryDep,
) -> EstimatorPublic:
    """Return an estimator's config, heads, training metrics, data, versions and validation."""
    metadata = registry.read_metadata(estimator_id)
    if metadata is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"estimator {estimator_id!r} not found in the registry at {registry.location}",
        )
    return EstimatorPublic.from_metadata(metadata, registry.read_validation_report(estimator_id))
