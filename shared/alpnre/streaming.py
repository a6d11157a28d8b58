"""Stream simulated spectra from Parquet files into torch minibatches.

Training on ~10^6 spectra must not need them in memory, so batches are read file by
file with pyarrow, passed through a shuffle buffer and emitted as ready-made
minibatches. The order of the minibatches is a function of ``(seed, epoch)`` only,
which makes an interrupted training resumable to the same result.

swyft-style NRE draws its marginal (negative) pairs by rolling θ within a minibatch, so
minibatches must be well shuffled: adjacent rows of a file can share θ when several
B-field realisations are simulated per θ.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from alpnre.dataset import DatasetError

__all__ = ["ParquetSpectra", "SpectraBatch", "read_spectra"]

log = logging.getLogger(__name__)


@dataclass
class SpectraBatch:
    """A minibatch: counts x of shape (B, n_bins) and parameters of shape (B, n_params)."""

    x: torch.Tensor
    theta: torch.Tensor


def _table_to_arrays(
    table: pa.Table, parameter_names: Sequence[str], column: str
) -> tuple[np.ndarray, np.ndarray]:
    spectra = table.column(column).combine_chunks()
    width = spectra.type.list_size
    x = spectra.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    theta = np.stack([table.column(name).to_numpy() for name in parameter_names], axis=1).astype(
        np.float64
    )
    return x, theta


def read_spectra(
    paths: Sequence[str | Path], parameter_names: Sequence[str], column: str = "counts"
) -> tuple[np.ndarray, np.ndarray]:
    """Read whole files into memory: x of shape (N, n_bins) and θ of shape (N, n_params)."""
    xs, thetas = [], []
    for path in paths:
        table = pq.read_table(path, columns=[column, *parameter_names])
        x, theta = _table_to_arrays(table, parameter_names, column)
        xs.append(x)
        thetas.append(theta)
    return np.concatenate(xs), np.concatenate(thetas)


def _bad_rows(x: np.ndarray, theta: np.ndarray) -> np.ndarray:
    return ~(np.isfinite(x).all(axis=1) & np.isfinite(theta).all(axis=1))


class ParquetSpectra(IterableDataset):  # type: ignore[type-arg]
    """Minibatches of (x, θ) streamed from Parquet files through a shuffle buffer.

    Parameters
    ----------
    paths
        Batch files, all written for the same config.
    parameter_names
        Parquet columns that form θ, in order.
    batch_size
        Rows per emitted minibatch; the last, smaller minibatch of an epoch is dropped
        so that every minibatch has enough rows for the rolled negative pairs.
    shuffle_buffer
        Rows held in memory for shuffling. Memory is bounded by this number (plus one
        Parquet record batch), whatever the size of the data set.
    seed
        Together with the epoch (see :meth:`set_epoch`), fixes the file order, the
        shuffling and the Poisson redraws.
    poisson_redraw
        Draw fresh counts from ``npred`` instead of using the stored ``counts``: a new
        noise realisation of each spectrum every epoch.
    drop_nonfinite
        Exclude rows with NaN or infinite values (and count them in
        :attr:`n_dropped`) instead of raising. Dropping silently would bias the
        posterior, so the default is to raise.
    transform_theta
        Maps the raw θ array (N, n_params) to the network's parameter space.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        parameter_names: Sequence[str],
        *,
        batch_size: int = 256,
        shuffle_buffer: int = 16384,
        seed: int = 0,
        poisson_redraw: bool = False,
        drop_nonfinite: bool = False,
        shuffle: bool = True,
        transform_theta: object | None = None,
        read_rows: int = 4096,
    ) -> None:
        super().__init__()
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 for rolled negative pairs, got {batch_size}")
        if shuffle_buffer < batch_size:
            raise ValueError(
                f"shuffle_buffer ({shuffle_buffer}) must be at least batch_size ({batch_size})"
            )
        if not paths:
            raise ValueError("no Parquet files to stream: pass at least one batch file")
        self.paths = [Path(path) for path in paths]
        self.parameter_names = list(parameter_names)
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.poisson_redraw = poisson_redraw
        self.drop_nonfinite = drop_nonfinite
        self.shuffle = shuffle
        self.transform_theta = transform_theta
        self.read_rows = read_rows
        self.epoch = 0
        self.n_dropped = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose file order, shuffling and redraws are produced next."""
        self.epoch = epoch

    def _worker_files(self, rng: np.random.Generator) -> list[Path]:
        order = rng.permutation(len(self.paths)) if self.shuffle else np.arange(len(self.paths))
        files = [self.paths[i] for i in order]
        info = get_worker_info()
        if info is None:
            return files
        return files[info.id :: info.num_workers]

    def _read_file(
        self, path: Path, rng: np.random.Generator
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        column = "npred" if self.poisson_redraw else "counts"
        try:
            parquet = pq.ParquetFile(path)
            for record_batch in parquet.iter_batches(
                batch_size=self.read_rows, columns=[column, *self.parameter_names]
            ):
                table = pa.Table.from_batches([record_batch])
                x, theta = _table_to_arrays(table, self.parameter_names, column)
                yield self._checked(path, x, theta, rng)
        except (OSError, pa.ArrowInvalid) as error:
            raise DatasetError(f"{path}: corrupt or partial Parquet file ({error})") from None

    def _checked(
        self, path: Path, x: np.ndarray, theta: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        bad = _bad_rows(x.astype(np.float64), theta)
        n_bad = int(bad.sum())
        if n_bad and not self.drop_nonfinite:
            raise DatasetError(
                f"{path}: {n_bad} rows contain NaN or infinite values; training stops because "
                "dropping them silently would bias the posterior (pass drop_nonfinite / "
                "--drop-nonfinite to exclude them explicitly)"
            )
        if n_bad:
            log.warning("%s: excluded %d rows with NaN or infinite values", path, n_bad)
            self.n_dropped += n_bad
            x, theta = x[~bad], theta[~bad]
        if self.poisson_redraw:
            x = rng.poisson(np.clip(x, 0.0, None))
        return x, theta

    def _emit(self, x: np.ndarray, theta: np.ndarray, n_batches: int) -> Iterator[SpectraBatch]:
        for i in range(n_batches):
            rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
            theta_rows = theta[rows]
            if self.transform_theta is not None:
                theta_rows = self.transform_theta(theta_rows)  # type: ignore[operator]
            yield SpectraBatch(
                x=torch.as_tensor(x[rows], dtype=torch.float32),
                theta=torch.as_tensor(theta_rows, dtype=torch.float32),
            )

    def __iter__(self) -> Iterator[SpectraBatch]:
        info = get_worker_info()
        worker_id = 0 if info is None else info.id
        file_rng = np.random.default_rng([self.seed, self.epoch])
        rng = np.random.default_rng([self.seed, self.epoch, worker_id, 1])
        # A separate stream for the Poisson redraws keeps the row order independent of them.
        noise_rng = np.random.default_rng([self.seed, self.epoch, worker_id, 2])
        buffer_x: list[np.ndarray] = []
        buffer_theta: list[np.ndarray] = []
        buffered = 0

        for path in self._worker_files(file_rng):
            for x, theta in self._read_file(path, noise_rng):
                buffer_x.append(x)
                buffer_theta.append(theta)
                buffered += len(x)
                if buffered < self.shuffle_buffer:
                    continue
                # Shuffle the full buffer, emit about half of it, keep the rest so that
                # rows of the next file mix with rows of this one.
                all_x, all_theta = self._shuffled(buffer_x, buffer_theta, rng)
                n_emit = max(1, (buffered - self.shuffle_buffer // 2) // self.batch_size)
                emitted = n_emit * self.batch_size
                yield from self._emit(all_x[:emitted], all_theta[:emitted], n_emit)
                buffer_x, buffer_theta = [all_x[emitted:]], [all_theta[emitted:]]
                buffered -= emitted

        if buffered >= self.batch_size:
            all_x, all_theta = self._shuffled(buffer_x, buffer_theta, rng)
            yield from self._emit(all_x, all_theta, buffered // self.batch_size)

    def _shuffled(
        self, xs: list[np.ndarray], thetas: list[np.ndarray], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate(xs)
        theta = np.concatenate(thetas)
        if not self.shuffle:
            return x, theta
        order = rng.permutation(len(x))
        return x[order], theta[order]
