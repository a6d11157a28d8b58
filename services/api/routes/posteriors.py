"""``/v1/posteriors``: posteriors, credible regions and upper limits of observed spectra.

A request names an estimator of the registry and one or more observations: counts in a
JSON body, uploaded OGIP PHA or gammapy ``SpectrumDatasetOnOff`` files (multipart), or
rows of simulation runs. The response has one posterior per observation, each computed on
its own, in request order.
Estimators stay loaded in an LRU cache of each API process. Posteriors are kept in the
state folder (``ALPNRE_STATE_DIR``) that every API process reads, so that their corner
plots can be fetched later from any of them.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import orjson
import torch
from alpnre.dataset import DatasetError
from alpnre.observations import (
    Observation,
    ObservationError,
    check_energy_edges,
    estimator_energy_edges,
    read_simulation_row,
    read_spectrum_file,
)
from alpnre.posterior import Marginal1D, Posterior, check_observation, compute_posterior
from alpnre.registry import (
    EstimatorNotFoundError,
    LoadedEstimator,
    load_estimator,
    resolve_estimator,
)
from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from services.api.schemas import ErrorDetail
from services.api.schemas_posteriors import (
    CountsObservation,
    PosteriorBatchPublic,
    PosteriorCreate,
    PosteriorOptions,
    PosteriorPublic,
    RunRowObservation,
)
from services.api.settings import ApiSettings
from services.api.state_store import SharedStore
from services.simulator.progress import RUN_ID_PATTERN

__all__ = [
    "EstimatorCache",
    "InferenceState",
    "OrjsonResponse",
    "PosteriorStore",
    "SizeLimitedRoute",
    "get_inference_state",
    "load_registry_estimator",
    "render_figure",
    "router",
    "validation_error",
]

log = logging.getLogger(__name__)

VALIDATION_REPORT = Path("validation") / "report.json"
VERDICTS = ("calibrated", "conservative", "overconfident")
FIGURE_MEDIA_TYPES = {"png": "image/png", "svg": "image/svg+xml"}


class OrjsonResponse(Response):
    """JSON response serialised with orjson, which also writes numpy arrays.

    orjson writes NaN and infinities as null, so payloads encode them explicitly
    before they get here (see ``log_ratio_nonfinite``).
    """

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


# --- request size limit -----------------------------------------------------------------


def _too_large(limit: int) -> HTTPException:
    return HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE,
        f"request body exceeds the limit of {limit} bytes (ALPNRE_MAX_REQUEST_BYTES); send "
        "fewer observations per request",
    )


class _SizeLimitedRequest(Request):
    """A request whose body stream raises 413 once it passes ``max_bytes``.

    ``body()``, ``json()`` and ``form()`` all read through ``stream()``, so the limit
    also holds for chunked bodies, which have no Content-Length.
    """

    max_bytes: int = 0

    async def stream(self) -> AsyncGenerator[bytes, None]:
        received = 0
        async for chunk in super().stream():
            received += len(chunk)
            if received > self.max_bytes:
                raise _too_large(self.max_bytes)
            yield chunk


class SizeLimitedRoute(APIRoute):
    """Route class that rejects bodies larger than ``ALPNRE_MAX_REQUEST_BYTES`` with 413."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def limited_handler(request: Request) -> Response:
            settings = cast(ApiSettings, request.app.state.settings)
            limit = settings.max_request_bytes
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise _too_large(limit)
            limited = _SizeLimitedRequest(request.scope, request.receive)
            limited.max_bytes = limit
            return await handler(limited)

        return limited_handler


# --- estimator cache and posterior store --------------------------------------------------


def _local_registry(registry: str) -> Path:
    if registry.startswith("file://"):
        return Path(registry.removeprefix("file://"))
    if "://" in registry:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"posterior queries read estimators from a local folder, but ALPNRE_REGISTRY is "
            f"{registry!r}; mount the registry and set ALPNRE_REGISTRY to its path",
        )
    return Path(registry)


def _inference_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


