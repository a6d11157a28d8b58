"""``alpnre stack up|down|status``: the local service stack without Docker."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _describe(state: Any) -> None:
    log.info("API %s, broker %s, data %s", state.api_url, state.broker_url, state.data_dir)
    for process in state.processes:
        status = "running" if process.running else "stopped"
        log.info("  %-12s pid %-7d %-8s log %s", process.name, process.pid, status, process.log)


def cmd_stack(args: argparse.Namespace) -> int:
    from alpnre.stack import StackError, stack_down, stack_status, stack_up

    try:
        if args.action == "up":
            state = stack_up(
                workers=args.workers,
                api_port=args.api_port,
                data_dir=args.data_dir,
                redis_port=args.redis_port,
                concurrency=args.concurrency,
                broker_url=args.broker_url,
                state_dir=args.state_dir,
            )
            _describe(state)
            hint = f" --state-dir {args.state_dir}" if args.state_dir else ""
            log.info("stop it with: alpnre stack down%s", hint)
        elif args.action == "down":
            stopped = stack_down(state_dir=args.state_dir)
            log.info("stopped %d processes", len(stopped))
        else:
            current = stack_status(state_dir=args.state_dir)
            if current is None:
                log.info("no stack is running")
            else:
                _describe(current)
    except StackError as error:
        log.error("%s", error)
        return 1
    return 0


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "stack",
        help="start or stop Redis, simulation workers and the API on this machine",
        description="Run the simulation service locally without Docker: redis-server "
        "(unless --broker-url is given), N Celery workers and the FastAPI app.",
    )
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--workers", type=int, default=1, help="Celery worker processes")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="pool processes per worker (default: CPU cores)",
    )
    parser.add_argument(
        "--api-port", type=int, default=8000, help="port of the API on 127.0.0.1 (default: 8000)"
    )
    parser.add_argument(
        "--redis-port",
        type=int,
        default=6379,
        help="port of the stack's own redis-server (default: 6379)",
    )
    parser.add_argument(
        "--broker-url",
        default=None,
        help="use this Redis instead of starting one, e.g. redis://host:6379/0",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=Path("runs"), help="folder for simulation runs"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="folder for pids and logs (default: $ALPNRE_STACK_DIR, else "
        "~/.local/state/alpnre/stack)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.set_defaults(handler=cmd_stack)
