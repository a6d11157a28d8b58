"""Parquet storage of simulated spectra: schema, atomic writes, run manifests, validation.

One simulation run is a folder holding one Parquet file per batch
(``batch-000000.parquet``, ...) and a ``manifest.json``. Each row is one simulation: a
float64 column per simulator parameter (the unit is in the name), the B-field seed
``bfield_seed``, and the spectra ``npred`` (expected counts, float32) and ``counts``
(one Poisson draw, int32) as fixed-size lists of length ``n_energy_bins``. The file's
key-value metadata records everything needed to reproduce and to check compatibility:
the config as JSON and its hash, the energy edges, the IRF identity, the library
version, the run seed and the batch index.

Writes are atomic: a file is written under a temporary name in the same folder and then
renamed, so a reader never sees a partial file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BatchInfo",
    "BatchRecord",
    "DatasetError",
    "RunManifest",
    "batch_path",
    "read_manifest",
    "validate_batch_file",
    "write_manifest",
    "write_table_atomic",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
MANIFEST_NAME = "manifest.json"
METADATA_PREFIX = "alpnre."


class DatasetError(ValueError):
    """A simulation file or run that cannot be used; the message names the file."""


def batch_path(run_dir: str | Path, batch_index: int) -> Path:
    """Return the path of batch ``batch_index`` in ``run_dir``: a function of both only."""
    if batch_index < 0:
        raise ValueError(f"batch_index must be >= 0, got {batch_index}")
    return Path(run_dir) / f"batch-{batch_index:06d}.parquet"


def spectra_schema(parameter_names: list[str], n_energy_bins: int) -> pa.Schema:
    """Arrow schema of a batch file for the given parameters and energy binning."""
    fields = [pa.field("sim_index", pa.int64()), pa.field("theta_index", pa.int64())]
    fields += [pa.field(name, pa.float64()) for name in parameter_names]
    fields += [
        pa.field("bfield_seed", pa.uint64()),
        pa.field("npred", pa.list_(pa.float32(), n_energy_bins)),
        pa.field("counts", pa.list_(pa.int32(), n_energy_bins)),
    ]
    return pa.schema(fields)


def encode_metadata(values: dict[str, Any]) -> dict[bytes, bytes]:
    """Encode metadata values as JSON under the ``alpnre.`` prefix."""
    return {
        (METADATA_PREFIX + key).encode(): json.dumps(value, sort_keys=True).encode()
        for key, value in values.items()
    }


def decode_metadata(raw: dict[bytes, bytes] | None) -> dict[str, Any]:
    """Decode the ``alpnre.`` metadata of a Parquet schema into Python values."""
    decoded: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        name = key.decode()
        if name.startswith(METADATA_PREFIX):
            decoded[name.removeprefix(METADATA_PREFIX)] = json.loads(value.decode())
    return decoded


def write_table_atomic(table: pa.Table, path: str | Path) -> str:
    """Write ``table`` to ``path`` atomically and return the file's SHA-256.

    The table is written to a hidden temporary file in the same folder, flushed to disk
    and renamed over ``path``. A crash therefore leaves at most a stray temporary file,
    never a truncated ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        pq.write_table(table, temporary, compression="zstd")
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return file_sha256(path)


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class BatchInfo:
    """Summary of a validated batch file: path, row count, binning and metadata."""

    path: Path
    n_rows: int
    n_energy_bins: int
    metadata: dict[str, Any]

    @property
    def config_hash(self) -> str:
        return str(self.metadata["config_hash"])


