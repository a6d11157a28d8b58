"""Training throughput streamed from Parquet against the same minibatches held in memory.

Trains the standard estimator (default network of ``TrainingConfig``) for ``--epochs``
epochs twice per repeat, from the same initial weights: once streaming the files through
:class:`~alpnre.streaming.ParquetSpectra` (read, shuffle buffer, Poisson redraw), once
over the identical minibatches materialised beforehand as tensors. Both use the
training loop of :func:`alpnre.training.train_estimator`. Prints training samples per
second of both and their ratio (streamed / in memory). The repeats alternate, so the
load of other processes falls on both paths evenly, and the medians are reported.

It also samples the process's resident memory (VmRSS, every 10 ms) during streamed
training epochs and prints the peak of each epoch. With the synthetic data set of
``--size-factor`` times the shuffle buffer, a flat peak shows that the data set is never
held in memory.

    python benchmarks/bench_training.py                       # synthetic data, 200 bins
    python benchmarks/bench_training.py --run runs/run-0123456789ab --markdown
    python benchmarks/bench_training.py --threads 1 --shuffle-buffer 1024   # busy machine

On a machine whose cores other processes keep busy, torch's default of one thread per
core can make every training step several times slower; ``--threads 1`` avoids that.

Without ``--run`` the files are synthetic: θ drawn from the default config's priors and
random spectra in the simulator's Parquet schema. The cost of a training step does not
depend on the values, so throughput and memory match those of simulated data.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from alpnre.config import AnalysisConfig, load_config
from alpnre.dataset import spectra_schema
from alpnre.nre import EstimatorSpec, RatioEstimator, TrainingConfig, default_heads, parameter_axes
from alpnre.streaming import ParquetSpectra, SpectraBatch
from alpnre.training import _epoch_loss, input_normalisation, load_training_data

log = logging.getLogger("bench_training")

DEFAULT_CONFIG = "ngc1275_cta_north_50h"


def write_synthetic_run(
    config: AnalysisConfig, folder: Path, n_rows: int, rows_per_file: int, seed: int
) -> list[Path]:
    """Write ``n_rows`` random spectra with θ from the config's priors into Parquet files."""
    folder.mkdir(parents=True, exist_ok=True)
    names = config.parameter_names
    n_bins = config.observation.n_energy_bins
    schema = spectra_schema(names, n_bins)
    rng = np.random.default_rng(seed)
    paths = []
    for index, first in enumerate(range(0, n_rows, rows_per_file)):
        rows = min(rows_per_file, n_rows - first)
        npred = rng.gamma(2.0, 20.0, size=(rows, n_bins)).astype(np.float32)
        counts = rng.poisson(npred).astype(np.int32)
        columns: dict[str, Any] = {
            "sim_index": np.arange(first, first + rows),
            "theta_index": np.arange(first, first + rows),
            "bfield_seed": rng.integers(0, 2**63, rows, dtype=np.uint64),
            "npred": pa.FixedSizeListArray.from_arrays(pa.array(npred.ravel()), n_bins),
            "counts": pa.FixedSizeListArray.from_arrays(pa.array(counts.ravel()), n_bins),
        }
        for name in names:
            columns[name] = config.prior(name).sample(rng, rows).astype(np.float64)
        path = folder / f"batch-{index:06d}.parquet"
        pq.write_table(pa.table(columns, schema=schema), path)
        paths.append(path)
    return paths


@dataclass
class Setup:
    """Files, model and settings shared by both measurements."""

    files: list[Path]
    spec: EstimatorSpec
    training: TrainingConfig
    initial_state: dict[str, torch.Tensor]

    def dataset(self) -> ParquetSpectra:
        """Build the training stream as :func:`alpnre.training.train_estimator` does."""
        return ParquetSpectra(
            self.files,
            self.spec.parameter_names,
            batch_size=self.training.batch_size,
            shuffle_buffer=self.training.shuffle_buffer,
            seed=self.training.seed,
            poisson_redraw=self.training.poisson_redraw,
            transform_theta=self.spec.transform_theta,
        )

    def fresh_model(self) -> tuple[RatioEstimator, torch.optim.Optimizer]:
        """Return a model with the shared initial weights, and a new optimiser."""
        model = RatioEstimator(self.spec)
        model.load_state_dict(copy.deepcopy(self.initial_state))
        model.train()
        optimiser = torch.optim.AdamW(
            model.parameters(),
            lr=self.training.learning_rate,
            weight_decay=self.training.weight_decay,
        )
        return model, optimiser