class EstimatorCache:
    """Loaded estimators by folder, least recently used dropped first.

    Estimator folders never change after publication, so a folder is loaded (and its
    checksum verified) once. ``latest:<config>`` is resolved on every call, so a newly
    published estimator is used from the next request on.
    """

    def __init__(self, registry: Path, size: int, device: str) -> None:
        self.registry = registry
        self.size = size
        self.device = device
        self._estimators: OrderedDict[Path, LoadedEstimator] = OrderedDict()
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()

    def resolve(self, reference: str) -> Path:
        """Folder of an estimator id or ``latest:<config>`` inside the registry."""
        if reference.startswith("latest"):
            return resolve_estimator(reference, self.registry)
        folder = self.registry / "estimators" / reference
        if not (folder / "estimator.json").exists():
            raise EstimatorNotFoundError(
                f"estimator {reference!r} not found in the registry at {self.registry}"
            )
        return folder

    def get(self, reference: str) -> LoadedEstimator:
        """Return the loaded estimator, loading it on first use."""
        folder = self.resolve(reference).resolve()
        with self._lock:
            if folder in self._estimators:
                self._estimators.move_to_end(folder)
                return self._estimators[folder]
        # One load at a time, so concurrent first requests do not load the same weights twice.
        with self._load_lock:
            with self._lock:
                if folder in self._estimators:
                    return self._estimators[folder]
            start = time.perf_counter()
            estimator = load_estimator(folder, device=self.device)
            log.info(
                "loaded estimator %s on %s in %.2f s",
                estimator.estimator_id,
                self.device,
                time.perf_counter() - start,
            )
            with self._lock:
                self._estimators[folder] = estimator
                while len(self._estimators) > self.size:
                    dropped, _ = self._estimators.popitem(last=False)
                    log.info("estimator cache full, dropped %s", dropped.name)
        return estimator


@dataclass
class StoredPosterior:
    """A computed posterior with the input it came from and its rendered figures."""

    posterior: Posterior
    observation: Observation
    validation: dict[str, Any] | None
    figures: dict[str, bytes] = field(default_factory=dict)


class PosteriorStore:
    """Posteriors by id, in memory (LRU) and in the state folder that all API processes read."""

    def __init__(self, size: int, folder: Path | None = None) -> None:
        self.size = size
        self._store: SharedStore[StoredPosterior] = SharedStore(folder, size)

    def add(self, item: StoredPosterior) -> str:
        """Store a posterior and return its new id."""
        posterior_id = f"post-{uuid.uuid4().hex[:16]}"
        self._store.put(posterior_id, item)
        return posterior_id

    def get(self, posterior_id: str) -> StoredPosterior | None:
        return self._store.get(posterior_id)


@dataclass
class InferenceState:
    """Per-app state of the inference routes, created on first use."""

    estimators: EstimatorCache
    posteriors: PosteriorStore
    extras: dict[str, Any] = field(default_factory=dict)


_STATE_LOCK = threading.Lock()


def get_inference_state(request: Request) -> InferenceState:
    """Return the app's estimator cache and posterior store, creating them once."""
    state = getattr(request.app.state, "inference", None)
    if state is not None:
        return cast(InferenceState, state)
    with _STATE_LOCK:
        state = getattr(request.app.state, "inference", None)
        if state is None:
            settings = cast(ApiSettings, request.app.state.settings)
            device = _inference_device(settings.inference_device)
            torch.set_num_threads(settings.inference_threads)
            state = InferenceState(
                estimators=EstimatorCache(
                    _local_registry(settings.registry), settings.estimator_cache_size, device
                ),
                posteriors=PosteriorStore(
                    settings.posterior_store_size, settings.resolved_state_dir / "posteriors"
                ),
            )
            request.app.state.inference = state
            log.info("posterior queries: registry %s, device %s", settings.registry, device)
    return cast(InferenceState, state)


# --- figures ---------------------------------------------------------------------------

# pyplot keeps global state, so figures are drawn one at a time.
_FIGURE_LOCK = threading.Lock()


def render_figure(draw: Callable[[], Any], image_format: str) -> bytes:
    """Draw a matplotlib figure with ``draw()`` and return it as PNG or SVG bytes."""
    import io

    import matplotlib.pyplot as plt

    with _FIGURE_LOCK:
        figure = draw()
        try:
            buffer = io.BytesIO()
            figure.savefig(buffer, format=image_format, dpi=110)
        finally:
            plt.close(figure)
    return buffer.getvalue()


