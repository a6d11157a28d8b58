"""Throughput of the simulation queue against a local process pool on the same machine.

Runs the same batches twice, with the same seed. The first path is the service: HTTP
API → Redis → one Celery worker with a prefork pool of ``--workers`` processes →
Parquet. The second is a local ``ProcessPoolExecutor`` of ``--workers`` processes that
writes the same files and manifest. Both sides are warmed up first (imports, IRF, JIT
compilation), so the numbers compare steady-state throughput. Prints simulations per
second of both, their ratio (queue / local), and the per-task overhead of the queue,
measured on a second run of one-simulation batches. The two runs of each pair must give
identical files.

    python benchmarks/bench_queue.py                       # shipped default config
    python benchmarks/bench_queue.py --n-simulations 400 --batch-size 50 --markdown

Needs redis-server on PATH; the stack it starts listens on free loopback ports only.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import platform
import socket
import sys
import tempfile
import time
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from alpnre.config import config_from_json, config_to_json, load_config
from alpnre.dataset import read_manifest
from alpnre.runs import record_batches, start_run
from alpnre.simulate import BatchResult, run_batch
from alpnre.stack import stack_down, stack_up

log = logging.getLogger("bench_queue")


@dataclass
class Measurement:
    """Wall time of one run of ``n_simulations`` in ``n_batches`` batches."""

    n_simulations: int
    n_batches: int
    seconds: float
    manifest_hash: str
    batch_seconds: float

    @classmethod
    def from_run(cls, run_dir: str | Path, seconds: float) -> Measurement:
        """Combine a wall time with what the run's manifest records."""
        manifest = read_manifest(run_dir)
        return cls(
            n_simulations=manifest.n_simulations,
            n_batches=manifest.n_batches,
            seconds=seconds,
            manifest_hash=manifest.manifest_hash(),
            batch_seconds=sum(record.seconds or 0.0 for record in manifest.batches),
        )

    @property
    def throughput(self) -> float:
        """Simulations per second."""
        return self.n_simulations / self.seconds


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _run_batch_from_json(
    config_json: str, run_dir: str, index: int, seed: int, batch_size: int, n: int
) -> BatchResult:
    return run_batch(config_from_json(config_json), run_dir, index, seed, batch_size, n)


def run_local(
    pool: Executor, config_json: str, run_dir: Path, n_simulations: int, batch_size: int, seed: int
) -> Measurement:
    """Run all batches in ``pool`` and record each in the manifest, as simulate_run does."""
    start = time.perf_counter()
    manifest = start_run(
        config_from_json(config_json),
        run_dir,
        n_simulations=n_simulations,
        batch_size=batch_size,
        run_seed=seed,
    )
    futures = [
        pool.submit(
            _run_batch_from_json, config_json, str(run_dir), index, seed, batch_size, n_simulations
        )
        for index in range(manifest.n_batches)
    ]
    for future in as_completed(futures):
        record_batches(run_dir, [future.result()])
    return Measurement.from_run(run_dir, time.perf_counter() - start)


def run_queue(
    client: httpx.Client, config: dict[str, Any], n_simulations: int, batch_size: int, seed: int
) -> Measurement:
    """POST a run, wait until it completes and time it with the API's ``finished_at``.

    Polling is slow (every 0.25 s) because on a small machine the polling requests
    would take CPU time from the workers. The end time comes from the progress store,
    on the same machine and clock, so the polling interval does not add to it.
    """
    body = {
        "config": config,
        "n_simulations": n_simulations,
        "batch_size": batch_size,
        "seed": seed,
    }
    start = time.time()
    created = client.post("/v1/simulations", json=body)
    created.raise_for_status()
    run_id = created.json()["run_id"]
    while True:
        run = client.get(f"/v1/simulations/{run_id}").json()
        if run["state"] not in ("queued", "running"):
            break
        time.sleep(0.25)
    if run["state"] != "completed":
        raise RuntimeError(f"run {run_id} ended {run['state']}: {run['error']} {run['errors']}")
    seconds = datetime.fromisoformat(run["finished_at"]).timestamp() - start
    return Measurement.from_run(run["output"]["run_dir"], seconds)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="ngc1275_cta_north_50h", help="shipped config name")
    parser.add_argument("--n-simulations", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument(
        "--tiny-batches", type=int, default=40, help="one-simulation batches of the overhead run"
    )
    parser.add_argument("--workers", type=int, default=2, help="processes on each side")
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating runs of each path; the best counts"
    )
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--markdown", action="store_true", help="also print a results table")
    return parser.parse_args()


