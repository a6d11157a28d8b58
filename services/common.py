"""Parts shared by the simulation and the training service.

Both services send tasks through a Redis broker with Celery and keep their progress in
Redis. They share the broker and progress store settings, the Celery configuration of
a late-acknowledged queue, the producer's broker check and the progress store client.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Generic, Self, TypeVar, cast

import kombu.exceptions
import redis
from celery import Celery
from kombu.utils.url import maybe_sanitize_url
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "BROKER_ERRORS",
    "ID_PATTERN",
    "BrokerClient",
    "BrokerSettings",
    "BrokerUnavailableError",
    "RedisStore",
    "optional_float",
    "queue_celery_config",
    "register_task",
]

# Ids name folders, so they must not contain a path separator or start with a dot.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

BROKER_ERRORS: tuple[type[BaseException], ...] = (
    kombu.exceptions.OperationalError,
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
)


class BrokerUnavailableError(RuntimeError):
    """The broker or the progress store cannot be reached; the message names the URL."""


class BrokerSettings(BaseSettings):
    """Broker, progress store and retry delays, read from ``ALPNRE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="ALPNRE_", extra="ignore")

    broker_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis URL of the Celery broker"
    )
    progress_url: str | None = Field(
        None, description="Redis URL of the progress store; default: broker_url"
    )
    key_prefix: str = Field("alpnre", description="prefix of the progress store's Redis keys")
    retry_backoff_s: float = Field(2.0, gt=0, description="delay before the first retry")
    retry_backoff_max_s: float = Field(60.0, gt=0, description="maximum delay between retries")

    @property
    def progress_redis_url(self) -> str:
        """Redis URL of the progress store."""
        return self.progress_url or self.broker_url


def queue_celery_config(
    *,
    broker_url: str,
    queue: str,
    task_name: str,
    visibility_timeout_s: float,
    soft_time_limit_s: float,
    time_limit_s: float,
    log_format: str,
) -> dict[str, Any]:
    """Build the Celery configuration of a queue whose tasks are acknowledged late.

    A task is acknowledged only when it has finished, so the broker delivers a task
    again when its worker process dies.
    """
    return {
        "broker_url": broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": visibility_timeout_s},
        "task_default_queue": queue,
        "task_routes": {task_name: {"queue": queue}},
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_soft_time_limit": soft_time_limit_s,
        "task_time_limit": time_limit_s,
        "worker_log_format": log_format,
        "worker_task_log_format": log_format,
    }


def register_task(
    app: Celery, name: str, function: Callable[..., dict[str, Any]], max_retries: int
) -> None:
    """Register ``function`` as the bound, late-acknowledged task ``name`` of ``app``."""
    # shared=False: otherwise every Celery app in the process would run the first
    # registered closure, with the settings of the app that registered it.
    app.task(
        name=name,
        shared=False,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        max_retries=max_retries,
    )(function)


class RedisStore:
    """Base of the progress stores: a Redis client and the prefix of its keys."""

    def __init__(self, client: redis.Redis, prefix: str = "alpnre") -> None:
        self.client = client
        self.prefix = prefix

    @classmethod
    def from_url(cls, url: str, prefix: str = "alpnre", timeout_s: float = 5.0) -> Self:
        """Connect lazily to the Redis at ``url``; nothing is sent before the first call."""
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
        )
        return cls(client, prefix)

    def ping(self) -> None:
        """Raise ``redis.ConnectionError`` when the store cannot be reached."""
        self.client.ping()

    def _page_ids(self, index_key: str, offset: int, limit: int) -> tuple[list[str], int]:
        """Return a page of the ids in sorted set ``index_key``, newest first, and its size."""
        ids = cast(list[str], self.client.zrevrange(index_key, offset, offset + limit - 1))
        total = self.client.zcard(index_key)
        return ids, total


def optional_float(fields: dict[str, str], name: str) -> float | None:
    """Return field ``name`` as a float, or None when the hash lacks it."""
    value = fields.get(name)
    return float(value) if value is not None else None


SettingsT = TypeVar("SettingsT", bound=BrokerSettings)
StoreT = TypeVar("StoreT", bound=RedisStore)


class BrokerClient(Generic[SettingsT, StoreT]):
    """Producer side of a queue: the Celery app, its settings and the progress store."""

    def __init__(self, settings: SettingsT, store: StoreT, app: Celery) -> None:
        self.settings = settings
        self.store = store
        self.app = app

    @property
    def broker_location(self) -> str:
        """Broker URL without its password, for messages."""
        return str(maybe_sanitize_url(self.settings.broker_url))

    def unavailable(self, error: BaseException) -> BrokerUnavailableError:
        """Wrap a connection error in one that names the broker URL and the fix."""
        return BrokerUnavailableError(
            f"broker unavailable at {self.broker_location}: {error}; start redis-server or "
            "set ALPNRE_BROKER_URL to a reachable Redis"
        )

    def check_broker(self, timeout_s: float = 3.0) -> None:
        """Connect to the broker and the progress store once.

        Raises
        ------
        BrokerUnavailableError
            When either cannot be reached within ``timeout_s``.
        """
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, interval_start=0, timeout=timeout_s)
            self.store.ping()
        except BROKER_ERRORS as error:
            raise self.unavailable(error) from error