def _posterior_figure(item: StoredPosterior, image_format: str) -> bytes:
    from alpnre.posterior import plot_posterior

    if image_format not in item.figures:
        item.figures[image_format] = render_figure(
            lambda: plot_posterior(item.posterior), image_format
        )
    return item.figures[image_format]


# --- validation report -----------------------------------------------------------------


def read_validation_summary(folder: Path) -> dict[str, Any] | None:
    """Summarise ``<estimator folder>/validation/report.json``, or None without one.

    The verdict is the first value 'calibrated', 'conservative' or 'overconfident'
    found in the report. Numbers are its scalar fields up to three levels deep, keyed
    by dotted path; non-finite numbers become null.
    """
    path = folder / VALIDATION_REPORT
    if not path.is_file():
        return None
    try:
        # The standard library parser, unlike orjson, accepts the NaN that json.dumps writes.
        report = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        log.warning("estimator %s: cannot read %s: %s", folder.name, path, error)
        return {"verdict": None, "numbers": {}, "report": str(VALIDATION_REPORT)}
    numbers: dict[str, Any] = {}
    verdicts: list[str] = []
    _collect_scalars(report, "", numbers, verdicts, depth=0)
    return {
        "verdict": verdicts[0] if verdicts else None,
        "numbers": numbers,
        "report": str(VALIDATION_REPORT),
    }


def _collect_scalars(
    value: Any, prefix: str, numbers: dict[str, Any], verdicts: list[str], depth: int
) -> None:
    if isinstance(value, dict) and depth < 3:
        for key, item in value.items():
            _collect_scalars(item, f"{prefix}{key}.", numbers, verdicts, depth + 1)
        return
    key = prefix.rstrip(".") or "value"
    if isinstance(value, bool | int | str) or value is None:
        numbers[key] = value
        if isinstance(value, str) and value.lower() in VERDICTS:
            verdicts.append(value.lower())
    elif isinstance(value, float):
        numbers[key] = value if math.isfinite(value) else None


# --- request parsing -------------------------------------------------------------------


def validation_error(location: Sequence[str | int], message: str) -> RequestValidationError:
    # Same shape as FastAPI's own 422 bodies: a list of {loc, msg, type}.
    return RequestValidationError(
        [{"loc": ("body", *location), "msg": message, "type": "value_error"}]
    )


@dataclass
class _ParsedRequest:
    options: PosteriorOptions
    counts: list[tuple[int, CountsObservation]] = field(default_factory=list)
    rows: list[tuple[int, RunRowObservation]] = field(default_factory=list)
    files: list[tuple[int, UploadFile]] = field(default_factory=list)

    @property
    def n_observations(self) -> int:
        return len(self.counts) + len(self.rows) + len(self.files)


async def _parse_request(request: Request, settings: ApiSettings) -> _ParsedRequest:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        body = await request.body()
        try:
            parsed = PosteriorCreate.model_validate_json(body)
        except ValidationError as error:
            raise RequestValidationError(error.errors(include_url=False)) from None
        result = _ParsedRequest(options=parsed)
        for index, observation in enumerate(parsed.observations):
            if isinstance(observation, CountsObservation):
                result.counts.append((index, observation))
            else:
                result.rows.append((index, observation))
        return result
    if content_type == "multipart/form-data":
        form = await request.form(
            # One file more than allowed, so the count check below rejects with a 422.
            max_files=settings.max_observations + 1,
            max_fields=100,
            max_part_size=1024 * 1024,
        )
        return _parse_form(form)
    raise HTTPException(
        status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
        f"unsupported content type {content_type or '(none)'!r}: send application/json with "
        "'observations', or multipart/form-data with spectrum files in 'files'",
    )