def best(measurements: list[Measurement]) -> Measurement:
    """Return the fastest run, because other load on the machine only ever adds time."""
    return min(measurements, key=lambda measurement: measurement.seconds)


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    config = load_config(args.config)
    config_json = config_to_json(config)
    config_mapping = config.model_dump(mode="json")
    # The stack must start its own Redis, not one named in the environment.
    os.environ.pop("ALPNRE_BROKER_URL", None)
    results: dict[str, list[Measurement]] = {"local": [], "queue": [], "local1": [], "queue1": []}

    with tempfile.TemporaryDirectory(prefix="bench-queue-") as scratch:
        root = Path(scratch)
        context = multiprocessing.get_context("spawn")
        state = stack_up(
            workers=1,
            concurrency=args.workers,
            api_port=free_port(),
            redis_port=free_port(),
            data_dir=root / "queue",
            state_dir=root / "stack",
        )
        try:
            with (
                ProcessPoolExecutor(max_workers=args.workers, mp_context=context) as pool,
                httpx.Client(base_url=state.api_url, timeout=30) as client,
            ):
                log.info("warming up the local pool and the workers")
                run_local(pool, config_json, root / "warmup", 2 * args.workers, 1, 0)
                run_queue(client, config_mapping, 2 * args.workers, 1, 0)

                # Alternate the paths so that load from other programs hits both alike.
                for repeat in range(args.repeats):
                    log.info("repeat %d of %d", repeat + 1, args.repeats)
                    results["local"].append(
                        run_local(
                            pool,
                            config_json,
                            root / f"local-{repeat}",
                            args.n_simulations,
                            args.batch_size,
                            args.seed,
                        )
                    )
                    results["queue"].append(
                        run_queue(
                            client, config_mapping, args.n_simulations, args.batch_size, args.seed
                        )
                    )
                    results["local1"].append(
                        run_local(
                            pool,
                            config_json,
                            root / f"local-tiny-{repeat}",
                            args.tiny_batches,
                            1,
                            args.seed,
                        )
                    )
                    results["queue1"].append(
                        run_queue(client, config_mapping, args.tiny_batches, 1, args.seed)
                    )
        finally:
            stack_down(root / "stack")

    report(args, results)
    hashes = {name: {run.manifest_hash for run in runs} for name, runs in results.items()}
    identical = hashes["local"] == hashes["queue"] and hashes["local1"] == hashes["queue1"]
    identical = identical and len(hashes["local"]) == 1 and len(hashes["local1"]) == 1
    print(f"identical files through both paths and all repeats: {'yes' if identical else 'NO'}")
    return 0 if identical else 1


def report(args: argparse.Namespace, results: dict[str, list[Measurement]]) -> None:
    """Print the best runs, the ratio and the per-task overhead."""
    local, queue = best(results["local"]), best(results["queue"])
    local_tiny, queue_tiny = best(results["local1"]), best(results["queue1"])
    ratio = queue.throughput / local.throughput
    overhead_s = (queue_tiny.seconds - local_tiny.seconds) * args.workers / args.tiny_batches
    all_seconds = {
        name: ", ".join(f"{run.seconds:.2f}" for run in runs) for name, runs in results.items()
    }

    print(f"config {args.config}, {args.workers} processes per side, {os.cpu_count()} CPU cores")
    print(f"best of {args.repeats} alternating runs of each path:")
    for name, run in (("local pool", local), ("queue", queue)):
        print(
            f"  {name:10s}: {run.n_simulations} sims in {run.n_batches} batches, "
            f"{run.seconds:.2f} s, {run.throughput:.1f} sims/s, "
            f"{run.batch_seconds:.2f} s inside run_batch"
        )
    print(f"  all runs (s): local {all_seconds['local']}; queue {all_seconds['queue']}")
    print(f"ratio queue/local: {ratio:.3f} (target >= 0.9)")
    print(
        f"per-task overhead: {1000 * overhead_s:.1f} ms per batch and process "
        f"({args.tiny_batches} one-simulation batches: local {local_tiny.seconds:.2f} s, "
        f"queue {queue_tiny.seconds:.2f} s)"
    )
    if args.markdown:
        print()
        print("| path | simulations | batches | best of runs (s) | sims/s |")
        print("|---|---|---|---|---|")
        for name, run in (("local process pool", local), ("API → Redis → Celery", queue)):
            print(
                f"| {name} | {run.n_simulations} | {run.n_batches} | "
                f"{run.seconds:.2f} | {run.throughput:.1f} |"
            )
        print(
            f"\nratio {ratio:.3f}, per-task overhead {1000 * overhead_s:.1f} ms; "
            f"{platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}"
        )


if __name__ == "__main__":
    sys.exit(main())