def build_setup(config: AnalysisConfig, files: list[Path], training: TrainingConfig) -> Setup:
    names, one_dim, two_dim = default_heads(config)
    n_bins = pq.read_schema(files[0]).field("counts").type.list_size
    spec = EstimatorSpec(
        n_bins=n_bins,
        axes=parameter_axes(config, names),
        one_dim=one_dim,
        two_dim=two_dim,
        training=training,
    )
    torch.manual_seed(training.seed)
    model = RatioEstimator(spec)
    plain = ParquetSpectra(
        files, names, batch_size=training.batch_size, shuffle_buffer=training.shuffle_buffer
    )
    model.set_normalisation(*input_normalisation(plain))
    return Setup(files, spec, training, copy.deepcopy(model.state_dict()))


@dataclass
class Timing:
    """Wall-clock and CPU seconds of this process (CPU time excludes DataLoader workers)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0

    @contextmanager
    def measure(self) -> Iterator[None]:
        """Add the wall-clock and CPU time of the block."""
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall_s += time.perf_counter() - wall
        self.cpu_s += time.process_time() - cpu


def train_epochs(
    setup: Setup, epoch_batches: Iterable[Iterable[SpectraBatch]], num_workers: int
) -> Timing:
    """Train one epoch per iterable of minibatches from the initial weights, timed."""
    model, optimiser = setup.fresh_model()
    device = torch.device("cpu")
    timing = Timing()
    for epoch, batches in enumerate(epoch_batches):
        torch.manual_seed(setup.training.seed + epoch)
        with timing.measure():
            # The training's own epoch loop: a DataLoader over the minibatches, with
            # forward, loss, backward and optimiser step.
            _epoch_loss(
                model,
                batches,  # type: ignore[arg-type]
                device,
                setup.training.bnre_lambda,
                optimiser,
                num_workers,
            )
    return timing


def _streamed_epochs(setup: Setup, epochs: int) -> Iterator[ParquetSpectra]:
    dataset = setup.dataset()
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        yield dataset


def materialise(setup: Setup, epochs: int) -> list[list[SpectraBatch]]:
    """Return the minibatches of every epoch as tensors, exactly as the stream yields them."""
    return [list(dataset) for dataset in _streamed_epochs(setup, epochs)]


@dataclass
class Throughput:
    """Samples per second of each repeat, by wall-clock and by CPU time."""

    samples: int
    streamed: list[Timing]
    in_memory: list[Timing]
    stream_only: list[Timing]

    def rate(self, timings: list[Timing], clock: str) -> float:
        """Median samples per second over the repeats; ``clock`` is 'wall_s' or 'cpu_s'."""
        return statistics.median(self.samples / getattr(timing, clock) for timing in timings)

    def ratio(self, clock: str) -> float:
        """Median of the per-repeat ratios streamed / in memory."""
        return statistics.median(
            getattr(memory, clock) / getattr(streamed, clock)
            for streamed, memory in zip(self.streamed, self.in_memory, strict=True)
        )


def measure_throughput(setup: Setup, epochs: int, repeats: int) -> Throughput:
    in_memory_batches = materialise(setup, epochs)
    # Both paths see exactly these minibatches, so they train on the same samples.
    samples = sum(len(batch.x) for batches in in_memory_batches for batch in batches)
    result = Throughput(samples, [], [], [])
    for repeat in range(repeats):
        result.in_memory.append(train_epochs(setup, in_memory_batches, num_workers=0))
        result.streamed.append(
            train_epochs(setup, _streamed_epochs(setup, epochs), setup.training.num_workers)
        )
        stream_only = Timing()
        with stream_only.measure():
            for dataset in _streamed_epochs(setup, epochs):
                for _ in dataset:
                    pass
        result.stream_only.append(stream_only)
        log.info(
            "repeat %d: in memory %.0f, streamed %.0f, stream without training %.0f samples/s",
            repeat,
            samples / result.in_memory[-1].wall_s,
            samples / result.streamed[-1].wall_s,
            samples / stream_only.wall_s,
        )
    return result


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def rss_sampler(interval_s: float = 0.01) -> Iterator[list[int]]:
    """Sample this process's resident memory into a list until the block ends."""
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(_rss_bytes())
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def measure_peak_rss(setup: Setup, epochs: int) -> tuple[int, list[int]]:
    """RSS before training and the peak RSS of each streamed training epoch (bytes)."""
    model, optimiser = setup.fresh_model()
    baseline = _rss_bytes()
    peaks = []
    for dataset in _streamed_epochs(setup, epochs):
        with rss_sampler() as samples:
            _epoch_loss(
                model, dataset, torch.device("cpu"), setup.training.bnre_lambda, optimiser, 0
            )
        peaks.append(max(samples))
    return baseline, peaks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=None, help="simulation run folder to use")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="config of the synthetic data")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per minibatch")
    parser.add_argument(
        "--shuffle-buffer", type=int, default=4096, help="rows in the shuffle buffer"
    )
    parser.add_argument(
        "--size-factor",
        type=int,
        default=10,
        help="synthetic data set size, in multiples of the shuffle buffer",
    )
    parser.add_argument("--epochs", type=int, default=2, help="epochs per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each path")
    parser.add_argument(
        "--num-workers", type=int, default=0, help="DataLoader processes of the streamed path"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown section")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    training = TrainingConfig(
        batch_size=args.batch_size,
        shuffle_buffer=args.shuffle_buffer,
        num_workers=args.num_workers,
        device="cpu",
        seed=1,
    )

    with tempfile.TemporaryDirectory(prefix="bench-training-") as scratch:
        if args.run is not None:
            data = load_training_data([args.run])
            config, files = data.config, data.files
        else:
            config = load_config(args.config)
            n_rows = args.size_factor * args.shuffle_buffer
            files = write_synthetic_run(
                config, Path(scratch), n_rows, rows_per_file=args.shuffle_buffer // 2, seed=0
            )
        setup = build_setup(config, files, training)
        n_rows = sum(pq.read_metadata(path).num_rows for path in files)
        log.info("%d rows in %d files, %d energy bins", n_rows, len(files), setup.spec.n_bins)

        # Memory first: the materialised minibatches of the throughput measurement
        # would stay in the allocator's pools and raise the baseline.
        baseline, peaks = measure_peak_rss(setup, max(args.epochs, 3))
        throughput = measure_throughput(setup, args.epochs, args.repeats)

    report = {
        "rows": n_rows,
        "files": len(files),
        "bins": setup.spec.n_bins,
        "baseline_mb": baseline / 2**20,
        "peaks_mb": [peak / 2**20 for peak in peaks],
        "load_average": os.getloadavg()[0],
    }
    for clock in ("wall_s", "cpu_s"):
        report[f"streamed_{clock}"] = throughput.rate(throughput.streamed, clock)
        report[f"in_memory_{clock}"] = throughput.rate(throughput.in_memory, clock)
        report[f"stream_only_{clock}"] = throughput.rate(throughput.stream_only, clock)
        report[f"ratio_{clock}"] = throughput.ratio(clock)
    print(format_markdown(args, report) if args.markdown else format_text(report))
    return 0