def _parse_form(form: FormData) -> _ParsedRequest:
    values: dict[str, Any] = {}
    for key in ("estimator_id", "config", "grid_size", "include_figures"):
        value = form.get(key)
        if isinstance(value, str):
            values[key] = value
    for key in ("levels", "marginals"):
        items = [item for item in form.getlist(key) if isinstance(item, str)]
        # Accept both repeated fields and one comma-separated field.
        split = [part.strip() for item in items for part in item.split(",") if part.strip()]
        if split:
            values[key] = split
    unknown = sorted(set(form.keys()) - {*values, "levels", "marginals", "files"})
    if unknown:
        raise validation_error(
            ("form",),
            f"unknown form fields {unknown}: expected estimator_id, config, grid_size, "
            "levels, marginals, include_figures and files",
        )
    try:
        options = PosteriorOptions.model_validate(_coerce_form_numbers(values))
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False)) from None
    files = [item for item in form.getlist("files") if isinstance(item, UploadFile)]
    if not files:
        raise validation_error(
            ("files",), "no spectrum file uploaded: send one or more files in the 'files' field"
        )
    return _ParsedRequest(options=options, files=list(enumerate(files)))


def _coerce_form_numbers(values: dict[str, Any]) -> dict[str, Any]:
    # Form fields arrive as strings, but grid_size is a strict integer in the JSON schema.
    coerced = dict(values)
    grid_size = coerced.get("grid_size")
    if isinstance(grid_size, str) and grid_size.strip().lstrip("-").isdigit():
        coerced["grid_size"] = int(grid_size)
    return coerced


def _check_options(
    options: PosteriorOptions, estimator: LoadedEstimator, settings: ApiSettings
) -> None:
    if options.grid_size > settings.max_grid_size:
        raise validation_error(
            ("grid_size",),
            f"grid_size={options.grid_size} exceeds the limit of {settings.max_grid_size} "
            "(ALPNRE_MAX_GRID_SIZE)",
        )
    available = list(estimator.spec.one_dim)
    unknown = [name for name in options.marginals or [] if name not in available]
    if unknown:
        raise validation_error(
            ("marginals",),
            f"estimator {estimator.estimator_id} has no 1-dim marginal {unknown}; "
            f"available: {available}",
        )


def load_registry_estimator(state: InferenceState, reference: str) -> LoadedEstimator:
    """Load an estimator of the registry, raising 404 when unknown and 503 when corrupt."""
    try:
        return state.estimators.get(reference)
    except EstimatorNotFoundError as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
    except ValueError as error:
        # The folder exists but its weights or metadata fail the checksum.
        log.error("estimator %s cannot be loaded: %s", reference, error)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"estimator {reference!r} cannot be loaded: {error}; republish it",
        ) from None


async def _load_estimator(state: InferenceState, options: PosteriorOptions) -> LoadedEstimator:
    try:
        reference = options.estimator_reference()
    except ValueError as error:
        raise validation_error(("config",), str(error)) from None
    return await run_in_threadpool(load_registry_estimator, state, reference)


def _check_counts(
    observation: Observation, estimator: LoadedEstimator, location: tuple[str | int, ...]
) -> Observation:
    """Check the energy axis (of files and runs) and the counts; raise 422 naming the input."""
    if observation.energy_edges_tev is not None:
        expected = estimator_energy_edges(estimator.metadata, estimator.config)
        try:
            check_energy_edges(observation.energy_edges_tev, expected, observation.name)
        except ObservationError as error:
            raise validation_error(location, str(error)) from None
    try:
        observation.counts = check_observation(observation.counts, estimator.spec.n_bins)
    except ValueError as error:
        raise validation_error(location, f"{observation.name}: {error}") from None
    return observation


async def _collect_observations(
    parsed: _ParsedRequest, estimator: LoadedEstimator, settings: ApiSettings
) -> list[Observation]:
    """Read and check every observation; raise 422 or 404 naming the first bad one."""
    slots: dict[int, Observation] = {}
    for index, item in parsed.counts:
        observation = Observation(
            counts=np.asarray(item.counts, dtype=float),
            source="counts",
            name=item.name or f"observations[{index}]",
        )
        slots[index] = _check_counts(observation, estimator, ("observations", index, "counts"))
    for index, row in parsed.rows:
        observation = await run_in_threadpool(_read_run_row, row, settings, index)
        slots[index] = _check_counts(observation, estimator, ("observations", index))
    for index, upload in parsed.files:
        content = await upload.read()
        name = upload.filename or f"files[{index}]"
        try:
            observation = await run_in_threadpool(read_spectrum_file, content, name)
        except ObservationError as error:
            raise validation_error(("files", index), str(error)) from None
        slots[index] = _check_counts(observation, estimator, ("files", index))
    return [slots[index] for index in sorted(slots)]


