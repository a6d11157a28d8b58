"""Fixtures and helpers that run a real redis-server and Celery workers as subprocesses.

Load them with ``pytest_plugins = ["redis_fixtures"]`` and use the fixtures. Import the
classes for annotations only, under ``TYPE_CHECKING``: a module imported before pytest
loads it as a plugin escapes pytest's assertion rewriting, and pytest warns about it. The
``redis_server`` fixture skips the test when the ``redis-server`` binary is missing.
Each server listens on a free loopback port, keeps no data on disk and is stopped at
the end of the session.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

__all__ = [
    "CeleryWorker",
    "CeleryWorkerFactory",
    "RedisServer",
    "celery_worker_factory",
    "free_port",
    "free_port_factory",
    "redis_server",
    "start_celery_worker",
    "start_redis_server",
    "stop_process",
]

REDIS_SERVER_BINARY = shutil.which("redis-server")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """Send SIGTERM, then SIGKILL to the process group when it outlives ``timeout_s``.

    Processes started by the helpers here lead their own process group, so the
    SIGKILL also reaches children such as Celery's pool processes.
    """
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


@dataclass
class RedisServer:
    """A redis-server subprocess on 127.0.0.1."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def url(self, db: int = 0) -> str:
        """Redis URL of database ``db``."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        """A client of database ``db`` that decodes responses to str."""
        return redis.Redis.from_url(self.url(db), decode_responses=True)


def start_redis_server(directory: Path, timeout_s: float = 10.0) -> RedisServer:
    """Start redis-server on a free port with persistence off, and wait until it replies to PING."""
    if REDIS_SERVER_BINARY is None:
        raise FileNotFoundError("redis-server not found on PATH")
    port = free_port()
    log_path = directory / f"redis-{port}.log"
    command = [
        REDIS_SERVER_BINARY,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(directory),
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = RedisServer(port=port, process=process, log_path=log_path)
    client = server.client()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return server
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_process(process)
                raise RuntimeError(
                    f"redis-server on port {port} did not start: {log_path.read_text()}"
                ) from None
            time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server for the whole session; tests keep apart by using fresh ids or dbs."""
    if REDIS_SERVER_BINARY is None:
        pytest.skip("redis-server not found on PATH; install it (apt-get install redis-server)")
    server = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield server
    stop_process(server.process)


@dataclass
class CeleryWorker:
    """A ``celery worker`` subprocess and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_text(self) -> str:
        """Everything the worker has logged so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout_s: float = 30.0) -> None:
        """Wait until ``text`` appears in the log; raise TimeoutError with the log tail."""
        deadline = time.monotonic() + timeout_s
        while text not in self.log_text():
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{self.log_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{text!r} not in the log of worker {self.name} after {timeout_s} s:\n"
                    f"{self.log_text()[-4000:]}"
                )
            time.sleep(0.05)

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the worker (warm shutdown, then SIGKILL)."""
        stop_process(self.process, timeout_s)


def start_celery_worker(
    app_module: str,
    queue: str,
    *,
    log_path: Path,
    env: Mapping[str, str],
    concurrency: int = 2,
    name: str = "worker",
    timeout_s: float = 60.0,
) -> CeleryWorker:
    """Start ``celery -A app_module worker -Q queue`` with the prefork pool; wait until ready.

    ``env`` is added to this process's environment. Gossip, mingle and heartbeats are
    off because the tests start one worker per queue.
    """
    command = [
        sys.executable, "-m", "celery",
        "-A", app_module,
        "worker",
        "-Q", queue,
        "--pool", "prefork",
        "--concurrency", str(concurrency),
        "--hostname", f"{name}@%h",
        "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )
    worker = CeleryWorker(name=name, process=process, log_path=log_path)
    try:
        worker.wait_for_log(" ready.", timeout_s)
    except (TimeoutError, RuntimeError):
        worker.stop()
        raise
    return worker


CeleryWorkerFactory = Callable[..., CeleryWorker]


@pytest.fixture(scope="session")
def celery_worker_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[CeleryWorkerFactory]:
    """:func:`start_celery_worker` with a log file in a fresh temporary folder.

    Call it as ``factory(app_module, queue, env=..., concurrency=..., name=...)``.
    Workers still running at the end of the session are stopped.
    """
    started: list[CeleryWorker] = []

    def start(app_module: str, queue: str, **kwargs: Any) -> CeleryWorker:
        name = kwargs.get("name", "worker")
        log_path = tmp_path_factory.mktemp(f"celery-{name}") / "worker.log"
        worker = start_celery_worker(app_module, queue, log_path=log_path, **kwargs)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def free_port_factory() -> Callable[[], int]:
    """:func:`free_port`, for tests that need loopback ports."""
    return free_port
