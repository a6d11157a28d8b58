"""A local service stack: redis-server, Celery simulation workers and the API.

:func:`stack_up` starts them as background processes and records their pids, commands
and log files in a state folder; :func:`stack_down` stops them; :func:`stack_status`
reports which still run. This is the single-machine counterpart of
``docker-compose.yml``, for development and for machines without Docker.

The state folder is ``$ALPNRE_STACK_DIR`` when set, else ``$XDG_STATE_HOME/alpnre/stack``
(``~/.local/state/alpnre/stack``). It contains ``stack.json`` and ``logs/``. When the
stack starts its own redis-server, Redis writes its append-only file there too, so
queued batches survive a restart of the stack.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

__all__ = [
    "StackError",
    "StackProcess",
    "StackState",
    "default_state_dir",
    "stack_down",
    "stack_status",
    "stack_up",
]

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"
QUEUE = "simulations"


class StackError(RuntimeError):
    """The stack cannot be started or stopped; the message names the cause and the fix."""


@dataclass
class StackProcess:
    """One process of the stack."""

    name: str
    pid: int
    command: list[str]
    log: str
    start_ticks: int | None = None

    @property
    def running(self) -> bool:
        """Whether the process still runs (a zombie or a reused pid counts as stopped)."""
        return _is_running(self.pid, self.start_ticks)


@dataclass
class StackState:
    """Record of the processes :func:`stack_up` started, stored as ``stack.json``."""

    state_dir: str
    broker_url: str
    api_url: str
    data_dir: str
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    processes: list[StackProcess] = field(default_factory=list)

    def save(self) -> None:
        """Write ``stack.json`` atomically."""
        path = Path(self.state_dir) / STATE_FILE
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(asdict(self), indent=2))
        os.replace(temporary, path)

    @classmethod
    def load(cls, state_dir: Path) -> StackState | None:
        """Read ``stack.json`` from ``state_dir``, or None when there is none."""
        path = state_dir / STATE_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        processes = [StackProcess(**item) for item in data.pop("processes")]
        return cls(**data, processes=processes)


def default_state_dir() -> Path:
    """Return the state folder: ``$ALPNRE_STACK_DIR``, else under ``$XDG_STATE_HOME``."""
    override = os.environ.get("ALPNRE_STACK_DIR")
    if override:
        return Path(override)
    state_home = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state_home) / "alpnre" / "stack"


def stack_up(
    workers: int = 1,
    api_port: int = 8000,
    data_dir: str | Path = "runs",
    redis_port: int = 6379,
    *,
    concurrency: int | None = None,
    broker_url: str | None = None,
    state_dir: str | Path | None = None,
    timeout_s: float = 60.0,
) -> StackState:
    """Start redis-server (unless a broker is given), ``workers`` Celery workers and the API.

    Parameters
    ----------
    workers
        Number of ``celery worker`` processes on the ``simulations`` queue.
    api_port
        Port of the API on 127.0.0.1.
    data_dir
        Folder of the run folders, shared by the API and the workers.
    redis_port
        Port on 127.0.0.1 of the redis-server started here.
    concurrency
        Pool processes per worker; default: the CPU cores divided among the workers.
    broker_url
        Use this Redis instead of starting one; default: ``$ALPNRE_BROKER_URL`` when
        set, else a redis-server started on ``redis_port``.
    state_dir
        Where pids and logs go; default: :func:`default_state_dir`.
    timeout_s
        Maximum wait for each component to become ready.

    Raises
    ------
    StackError
        When a stack already runs from ``state_dir``, a port is taken, no broker is
        available, or a component does not become ready (the stack is then stopped).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    state_path = Path(state_dir) if state_dir is not None else default_state_dir()
    _check_not_running(state_path)
    (state_path / "logs").mkdir(parents=True, exist_ok=True)
    data_path = Path(data_dir).resolve()
    data_path.mkdir(parents=True, exist_ok=True)
    _check_port_free(api_port, "API port: pass another api_port")

    broker_url = broker_url or os.environ.get("ALPNRE_BROKER_URL")
    state = StackState(
        state_dir=str(state_path),
        broker_url=broker_url or f"redis://127.0.0.1:{redis_port}/0",
        api_url=f"http://127.0.0.1:{api_port}",
        data_dir=str(data_path),
    )
    env = {
        **os.environ,
        "ALPNRE_BROKER_URL": state.broker_url,
        "ALPNRE_DATA_DIR": state.data_dir,
    }
    per_worker = concurrency or max(1, (os.cpu_count() or 1) // workers)
    try:
        if broker_url is None:
            _start_redis(state, redis_port, timeout_s)
        for number in range(1, workers + 1):
            _start_worker(state, env, number, per_worker)
        _start_training_worker(state, env)
        _start(state, env, "api", _api_command(api_port))
        for process in state.processes:
            if process.name.startswith("simulator"):
                _wait_for_worker(process, timeout_s)
        _wait_for_api(state, timeout_s)
    except BaseException:
        log.error("stack failed to start; stopping what was started (logs in %s)", state_path)
        stack_down(state_path)
        raise
    log.info(
        "stack up: API %s, %d simulation worker(s) x %d process(es), 1 training worker, "
        "broker %s, data %s",
        state.api_url,
        workers,
        per_worker,
        state.broker_url,
        state.data_dir,
    )
    return state


def stack_down(state_dir: str | Path | None = None, timeout_s: float = 20.0) -> list[StackProcess]:
    """Stop the stack's processes: API first, redis-server last; return those stopped.

    Each gets SIGTERM (Celery then finishes its running batches) and, when it still
    runs after ``timeout_s``, SIGKILL to its whole process group. Does nothing when
    no stack was started from ``state_dir``.
    """
    state_path = Path(state_dir) if state_dir is not None else default_state_dir()
    state = StackState.load(state_path)
    if state is None:
        log.info("no stack state in %s; nothing to stop", state_path)
        return []
    running = [process for process in reversed(state.processes) if process.running]
    for process in running:
        log.info("stopping %s (pid %d)", process.name, process.pid)
        _signal(process.pid, signal.SIGTERM)
        if process.name == "api":
            # The workers' warm shutdown can take long; stop the API before waiting.
            _wait_stopped(process, timeout_s)
    for process in running:
        if not _wait_stopped(process, timeout_s):
            log.warning(
                "%s (pid %d) still runs %g s after SIGTERM; killing it",
                process.name,
                process.pid,
                timeout_s,
            )
            _signal(process.pid, signal.SIGKILL, group=True)
            _wait_stopped(process, 5.0)
    (state_path / STATE_FILE).unlink(missing_ok=True)
    return running


def stack_status(state_dir: str | Path | None = None) -> StackState | None:
    """Return the recorded stack (check ``process.running`` of each), or None when none."""
    state_path = Path(state_dir) if state_dir is not None else default_state_dir()
    return StackState.load(state_path)


def _check_not_running(state_path: Path) -> None:
    state = StackState.load(state_path)
    if state is None:
        return
    alive = [
        f"{process.name} (pid {process.pid})" for process in state.processes if process.running
    ]
    if alive:
        raise StackError(
            f"a stack started from {state_path} still runs: {', '.join(alive)}; "
            "stop it first with 'alpnre stack down'"
        )
    (state_path / STATE_FILE).unlink()


def _check_port_free(port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise StackError(f"port {port} on 127.0.0.1 is already in use ({what})")


def _start(state: StackState, env: dict[str, str], name: str, command: list[str]) -> StackProcess:
    log_path = Path(state.state_dir) / "logs" / f"{name}.log"
    with open(log_path, "ab") as log_file:
        popen = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    process = StackProcess(
        name=name,
        pid=popen.pid,
        command=command,
        log=str(log_path),
        start_ticks=_start_ticks(popen.pid),
    )
    state.processes.append(process)
    state.save()
    log.info("started %s (pid %d), log %s", name, popen.pid, log_path)
    return process


def _start_redis(state: StackState, port: int, timeout_s: float) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        raise StackError(
            "redis-server not found on PATH: install it (apt-get install redis-server) or "
            "set ALPNRE_BROKER_URL to a running Redis"
        )
    _check_port_free(
        port,
        f"Redis port: pass another redis_port, or set ALPNRE_BROKER_URL="
        f"redis://127.0.0.1:{port}/0 to use the server that listens there",
    )
    command = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", state.state_dir,
        "--appendonly", "yes",
        "--save", "",
    ]  # fmt: skip
    process = _start(state, dict(os.environ), "redis", command)
    deadline = time.monotonic() + timeout_s
    while not _redis_answers(port):
        if not process.running or time.monotonic() > deadline:
            raise StackError(f"redis-server did not start; see {process.log}")
        time.sleep(0.1)


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _start_worker(state: StackState, env: dict[str, str], number: int, concurrency: int) -> None:
    command = [
        sys.executable, "-m", "celery",
        "-A", "services.simulator.celery_app",
        "worker",
        "-Q", QUEUE,
        "--pool", "prefork",
        "--concurrency", str(concurrency),
        "--hostname", f"simulator{number}@%h",
        "--loglevel", "INFO",
    ]  # fmt: skip
    _start(state, env, f"simulator-{number}", command)


def _start_training_worker(state: StackState, env: dict[str, str]) -> None:
    # One training process: a training uses every core, so trainings run one at a time.
    command = [
        sys.executable, "-m", "celery",
        "-A", "services.trainer.celery_app",
        "worker",
        "-Q", "training",
        "--pool", "prefork",
        "--concurrency", "1",
        "--hostname", "trainer@%h",
        "--loglevel", "INFO",
    ]  # fmt: skip
    _start(state, env, "trainer", command)


def _api_command(port: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "services.api.app:app",
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip


def _wait_for_worker(process: StackProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while " ready." not in Path(process.log).read_text(errors="replace"):
        if not process.running or time.monotonic() > deadline:
            raise StackError(f"{process.name} did not become ready; see {process.log}")
        time.sleep(0.1)


def _wait_for_api(state: StackState, timeout_s: float) -> None:
    api = next(process for process in state.processes if process.name == "api")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            response = httpx.get(f"{state.api_url}/readyz", timeout=5.0)
            if response.status_code == 200:
                return
            detail = response.text
        except httpx.TransportError as error:
            detail = str(error)
        if not api.running or time.monotonic() > deadline:
            raise StackError(f"the API did not become ready ({detail}); see {api.log}")
        time.sleep(0.2)


def _signal(pid: int, signum: signal.Signals, group: bool = False) -> None:
    try:
        if group:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _wait_stopped(process: StackProcess, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while process.running:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _start_ticks(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (Linux), to detect pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name; starttime is field 22 of proc(5).
    return int(stat.rsplit(")", 1)[1].split()[19])


def _is_running(pid: int, start_ticks: int | None) -> bool:
    # Reap the process when it is a child of this one, otherwise it stays a zombie.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        # No /proc (not Linux): trust the signal check.
        return not Path("/proc/self/stat").exists()
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return False
    return start_ticks is None or int(fields[19]) == start_ticks
