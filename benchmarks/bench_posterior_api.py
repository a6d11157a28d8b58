"""Latency and throughput of posterior queries through the HTTP API served by uvicorn.

Publishes an estimator of the shipped default config (200 energy bins, the default
network sizes of ``TrainingConfig``) with seeded random weights to a temporary
registry. Latency does not depend on what the weights learned, so no training is
needed. Starts ``uvicorn services.api.app:app`` (one process) on a free loopback port,
warms it up, then sends posterior queries of one observation each (1-dim marginals and
the 100 x 100 (log10 m, log10 g) grid, no figure):

1. one client, one request at a time: latency p50 and p99;
2. ``--clients`` concurrent clients (threads with their own httpx client): latency p50
   and p99, requests per second, errors.

Each request is timed from sending it to reading the whole response body. The clients
run on the same machine as the server and share its cores.

    python benchmarks/bench_posterior_api.py                  # 200 + 400 requests
    python benchmarks/bench_posterior_api.py --markdown       # also a results table
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from alpnre.config import load_config

SERVER_START_TIMEOUT_S = 60.0
TARGET_P50_S = 0.050
TARGET_P99_S = 0.200


@dataclass
class Measurement:
    """Latencies of one phase, in seconds, with its wall time and errors."""

    name: str
    clients: int
    latencies: np.ndarray
    wall_s: float
    errors: int

    @property
    def p50(self) -> float:
        return float(np.percentile(self.latencies, 50))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.latencies, 99))

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies) / self.wall_s


def publish_random_estimator(registry: Path, config_name: str, seed: int) -> str:
    """Publish an untrained estimator with the default network sizes; return its id."""
    import torch
    from alpnre.nre import (
        EstimatorSpec,
        RatioEstimator,
        TrainingConfig,
        default_heads,
        parameter_axes,
    )
    from alpnre.registry import publish_estimator

    torch.manual_seed(seed)
    config = load_config(config_name)
    names, one_dim, two_dim = default_heads(config)
    spec = EstimatorSpec(
        n_bins=config.observation.n_energy_bins,
        axes=parameter_axes(config, names),
        one_dim=one_dim,
        two_dim=two_dim,
        training=TrainingConfig(),
    )
    return publish_estimator(registry, RatioEstimator(spec), config)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(
    port: int, registry: Path, log_path: Path, workers: int
) -> subprocess.Popen[bytes]:
    """Start uvicorn (``workers`` processes) on 127.0.0.1:port and wait for /healthz."""
    env = {
        **os.environ,
        "ALPNRE_REGISTRY": str(registry),
        # No broker is needed for posterior queries; nothing listens on port 9.
        "ALPNRE_BROKER_URL": "redis://127.0.0.1:9/0",
        "ALPNRE_INFERENCE_DEVICE": "cpu",
    }
    command = [
        sys.executable, "-m", "uvicorn", "services.api.app:app",
        "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "warning", "--no-access-log", "--workers", str(workers),
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"uvicorn exited:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.terminate()
    raise TimeoutError(f"uvicorn did not respond within {SERVER_START_TIMEOUT_S} s")


def request_body(estimator_id: str, counts: list[int], grid_size: int) -> dict[str, object]:
    return {
        "estimator_id": estimator_id,
        "observations": [{"counts": counts}],
        "grid_size": grid_size,
        "include_figures": False,
    }


def run_phase(
    name: str, url: str, body: dict[str, object], clients: int, n_requests: int
) -> Measurement:
    """Send ``n_requests`` in all from ``clients`` threads; record each latency."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    per_client = [n_requests // clients + (i < n_requests % clients) for i in range(clients)]

    def client_loop(count: int) -> None:
        with httpx.Client(timeout=30.0) as client:
            for _ in range(count):
                start = time.perf_counter()
                try:
                    response = client.post(url, json=body)
                    ok = response.status_code == 200 and len(response.content) > 0
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    errors[0] += not ok

    threads = [threading.Thread(target=client_loop, args=(count,)) for count in per_client]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - start
    return Measurement(name, clients, np.asarray(latencies), wall_s, errors[0])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="ngc1275_cta_north_50h", help="shipped config")
    parser.add_argument("--grid-size", type=int, default=100, help="grid points per axis")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--sequential", type=int, default=200, help="requests of phase 1")
    parser.add_argument("--concurrent", type=int, default=400, help="requests of phase 2")
    parser.add_argument("--warmup", type=int, default=10, help="untimed requests first")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="also print a results table")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-posterior-") as folder:
        registry = Path(folder) / "registry"
        estimator_id = publish_random_estimator(registry, args.config, args.seed)
        port = free_port()
        server = start_server(port, registry, Path(folder) / "uvicorn.log", args.workers)
        try:
            url = f"http://127.0.0.1:{port}/v1/posteriors"
            bins = load_config(args.config).observation.n_energy_bins
            counts = np.random.default_rng(args.seed).poisson(20.0, size=bins).tolist()
            body = request_body(estimator_id, counts, args.grid_size)
            first = httpx.post(url, json=body, timeout=60.0)
            first.raise_for_status()
            response_kib = len(first.content) / 1024
            run_phase("warm-up", url, body, 1, args.warmup)
            results = [
                run_phase("sequential", url, body, 1, args.sequential),
                run_phase("concurrent", url, body, args.clients, args.concurrent),
            ]
        finally:
            server.terminate()
            server.wait(timeout=30)
    report(args, results, response_kib)
    return 0 if all(result.errors == 0 for result in results) else 1


def report(args: argparse.Namespace, results: list[Measurement], response_kib: float) -> None:
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}"
    print(
        f"posterior query: 1 observation, {args.grid_size} x {args.grid_size} grid, "
        f"config {args.config}, response {response_kib:.0f} KiB; {machine}"
    )
    for result in results:
        print(
            f"{result.name:>10}: {result.clients} clients, {len(result.latencies)} requests, "
            f"p50 {1000 * result.p50:.1f} ms, p99 {1000 * result.p99:.1f} ms, "
            f"{result.requests_per_s:.1f} requests/s, {result.errors} errors"
        )
    print(f"targets: p50 <= {1000 * TARGET_P50_S:.0f} ms, p99 <= {1000 * TARGET_P99_S:.0f} ms")
    # Ratios against the one-client phase of the same run, which cancel machine speed.
    reference = results[0]
    for result in results[1:]:
        print(
            f"{result.name} / {reference.name}: p50 x{result.p50 / reference.p50:.2f}, "
            f"requests/s x{result.requests_per_s / reference.requests_per_s:.2f}"
        )
    if args.markdown:
        print()
        print("| clients | requests | p50 (ms) | p99 (ms) | requests/s | errors |")
        print("|---|---|---|---|---|---|")
        for result in results:
            print(
                f"| {result.clients} | {len(result.latencies)} | {1000 * result.p50:.1f} | "
                f"{1000 * result.p99:.1f} | {result.requests_per_s:.1f} | {result.errors} |"
            )


if __name__ == "__main__":
    sys.exit(main())