def _read_run_row(row: RunRowObservation, settings: ApiSettings, index: int) -> Observation:
    run_dir = settings.data_dir / row.run_id
    if not RUN_ID_PATTERN.match(row.run_id) or not (run_dir / "manifest.json").is_file():
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"observations[{index}]: simulation run {row.run_id!r} not found in "
            f"{settings.data_dir}",
        )
    try:
        return read_simulation_row(run_dir, row.row)
    except (ObservationError, DatasetError) as error:
        raise validation_error(("observations", index, "row"), str(error)) from None


# --- response --------------------------------------------------------------------------


def _nonfinite(values: np.ndarray[Any, Any]) -> list[dict[str, Any]]:
    entries = []
    for index in np.flatnonzero(~np.isfinite(values)):
        value = float(values[index])
        if math.isnan(value):
            label = "nan"
        elif value > 0:
            label = "inf"
        else:
            label = "-inf"
        entries.append({"index": int(index), "value": label})
    return entries


def _prior_density(marginal: Marginal1D) -> list[float]:
    finite = np.isfinite(marginal.log_prior)
    if not finite.any():
        return [0.0] * len(marginal.grid)
    shifted = np.where(finite, marginal.log_prior - marginal.log_prior[finite].max(), -np.inf)
    density = np.exp(shifted)
    step = float(marginal.grid[1] - marginal.grid[0])
    return cast(list[float], (density / (density.sum() * step)).tolist())


def posterior_payload(posterior_id: str, item: StoredPosterior, base_path: str) -> dict[str, Any]:
    """Build the JSON body of one posterior (schema: ``PosteriorPublic``)."""
    payload = item.posterior.to_dict(compact=True)
    for name, marginal in item.posterior.one_dim.items():
        entry = payload["marginals_1d"][name]
        entry["log_ratio_nonfinite"] = _nonfinite(marginal.log_ratio)
        entry["prior_density"] = _prior_density(marginal)
    return {
        "id": posterior_id,
        "figure_png": f"{base_path}/{posterior_id}/figure.png",
        "figure_svg": f"{base_path}/{posterior_id}/figure.svg",
        "observation": item.observation.describe(),
        **payload,
        "validation": item.validation,
    }


def _compute_all(
    estimator: LoadedEstimator,
    observations: list[Observation],
    options: PosteriorOptions,
    state: InferenceState,
    base_path: str,
) -> list[dict[str, Any]]:
    validation = read_validation_summary(estimator.path)
    answers = []
    for observation in observations:
        try:
            posterior = compute_posterior(
                estimator,
                observation.counts,
                grid_size=options.grid_size,
                levels=options.levels,
                marginals=options.marginals,
                truth=observation.truth,
            )
        except ValueError as error:
            raise ValueError(f"{observation.name}: {error}") from None
        item = StoredPosterior(posterior, observation, validation)
        posterior_id = state.posteriors.add(item)
        payload = posterior_payload(posterior_id, item, base_path)
        if options.include_figures:
            figure = _posterior_figure(item, "png")
            payload["figure_png_base64"] = base64.b64encode(figure).decode("ascii")
        answers.append(payload)
    return answers


# --- routes ----------------------------------------------------------------------------

router = APIRouter(prefix="/posteriors", tags=["posteriors"], route_class=SizeLimitedRoute)

_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorDetail, "description": "unknown estimator or simulation run"},
    413: {"model": ErrorDetail, "description": "request body too large"},
    415: {"model": ErrorDetail, "description": "neither JSON nor multipart"},
    503: {"model": ErrorDetail, "description": "estimator cannot be loaded"},
}

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["estimator_id", "files"],
    "properties": {
        "estimator_id": {"type": "string"},
        "config": {"type": "string"},
        "grid_size": {"type": "integer", "default": 100},
        "levels": {"type": "array", "items": {"type": "number"}},
        "marginals": {"type": "array", "items": {"type": "string"}},
        "include_figures": {"type": "boolean", "default": False},
        "files": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "OGIP PHA files (SPECTRUM + EBOUNDS) or gammapy "
            "SpectrumDatasetOnOff files (GADF)",
        },
    },
}