def validate_batch_file(
    path: str | Path,
    *,
    expected_rows: int | None = None,
    config_hash: str | None = None,
    check_values: bool = False,
) -> BatchInfo:
    """Check that a batch file is complete and consistent, and describe it.

    Parameters
    ----------
    path
        Parquet file written by :func:`write_table_atomic`.
    expected_rows
        When given, the number of rows the file must hold.
    config_hash
        When given, the config hash the file's metadata must carry.
    check_values
        Also read the spectra and reject NaN, infinite or negative values (slower).

    Raises
    ------
    DatasetError
        Naming the file and what is wrong: unreadable or truncated Parquet, missing
        metadata or columns, wrong spectrum length, unexpected row count or config.
    """
    path = Path(path)
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as error:
        raise DatasetError(f"{path}: not a readable Parquet file ({error})") from None
    metadata = decode_metadata(parquet.schema_arrow.metadata)
    for key in ("config", "config_hash", "energy_edges_tev", "schema_version"):
        if key not in metadata:
            raise DatasetError(f"{path}: missing metadata key {key!r}; was it written by alpnre?")
    n_bins = len(metadata["energy_edges_tev"]) - 1
    schema = parquet.schema_arrow
    for column in ("npred", "counts", "bfield_seed"):
        if column not in schema.names:
            raise DatasetError(f"{path}: missing column {column!r}")
        if column != "bfield_seed" and schema.field(column).type.list_size != n_bins:
            raise DatasetError(
                f"{path}: column {column!r} has spectra of length "
                f"{schema.field(column).type.list_size}, the energy edges give {n_bins} bins"
            )
    n_rows = parquet.metadata.num_rows
    if expected_rows is not None and n_rows != expected_rows:
        raise DatasetError(f"{path}: contains {n_rows} rows, expected {expected_rows}")
    if config_hash is not None and metadata["config_hash"] != config_hash:
        raise DatasetError(
            f"{path}: written for config hash {metadata['config_hash'][:12]}, expected "
            f"{config_hash[:12]}; runs with different configs cannot be mixed"
        )
    if check_values:
        _check_spectra_values(path, parquet)
    return BatchInfo(path=path, n_rows=n_rows, n_energy_bins=n_bins, metadata=metadata)


def _check_spectra_values(path: Path, parquet: pq.ParquetFile) -> None:
    table = parquet.read(columns=["npred", "counts"])
    npred = table.column("npred").combine_chunks().flatten().to_numpy()
    bad_rows = int(np.count_nonzero(~np.isfinite(npred)))
    if bad_rows:
        raise DatasetError(f"{path}: {bad_rows} npred values are NaN or infinite")
    if np.any(npred < 0):
        raise DatasetError(f"{path}: negative npred values")


class BatchRecord(BaseModel):
    """One finished batch of a run."""

    model_config = ConfigDict(extra="forbid")

    batch_index: int = Field(ge=0)
    file: str
    n_rows: int = Field(ge=0)
    sha256: str
    seconds: float | None = None


class RunManifest(BaseModel):
    """``manifest.json`` of a simulation run: what was asked for and what exists."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    config_name: str
    config_hash: str
    config: dict[str, Any]
    n_simulations: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    run_seed: int
    n_batches: int = Field(ge=1)
    energy_edges_tev: list[float]
    irf_id: str | None = None
    irf_is_approximation: bool | None = None
    library_version: str
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    batches: list[BatchRecord] = Field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len({record.batch_index for record in self.batches}) == self.n_batches

    @property
    def n_rows(self) -> int:
        return sum(record.n_rows for record in self.batches)

    def manifest_hash(self) -> str:
        """SHA-256 of the manifest's batch checksums and config hash: the data identity."""
        parts = [self.config_hash] + [
            f"{record.batch_index}:{record.sha256}"
            for record in sorted(self.batches, key=lambda r: r.batch_index)
        ]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def write_manifest(run_dir: str | Path, manifest: RunManifest) -> Path:
    """Write ``manifest.json`` atomically into ``run_dir``."""
    path = Path(run_dir) / MANIFEST_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    temporary.write_text(manifest.model_dump_json(indent=2))
    os.replace(temporary, path)
    return path


def read_manifest(run_dir: str | Path) -> RunManifest:
    """Read the manifest of a run folder.

    Raises
    ------
    DatasetError
        When the folder has no manifest or it is not valid.
    """
    path = Path(run_dir) / MANIFEST_NAME
    if not path.exists():
        raise DatasetError(
            f"{run_dir}: no {MANIFEST_NAME}; is this a simulation run folder written by "
            "'alpnre simulate' or the simulation service?"
        )
    try:
        return RunManifest.model_validate_json(path.read_text())
    except ValueError as error:
        raise DatasetError(f"{path}: invalid manifest ({error})") from None


def run_batch_files(run_dir: str | Path) -> list[Path]:
    """Batch files of a run in batch order, taken from its manifest."""
    manifest = read_manifest(run_dir)
    records = sorted(manifest.batches, key=lambda record: record.batch_index)
    return [Path(run_dir) / record.file for record in records]