def format_text(report: dict[str, Any]) -> str:
    peaks = ", ".join(f"{peak:.0f}" for peak in report["peaks_mb"])
    lines = []
    for clock, label in (("wall_s", "wall-clock"), ("cpu_s", "CPU time")):
        lines.append(
            f"{label}: streamed {report[f'streamed_{clock}']:.0f} samples/s, in memory "
            f"{report[f'in_memory_{clock}']:.0f} samples/s, ratio {report[f'ratio_{clock}']:.3f}; "
            f"stream alone {report[f'stream_only_{clock}']:.0f} samples/s"
        )
    lines.append(f"RSS {report['baseline_mb']:.0f} MB before training, peak per epoch: {peaks} MB")
    return "\n".join(lines)


def format_markdown(args: argparse.Namespace, report: dict[str, Any]) -> str:
    source = str(args.run) if args.run else f"synthetic, {args.config} priors"
    peaks = ", ".join(f"{peak:.0f}" for peak in report["peaks_mb"])
    rows = [
        f"Measured {datetime.now():%Y-%m-%d} on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, Python {sys.version.split()[0]}; load average "
        f"{report['load_average']:.1f} when it finished (other processes share the cores). "
        f"Medians of {args.repeats} repeats of {args.epochs} epochs.",
        "",
        f"Data: {source}, {report['rows']} rows in {report['files']} files, "
        f"{report['bins']} energy bins; batch size {args.batch_size}, shuffle buffer "
        f"{args.shuffle_buffer} rows.",
        "",
        "| quantity | by wall-clock | by CPU time |",
        "|---|---:|---:|",
    ]
    for key, label in (
        ("streamed", "streamed from Parquet, samples/s"),
        ("in_memory", "same minibatches in memory, samples/s"),
        ("stream_only", "stream without training, samples/s"),
    ):
        rows.append(f"| {label} | {report[f'{key}_wall_s']:.0f} | {report[f'{key}_cpu_s']:.0f} |")
    rows += [
        f"| ratio streamed / in memory | {report['ratio_wall_s']:.3f} | "
        f"{report['ratio_cpu_s']:.3f} |",
        "",
        f"Resident memory: {report['baseline_mb']:.0f} MB before training; peak of each "
        f"streamed epoch on the {report['rows']} rows: {peaks} MB.",
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
