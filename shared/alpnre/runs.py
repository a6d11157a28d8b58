"""Simulation runs: split a request into batches, run them, keep the manifest current.

The embedded default runs batches in a local process pool, so no broker is needed. The
simulation service runs the same :func:`alpnre.simulate.run_batch` in Celery workers
and uses :func:`start_run` and :func:`record_batches` for the manifest.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import uuid
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

import alpnre
from alpnre.config import AnalysisConfig, config_from_json, config_hash, config_to_json
from alpnre.dataset import (
    BatchRecord,
    RunManifest,
    batch_path,
    file_sha256,
    read_manifest,
    validate_batch_file,
    write_manifest,
)
from alpnre.physics.irf import load_instrument_response
from alpnre.simulate import BatchResult, run_batch

__all__ = ["new_run_id", "record_batches", "simulate_run", "start_run"]

log = logging.getLogger(__name__)


def new_run_id() -> str:
    """Return a fresh run id: ``run-`` and 12 hex digits."""
    return f"run-{uuid.uuid4().hex[:12]}"


def start_run(
    config: AnalysisConfig,
    run_dir: str | Path,
    *,
    n_simulations: int,
    batch_size: int,
    run_seed: int,
    run_id: str | None = None,
) -> RunManifest:
    """Create the run folder and its manifest, or reopen a compatible existing one.

    Reopening lets an interrupted run continue: batches already written are kept.

    Raises
    ------
    ValueError
        When the folder already contains a run with another config, size or seed.
    """
    if n_simulations < 1:
        raise ValueError(f"n_simulations must be >= 1, got {n_simulations}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    run_dir = Path(run_dir)
    manifest_path = run_dir / "manifest.json"
    if manifest_path.exists():
        manifest = read_manifest(run_dir)
        wanted = (config_hash(config), n_simulations, batch_size, run_seed)
        found = (
            manifest.config_hash,
            manifest.n_simulations,
            manifest.batch_size,
            manifest.run_seed,
        )
        if wanted != found:
            raise ValueError(
                f"{run_dir} already contains run {manifest.run_id} with (config hash, "
                f"n_simulations, batch_size, seed) = {found[0][:12], *found[1:]}; choose another "
                "output folder or repeat the same request to resume it"
            )
        log.info("run %s: resuming in %s", manifest.run_id, run_dir)
        return manifest

    instrument = load_instrument_response(config)
    manifest = RunManifest(
        run_id=run_id or new_run_id(),
        config_name=config.name,
        config_hash=config_hash(config),
        config=config.model_dump(mode="json"),
        n_simulations=n_simulations,
        batch_size=batch_size,
        run_seed=run_seed,
        n_batches=-(-n_simulations // batch_size),
        energy_edges_tev=[float(edge) for edge in instrument.energy_edges_tev],
        irf_id=instrument.irf_id,
        irf_is_approximation=instrument.is_approximation,
        library_version=alpnre.__version__,
    )
    write_manifest(run_dir, manifest)
    log.info(
        "run %s: %d simulations in %d batches of %d, seed %d, output %s",
        manifest.run_id,
        n_simulations,
        manifest.n_batches,
        batch_size,
        run_seed,
        run_dir,
    )
    return manifest


def record_batches(run_dir: str | Path, results: Iterable[BatchResult]) -> RunManifest:
    """Add finished batches to the run's manifest (replacing older records of them)."""
    manifest = read_manifest(run_dir)
    records = {record.batch_index: record for record in manifest.batches}
    for result in results:
        records[result.batch_index] = BatchRecord(
            batch_index=result.batch_index,
            file=result.path.name,
            n_rows=result.n_rows,
            sha256=result.sha256,
            seconds=None if result.skipped else result.seconds,
        )
    manifest.batches = [records[index] for index in sorted(records)]
    write_manifest(run_dir, manifest)
    return manifest


def rebuild_manifest(run_dir: str | Path) -> RunManifest:
    """Record every batch file on disk that validates; used after workers wrote in parallel."""
    manifest = read_manifest(run_dir)
    results = []
    for index in range(manifest.n_batches):
        path = batch_path(run_dir, index)
        if not path.exists():
            continue
        info = validate_batch_file(path, config_hash=manifest.config_hash)
        results.append(BatchResult(index, path, info.n_rows, file_sha256(path), 0.0, True))
    return record_batches(run_dir, results)


def _init_pool_worker(level: int) -> None:
    # A spawned process starts without logging handlers; give it the parent's level so
    # its warnings are formatted like the parent's instead of printed bare.
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(name)s [pid %(process)d]: %(message)s"
    )
    # gammaALPs logs every environment it builds at INFO.
    logging.getLogger("gamma_alps").setLevel(max(level, logging.WARNING))


def _run_batch_from_json(
    config_json: str, run_dir: str, batch_index: int, run_seed: int, batch_size: int, n: int
) -> BatchResult:
    # Runs in a pool process: configs travel as JSON, never as live objects.
    return run_batch(config_from_json(config_json), run_dir, batch_index, run_seed, batch_size, n)


def simulate_run(
    config: AnalysisConfig,
    run_dir: str | Path,
    *,
    n_simulations: int,
    batch_size: int,
    run_seed: int,
    workers: int | None = None,
    progress: bool = True,
) -> RunManifest:
    """Run a whole simulation run on this machine with a local process pool.

    Parameters
    ----------
    workers
        Pool size; default: the number of CPU cores. ``1`` runs in this process.
    progress
        Show a progress bar of finished simulations.
    """
    manifest = start_run(
        config, run_dir, n_simulations=n_simulations, batch_size=batch_size, run_seed=run_seed
    )
    workers = workers or os.cpu_count() or 1
    config_json = config_to_json(config)
    pending = [
        index
        for index in range(manifest.n_batches)
        if index not in {record.batch_index for record in manifest.batches}
    ]
    bar = tqdm(total=n_simulations, unit="sim", disable=not progress, desc=manifest.run_id)
    bar.update(manifest.n_rows)
    arguments = [
        (config_json, str(run_dir), index, run_seed, batch_size, n_simulations) for index in pending
    ]
    if workers == 1:
        for args in arguments:
            result = _run_batch_from_json(*args)
            manifest = record_batches(run_dir, [result])
            bar.update(result.n_rows)
    else:
        # spawn, not fork: a forked child of a process that already ran torch or numba
        # threads can deadlock.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=context,
            initializer=_init_pool_worker,
            initargs=(logging.getLogger().getEffectiveLevel(),),
        ) as pool:
            futures = [pool.submit(_run_batch_from_json, *args) for args in arguments]
            for future in as_completed(futures):
                result = future.result()
                manifest = record_batches(run_dir, [result])
                bar.update(result.n_rows)
    bar.close()
    log.info("run %s: complete, %d rows", manifest.run_id, manifest.n_rows)
    return manifest