@router.post(
    "",
    response_model=None,
    responses={200: {"model": PosteriorBatchPublic}, **_ERRORS},
    summary="Compute posteriors of observed spectra",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/PosteriorCreate"}},
                "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            },
        }
    },
)
async def create_posteriors(request: Request) -> OrjsonResponse:
    """Evaluate the estimator on each observation and return marginals, regions and limits.

    Counts must be non-negative integers, one per energy bin of the estimator. Files
    must have the estimator's energy axis. Responds 422 naming the first bad
    observation, 404 for an unknown estimator or run, and 413 for a body above
    ALPNRE_MAX_REQUEST_BYTES.
    """
    start = time.perf_counter()
    settings = cast(ApiSettings, request.app.state.settings)
    state = get_inference_state(request)
    parsed = await _parse_request(request, settings)
    if parsed.n_observations > settings.max_observations:
        raise validation_error(
            ("observations",),
            f"{parsed.n_observations} observations exceed the limit of "
            f"{settings.max_observations} per request (ALPNRE_MAX_OBSERVATIONS)",
        )
    estimator = await _load_estimator(state, parsed.options)
    _check_options(parsed.options, estimator, settings)
    observations = await _collect_observations(parsed, estimator, settings)

    base_path = request.url.path.rstrip("/")
    try:
        answers = await run_in_threadpool(
            _compute_all, estimator, observations, parsed.options, state, base_path
        )
    except ValueError as error:
        raise validation_error(("observations",), str(error)) from None
    log.info(
        "estimator %s: %d posteriors in %.3f s",
        estimator.estimator_id,
        len(answers),
        time.perf_counter() - start,
    )
    return OrjsonResponse(
        {
            "estimator": {
                "estimator_id": estimator.estimator_id,
                "estimator_checksum": estimator.checksum,
                "config_name": estimator.config.name,
                "device": state.estimators.device,
            },
            "posteriors": answers,
            "timing_s": time.perf_counter() - start,
        }
    )


def _stored(request: Request, posterior_id: str) -> StoredPosterior:
    item = get_inference_state(request).posteriors.get(posterior_id)
    if item is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"posterior {posterior_id!r} not found; the latest ALPNRE_POSTERIOR_STORE_SIZE "
            "posteriors are kept, compute it again",
        )
    return item


@router.get(
    "/{posterior_id}",
    response_model=None,
    responses={200: {"model": PosteriorPublic}, 404: {"model": ErrorDetail}},
    summary="Get a stored posterior",
)
async def get_posterior(posterior_id: str, request: Request) -> OrjsonResponse:
    """Return a posterior computed earlier, in the form POST returned it."""
    item = _stored(request, posterior_id)
    base_path = request.url.path.rstrip("/").rsplit("/", 1)[0]
    payload = await run_in_threadpool(posterior_payload, posterior_id, item, base_path)
    return OrjsonResponse(payload)


def _figure_route(image_format: str) -> Callable[[str, Request], Coroutine[Any, Any, Response]]:
    async def get_figure(posterior_id: str, request: Request) -> Response:
        item = _stored(request, posterior_id)
        content = await run_in_threadpool(_posterior_figure, item, image_format)
        return Response(content, media_type=FIGURE_MEDIA_TYPES[image_format])

    get_figure.__doc__ = f"Return the corner plot of a stored posterior as {image_format.upper()}."
    return get_figure


for _format in FIGURE_MEDIA_TYPES:
    router.add_api_route(
        f"/{{posterior_id}}/figure.{_format}",
        _figure_route(_format),
        methods=["GET"],
        response_class=Response,
        responses={
            200: {"content": {FIGURE_MEDIA_TYPES[_format]: {}}},
            404: {"model": ErrorDetail},
        },
        summary=f"Corner plot of a posterior ({_format.upper()})",
        name=f"get_posterior_figure_{_format}",
    )
