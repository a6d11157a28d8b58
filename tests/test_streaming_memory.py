"""Memory of streaming: bounded by the shuffle buffer, not by the size of the data set.

The files are synthetic (random spectra in the Parquet schema of the simulator), which
is all :class:`~alpnre.streaming.ParquetSpectra` reads. Memory is measured as the peak
of numpy allocations (tracemalloc) plus the peak of Arrow's memory pool sampled at every
minibatch. Together they cover the buffers that the stream keeps. A first pass, not
measured, takes the allocations made once per process (caches of numpy and Arrow).
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from alpnre.dataset import spectra_schema
from alpnre.streaming import ParquetSpectra

PARAMETERS = ["m_neV", "g_per_gev"]
N_BINS = 40
SHUFFLE_BUFFER = 1024
ROWS_PER_FILE = 1024
BATCH_SIZE = 128
READ_ROWS = 256


def write_synthetic_files(folder: Path, n_files: int, seed: int = 0) -> list[Path]:
    """Write ``n_files`` Parquet files of ``ROWS_PER_FILE`` random spectra each."""
    folder.mkdir(parents=True, exist_ok=True)
    schema = spectra_schema(PARAMETERS, N_BINS)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(n_files):
        npred = rng.gamma(2.0, 5.0, size=(ROWS_PER_FILE, N_BINS)).astype(np.float32)
        counts = rng.poisson(npred).astype(np.int32)
        first = index * ROWS_PER_FILE
        columns = {
            "sim_index": np.arange(first, first + ROWS_PER_FILE),
            "theta_index": np.arange(first, first + ROWS_PER_FILE),
            "m_neV": rng.uniform(1.0, 100.0, ROWS_PER_FILE),
            "g_per_gev": rng.uniform(1e-12, 1e-10, ROWS_PER_FILE),
            "bfield_seed": rng.integers(0, 2**63, ROWS_PER_FILE, dtype=np.uint64),
            "npred": pa.FixedSizeListArray.from_arrays(pa.array(npred.ravel()), N_BINS),
            "counts": pa.FixedSizeListArray.from_arrays(pa.array(counts.ravel()), N_BINS),
        }
        path = folder / f"batch-{index:06d}.parquet"
        pq.write_table(pa.table(columns, schema=schema), path)
        paths.append(path)
    return paths


def epoch_peaks(files: list[Path], epochs: int) -> list[int]:
    """Peak bytes held while streaming each epoch (numpy peak + Arrow pool peak)."""
    dataset = ParquetSpectra(
        files,
        PARAMETERS,
        batch_size=BATCH_SIZE,
        shuffle_buffer=SHUFFLE_BUFFER,
        seed=1,
        poisson_redraw=True,
        read_rows=READ_ROWS,
    )
    peaks = []
    tracemalloc.start()
    try:
        for epoch in range(epochs):
            dataset.set_epoch(epoch)
            tracemalloc.reset_peak()
            arrow_peak = 0
            n_rows = 0
            for batch in dataset:
                arrow_peak = max(arrow_peak, pa.total_allocated_bytes())
                n_rows += len(batch.x)
            assert n_rows >= len(files) * ROWS_PER_FILE - BATCH_SIZE
            peaks.append(tracemalloc.get_traced_memory()[1] + arrow_peak)
    finally:
        tracemalloc.stop()
    return peaks


@pytest.fixture(scope="module")
def small_and_large(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    """Data sets of 2 and 10 times the shuffle buffer."""
    folder = tmp_path_factory.mktemp("synthetic")
    small = write_synthetic_files(folder / "small", 2 * SHUFFLE_BUFFER // ROWS_PER_FILE)
    large = write_synthetic_files(folder / "large", 10 * SHUFFLE_BUFFER // ROWS_PER_FILE)
    epoch_peaks(small, epochs=1)
    return small, large


def test_peak_memory_independent_of_data_size(
    small_and_large: tuple[list[Path], list[Path]],
) -> None:
    small, large = small_and_large
    small_peak = max(epoch_peaks(small, epochs=1))
    large_peak = max(epoch_peaks(large, epochs=1))

    assert large_peak < 1.1 * small_peak, (small_peak, large_peak)


def test_peak_memory_flat_over_epochs(small_and_large: tuple[list[Path], list[Path]]) -> None:
    _, large = small_and_large
    peaks = epoch_peaks(large, epochs=3)

    assert max(peaks) < 1.1 * peaks[0], peaks
